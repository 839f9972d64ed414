"""The client the gateway forwards with: one pooled aiohttp session for every model server.

Errors (the only ones that leave this module; aiohttp's own are translated here):

    UpstreamError        502  upstream_error     every upstream of the model refused, failed (5xx) or
     │                                           answered with something that is not a usable response
     └── UpstreamTimeout  504  upstream_timeout   the model server accepted the request but went silent
                                                 for longer than the model's ``timeout_seconds``

Routing: a model's upstreams are tried round-robin; one that refused a connection or answered 5xx/429
is put aside for a few seconds, and the request moves on to the next one. Failover happens only before
the response has started, so a client never sees two half-answers; a read timeout does not fail over,
because the model server may still be generating (retrying would double the work and the bill).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from quotagate.config import GatewaySpec, ModelSpec

log = logging.getLogger(__name__)

# How long an upstream that refused a connection or answered 5xx is tried last.
COOL_DOWN_SECONDS = 2.0
# Keep-alive connections are dropped before common servers drop them (uvicorn, and so vLLM and
# SGLang, closes idle connections after 5 s); reusing a connection the server is closing fails.
KEEPALIVE_SECONDS = 4.0
POOL_SIZE = 1024


class UpstreamError(Exception):
    """The model server failed; rendered as 502 ``upstream_error``."""

    status = 502
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """The model server did not answer within the model's timeout; rendered as 504."""

    status = 504
    code = "upstream_timeout"


@dataclass(slots=True)
class _Upstream:
    base_url: str
    down_until: float = 0.0


@dataclass(slots=True)
class _Route:
    spec: ModelSpec
    upstreams: list[_Upstream]
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout
    turn: itertools.count[int] = field(default_factory=itertools.count)

    def candidates(self) -> list[_Upstream]:
        ups = self.upstreams
        if len(ups) == 1:
            return ups
        start = next(self.turn) % len(ups)
        ordered = ups[start:] + ups[:start]
        now = time.monotonic()
        # Healthy first, in round-robin order; the cooling-down ones stay as a last resort.
        return [u for u in ordered if u.down_until <= now] + [u for u in ordered if u.down_until > now]


class UpstreamClient:
    """Forwards requests to a model's upstreams; ``start`` and ``close`` bracket its life."""

    def __init__(self, models: Mapping[str, ModelSpec], gateway: GatewaySpec,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._connect_timeout = gateway.connect_timeout_seconds
        self._routes: dict[str, _Route] = {}
        for spec in models.values():
            headers = {"Content-Type": "application/json"}
            if spec.upstream_api_key_env:
                secret = env.get(spec.upstream_api_key_env)
                if secret:
                    headers["Authorization"] = f"Bearer {secret}"
                else:
                    log.warning("model %s: env var %s (its upstream API key) is not set; forwarding without "
                                "an Authorization header", spec.id, spec.upstream_api_key_env)
            timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self._connect_timeout,
                                            sock_read=spec.timeout_seconds)
            self._routes[spec.id] = _Route(spec, [_Upstream(u) for u in spec.upstreams], headers, timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS,
                                         ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",),
                                              auto_decompress=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, model: str, path: str, body: bytes, request_id: str) -> aiohttp.ClientResponse:
        """POST ``body`` to ``path`` (e.g. ``/chat/completions``) of the first upstream of ``model`` that
        answers with something other than 5xx/429, and return the response with its body unread.

        The caller must ``release()`` or ``close()`` the response. Raises UpstreamError/UpstreamTimeout.
        """
        session = self._session
        if session is None:
            raise UpstreamError("the upstream client is not started")
        route = self._routes[model]
        headers = route.headers | {"X-Request-Id": request_id}
        last: str = "no upstream configured"
        candidates = route.candidates()
        for index, upstream in enumerate(candidates):
            is_last = index == len(candidates) - 1
            for attempt in (0, 1):
                try:
                    response = await session.post(upstream.base_url + path, data=body, headers=headers,
                                                  timeout=route.timeout)
                except aiohttp.ServerDisconnectedError:
                    # Most often a pooled keep-alive connection the server had just closed: retry it once.
                    last = f"{upstream.base_url} closed the connection"
                    if attempt == 0:
                        continue
                    upstream.down_until = time.monotonic() + COOL_DOWN_SECONDS
                    break
                except aiohttp.SocketTimeoutError:
                    raise UpstreamTimeout(f"the model server did not answer within "
                                          f"{route.spec.timeout_seconds:g}s") from None
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    last = f"{upstream.base_url}: {type(exc).__name__}: {exc}"
                    upstream.down_until = time.monotonic() + COOL_DOWN_SECONDS
                    log.warning("upstream %s of model %s unreachable: %s", upstream.base_url, model, exc)
                    break
                if (response.status >= 500 or response.status == 429) and not is_last:
                    last = f"{upstream.base_url} answered {response.status}"
                    log.warning("upstream %s of model %s answered %d; trying the next one",
                                upstream.base_url, model, response.status)
                    response.close()
                    upstream.down_until = time.monotonic() + COOL_DOWN_SECONDS
                    break
                return response
        raise UpstreamError(f"no model server for {model!r} could be reached ({last})")
