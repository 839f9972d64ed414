"""Helpers for tests: free ports, a quotagate server subprocess, the CLI, a console API client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and never one this test run has handed out before (the kernel may
    hand a just-closed port to the next ``bind(0)``: two servers started together could get the same)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def qg_env(data_dir: Path, database_url: str, config: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env.update({"QUOTAGATE_DATA_DIR": str(data_dir), "QUOTAGATE_DATABASE_URL": database_url,
                "PYTHONUNBUFFERED": "1"})
    if config is not None:
        env["QUOTAGATE_CONFIG"] = str(config)
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, stdin: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `quotagate` command line."""
    result = subprocess.run([sys.executable, "-m", "quotagate", *args], env=env, input=stdin, text=True,
                            capture_output=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"quotagate {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    console_port: int
    llm_port: int
    log_path: Path
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"

    @property
    def llm_url(self) -> str:
        return f"http://127.0.0.1:{self.llm_port}/v1"

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(self.env, *args, stdin=stdin, check=check)

    def user(self, email: str, *, admin: bool = False, password: str | None = None) -> Console:
        """Create a user with the CLI and return a console API client holding their fresh access token."""
        args = ["users", "create", email] + (["--admin"] if admin else [])
        if password is not None:
            args.append("--password-stdin")
        self.cli(*args, stdin=(password + "\n") if password is not None else None)
        token = self.cli("tokens", "create", email).stdout.strip()
        return Console(self.console_url, token)

    def admin_token(self) -> str:
        """An instance admin's access token (made once per gateway): for /metrics on the console port."""
        if "admin" not in self._tokens:
            email = f"metrics-{self.console_port}@example.com"
            self.cli("users", "create", email, "--admin")
            self._tokens["admin"] = self.cli("tokens", "create", email).stdout.strip()
        return self._tokens["admin"]

    def metrics(self) -> str:
        """The text of /metrics on the console port."""
        r = httpx.get(f"{self.console_url}/metrics", headers={"Authorization": f"Bearer {self.admin_token()}"},
                      timeout=10)
        r.raise_for_status()
        return r.text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_gateway(data_dir: Path, database_url: str, config: Path | None, *, role: str = "all",
                  extra_env: dict[str, str] | None = None, console_port: int | None = None,
                  llm_port: int | None = None) -> Gateway:
    data_dir.mkdir(parents=True, exist_ok=True)
    console_port = console_port or free_port()
    llm_port = llm_port or free_port()
    env = qg_env(data_dir, database_url, config, QUOTAGATE_CONSOLE_PORT=str(console_port),
                 QUOTAGATE_LLM_PORT=str(llm_port), QUOTAGATE_ROLE=role, **(extra_env or {}))
    log_path = data_dir / f"server-{console_port}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "quotagate", "serve"], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    gw = Gateway(proc=proc, env=env, console_port=console_port, llm_port=llm_port, log_path=log_path)
    try:
        if role in ("all", "console"):
            wait_for_http(f"{gw.console_url}/healthz", proc=proc)
        if role in ("all", "llm"):
            wait_for_http(f"http://127.0.0.1:{llm_port}/healthz", proc=proc)
        # What answered must be this process, still running (not another server on a port it lost).
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
    except Exception as exc:
        gw.stop()
        raise RuntimeError(f"quotagate did not start ({exc}):\n{log_path.read_text(errors='replace')}") from None
    return gw


class Console:
    """A console API client authenticated as one user."""

    def __init__(self, base_url: str, token: str) -> None:
        self.token = token
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        """Make the call, insist on ``status``, return the decoded JSON body."""
        r = self.http.request(method, path, **kwargs)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def project(self, name: str = "demo", **body: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.ok("POST", "/v1/projects", 201, json={"name": name, **body})
        return result

    def join(self, project_id: str) -> dict[str, Any]:
        """Accept this user's invitation to the project (members are invited: nothing is granted before)."""
        result: dict[str, Any] = self.ok("POST", f"/v1/me/invitations/{project_id}/accept")
        return result

    def mint(self, project_id: str, **body: Any) -> dict[str, Any]:
        body.setdefault("name", "test-key")
        result: dict[str, Any] = self.ok("POST", f"/v1/projects/{project_id}/inference/keys", 201, json=body)
        return result
