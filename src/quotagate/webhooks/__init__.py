"""Webhooks: a project's endpoints notified of budget thresholds crossed and of keys revoked, leaked or
about to expire (CONTRACT §6; docs/webhooks.md).

``install(rt, worker=...)`` builds the service (``rt.extras["webhooks"]``) and, in every process but the
workers of ``serve --workers``, the loop that finds events and delivers them; ``console_handlers(rt)``
gives the console API its routes. Nothing here runs on the LLM API's path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from quotagate.console.http import Handler
from quotagate.webhooks.api import WebhookAPI
from quotagate.webhooks.delivery import Policy
from quotagate.webhooks.service import WebhookService
from quotagate.webhooks.signing import load_signing_key
from quotagate.webhooks.worker import WebhookWorker

if TYPE_CHECKING:
    from quotagate.app import Runtime

SERVICE = "webhooks"
WORKER = "webhook_worker"


def install(rt: Runtime, *, worker: bool = False) -> None:
    if worker:
        return  # a worker of serve --workers serves the LLM API only; its parent runs the loop
    s = rt.settings
    key = load_signing_key(s.webhook_signing_key, s.data_dir)
    rt.extras[SERVICE] = WebhookService(rt.engine, rt.accounts, key)
    loop = WebhookWorker(rt.engine, key, Policy(timeout=s.webhook_timeout_seconds,
                                                retry_base=s.webhook_retry_base_seconds,
                                                max_attempts=s.webhook_max_attempts), s.webhook_poll_seconds)
    rt.extras[WORKER] = loop
    rt.on_start.append(loop.start)
    rt.on_stop.append(loop.stop)


def waker(rt: Runtime) -> Callable[[], None]:
    """Wakes this process's webhook loop (a test event was queued); does nothing where none runs."""
    loop = rt.extras.get(WORKER)
    return loop.wake if isinstance(loop, WebhookWorker) else lambda: None


def console_handlers(rt: Runtime) -> list[tuple[str, str, Handler]]:
    service = rt.extras.get(SERVICE)
    return WebhookAPI(service, waker(rt)).routes() if isinstance(service, WebhookService) else []
