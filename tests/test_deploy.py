"""deploy/: the systemd unit, the Dockerfile and the compose example, kept working by building what can be
built here. There is no Docker daemon on these machines, so the Dockerfile's build stage is run step by
step in a fresh virtualenv (the same commands, the same lock file), and the image's entry point and
health check are run from it; systemd checks the unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quotagate.config import parse_config
from tests.support import free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package has it)", pytrace=False)
    env_file = tmp_path / "quotagate.env"
    env_file.write_text("QUOTAGATE_LOG_LEVEL=info\n")
    unit = (DEPLOY / "quotagate.service").read_text()
    assert "ExecStart=/opt/quotagate/.venv/bin/quotagate serve" in unit
    # The paths of an installed machine, pointed at this checkout's (verify checks that they exist).
    local = unit.replace("/opt/quotagate/.venv/bin/quotagate", str(Path(sys.executable).parent / "quotagate"))
    local = local.replace("/etc/quotagate/quotagate.env", str(env_file))
    path = tmp_path / "quotagate.service"
    path.write_text(local)
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 even for unknown keys and bad values; it says so on stderr.
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def _dockerfile_steps() -> tuple[list[str], list[str]]:
    """(the sources the Dockerfile COPYs from the build context, the RUN commands of its build stage)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    build = text.split("\nFROM ")[1]  # the first stage (the comments before it are [0])
    copies = [src for line in build.splitlines() if line.startswith("COPY ")
              for src in line.split()[1:-1] if not src.startswith("--")]
    runs = [line[4:].strip() for line in build.splitlines() if line.startswith("RUN ")]
    return copies, runs


@pytest.mark.sqlite_only
def test_the_dockerfiles_build_stage_runs_and_its_image_serves(tmp_path: Path) -> None:
    copies, runs = _dockerfile_steps()
    assert copies and runs
    work = tmp_path / "opt-quotagate"
    work.mkdir()
    for src in copies:  # COPY: every source exists in the build context (the repository root)
        assert (ROOT / src).exists(), src
        target = work / src
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / src, target)
    for command in runs:  # RUN, with this machine's Python 3.11 as the image's
        command = re.sub(r"^python ", f"{sys.executable} ", command)
        done = subprocess.run(command, shell=True, cwd=work, capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    # The image's ENTRYPOINT and CMD (quotagate serve), with its ENV, and its HEALTHCHECK.
    port = free_port()
    data = tmp_path / "data"
    env = {"PATH": f"{work / '.venv' / 'bin'}:/usr/bin:/bin", "QUOTAGATE_DATA_DIR": str(data),
           "QUOTAGATE_HOST": "127.0.0.1", "QUOTAGATE_LLM_PORT": str(port),
           "QUOTAGATE_CONSOLE_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    sim = tmp_path / "sim.toml"
    demo = (ROOT / "src" / "quotagate" / "demo.toml").read_text().replace("8402", str(free_port()))
    sim.write_text(demo.replace('"simulator/tokenizer/', f'"{ROOT}/src/quotagate/simulator/tokenizer/'))
    env["QUOTAGATE_CONFIG"] = str(sim)
    proc = subprocess.Popen([str(work / ".venv" / "bin" / "quotagate"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        health = re.search(r'HEALTHCHECK .* CMD (.+)$', (DEPLOY / "Dockerfile").read_text(), re.M)
        assert health is not None
        check = health.group(1).replace("python ", f"{work / '.venv' / 'bin' / 'python'} ", 1)
        assert subprocess.run(check.replace("8401", str(port)), shell=True, timeout=30).returncode == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_compose_examples_files_exist_and_the_catalog_is_valid() -> None:
    compose = (DEPLOY / "compose.yaml").read_text()
    for mounted in re.findall(r'"\./([^:"]+):', compose):
        assert (DEPLOY / mounted).is_file(), mounted
    assert "dockerfile: deploy/Dockerfile" in compose and (ROOT / "deploy" / "Dockerfile").is_file()
    config = parse_config((DEPLOY / "models.example.toml").read_text(), source="models.example.toml")
    assert config.models["qwen3.6-27b"].upstream_model == "Qwen/Qwen3.6-27B-Instruct"
