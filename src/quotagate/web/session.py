"""Web sessions, CSRF tokens and sign-in throttling.

A session *is* a console access token (named "web session"), kept in an HttpOnly, SameSite=Lax cookie:
signing out revokes it, it shows up on the access tokens page, and no new table or secret key is needed.
The CSRF token of a session is derived from the session's secret (a keyed hash), so forms carry a value
that another site cannot compute, and the server keeps no state for it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque
from dataclasses import dataclass, field

COOKIE = "qg_session"
SESSION_TOKEN_NAME = "web session"  # noqa: S105 - a label, not a password


def csrf_token(session_secret: str) -> str:
    return hmac.new(session_secret.encode(), b"quotagate-csrf", hashlib.sha256).hexdigest()[:40]


def csrf_ok(session_secret: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(csrf_token(session_secret), presented)


@dataclass
class SignInThrottle:
    """At most ``attempts`` failed sign-ins per email and per client address in ``window`` seconds."""

    attempts: int = 5
    window: float = 300.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, who: str, now: float) -> deque[float]:
        q = self._failures.setdefault(who, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def retry_after(self, email: str, ip: str | None) -> float:
        """Seconds until another attempt is allowed, 0 when it is allowed now."""
        now = time.monotonic()
        waits = [q[0] + self.window - now for who in (f"e:{email}", f"i:{ip}")
                 if len(q := self._recent(who, now)) >= self.attempts]
        if len(self._failures) > 100_000:  # bound memory under a spray of made-up emails
            self._failures = {k: v for k, v in self._failures.items() if v}
        return max(waits, default=0.0)

    def failed(self, email: str, ip: str | None) -> None:
        now = time.monotonic()
        for who in (f"e:{email}", f"i:{ip}"):
            self._recent(who, now).append(now)

    def succeeded(self, email: str) -> None:
        self._failures.pop(f"e:{email}", None)
