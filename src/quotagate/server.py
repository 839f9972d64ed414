"""Running the listeners: the console, the LLM API, the metrics listener and (in demo configs) the
simulated model server, sharing one event loop and one set of signal handlers. All but the simulator run
on quotagate's own HTTP server (httpserver.py); the simulator, a stand-in for a model server, on uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator
from typing import Any, Protocol

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to ``serve_all``, so one Ctrl-C stops every listener."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(app: Any, host: str, port: int, log_level: str, *, access_log: bool = False,
                proxy_headers: bool = True, keepalive: int = 75) -> uvicorn.Server:
    """A uvicorn server on uvloop + httptools (the demo's simulated model server). ``proxy_headers`` trusts
    X-Forwarded-For from a proxy on 127.0.0.1 (uvicorn's default).

    ``keepalive``: idle client connections stay open this long, longer than a load balancer keeps its
    own idle connections to us (nginx 60 s, cloud load balancers 60 s by default). uvicorn's default of
    5 s is shorter, and then a proxy sends a request down a connection just as we close it: a 502 for a
    POST it may not retry (the scale-out tests' httpx client met the same race at its own 5 s expiry)."""
    config = uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", lifespan="on",
                            proxy_headers=proxy_headers, timeout_keep_alive=keepalive,
                            log_level=log_level, access_log=access_log, server_header=False,
                            date_header=False, timeout_graceful_shutdown=10)
    return _Server(config)


class Listener(Protocol):
    """What ``serve_all`` drives: uvicorn's Server, and quotagate's own (httpserver.py)."""

    should_exit: bool
    started: bool

    async def serve(self) -> None: ...


async def serve_all(servers: list[Listener]) -> None:
    """Serve until SIGINT/SIGTERM or until any server stops; then stop all of them."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for s in servers:
            s.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    if any(not s.started for s in servers):
        raise SystemExit(1)
