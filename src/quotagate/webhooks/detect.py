"""Finding events: budget thresholds crossed, keys revoked, leaked or about to expire.

Run by every instance's webhook loop every few seconds, never on the LLM API's path. Each finding becomes
a delivery row per subscribed webhook, keyed by the event's natural identity (``dedupe_key``), so that
the instances that all find the same crossing create one row between them (webhooks/store.py).

- Budgets: the usage the store holds for the current period of each key's budget (the usage tables the
  shipper fills, a second or so behind the gateway), against the key's ``token_limit``: cheap (the
  aggregates), exact to what is stored, and the same answer on every instance.
- Revocations and leaks: the audit log, which is written in the very transaction that revokes the key,
  so nothing revoked is missed and nothing unrevoked is announced. Entries of the last ``LOOKBACK`` are
  read (and only those after the webhook was made).
- Expiry: active keys whose ``expires_at`` is within ``EXPIRING_WITHIN``; announced once per expiry time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Engine, func, select, tuple_

from quotagate.ids import isoformat
from quotagate.keys.models import Period
from quotagate.limits.periods import period_bounds
from quotagate.metering.store import DAY, HOUR, MINUTE
from quotagate.store.tables import audit_log, inference_keys, projects, usage_buckets, webhook_deliveries, webhooks
from quotagate.webhooks.store import enqueue

# The usage bucket level that tiles each kind of budget period and is kept at least as long as it lasts
# (as metering/history.py reads budgets on a restart).
PERIOD_LEVEL = {"minute": MINUTE, "hour": HOUR, "day": DAY, "week": DAY, "month": DAY}
EXPIRING_WITHIN = timedelta(days=7)
LOOKBACK = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Finding:
    webhook_id: str
    project_id: str
    event_type: str
    dedupe_key: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hook:
    id: str
    project_id: str
    events: frozenset[str]
    thresholds: tuple[float, ...]
    created_at: datetime


def _key_view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "prefix": row.prefix}


def _threshold_text(t: float) -> str:
    return format(t, "g")


def key_budget_findings(conn: Connection, hooks: list[Hook], now: datetime) -> list[Finding]:
    """Every threshold of every subscribed webhook that a key's use in its budget's current period has reached."""
    by_project: dict[str, list[Hook]] = defaultdict(list)
    for h in hooks:
        if "key.budget_threshold" in h.events:
            by_project[h.project_id].append(h)
    if not by_project:
        return []
    k, b = inference_keys.c, usage_buckets.c
    found: list[Finding] = []
    keys = conn.execute(select(k.id, k.project_id, k.name, k.prefix, k.token_limit, k.token_limit_period).where(
        k.project_id.in_(list(by_project)), k.token_limit.is_not(None), k.revoked_at.is_(None))).all()
    by_period: dict[str, list[Any]] = defaultdict(list)
    for key in keys:
        by_period[key.token_limit_period].append(key)
    for period, members in by_period.items():
        start, end = period_bounds(cast(Period, period), now.timestamp())
        used = dict(conn.execute(
            select(b.key_id, func.sum(b.prompt_tokens + b.completion_tokens))
            .where(b.key_id.in_([m.id for m in members]), b.width == PERIOD_LEVEL[period], b.bucket_start >= start)
            .group_by(b.key_id)).all())
        for key in members:
            tokens = int(used.get(key.id) or 0)
            for hook in by_project[key.project_id]:
                for t in hook.thresholds:
                    if tokens >= t * key.token_limit:
                        found.append(Finding(hook.id, key.project_id, "key.budget_threshold",
                                             f"key.budget_threshold:{key.id}:{period}:{start}:{_threshold_text(t)}",
                                             {"project_id": key.project_id, "key": _key_view(key), "threshold": t,
                                              "token_limit": key.token_limit, "period": period,
                                              "period_start": _iso(start), "period_end": _iso(end),
                                              "used_tokens": tokens}))
    return found


def project_budget_findings(conn: Connection, hooks: list[Hook], now: datetime) -> list[Finding]:
    """The same for a project's own budget (CONTRACT §6 project limits: ``projects.token_limit`` and
    ``token_limit_period``, shared by all of its keys). Finds nothing on a schema without those columns."""
    limit_col, period_col = projects.c.get("token_limit"), projects.c.get("token_limit_period")
    if limit_col is None or period_col is None:
        return []
    subscribed = {h.project_id for h in hooks if "project.budget_threshold" in h.events}
    if not subscribed:
        return []
    b = usage_buckets.c
    found: list[Finding] = []
    rows = conn.execute(select(projects.c.id, projects.c.name, limit_col.label("token_limit"),
                               period_col.label("period"))
                        .where(projects.c.id.in_(list(subscribed)), limit_col.is_not(None))).all()
    for project in rows:
        start, end = period_bounds(cast(Period, project.period), now.timestamp())
        used = select(func.sum(b.prompt_tokens + b.completion_tokens)).where(
            b.project_id == project.id, b.width == PERIOD_LEVEL[project.period], b.bucket_start >= start)
        tokens = int(conn.execute(used).scalar() or 0)
        for hook in hooks:
            if hook.project_id != project.id or "project.budget_threshold" not in hook.events:
                continue
            for t in hook.thresholds:
                if tokens >= t * project.token_limit:
                    found.append(Finding(hook.id, project.id, "project.budget_threshold",
                                         f"project.budget_threshold:{project.period}:{start}:{_threshold_text(t)}",
                                         {"project_id": project.id, "project": {"id": project.id, "name": project.name},
                                          "threshold": t, "token_limit": project.token_limit,
                                          "period": project.period, "period_start": _iso(start),
                                          "period_end": _iso(end), "used_tokens": tokens}))
    return found


def expiring_findings(conn: Connection, hooks: list[Hook], now: datetime) -> list[Finding]:
    subscribed = [h for h in hooks if "key.expiring" in h.events]
    if not subscribed:
        return []
    k = inference_keys.c
    rows = conn.execute(select(k.id, k.project_id, k.name, k.prefix, k.expires_at).where(
        k.project_id.in_({h.project_id for h in subscribed}), k.revoked_at.is_(None),
        k.expires_at > now, k.expires_at <= now + EXPIRING_WITHIN)).all()
    found: list[Finding] = []
    for key in rows:
        for hook in subscribed:
            if hook.project_id == key.project_id:
                found.append(Finding(hook.id, key.project_id, "key.expiring",
                                     f"key.expiring:{key.id}:{int(key.expires_at.timestamp())}",
                                     {"project_id": key.project_id, "key": _key_view(key),
                                      "expires_at": isoformat(key.expires_at),
                                      "expires_in_seconds": int((key.expires_at - now).total_seconds())}))
    return found


def audit_findings(conn: Connection, hooks: list[Hook], now: datetime) -> list[Finding]:
    """``key.revoked`` and ``key.leaked`` from the audit log (a rotation with no grace revokes too)."""
    wanted = [h for h in hooks if {"key.revoked", "key.leaked"} & h.events]
    if not wanted:
        return []
    a, k = audit_log.c, inference_keys.c
    since = min(max(h.created_at, now - LOOKBACK) for h in wanted)
    rows = conn.execute(
        select(a.id, a.project_id, a.action, a.details, a.actor_id, a.actor_email, a.created_at,
               k.id.label("key_id"), k.name, k.prefix)
        .join(inference_keys, k.id == a.target_id)
        .where(a.project_id.in_({h.project_id for h in wanted}), a.created_at >= since,
               a.action.in_(("key.revoked", "key.leaked", "key.rotated")))).all()
    found: list[Finding] = []
    for row in rows:
        details = row.details or {}
        if row.action == "key.rotated" and not details.get("revoked_at"):
            continue  # a rotation with a grace period: the old key expires later (key.expiring says when)
        event_type = "key.leaked" if row.action == "key.leaked" else "key.revoked"
        key = {"id": row.key_id, "name": row.name, "prefix": row.prefix}
        if event_type == "key.leaked":
            data = {"project_id": row.project_id, "key": key, "revoked": bool(details.get("revoked")),
                    "url": details.get("url"), "source": details.get("source"), "type": details.get("type"),
                    "reported_at": isoformat(row.created_at)}
        else:
            data = {"project_id": row.project_id, "key": key, "revoked_at": isoformat(row.created_at),
                    "actor": {"id": row.actor_id, "email": row.actor_email},
                    "reason": "rotated" if row.action == "key.rotated" else "revoked"}
        for hook in wanted:
            if hook.project_id == row.project_id and event_type in hook.events and row.created_at >= hook.created_at:
                found.append(Finding(hook.id, row.project_id, event_type, f"{event_type}:{row.id}", data))
    return found


def _iso(unix: int) -> str | None:
    return isoformat(datetime.fromtimestamp(unix, UTC))


def enabled_hooks(conn: Connection) -> list[Hook]:
    w = webhooks.c
    rows = conn.execute(select(w.id, w.project_id, w.events, w.budget_thresholds, w.created_at)
                        .where(w.enabled.is_(True))).all()
    return [Hook(r.id, r.project_id, frozenset(r.events), tuple(r.budget_thresholds), r.created_at) for r in rows]


def scan(engine: Engine, now: datetime) -> int:
    """Queue every event found that its webhook does not have yet; how many were queued (by this call)."""
    with engine.connect() as conn:
        hooks = enabled_hooks(conn)
        if not hooks:
            return 0
        findings = [*key_budget_findings(conn, hooks, now), *project_budget_findings(conn, hooks, now),
                    *expiring_findings(conn, hooks, now), *audit_findings(conn, hooks, now)]
        if not findings:
            return 0
        d = webhook_deliveries.c
        pairs = [(f.webhook_id, f.dedupe_key) for f in findings]
        have: set[tuple[str, str]] = set()
        for i in range(0, len(pairs), 500):
            have |= {(r.webhook_id, r.dedupe_key) for r in conn.execute(
                select(d.webhook_id, d.dedupe_key).where(tuple_(d.webhook_id, d.dedupe_key).in_(pairs[i:i + 500])))}
    new = [f for f in findings if (f.webhook_id, f.dedupe_key) not in have]
    if not new:
        return 0  # the usual case: everything found was queued by an earlier pass (no write transaction)
    queued = 0
    with engine.begin() as conn:
        live = {h.id for h in enabled_hooks(conn)}  # a webhook deleted meanwhile gets nothing (the foreign key)
        for f in new:
            if f.webhook_id in live:
                queued += enqueue(conn, webhook_id=f.webhook_id, project_id=f.project_id, event_type=f.event_type,
                                  dedupe_key=f.dedupe_key, data=f.data, now=now)
    return queued

