"""What ``quotagate serve`` runs: the listeners the role asks for, over one runtime."""

from __future__ import annotations

import logging

import uvicorn

from quotagate.app import Runtime, build_console_app
from quotagate.server import make_server, serve_all

log = logging.getLogger(__name__)


async def run(rt: Runtime) -> None:
    s = rt.settings
    servers: list[uvicorn.Server] = []
    if rt.config.simulator is not None:
        from quotagate.simulator.app import build_simulator_app

        sim = rt.config.simulator
        log.warning("DEMO: serving a SIMULATED model server on http://%s:%d/v1 (made-up tokens, no model)",
                    sim.host, sim.port)
        servers.append(make_server(build_simulator_app(sim.tokens_per_second), sim.host, sim.port, s.log_level))
    if s.role in ("all", "console"):
        servers.append(make_server(build_console_app(rt), s.host, s.console_port, s.log_level))
        log.info("console API on http://%s:%d", s.host, s.console_port)
    if s.role in ("all", "llm"):
        from quotagate.gateway.app import build_llm_app

        servers.append(make_server(build_llm_app(rt), s.host, s.llm_port, s.log_level))
        log.info("LLM API on http://%s:%d/v1", s.host, s.llm_port)
    log.info("models: %s (from %s)", ", ".join(sorted(rt.config.models)) or "none", rt.config.source)
    await rt.start()
    try:
        await serve_all(servers)
    finally:
        await rt.stop()
