"""The `quotagate` command line, run as a real subprocess: help, users, tokens, migrate, bad settings."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from quotagate.keys import secrets
from quotagate.store.tables import access_tokens, users
from tests.support import Gateway, cli, free_port, qg_env, start_gateway, wait_for_http


@pytest.fixture
def env(tmp_path: Path, database_url: str, config_file: Path) -> dict[str, str]:
    return qg_env(tmp_path / "data", database_url, config_file)


def rows(database_url: str, table: object) -> list[object]:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(table)).all())  # type: ignore[call-overload]
    finally:
        engine.dispose()


@pytest.mark.parametrize("args", [[], ["--help"], ["serve", "--help"], ["migrate", "--help"], ["users", "--help"],
                                  ["users", "create", "--help"], ["tokens", "--help"], ["tokens", "create", "--help"]])
def test_help_is_plain_and_complete(args: list[str]) -> None:
    result = cli({k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}, *args, check=False)
    assert result.returncode in (0, 2), result.stderr  # click exits 2 when a group is called bare
    text = result.stdout + result.stderr
    assert "Usage: quotagate" in text
    assert "Traceback" not in text
    if args == ["--help"]:
        for word in ("serve", "migrate", "users", "tokens", "QUOTAGATE_DATABASE_URL", "users create",
                     "tokens create"):
            assert word in text, word
    if args[:1] == ["serve"]:
        for option in ("--config", "--data-dir", "--host", "--console-port", "--llm-port", "--role",
                       "--database-url", "--redis-url", "8400", "8401", "./.quotagate", "QUOTAGATE_REDIS_URL"):
            assert option in text, option
    if args[:2] == ["users", "create"]:
        assert "EMAIL" in text and "--admin" in text and "--password-stdin" in text
    if args[:2] == ["tokens", "create"]:
        assert "EMAIL" in text and "--name" in text and "only the token" in text


def test_console_script_is_installed() -> None:
    exe = shutil.which("quotagate", path=str(Path(sys.executable).parent))
    assert exe is not None
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serve" in result.stdout


def test_users_create_then_duplicate_is_a_clear_error(env: dict[str, str], database_url: str) -> None:
    made = cli(env, "users", "create", "Ada@Example.com")
    assert made.stdout == "" and "created user ada@example.com" in made.stderr
    dup = cli(env, "users", "create", "ada@example.com", check=False)
    assert dup.returncode != 0
    assert "already exists" in dup.stderr and "Traceback" not in dup.stderr and dup.stdout == ""
    bad = cli(env, "users", "create", "not-an-email", check=False)
    assert bad.returncode != 0 and "email" in bad.stderr and "Traceback" not in bad.stderr
    assert [r.email for r in rows(database_url, users)] == ["ada@example.com"]  # type: ignore[attr-defined]


def test_password_stdin_stores_an_argon2_hash(env: dict[str, str], database_url: str) -> None:
    password = "correct horse battery staple"
    cli(env, "users", "create", "pat@example.com", "--password-stdin", stdin=password + "\n")
    (row,) = rows(database_url, users)
    assert row.password_hash.startswith("$argon2id$")  # type: ignore[attr-defined]
    assert password not in row.password_hash  # type: ignore[attr-defined]
    short = cli(env, "users", "create", "short@example.com", "--password-stdin", stdin="abc\n", check=False)
    assert short.returncode != 0 and "password" in short.stderr
    assert len(rows(database_url, users)) == 1
    no_password = cli(env, "users", "create", "nopw@example.com")
    assert no_password.returncode == 0


def test_tokens_create_prints_only_the_token(env: dict[str, str], database_url: str) -> None:
    cli(env, "users", "create", "tok@example.com", "--admin")
    result = cli(env, "tokens", "create", "tok@example.com", "--name", "laptop")
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout == lines[0] + "\n"
    token = lines[0]
    assert secrets.is_well_formed(token, secrets.ACCESS_TOKEN_KIND)
    (row,) = rows(database_url, access_tokens)
    assert row.name == "laptop" and row.token_hash == secrets.hash_secret(token)  # type: ignore[attr-defined]
    assert token not in repr(row)
    # every call makes a new token
    assert cli(env, "tokens", "create", "tok@example.com").stdout.strip() != token
    missing = cli(env, "tokens", "create", "ghost@example.com", check=False)
    assert missing.returncode != 0 and missing.stdout == "" and "no user" in missing.stderr
    blank = cli(env, "tokens", "create", "tok@example.com", "--name", " ", check=False)
    assert blank.returncode != 0 and blank.stdout == "" and "name" in blank.stderr


def test_cli_users_and_tokens_work_against_the_running_server(gateway_console: Gateway) -> None:
    gateway_console.cli("users", "create", "root@example.com", "--admin")
    token = gateway_console.cli("tokens", "create", "root@example.com").stdout.strip()
    me = httpx.get(f"{gateway_console.console_url}/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["email"] == "root@example.com" and me.json()["is_admin"] is True
    tokens = httpx.get(f"{gateway_console.console_url}/v1/me/access-tokens",
                       headers={"Authorization": f"Bearer {token}"}).json()["data"]
    assert [t["name"] for t in tokens] == ["cli"]


def test_migrate_is_repeatable(env: dict[str, str]) -> None:
    for _ in range(2):
        result = cli(env, "migrate")
        assert result.returncode == 0 and "up to date" in result.stderr


def test_data_dir_option_and_default(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run([sys.executable, "-m", "quotagate", "migrate"], cwd=work, env=base,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (work / ".quotagate" / "quotagate.db").is_file()
    result = subprocess.run([sys.executable, "-m", "quotagate", "users", "create", "dd@example.com",
                             "--data-dir", str(tmp_path / "elsewhere")], cwd=work, env=base,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "quotagate.db").is_file()
    # the same data dir through the environment finds the same user
    result = cli({**base, "QUOTAGATE_DATA_DIR": str(tmp_path / "elsewhere")}, "tokens", "create", "dd@example.com")
    assert result.stdout.startswith("qgt_")


@pytest.mark.parametrize(("url", "needle"), [
    ("mysql://root@localhost/db", "unsupported scheme 'mysql'"),
    ("not a url", "unsupported scheme"),
    ("postgresql://someone:hunter2-secret@127.0.0.1:1/nothing", "cannot use the database"),
])
@pytest.mark.parametrize("command", [["migrate"], ["users", "create", "x@example.com"],
                                     ["tokens", "create", "x@example.com"]])
def test_bad_database_url_is_a_clear_error(tmp_path: Path, url: str, needle: str, command: list[str]) -> None:
    env = qg_env(tmp_path / "data", url, None)
    result = cli(env, *command, check=False)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr, result.stderr
    assert "QUOTAGATE_DATABASE_URL" in result.stderr or "cannot use the database at postgresql" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "hunter2-secret" not in result.stderr


def test_serve_refuses_bad_settings_clearly(tmp_path: Path) -> None:
    env = qg_env(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", None)
    for args, needle in ((["--role", "everything"], "--role"), (["--console-port", "99999"], "--console-port"),
                         (["--config", str(tmp_path / "missing.toml")], "missing.toml"),
                         (["--database-url", "mysql://x"], "unsupported scheme"),
                         (["--metrics-port", "0"], "--metrics-port")):
        result = cli(env, "serve", *args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    for name, value in (("QUOTAGATE_DATABASE_POOL_SIZE", "0"), ("QUOTAGATE_SHIPPER_NICE", "20")):
        result = cli({**env, name: value}, "serve", check=False)
        assert result.returncode == 2 and name in result.stderr, result.stderr
    # An upstream API key that would break the request head (a line break would inject headers).
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nid = "m"\nupstreams = ["http://127.0.0.1:9/v1"]\nupstream_api_key_env = "UP_KEY"\n')
    result = cli({**env, "UP_KEY": "sk-abc\r\nX-Evil: 1", "QUOTAGATE_LLM_PORT": str(free_port()),
                  "QUOTAGATE_CONSOLE_PORT": str(free_port())}, "serve", "--config", str(config), check=False)
    assert result.returncode == 2, result.stderr
    assert "env var UP_KEY" in result.stderr and "line break" in result.stderr and "Traceback" not in result.stderr
    assert "X-Evil" not in result.stderr  # the secret is not echoed


def test_an_llm_only_instance_is_scraped_on_a_metrics_port_that_serves_nothing_else(
        tmp_path: Path, database_url: str, config_file: Path) -> None:
    metrics_port = free_port()
    gw = start_gateway(tmp_path / "data", database_url, config_file, role="llm",
                       extra_env={"QUOTAGATE_METRICS_PORT": str(metrics_port)})
    try:
        base = f"http://127.0.0.1:{metrics_port}"
        wait_for_http(f"{base}/healthz", proc=gw.proc)  # a listener of its own, started beside the others
        assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
        stranger = secrets.generate(secrets.INFERENCE_KEY_KIND)
        r = httpx.get(f"{gw.llm_url}/models", headers={"Authorization": f"Bearer {stranger}"}, timeout=10)
        assert r.status_code == 401
        text = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'quotagate_requests_total{' in text and 'code="401"' in text, text[:2000]
        for path in ("/v1/projects", "/", "/v1/inference/keys/x/usage"):
            assert httpx.get(base + path, timeout=10).status_code == 404, path
        with pytest.raises(httpx.ConnectError):  # an llm-only instance has no console listener
            httpx.get(f"http://127.0.0.1:{gw.console_port}/healthz", timeout=2)
    finally:
        gw.stop()


def test_python_dash_m_and_env_vars_apply_to_every_command(tmp_path: Path, database_url: str) -> None:
    env = qg_env(tmp_path / "data", database_url, None)  # no config file: the built-in demo catalog
    cli(env, "users", "create", "m@example.com")
    assert cli(env, "tokens", "create", "m@example.com").stdout.startswith("qgt_")


def test_an_idle_keep_alive_connection_outlives_a_proxys_idle_timeout(gateway: Gateway) -> None:
    """uvicorn's own default closes an idle connection after 5 s, and a proxy reusing it at that moment
    answers 502; quotagate keeps it for QUOTAGATE_KEEPALIVE_SECONDS (75 s by default)."""
    request = b"GET /healthz HTTP/1.1\r\nHost: quotagate\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.llm_port), timeout=10) as conn:
        conn.sendall(request)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(6.5)
        conn.sendall(request)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200"), "the gateway closed an idle connection after 5 s"


def test_the_shippers_niceness_is_a_setting(tmp_path: Path, database_url: str, config_file: Path) -> None:
    gw = start_gateway(tmp_path / "data", database_url, config_file, extra_env={"QUOTAGATE_SHIPPER_NICE": "7"})
    try:
        pid = gw.proc.pid
        shippers = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        assert len(shippers) == 1
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, shippers[0]) != 7:
            assert time.monotonic() < deadline, os.getpriority(os.PRIO_PROCESS, shippers[0])
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, os.getpid())
    finally:
        gw.stop()
