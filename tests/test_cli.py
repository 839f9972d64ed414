"""The `quotagate` command line, run as a real subprocess: help, users, tokens, migrate, bad settings."""

from __future__ import annotations

import json
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


def test_version() -> None:
    from importlib.metadata import version

    result = cli({k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}, "--version")
    assert result.stdout.strip() == f"quotagate {version('quotagate')}"


@pytest.mark.parametrize("group", [[], ["users"], ["tokens"], ["keys"]])
def test_help_lists_commands_without_cutting_them_off(group: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    text = cli({**env, "COLUMNS": "80"}, *group, "--help").stdout
    commands = text.split("Commands:")[1]
    assert "..." not in commands and len(commands.strip().splitlines()) >= 3


def test_users_list_set_password_disable_enable(gateway_console: Gateway) -> None:
    gw = gateway_console
    gw.cli("users", "create", "ops@example.com", "--admin")
    gw.cli("users", "create", "dev@example.com", "--password-stdin", stdin="first password\n")
    listed = gw.cli("users", "list").stdout.splitlines()
    assert listed[0].split() == ["EMAIL", "ID", "ROLE", "CREATED", "STATUS"]
    assert [line.split()[0] for line in listed[1:]] == ["ops@example.com", "dev@example.com"]
    assert "admin" in listed[1] and "admin" not in listed[2]
    as_json = json.loads(gw.cli("users", "list", "--json").stdout)
    assert [(u["email"], u["is_admin"], u["disabled_at"]) for u in as_json] == [
        ("ops@example.com", True, None), ("dev@example.com", False, None)]

    def sign_in(password: str) -> int:
        return httpx.post(f"{gw.console_url}/login", data={"email": "dev@example.com", "password": password},
                          follow_redirects=False).status_code

    assert sign_in("first password") == 303
    changed = gw.cli("users", "set-password", "dev@example.com", "--password-stdin", stdin="second password\n")
    assert "web sessions have ended" in changed.stderr
    assert sign_in("first password") != 303 and sign_in("second password") == 303
    short = gw.cli("users", "set-password", "dev@example.com", "--password-stdin", stdin="abc\n", check=False)
    assert short.returncode == 2 and "password" in short.stderr

    token = gw.cli("tokens", "create", "dev@example.com").stdout.strip()
    me = lambda: httpx.get(f"{gw.console_url}/v1/me", headers={"Authorization": f"Bearer {token}"})  # noqa: E731
    assert me().status_code == 200
    gw.cli("users", "disable", "dev@example.com")
    assert me().status_code == 401
    assert sign_in("second password") != 303
    assert "disabled" in gw.cli("users", "list").stdout.splitlines()[2]
    gw.cli("users", "enable", "dev@example.com")
    assert sign_in("second password") == 303
    assert me().status_code == 401  # tokens stay revoked: new ones must be made
    ghost = gw.cli("users", "disable", "ghost@example.com", check=False)
    assert ghost.returncode == 2 and "no user" in ghost.stderr


def test_tokens_list_and_revoke(gateway_console: Gateway) -> None:
    gw = gateway_console
    gw.cli("users", "create", "tok@example.com")
    token = gw.cli("tokens", "create", "tok@example.com", "--name", "ci").stdout.strip()
    gw.cli("tokens", "create", "tok@example.com", "--name", "laptop")
    listed = json.loads(gw.cli("tokens", "list", "tok@example.com", "--json").stdout)
    assert sorted(t["name"] for t in listed) == ["ci", "laptop"]
    assert token not in gw.cli("tokens", "list", "tok@example.com").stdout
    ci = next(t for t in listed if t["name"] == "ci")
    gw.cli("tokens", "revoke", "tok@example.com", ci["id"])
    assert httpx.get(f"{gw.console_url}/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    listed = json.loads(gw.cli("tokens", "list", "tok@example.com", "--json").stdout)
    statuses = {t["name"]: t["status"] for t in listed}
    assert statuses == {"ci": "revoked", "laptop": "active"}
    other = gw.cli("tokens", "revoke", "tok@example.com", "tok_doesnotexist", check=False)
    assert other.returncode == 2 and "no access token" in other.stderr


def test_keys_list_create_revoke(gateway: Gateway) -> None:
    gw = gateway
    admin = gw.user("keys-admin@example.com", admin=True)
    project = admin.project("scripted")
    made = gw.cli("keys", "create", project["id"], "--name", "batch job", "--rpm", "5", "--token-limit", "1000",
                  "--token-limit-period", "day", "--model", "qwen3.6-27b")
    secret = made.stdout.strip()
    assert made.stdout == secret + "\n" and secrets.is_well_formed(secret, secrets.INFERENCE_KEY_KIND)
    keys = json.loads(gw.cli("keys", "list", project["id"], "--json").stdout)
    assert [(k["name"], k["rpm"], k["token_limit"], k["allowed_models"], k["status"]) for k in keys] == [
        ("batch job", 5, 1000, ["qwen3.6-27b"], "active")]
    assert "rpm 5" in gw.cli("keys", "list", project["id"]).stdout
    models = httpx.get(f"{gw.llm_url}/models", headers={"Authorization": f"Bearer {secret}"})
    assert models.status_code == 200
    gw.cli("keys", "revoke", keys[0]["id"])
    deadline = time.monotonic() + 15  # without Redis: the gateway's key cache refreshes within 5 s of a use
    while time.monotonic() < deadline:
        r = httpx.get(f"{gw.llm_url}/models", headers={"Authorization": f"Bearer {secret}"})
        if r.status_code == 401:
            break
        time.sleep(0.5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"
    events = admin.ok("GET", f"/v1/projects/{project['id']}/audit-log")["data"]
    assert [(e["action"], e["actor"]["email"]) for e in events] == [
        ("key.revoked", "quotagate cli"), ("key.minted", "quotagate cli"),
        ("project.created", "keys-admin@example.com")]
    bad = gw.cli("keys", "create", project["id"], "--name", "x", "--rpm", "-5", check=False)
    assert bad.returncode == 2 and "--rpm" in bad.stderr and "greater than 0" in bad.stderr
    missing = gw.cli("keys", "list", "proj_nope", check=False)
    assert missing.returncode == 2 and "proj_nope" in missing.stderr


def test_serve_says_where_the_web_console_is_and_how_to_make_the_first_user(gateway: Gateway) -> None:
    log = gateway.log()
    assert f"web console: http://127.0.0.1:{gateway.console_port}/" in log
    assert "quotagate users create you@example.com --admin --password-stdin" in log
