"""Schemathesis hooks of the API runs (``test_schemathesis.py`` loads them with ``hooks = ...``).

A positive case is one the document says is valid, and the gateway must accept it. A few rules span
several fields, or depend on the clock or on stored state, and no OpenAPI document can state them (each
is written in the field's description instead). A positive case that breaks one is made to keep it here,
so that the acceptance check stays on for everything else. Negative cases are never touched: a repair
could make one valid.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis

FUTURE = (datetime.now(UTC) + timedelta(days=30)).isoformat()
MAX_POINTS = 1500
WIDTHS = {"minute": 60, "hour": 3600, "day": 86400}
CURSORS = ("before", "starting_after")


def _positive(case: Any) -> bool:
    meta = case.meta
    return meta is not None and meta.generation.mode.is_positive


def _time(raw: Any) -> datetime | None:
    try:
        value = datetime.fromisoformat(str(raw).strip())
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _query(query: dict[str, Any]) -> None:
    # A cursor names an item of the very list being paged (stored state): a made-up one is a 400.
    for name in CURSORS:
        query.pop(name, None)
    # start before end, and at most MAX_POINTS points of the granularity between them.
    end = _time(query["end"]) if "end" in query else datetime.now(UTC)
    start = _time(query["start"]) if "start" in query else None
    if start is not None and end is not None:
        width = WIDTHS.get(query.get("granularity") or "day", 86400)
        if start >= end or (end - start).total_seconds() / width > MAX_POINTS - 2:
            query.pop("start")  # the default, 24 hours before end, is in range for every granularity


def _metadata(query: dict[str, Any]) -> None:
    # A metadata key has one value: a filter naming a key twice cannot match (a 400), so keep the first.
    entries = query.get("metadata")
    if isinstance(entries, list):
        seen: dict[str, str] = {}
        for entry in entries:
            seen.setdefault(str(entry).split("=", 1)[0], str(entry))
        query["metadata"] = list(seen.values())


def _page(query: dict[str, Any]) -> None:
    # A page of JSON is at most 1,000 rows; a CSV export up to 100,000.
    limit = query.get("limit")
    if str(limit).isdigit() and int(str(limit)) > 1000 and query.get("format") != "csv":
        query["limit"] = 1000


def _key_body(body: dict[str, Any], patch: bool) -> None:
    # expires_at lies in the future (the clock).
    if body.get("expires_at") is not None:
        body["expires_at"] = FUTURE
    _budget_pair(body, patch)
    # Each model's limits: at least one limit, and the budget pair as for the key's own.
    per_model = body.get("model_limits")
    if isinstance(per_model, dict):
        for entry in per_model.values():
            if isinstance(entry, dict):
                _budget_pair(entry, patch=False)
                if all(entry.get(k) is None for k in ("rpm", "tpm", "token_limit")):
                    entry["rpm"] = 60


def _budget_pair(body: dict[str, Any], patch: bool) -> None:
    # token_limit and token_limit_period come together (a PATCH of a key or project without a budget, too).
    limit, period = body.get("token_limit"), body.get("token_limit_period")
    if limit is None and period is not None:
        body["token_limit"] = 1000
    elif limit is not None and period is None:
        body["token_limit_period"] = "day"
    elif patch and "token_limit" in body and limit is None:
        body.pop("token_limit_period", None)  # clearing the budget clears both


def _completion_body(body: dict[str, Any]) -> None:
    # best_of is at least n; prompts times max(n, best_of) at most 128 sequences.
    n, best_of = body.get("n"), body.get("best_of")
    if isinstance(n, int) and isinstance(best_of, int) and best_of < n:
        body["best_of"] = n
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not all(type(t) is int for t in prompt) else 1
    if prompts * max(n or 1, best_of or 1) > 128:
        body.pop("n", None)
        body.pop("best_of", None)


def _pairs_body(body: dict[str, Any]) -> None:
    # Two lists of texts pair by position: as long as each other (or text_1 a single text).
    one, two = body.get("text_1"), body.get("text_2")
    if isinstance(one, list) and len(one) != (len(two) if isinstance(two, list) else 1):
        body["text_1"] = one[0]


def _integers(value: Any) -> Any:
    """1.0 as 1: JSON Schema calls 1.0 an integer, and the APIs refuse it where they take one (the
    console API's documented rule: a JSON integer, not 1.0); a number field reads 1 as well."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integers(v) for v in value]
    if isinstance(value, dict):
        return {k: _integers(v) for k, v in value.items()}
    return value


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if not _positive(case):
        return case
    path, method = case.operation.path, case.method.upper()
    if isinstance(case.query, dict):
        _query(case.query)
        _page(case.query)
        _metadata(case.query)
    if isinstance(case.body, dict | list):
        case.body = _integers(case.body)
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return case
    if path.startswith("/v1/projects/{projectId}/inference/keys") or path.startswith("/v1/inference/keys/{keyId}"):
        _key_body(body, patch=method == "PATCH")
    elif path == "/v1/projects/{projectId}" and method == "PATCH":
        _budget_pair(body, patch=True)
    elif path == "/v1/completions":
        _completion_body(body)
    elif path == "/v1/score":
        _pairs_body(body)
    return case
