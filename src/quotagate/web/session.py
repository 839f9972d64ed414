"""Web sessions and CSRF tokens (the sign-in throttle is in accounts/signin.py).

A session is an access token of kind "session" (named "web session"), kept in an HttpOnly, SameSite=Lax
cookie: signing out revokes it and it shows up on the access tokens page, but the console API refuses it,
and the server ends it after its absolute lifetime or when idle (accounts.service.SessionPolicy).
The CSRF token of a session is derived from the session's secret (a keyed hash), so forms carry a value
that another site cannot compute, and the server keeps no state for it.
"""

from __future__ import annotations

import hashlib
import hmac

COOKIE = "qg_session"
SESSION_TOKEN_NAME = "web session"  # noqa: S105 - a label, not a password


def csrf_token(session_secret: str) -> str:
    return hmac.new(session_secret.encode(), b"quotagate-csrf", hashlib.sha256).hexdigest()[:40]


def csrf_ok(session_secret: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(csrf_token(session_secret), presented)
