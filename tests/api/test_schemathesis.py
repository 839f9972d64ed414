"""Schemathesis against the running gateway, on its own documents (GET /openapi.json of each port): every
operation of the console API and the LLM API is sent generated requests, valid and invalid, and every
answer is checked: no 500, a status the document lists, an answer that matches its schema (and its
headers), valid data accepted, invalid data refused, 405 with Allow for other methods, 401 without a token.

Bounded and deterministic: a fixed number of examples per operation, generated without randomness
(``generation.deterministic``), one worker. A failure prints Schemathesis' report, with a curl command
that reproduces each finding.

Not run, with the reason:
- the stateful phase (chains of calls following the document's links): it would find the run's own
  access token in ``GET /v1/me/access-tokens`` and revoke it, and every later call would be a 401;
- the checks ``use_after_free``, ``ensure_resource_availability`` and ``object_level_authorization``:
  they need the stateful phase (and a second user) to mean anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import Served

MAX_EXAMPLES = 25
ROOT = Path(__file__).resolve().parents[2]
SKIPPED_CHECKS = ("use_after_free", "ensure_resource_availability", "object_level_authorization")


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


def run(tmp_path: Path, url: str, token: str, parameters: dict[str, str],
        operations: list[dict[str, object]] | None = None) -> None:
    """Run ``schemathesis run`` on the document at ``url``; fail the test with its report if it finds anything."""
    lines = [
        f"hooks = {_toml('tests.api.st_hooks')}", "workers = 1",
        f"headers = {_toml({'Authorization': f'Bearer {token}'})}",
        "[generation]", f"max-examples = {MAX_EXAMPLES}", "deterministic = true", "database = \"none\"",
        "[phases.stateful]", "enabled = false",
        *(f"[checks.{name}]\nenabled = false" for name in SKIPPED_CHECKS),
        "[parameters]", *(f"{_toml(k)} = {_toml(v)}" for k, v in parameters.items()),
    ]
    for op in operations or []:
        lines.append("[[operations]]")
        lines.extend(f"{_toml(k)} = {_toml(v)}" for k, v in op.items())
    config = tmp_path / "schemathesis.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", url, "--no-color",
         "--checks", "all", "--request-timeout", "20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]
    assert "Tested:" in report, report[-5000:]


def test_console_api_conforms_to_its_document(served: Served, tmp_path: Path) -> None:
    second = served.owner.project("members and settings")
    run(tmp_path, f"{served.gw.console_url}/openapi.json", served.owner.token,
        {"path.projectId": served.project_id, "path.keyId": served.key_id},
        # Project settings and members on a project of their own: narrowing a project's models would make
        # a later mint in it a 400 (allowed_models must lie within them), a rule across two resources.
        [{"include-path-regex": r"^/v1/projects/\{projectId\}(/members.*)?$",
          "parameters": {"path.projectId": second["id"]}}])


def test_llm_api_conforms_to_its_document(served: Served, tmp_path: Path) -> None:
    run(tmp_path, f"http://127.0.0.1:{served.gw.llm_port}/openapi.json", served.secret, {})
    assert served.upstream.requests, "no generated request reached the model server"
