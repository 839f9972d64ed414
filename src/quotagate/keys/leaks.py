"""Leaked-key reports: secrets found in the wild (a public repository, a paste, a log) are revoked at once.

The report is the shape GitHub's secret-scanning partner program sends (and any scanner can): a JSON list
of ``{"token", "type", "url", "source"}``. Each token that is one of our inference keys is revoked, the
report is recorded in its project's audit log (``key.leaked``, with where it was found), and the answer
says per token whether it was one of ours (``true_positive``) or not (``false_positive``).

The endpoint needs no authentication (scanners have no account), so it must not be an oracle:
- A token whose checksum is wrong is answered without touching the store (the checksum is public, so
  this says nothing an attacker could not compute).
- A well-formed token costs one indexed lookup whether or not it is a key.
- The only token the answer calls ``true_positive`` is a key that is revoked by that very report (or was
  already revoked): finding out that a guess was a live key destroys it. Nothing here can test a key and
  leave it working.
- Reports are limited per client address (``QUOTAGATE_LEAK_REPORTS_PER_MINUTE``) and to
  ``MAX_TOKENS`` tokens each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from quotagate.errors import InvalidRequest, QuotagateError
from quotagate.keys import secrets

MAX_TOKENS = 1000
WINDOW = 60.0


class TooManyReports(QuotagateError):
    status = 429
    code = "too_many_reports"


class LeakedToken(BaseModel):
    model_config = ConfigDict(extra="ignore")  # scanners add fields of their own

    token: str = Field(min_length=1, max_length=1000)
    type: str = Field(default="", max_length=200)
    url: str = Field(default="", max_length=4000)
    source: str = Field(default="", max_length=200)


_REPORT = TypeAdapter(list[LeakedToken])


def parse_report(body: bytes) -> list[LeakedToken]:
    """The report's tokens; a 400 naming the problem for anything else."""
    try:
        tokens = _REPORT.validate_json(body or b"null")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"a leak report is a JSON list of {{token, type, url, source}}: {where}: "
                             f"{first['msg']}", field=where) from None
    if len(tokens) > MAX_TOKENS:
        raise InvalidRequest(f"at most {MAX_TOKENS} tokens per report (send more reports)", field="body")
    return tokens


def is_ours(token: str) -> bool:
    """Whether ``token`` is shaped like one of our inference keys, checksum included (no lookup)."""
    return secrets.is_well_formed(token.strip(), secrets.INFERENCE_KEY_KIND)


class ReportThrottle:
    """Reports per client address, in fixed one-minute windows (at most ``max_addresses`` tracked)."""

    def __init__(self, per_minute: int, *, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_minute
        self._max = max_addresses
        self._clock = clock
        self._windows: dict[str | None, list[float]] = {}

    def take(self, address: str | None) -> None:
        if not self._limit:
            return
        now = self._clock()
        window = self._windows.get(address)
        if window is None or window[0] + WINDOW <= now:
            self._windows.pop(address, None)
            if len(self._windows) >= self._max:
                del self._windows[next(iter(self._windows))]
            self._windows[address] = [now, 1.0]
            return
        if window[1] >= self._limit:
            raise TooManyReports(f"too many leak reports from this address; wait {window[0] + WINDOW - now:.0f} s")
        window[1] += 1


def answer(token: LeakedToken, found: bool) -> dict[str, Any]:
    return {"token_raw": token.token, "token_type": token.type,
            "label": "true_positive" if found else "false_positive"}
