"""Security headers on every answer of the console listener, as plain ASGI middleware.

It sits inside Starlette's exception handling, so Starlette's own 404s and 405s, redirects, static files
and both APIs all carry the headers, whichever code made the answer. A header the answer already has wins.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Scripts, styles, images and form targets only from the console itself; no <base> to re-root links; not
# framed. The web console has no inline script or style (charts are SVG with attributes, not styles).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "form-action 'self'; base-uri 'none'; frame-ancestors 'none'; object-src 'none'")

ALWAYS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
)
# Every answer but a static asset may carry a secret (a minted key, an access token, a web page showing
# one) or private data: no cache, shared or the browser's, may keep it.
NO_STORE = (b"cache-control", b"no-store")
STATIC_PREFIX = "/static/"


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = ALWAYS if str(scope.get("path", "")).startswith(STATIC_PREFIX) else (*ALWAYS, NO_STORE)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in extra if h[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
