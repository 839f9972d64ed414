"""A real llama.cpp ``llama-server`` loaded with a tiny model made at test time (see model.py).

The binary comes from ``$QUOTAGATE_LLAMA_SERVER`` (scripts/test sets it) or else from
``scripts/llama-server``, which builds it once per machine (about 7 minutes) and caches it. That build
happens when collection is over, before the first test, so that no per-test timeout covers it; if the
binary cannot be had, every test here fails saying why: these tests are never silently skipped.
docs/testing.md has the details.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.realserver.model import CONTEXT_LENGTH, TinyModel, make_model
from tests.support import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BINARY_ENV = "QUOTAGATE_LLAMA_SERVER"
SLOTS = 4
MODEL_ALIAS = "tiny"  # the name llama-server reports for the model (--alias); requests may name any model


@dataclass(frozen=True)
class Binary:
    path: Path | None
    error: str = ""


_BINARY = pytest.StashKey[Binary]()


def _find_binary(config: pytest.Config) -> Binary:
    configured = os.environ.get(BINARY_ENV)
    if configured:
        path = Path(configured)
        if path.is_file() and os.access(path, os.X_OK):
            return Binary(path)
        return Binary(None, f"{BINARY_ENV}={configured} is not an executable file")
    script = REPO / "scripts" / "llama-server"
    cached = subprocess.run([script, "--cached"], capture_output=True, text=True, check=False)
    if cached.returncode == 0:
        return Binary(Path(cached.stdout.strip()))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("tests/realserver: building llama-server with scripts/llama-server "
                            "(once per machine, about 7 minutes on 2 cores)", bold=True)
    built = subprocess.run([script], capture_output=True, text=True, check=False)
    if built.returncode != 0:
        return Binary(None, f"scripts/llama-server failed ({built.returncode}); the real-server tests need "
                            f"llama-server (docs/testing.md). Its output:\n{built.stderr}")
    return Binary(Path(built.stdout.strip()))


def pytest_collection_finish(session: pytest.Session) -> None:
    # After -k/-m deselection: only a run that has tests here pays for the binary.
    if any(Path(item.path).is_relative_to(HERE) for item in session.items):
        session.config.stash[_BINARY] = _find_binary(session.config)


@pytest.fixture(scope="session")
def llama_binary(pytestconfig: pytest.Config) -> Path:
    binary = pytestconfig.stash.get(_BINARY, None) or _find_binary(pytestconfig)
    if binary.path is None:
        pytest.fail(binary.error, pytrace=False)
    return binary.path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return make_model(tmp_path_factory.mktemp("tiny-model"))


@dataclass(frozen=True)
class LlamaServer:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    model: TinyModel

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (what a gateway's ``upstreams`` names)."""
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_llama_server(binary: Path, model: TinyModel, log_path: Path, *extra: str) -> LlamaServer:
    port = free_port()
    args = [
        str(binary), "--model", str(model.gguf_path), "--alias", MODEL_ALIAS,
        "--host", "127.0.0.1", "--port", str(port),
        "--jinja",                        # the GGUF's chat template, rendered by llama.cpp's Jinja engine
        # The context is split between the slots: each gets the model's whole context of 2048.
        "--ctx-size", str(CONTEXT_LENGTH * SLOTS), "--parallel", str(SLOTS),
        "--threads", "2", "--threads-http", "4",
        "--no-ui",                        # built without one anyway
        "--offline",                      # never fetch anything (it would only try for a model to download)
        "--seed", "1",
        *extra,
    ]
    log_file = log_path.open("wb")
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log_file.close()
    server = LlamaServer(proc=proc, port=port, log_path=log_path, model=model)
    # /health is 503 while the model loads and 200 once requests can be served.
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_llama_server(server)
            raise RuntimeError(f"llama-server did not become healthy within 60s:\n{server.log()}")
        time.sleep(0.1)


def stop_llama_server(server: LlamaServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def llama_server(llama_binary: Path, tiny_model: TinyModel,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = start_llama_server(llama_binary, tiny_model, tmp_path_factory.mktemp("llama-server") / "server.log")
    yield server
    stop_llama_server(server)
