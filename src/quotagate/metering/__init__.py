"""Usage metering: the journal the gateway records into, shipping to the store, aggregation, the usage
and activity API, and the Prometheus metrics.

``install(rt)`` wires it into a runtime: ``rt.meter`` (a journal in ``<data dir>/journal`` when the
process serves the LLM API), the shipper's start/stop hooks, and the metrics registry in
``rt.extras["metrics_registry"]``. ``console_routes(rt)`` gives the console listener its routes.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute, Route

from quotagate.accounts.models import Actor
from quotagate.console.http import Handler, admin_only
from quotagate.metering.api import UsageAPI, limits_json, metrics_endpoint
from quotagate.metering.interfaces import Meter, UsageEvent
from quotagate.metering.meter import JournalMeter
from quotagate.metering.metrics import Gauge, GaugeCollector, UsageMetrics, new_registry
from quotagate.metering.pages import ProjectUsagePages
from quotagate.metering.queries import Window
from quotagate.metering.shipper import ShipperOptions
from quotagate.metering.store import WIDTHS

if TYPE_CHECKING:
    from quotagate.app import Runtime

__all__ = ["JournalMeter", "Meter", "UsageEvent", "console_routes", "install"]

REGISTRY = "metrics_registry"
# Set by ``serve --workers N`` (workers/supervisor.py): the scrape of the worker processes' metrics.
WORKER_METRICS = "worker_metrics"


def _cache_figure(rt: Runtime, name: str) -> float | None:
    cache = rt.extras.get("key_cache")
    value = getattr(cache, name, None)
    return float(value) if isinstance(value, int | float) else None


def _hit_ratio(rt: Runtime) -> float | None:
    hits, misses = _cache_figure(rt, "hits"), _cache_figure(rt, "misses")
    if hits is None or misses is None or hits + misses == 0:
        return None
    return hits / (hits + misses)


def install(rt: Runtime, *, ship: bool = True) -> None:
    """Build metering for the runtime: the meter (LLM roles only), its hooks, the metrics registry.
    ``ship=False``: the meter only journals (a worker's; its parent runs the shipper)."""
    registry = new_registry()
    usage_metrics = UsageMetrics()
    registry.register(usage_metrics)
    gauges = [
        Gauge("quotagate_key_cache_hits", "Key lookups answered from the gateway's cache",
              lambda: _cache_figure(rt, "hits")),
        Gauge("quotagate_key_cache_misses", "Key lookups that went to the store", lambda: _cache_figure(rt, "misses")),
        Gauge("quotagate_key_cache_hit_ratio", "hits / (hits + misses) since start", lambda: _hit_ratio(rt)),
    ]
    if rt.settings.role in ("all", "llm"):
        meter = JournalMeter(rt.engine, rt.settings.data_dir / "journal", metrics=usage_metrics,
                             options=ShipperOptions(nice=rt.settings.shipper_nice), ship=ship)
        rt.meter = meter
        rt.on_start.append(meter.start)
        rt.on_stop.append(meter.close)
        gauges += [
            Gauge("quotagate_journal_backlog_records", "Usage records in the local journal not yet in the store",
                  lambda: float(meter.backlog_records())),
            Gauge("quotagate_journal_shipped_records", "Usage records shipped to the store since start",
                  lambda: float(meter.shipped_records())),
            Gauge("quotagate_journal_ship_failures", "Failed attempts to ship the journal since start",
                  lambda: float(meter.shipper.failures)),
            Gauge("quotagate_journal_lost_records", "Usage records that could not be written to the journal",
                  lambda: float(meter.lost + meter.journal.write_errors)),
            Gauge("quotagate_journal_shipper_restarts", "Times the shipper process died and was restarted",
                  lambda: float(meter.shipper.restarts)),
        ]
    registry.register(GaugeCollector(gauges))
    rt.extras[REGISTRY] = registry
    rt.extras["web_usage"] = _web_usage(rt)
    rt.extras["web_project_usage"] = ProjectUsagePages(rt.accounts, lambda: _usage_api(rt))


def _usage_api(rt: Runtime) -> UsageAPI:
    meter = rt.meter
    flush = meter.flush if isinstance(meter, JournalMeter) else None
    return UsageAPI(rt.engine, rt.accounts, rt.keys, lambda: rt.limiter, flush)


def metrics_route(rt: Runtime) -> Route:
    """``GET /metrics``: the process's registry in Prometheus's text format."""
    registry = rt.extras.get(REGISTRY)
    if not isinstance(registry, CollectorRegistry):
        install(rt)
        registry = rt.extras[REGISTRY]
    return Route("/metrics", metrics_endpoint(registry, lambda: rt.extras.get(WORKER_METRICS)), methods=["GET"])


def console_routes(rt: Runtime) -> tuple[list[tuple[str, str, Handler]], list[BaseRoute]]:
    """(console API handlers for ``ConsoleAPI.routes(extra=...)``, plain routes: ``/metrics``, for
    instance admins only on the console port)."""
    metrics = metrics_route(rt)  # first: it installs metering (the meter the usage API flushes) if needed
    guarded = Route("/metrics", admin_only(metrics.endpoint, rt.accounts.authenticate_token), methods=["GET"])
    return _usage_api(rt).routes(), [guarded]


def _web_usage(rt: Runtime) -> Any:
    """The web console's view of a key: a series summed over models, limits and recent activity."""

    def usage(actor: Actor, key_id: str, start: datetime, end: datetime, granularity: str) -> dict[str, Any]:
        api = _usage_api(rt)
        key = rt.keys.get(actor, key_id)
        width = WIDTHS[granularity]
        window = Window(start=int(start.timestamp()) // width * width, end=-(-int(end.timestamp()) // width) * width,
                        width=width, granularity=granularity)
        totals, data = api.queries.key_usage(key.id, window)
        series: dict[str, dict[str, Any]] = {}
        for p in data:
            s = series.setdefault(p["start"], {"start": p["start"], "requests": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0, "total_tokens": 0})
            for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
                s[field] += p[field]
        limits = limits_json(key, api.live_state(key))
        if not limits["live"]:
            limits["budget"] = None  # no live figure to draw
        activity, _more = api.queries.activity(key.id, limit=20)
        return {"totals": totals, "series": list(series.values()), "limits": limits, "activity": activity}

    return usage
