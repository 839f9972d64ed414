"""A worker of ``serve --workers N`` (started by supervisor.py): serves the LLM API on the listening
sockets it inherited, until SIGTERM/SIGINT or until its parent is gone (its control channel closes)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

import orjson

from quotagate.app import Runtime
from quotagate.limits.interfaces import Limiter
from quotagate.settings import Settings
from quotagate.workers.channel import READY
from quotagate.workers.link import ParentLink, SharedLimiter

log = logging.getLogger(__name__)


async def serve(rt: Runtime, link: ParentLink, channel: socket.socket, sockets: list[socket.socket]) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from quotagate.connlimits import ConnectionMetrics
    from quotagate.gateway.app import build_llm_app
    from quotagate.runner import listener_factory, raise_fd_limit, tune_gc
    from quotagate.server import serve_all

    s = rt.settings
    raise_fd_limit()
    llm = build_llm_app(rt)

    async def startup() -> None:
        await llm.start()
        link.send([READY])

    server = listener_factory(s)(llm, s.host, s.llm_port, "llm", startup=startup, shutdown=llm.close,
                                 sockets=sockets)

    def parent_gone() -> None:
        server.should_exit = True

    link.on_lost = parent_gone
    await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=channel)
    registry = rt.extras.get("metrics_registry")
    if isinstance(registry, CollectorRegistry):
        registry.register(ConnectionMetrics([server]))
        link.metrics = lambda: generate_latest(registry)
    await rt.start()
    tune_gc()
    try:
        await serve_all([server])
    finally:
        await rt.stop()


def main() -> None:
    boot: dict[str, Any] = orjson.loads(sys.stdin.buffer.readline())
    sys.stdin.close()
    index = boot["index"]
    # The parent's settings, for one process of the LLM API (it keeps the console, shipper and relay).
    s = Settings(**boot["settings"]).model_copy(update={"role": "llm", "workers": 1})
    logging.basicConfig(level=s.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    channel = socket.socket(fileno=boot["channel"])
    sockets = [socket.socket(fileno=fd) for fd in boot["listen"]]
    link = ParentLink()
    limiter: Limiter | None = None if s.redis_url else SharedLimiter(link)
    rt = Runtime.build(s, run_migrations=False, limiter=limiter, worker=True)
    link.listen(rt.events)
    try:
        import uvloop

        uvloop.run(serve(rt, link, channel, sockets))
    finally:
        rt.close()


if __name__ == "__main__":
    main()
