"""The app factory: one ``Runtime`` built from ``Settings`` holds every service; both ASGI apps and the
CLI are built from it. Nothing lives at module level."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from quotagate.accounts.passwords import Passwords
from quotagate.accounts.service import AccountService, SessionPolicy
from quotagate.accounts.signin import HashGate, SignInThrottle, ThrottlePolicy
from quotagate.audit import AuditLog
from quotagate.config import Config, load_config, with_simulator_port
from quotagate.console.api import ConsoleAPI
from quotagate.console.headers import SecurityHeaders
from quotagate.console.http import JSON, client_disconnect_handler, http_exception_handler
from quotagate.keys.events import KeyEvents
from quotagate.keys.leaks import ReportThrottle
from quotagate.keys.service import KeyService, project_keys_invalidator
from quotagate.limits import build_broadcaster, build_limiter
from quotagate.limits import register_metrics as register_limiter_metrics
from quotagate.limits.interfaces import Limiter
from quotagate.limits.memory import MemoryLimiter
from quotagate.metering import console_routes as metering_console_routes
from quotagate.metering import install as install_metering
from quotagate.metering import metrics_route
from quotagate.metering.history import restore_limits
from quotagate.metering.interfaces import Meter
from quotagate.openapi.page import reference_routes
from quotagate.settings import Settings
from quotagate.store.engine import make_engine, migrate, private_dir
from quotagate.webhooks import console_handlers as webhook_handlers
from quotagate.webhooks import install as install_webhooks
from quotagate.webhooks import waker as webhook_waker

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything one quotagate process runs on, built once from settings."""

    settings: Settings
    config: Config
    engine: Engine
    events: KeyEvents
    accounts: AccountService
    keys: KeyService
    audit: AuditLog
    # Built by their own packages' factories in ``build`` (limits/ and metering/); None until wired.
    limiter: Limiter | None = None
    meter: Meter | None = None
    # Async start/stop hooks run by the server around serving (limiter connections, journal shipper).
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, *, run_migrations: bool = True, limiter: Limiter | None = None,
              worker: bool = False) -> Runtime:
        """The runtime of ``settings``. ``limiter`` replaces the one the settings ask for; ``worker``
        builds one of several processes serving the LLM API (workers/): its parent ships the usage journal,
        relays key changes between instances and restores limits, so the worker does none of that."""
        config = with_simulator_port(load_config(settings.config), settings.simulator_port)
        url = settings.effective_database_url
        if run_migrations:
            migrate(url)
        engine = make_engine(url, pool_size=settings.database_pool_size)
        events = KeyEvents()
        model_ids = lambda: config.model_ids  # noqa: E731 - the catalog is fixed for the process's life
        passwords = Passwords()
        sessions = SessionPolicy(max_age=timedelta(seconds=settings.session_max_age_seconds),
                                 idle=timedelta(seconds=settings.session_idle_seconds))
        accounts = AccountService(engine, passwords, model_ids, project_keys_invalidator(events), sessions=sessions,
                                  max_projects_per_user=settings.max_projects_per_user)
        keys = KeyService(engine, accounts, events, model_ids)
        limiter = limiter or build_limiter(settings)
        runtime = cls(settings=settings, config=config, engine=engine, events=events, accounts=accounts,
                      keys=keys, audit=AuditLog(engine), limiter=limiter)
        runtime.on_stop.append(limiter.close)
        broadcaster = None if worker else build_broadcaster(limiter, events, keys.resolve)  # None without Redis
        if broadcaster is not None:
            runtime.on_start.append(broadcaster.start)
            runtime.on_stop.append(broadcaster.stop)  # runs before the limiter closes (reverse order)
            runtime.extras["broadcaster"] = broadcaster
        install_metering(runtime, ship=not worker)
        if isinstance(limiter, MemoryLimiter) and runtime.meter is not None:
            # After the meter's start (which ships the journals of processes now gone into the store).
            runtime.on_start.append(lambda: restore_limits(limiter, engine))
        register_limiter_metrics(limiter, runtime.extras.get("metrics_registry"))
        install_webhooks(runtime, worker=worker)
        return runtime

    async def start(self) -> None:
        private_dir(self.settings.data_dir)  # before the journal (and SQLite) put anything in it
        for hook in self.on_start:
            await hook()

    async def stop(self) -> None:
        for hook in reversed(self.on_stop):
            try:
                await hook()
            except Exception:
                log.exception("error while stopping")

    def close(self) -> None:
        self.engine.dispose()


async def _healthz(_request: Request) -> Response:
    return JSON({"status": "ok"})


def build_metrics_app(runtime: Runtime) -> Starlette:
    """The metrics listener's ASGI app (``--metrics-port``): only /metrics and /healthz, so that an
    instance with the LLM role alone can be scraped without exposing anything else."""
    return Starlette(routes=[Route("/healthz", _healthz), metrics_route(runtime)])


def build_console_app(runtime: Runtime, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    """The console listener's ASGI app: the console API under /v1 and the web console at /."""
    from quotagate.web.views import WebConsole

    s = runtime.settings
    api = ConsoleAPI(runtime.accounts, runtime.keys, runtime.audit, ReportThrottle(s.leak_reports_per_minute))
    throttle = SignInThrottle(ThrottlePolicy(free_attempts=s.login_free_attempts,
                                             address_free_attempts=s.login_address_free_attempts,
                                             max_delay=float(s.login_max_delay_seconds)))
    gate = HashGate(s.login_hash_concurrency, s.login_hash_queue)
    web = WebConsole(runtime.accounts, runtime.keys, lambda: runtime.config.model_ids,
                     usage=runtime.extras.get("web_usage"), project_usage=runtime.extras.get("web_project_usage"),
                     throttle=throttle, gate=gate, origin=s.console_origin,
                     webhooks=runtime.extras.get("webhooks"), wake_webhooks=webhook_waker(runtime))

    usage_handlers, metering_routes = metering_console_routes(runtime)
    table = api.table(extra=[*usage_handlers, *webhook_handlers(runtime)])
    routes: list[BaseRoute] = [Route("/healthz", _healthz), *metering_routes,
                               *api.routes(runtime.settings.console_max_body_bytes, table),
                               *reference_routes(table, runtime.config)]
    routes.extend(extra_routes or [])
    routes.extend(web.routes())
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                     exception_handlers={HTTPException: http_exception_handler,
                                         ClientDisconnect: client_disconnect_handler})
