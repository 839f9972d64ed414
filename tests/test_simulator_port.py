"""`quotagate serve --simulator-port P` (env QUOTAGATE_SIMULATOR_PORT): the demo's simulated model server
moves off 8402 without a config file of one's own, and the models it serves move with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from quotagate.config import ConfigError, load_config, parse_config, with_simulator_port
from tests.support import Gateway, cli, free_port, qg_env, start_gateway, wait_for_http


def test_the_demo_catalog_follows_its_simulator() -> None:
    demo = load_config(None)
    assert demo.simulator is not None and demo.simulator.port == 8402
    moved = with_simulator_port(demo, 9555)
    assert moved.simulator is not None and moved.simulator.port == 9555
    for spec in moved.models.values():
        assert spec.upstreams == ("http://127.0.0.1:9555/v1",)
    assert with_simulator_port(demo, None) is demo


def test_only_the_simulators_own_upstreams_move() -> None:
    config = parse_config("""
[simulator]
host = "0.0.0.0"
port = 8402

[[models]]
id = "sim"
upstreams = ["http://localhost:8402/v1", "http://10.0.0.5:8402/v1", "http://127.0.0.1:8000/v1"]
""")
    moved = with_simulator_port(config, 9000)
    assert moved.models["sim"].upstreams == ("http://localhost:9000/v1", "http://10.0.0.5:8402/v1",
                                             "http://127.0.0.1:8000/v1")


def test_a_config_without_a_simulator_says_so() -> None:
    config = parse_config('[[models]]\nid = "m"\nupstreams = ["http://127.0.0.1:8000/v1"]\n', source="own.toml")
    with pytest.raises(ConfigError, match=r"own\.toml: --simulator-port 9000: the configuration has no \[simulator\]"):
        with_simulator_port(config, 9000)


def _chat(llm_url: str, secret: str) -> int:
    client = openai.OpenAI(base_url=llm_url, api_key=secret, max_retries=0)
    reply = client.chat.completions.create(model="qwen3.6-27b", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5)
    assert reply.usage is not None
    return reply.usage.completion_tokens


def test_serve_moves_the_demo_simulator_with_the_option(tmp_path: Path, database_url: str) -> None:
    """No config file: the built-in demo, its simulator on the port given, and chat through the gateway
    reaches it there."""
    sim, console, llm = free_port(), free_port(), free_port()
    env = qg_env(tmp_path / "data", database_url, None, QUOTAGATE_CONSOLE_PORT=str(console),
                 QUOTAGATE_LLM_PORT=str(llm))
    (tmp_path / "data").mkdir()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "quotagate", "serve", "--simulator-port", str(sim)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    gw = Gateway(proc=proc, env=env, console_port=console, llm_port=llm, log_path=log_path)
    try:
        wait_for_http(f"{gw.console_url}/healthz", proc=proc)
        wait_for_http(f"http://127.0.0.1:{llm}/healthz", proc=proc)
        assert httpx.get(f"http://127.0.0.1:{sim}/v1/models", timeout=10).status_code == 200
        assert f"SIMULATED model server on http://127.0.0.1:{sim}/v1" in gw.log()
        owner = gw.user("sim@example.com")
        key = owner.mint(owner.project()["id"])
        assert _chat(gw.llm_url, key["secret"]) == 5
    finally:
        gw.stop()


def test_serve_takes_it_from_the_environment_too(tmp_path: Path, database_url: str) -> None:
    sim = free_port()
    gw = start_gateway(tmp_path / "data", database_url, None, extra_env={"QUOTAGATE_SIMULATOR_PORT": str(sim)})
    try:
        owner = gw.user("env@example.com")
        key = owner.mint(owner.project()["id"])
        assert _chat(gw.llm_url, key["secret"]) == 5
        assert f"SIMULATED model server on http://127.0.0.1:{sim}/v1" in gw.log()
    finally:
        gw.stop()


def test_bad_simulator_ports_are_clear_errors(tmp_path: Path) -> None:
    env = qg_env(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", None,
                 QUOTAGATE_CONSOLE_PORT=str(free_port()), QUOTAGATE_LLM_PORT=str(free_port()))
    result = cli(env, "serve", "--simulator-port", "70000", check=False)
    assert result.returncode == 2 and "--simulator-port" in result.stderr and "Traceback" not in result.stderr
    own = tmp_path / "own.toml"
    own.write_text('[[models]]\nid = "m"\nupstreams = ["http://127.0.0.1:9/v1"]\n')
    result = cli(env, "serve", "--config", str(own), "--simulator-port", "9000", check=False)
    assert result.returncode == 2, result.stderr
    assert "has no [simulator]" in result.stderr and "Traceback" not in result.stderr
    assert "--simulator-port" in cli(env, "serve", "--help").stdout
