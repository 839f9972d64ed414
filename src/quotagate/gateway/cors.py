"""CORS for the LLM API: which browser pages may call it (``QUOTAGATE_CORS_ORIGINS``; none by default).

A browser app (openai-node with ``dangerouslyAllowBrowser``, a web chat UI) sends a preflight ``OPTIONS``
before each call that carries an ``Authorization`` header; the answer says which origin, methods and
headers may follow. Keys travel in that header, never in cookies, so credentials are never allowed: a
page can only use a key it already holds. The headers clients read (``x-request-id``, the rate-limit
and retry headers) are exposed to the page. An origin not listed gets a 403 to its preflight and no CORS
headers on anything else, so the browser keeps the answer from the page.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

Headers = list[tuple[bytes, bytes]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_METHODS = b"GET, POST, OPTIONS"
_DEFAULT_HEADERS = b"authorization, content-type"
_MAX_AGE = b"600"  # seconds a browser may cache a preflight answer
_EXPOSED = (b"x-request-id, openai-processing-ms, retry-after, retry-after-ms, x-should-retry, "
            b"x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
            b"x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, "
            b"x-ratelimit-limit-budget, x-ratelimit-remaining-budget, x-ratelimit-reset-budget")
# A header list as browsers send it in Access-Control-Request-Headers: tokens and commas.
_HEADER_LIST = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")


class Cors:
    def __init__(self, origins: frozenset[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.encode() for o in origins if o != "*")

    def origin(self, scope: dict[str, Any]) -> bytes | None:
        """The request's ``Origin`` if it is allowed, else None."""
        for name, value in scope["headers"]:
            if name == b"origin":
                return value if self._any or value.lower() in self._origins else None
        return None

    @staticmethod
    def requested(scope: dict[str, Any]) -> bool:
        """Whether an OPTIONS request is a CORS preflight (it names the method to follow)."""
        return any(name == b"access-control-request-method" for name, _ in scope["headers"])

    @staticmethod
    def preflight_headers(scope: dict[str, Any], origin: bytes) -> Headers:
        asked = _DEFAULT_HEADERS
        for name, value in scope["headers"]:
            if name == b"access-control-request-headers" and _HEADER_LIST.match(value.strip()):
                asked = value.strip()
        return [(b"access-control-allow-origin", origin), (b"access-control-allow-methods", _METHODS),
                (b"access-control-allow-headers", asked), (b"access-control-max-age", _MAX_AGE),
                (b"vary", b"origin"), (b"content-length", b"0")]

    @staticmethod
    def wrap(send: Send, origin: bytes) -> Send:
        """``send``, adding the CORS headers to the response's head."""
        extra = [(b"access-control-allow-origin", origin), (b"access-control-expose-headers", _EXPOSED),
                 (b"vary", b"origin")]

        async def cors_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return cors_send
