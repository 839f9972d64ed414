"""Forwarding to a model's upstreams: routing, failover, timeouts (the HTTP itself is in ``http``).

Errors (the only ones that leave this module) are in ``errors``: UpstreamError (502) and UpstreamTimeout (504).

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

from quotagate.config import ConfigError, GatewaySpec, ModelSpec
from quotagate.upstreams.errors import OutOfSockets, Stale, UpstreamError, UpstreamTimeout
from quotagate.upstreams.http import Pool, Response

__all__ = ["Response", "UpstreamClient", "UpstreamError", "UpstreamTimeout"]

log = logging.getLogger(__name__)

# How long an upstream that refused a connection or answered 5xx is tried last.
COOL_DOWN_SECONDS = 2.0
# Keep-alive connections are dropped before common servers drop them (uvicorn, and so vLLM and
# SGLang, closes idle connections after 5 s); reusing a connection the server is closing fails.
KEEPALIVE_SECONDS = 4.0


@dataclass(slots=True)
class _Upstream:
    pool: Pool
    down_until: float = 0.0


@dataclass(slots=True)
class _Route:
    spec: ModelSpec
    upstreams: list[_Upstream]
    timeout: float
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


def as_uuid(request_id: str) -> str:
    """The request id's 128 bits (``req_`` + 32 hex digits) written as a UUID, the form every server
    accepts in X-Request-Id: llama-cpp-python's answers any other with a 400 and an empty body."""
    h = request_id.removeprefix("req_")
    if len(h) != 32:
        return request_id
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class UpstreamClient:
    """Forwards requests to a model's upstreams; ``start`` and ``close`` bracket its life."""

    def __init__(self, models: Mapping[str, ModelSpec], gateway: GatewaySpec,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._connect_timeout = gateway.connect_timeout_seconds
        self._send_request_id = gateway.upstream_request_id == "uuid"
        self._routes: dict[str, _Route] = {}
        for spec in models.values():
            headers = {"Content-Type": "application/json"}
            if spec.upstream_api_key_env:
                secret = env.get(spec.upstream_api_key_env)
                if secret and not all(" " <= c <= "~" for c in secret):
                    raise ConfigError(f"model {spec.id}: env var {spec.upstream_api_key_env} (its upstream API key) "
                                     "holds a line break, control or non-ASCII character")
                if secret:
                    headers["Authorization"] = f"Bearer {secret}"
                else:
                    log.warning("model %s: env var %s (its upstream API key) is not set; forwarding without "
                                "an Authorization header", spec.id, spec.upstream_api_key_env)
            pools = [_Upstream(Pool(url, connect_timeout=gateway.connect_timeout_seconds,
                                    keepalive=KEEPALIVE_SECONDS, headers=headers)) for url in spec.upstreams]
            self._routes[spec.id] = _Route(spec, pools, spec.timeout_seconds)

    async def start(self) -> None:
        pass  # connections are made on first use

    async def close(self) -> None:
        for route in self._routes.values():
            for upstream in route.upstreams:
                upstream.pool.close()

    async def post(self, model: str, path: str, body: bytes, request_id: str) -> Response:
        """POST ``body`` to ``path`` (e.g. ``/chat/completions``) of the first upstream of ``model`` that
        answers with something other than 5xx/429, and return the response with its body unread.

        The caller must ``release()`` or ``close()`` the response. Raises UpstreamError/UpstreamTimeout.
        """
        route = self._routes[model]
        last: str = "no upstream configured"
        candidates = route.candidates()
        upstream_id = as_uuid(request_id) if self._send_request_id else None
        for index, upstream in enumerate(candidates):
            is_last = index == len(candidates) - 1
            pool = upstream.pool
            request = pool.request(path, body, upstream_id)
            for attempt in (0, 1):
                try:
                    response = await pool.post(request, route.timeout, fresh=attempt == 1)
                except Stale as exc:
                    # Most often a pooled keep-alive connection the server had just closed: retry it once.
                    last = str(exc)
                    if attempt == 0:
                        continue
                    upstream.down_until = time.monotonic() + COOL_DOWN_SECONDS
                    break
                except OutOfSockets:
                    raise  # our limit, not the upstream's fault: no failover, no cool-down
                except UpstreamTimeout:
                    raise UpstreamTimeout(f"the model server did not answer within "
                                          f"{route.spec.timeout_seconds:g}s") from None
                except UpstreamError as exc:
                    # Unreachable, or an answer that broke off or was not HTTP before its head was in:
                    # nothing reached the client yet, so the next upstream may still serve it.
                    last = str(exc)
                    upstream.down_until = time.monotonic() + COOL_DOWN_SECONDS
                    log.warning("upstream %s of model %s unreachable: %s", pool.label, model, exc)
                    break
                if (response.status >= 500 or response.status == 429) and not is_last:
                    last = f"{pool.label} answered {response.status}"
                    log.warning("upstream %s of model %s answered %d; trying the next one",
                                pool.label, model, response.status)
                    response.close()
                    upstream.down_until = time.monotonic() + COOL_DOWN_SECONDS
                    break
                return response
        raise UpstreamError(f"no model server for {model!r} could be reached ({last})")
