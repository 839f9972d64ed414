"""Prometheus metrics of the LLM API, counted from usage events.

``record`` runs on the hot path, so counting is a few dict increments; the Prometheus families are
built only when ``/metrics`` is scraped. Labels are model and project, never key: a key's own figures
come from the usage API (keys are many and come and go; every label value is a time series forever).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from quotagate.metering.interfaces import UsageEvent

# Seconds; upstream latency of LLM calls ranges from a few ms (embeddings) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
REFUSALS = frozenset({400, 401, 403, 404, 413, 429})
# 503s the gateway answers itself, before any model server (the limiter or the key store is down).
GATEWAY_UNAVAILABLE = frozenset({"limiter_unavailable", "service_unavailable"})

Labels = tuple[str, str]  # (model, project)


class _Histogram:
    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class UsageMetrics(Collector):
    """Counters fed by ``observe`` (one call per usage event), exposed as Prometheus families."""

    def __init__(self) -> None:
        self._requests: dict[tuple[Labels, int], int] = {}
        self._prompt: dict[Labels, int] = {}
        self._completion: dict[Labels, int] = {}
        self._refusals: dict[tuple[Labels, str], int] = {}
        self._upstream_errors: dict[tuple[Labels, int], int] = {}
        self._latency: dict[Labels, _Histogram] = {}
        self._ttft: dict[Labels, _Histogram] = {}

    def observe(self, e: UsageEvent) -> None:
        labels = (e.model or "", e.project_id or "")
        status = e.status_code
        key = (labels, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        if e.prompt_tokens:
            self._prompt[labels] = self._prompt.get(labels, 0) + e.prompt_tokens
        if e.completion_tokens:
            self._completion[labels] = self._completion.get(labels, 0) + e.completion_tokens
        refused = status in REFUSALS or (status == 503 and e.error_code in GATEWAY_UNAVAILABLE)
        if refused:
            reason = (labels, e.error_code or str(status))
            self._refusals[reason] = self._refusals.get(reason, 0) + 1
        elif status >= 500:
            self._upstream_errors[key] = self._upstream_errors.get(key, 0) + 1
        if not refused and (status < 400 or status >= 500):  # forwarded upstream: its latency is the upstream's
            hist = self._latency.get(labels)
            if hist is None:
                hist = self._latency[labels] = _Histogram()
            hist.observe(e.latency_ms / 1000.0)
            if e.ttft_ms is not None:
                hist = self._ttft.get(labels)
                if hist is None:
                    hist = self._ttft[labels] = _Histogram()
                hist.observe(e.ttft_ms / 1000.0)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        # Copies are taken in C under the GIL, so a concurrent observe() cannot break the iteration.
        requests = CounterMetricFamily("quotagate_requests", "Requests that reached the LLM API",
                                       labels=["model", "project", "code"])
        for ((model, project), code), n in list(self._requests.items()):
            requests.add_metric([model, project, str(code)], n)
        tokens = CounterMetricFamily("quotagate_tokens", "Tokens in the usage sent to clients",
                                     labels=["model", "project", "type"])
        for kind, counts in (("prompt", self._prompt), ("completion", self._completion)):
            for (model, project), n in list(counts.items()):
                tokens.add_metric([model, project, kind], n)
        refusals = CounterMetricFamily("quotagate_refusals", "Requests refused before reaching a model server",
                                       labels=["model", "project", "reason"])
        for ((model, project), reason), n in list(self._refusals.items()):
            refusals.add_metric([model, project, reason], n)
        errors = CounterMetricFamily("quotagate_upstream_errors", "Requests that failed at or after the "
                                     "model server (5xx)", labels=["model", "project", "code"])
        for ((model, project), code), n in list(self._upstream_errors.items()):
            errors.add_metric([model, project, str(code)], n)
        yield from (requests, tokens, refusals, errors)
        histograms: tuple[tuple[str, str, dict[Labels, _Histogram]], ...] = (
            ("quotagate_upstream_latency_seconds", "Time from a forwarded request's arrival to the end of its "
             "response", self._latency),
            ("quotagate_time_to_first_token_seconds", "Time to the first token of streamed responses",
             self._ttft),
        )
        for name, doc, source in histograms:
            family = HistogramMetricFamily(name, doc, labels=["model", "project"])
            for (model, project), hist in list(source.items()):
                family.add_metric([model, project], hist.buckets(), hist.total)
            yield family


@dataclass(frozen=True, slots=True)
class Gauge:
    name: str
    doc: str
    read: Callable[[], float | None]


class GaugeCollector(Collector):
    """Gauges read at scrape time (journal backlog, key cache figures); a None reading is left out."""

    def __init__(self, gauges: list[Gauge]) -> None:
        self.gauges = gauges

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        for g in self.gauges:
            value = g.read()
            if value is not None:
                yield GaugeMetricFamily(g.name, g.doc, value=value)


def new_registry() -> CollectorRegistry:
    """A registry of this runtime's own (never the process-global default one)."""
    return CollectorRegistry(auto_describe=False)


class _Families:
    """A registry-shaped list of families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merged_exposition(registry: CollectorRegistry, workers: dict[int, str]) -> bytes:
    """This process's metrics and its workers' (``serve --workers N``: index -> their /metrics text) in
    one exposition: each worker's samples labelled ``worker="<index>"``, family by family (a family may
    appear only once in the text format), this process's own samples unlabelled beside them."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for family in registry.collect():
        families[family.name] = family
    for index, text in sorted(workers.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [s._replace(labels={**s.labels, "worker": str(index)}) for s in family.samples]
    return generate_latest(_Families(list(families.values())))
