"""The LLM API: a plain ASGI app (no framework on the hot path) that authenticates, admits, forwards.

Per request: route → authenticate (checksum, then the key cache; expiry against the clock) → read and
parse the body once → model checks → one ``limiter.admit`` (check and reserve) → forward → one
``limiter.settle`` → meter → last bytes out. Every answer carries ``x-request-id``; every answer to a
known key carries the ``x-ratelimit-*`` headers; errors are OpenAI-shaped (see ``errors``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from quotagate.app import Runtime
from quotagate.config import ModelSpec
from quotagate.gateway import headers as rl
from quotagate.gateway.assemble import assemble, assemble_completion
from quotagate.gateway.authfail import FailedAuthThrottle
from quotagate.gateway.cors import Cors
from quotagate.gateway.counting import (
    answer_tokens,
    chat_prompt,
    completion_prompt,
    embeddings_prompt,
    pairs_prompt,
)
from quotagate.gateway.dialects import CHAT, COMPLETIONS, Dialect
from quotagate.gateway.encoding import decode_body
from quotagate.gateway.errors import ApiError, bad_request
from quotagate.gateway.forwarded import ForwardedFor
from quotagate.gateway.keycache import KeyCache
from quotagate.gateway.parsing import (
    LENGTH_FIELDS,
    ChatRequest,
    EmbeddingsRequest,
    PairsRequest,
    parse_chat,
    parse_completions,
    parse_embeddings,
    parse_rerank,
    parse_score,
    text_bytes,
)
from quotagate.gateway.refusals import refusal_error
from quotagate.gateway.responses import endpoint as responses
from quotagate.gateway.routes import HEALTH, MODEL_PREFIX, OPENAPI, ROUTES
from quotagate.gateway.streaming import Lease, StreamRelay
from quotagate.gateway.upstream_errors import upstream_failure
from quotagate.gateway.usage import charge, reported, usage_object
from quotagate.httpserver import BODY_ERROR, direct_writer
from quotagate.keys.models import KeyRecord
from quotagate.keys.secrets import INFERENCE_KEY_KIND, hash_secret, is_well_formed
from quotagate.limits.errors import LimiterUnavailable
from quotagate.limits.interfaces import Admission
from quotagate.metering.interfaces import UsageEvent
from quotagate.tokens.counter import TokenCounter, load_counters
from quotagate.upstreams.client import Response, UpstreamClient, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")
_NOT_ADMITTED = Admission(admitted=True)
# Refusals that are the caller's fault and come before admission: they count against rpm all the same.
_CALLERS_FAULT = frozenset({400, 403, 404, 413, 415})
UNKNOWN_MODEL = "unknown"  # what usage and metrics record for a model name not in the catalog
_ECHO = 100  # characters of a caller's string an error message repeats


def echo(value: str) -> str:
    """A caller's string as an error message may repeat it: cut to ``_ECHO`` characters."""
    return value if len(value) <= _ECHO else value[:_ECHO] + "…"


class RequestIds:
    """Request ids: ``req_``, the time in milliseconds (12 hex digits), then 80 random bits.

    The random bits make them unique across processes without any coordination (a collision needs two
    requests in the same millisecond drawing the same 80 bits). The time in front makes them ordered:
    they are the primary key of the activity table, and random keys would land each insert on a
    different page of its index, so that the shipper rewrote most of that index on every pass (measured:
    ~2.7 KB written to disk per event on SQLite, growing with the table; docs/metering.md).
    Drawn from a PRNG seeded from the OS once per process: ``secrets`` costs a system call per id, and a
    request id needs uniqueness, not secrecy (it is shown to the client anyway)."""

    def __init__(self) -> None:
        self._bits = random.Random(secrets.randbits(128)).getrandbits

    def __call__(self) -> str:
        return f"req_{(time.time_ns() // 1_000_000) << 80 | self._bits(80):032x}"


class Call:
    """One request's state, as it goes through the gateway (what metering and the headers need)."""

    __slots__ = ("admission", "client_ip", "endpoint", "key", "model", "rate_headers", "request_id", "started",
                 "stream", "t0", "user_agent")

    def __init__(self, endpoint: str, scope: Scope, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.time()
        self.t0 = time.perf_counter()
        self.endpoint = endpoint
        self.key: KeyRecord | None = None
        self.model: str | None = None
        self.stream = False
        self.admission: Admission | None = None
        self.rate_headers: Headers = []
        client = scope.get("client")
        self.client_ip: str | None = client[0] if client else None
        self.user_agent: str | None = None


class LLMApp:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._request_id = RequestIds()
        self._keys = KeyCache(rt.keys.resolve)
        self._failed_auth = FailedAuthThrottle(rt.settings.llm_auth_failures_per_minute)
        rt.events.subscribe(self._keys.invalidate)
        rt.extras["key_cache"] = self._keys  # hits/misses for /metrics
        self._models = rt.config.models
        self._upstreams = UpstreamClient(rt.config.models, rt.config.gateway)
        self._max_body = rt.settings.llm_max_body_bytes
        self._default_max_tokens = rt.config.gateway.default_max_tokens
        self._counters = load_counters(rt.config.models.values())
        self._model_lists: dict[frozenset[str] | None, bytes] = {}
        self._forwarded = ForwardedFor(rt.settings.forwarded_allow_ips)
        origins = rt.settings.cors_origin_set
        self._cors = Cors(origins) if origins else None
        handlers = {"chat.completions": self._chat, "completions": self._completions, "embeddings": self._embeddings,
                    "rerank": self._rerank, "score": self._score, responses.ENDPOINT: self._responses,
                    "models": self._list_models}
        self._routes = {path: (name, handlers[name], method) for path, (name, method) in ROUTES.items()}
        self._openapi: bytes | None = None
        if rt.limiter is None:
            log.warning("no limiter configured: rpm, tpm and token budgets are NOT enforced")

    # -- ASGI (the http messages only: httpserver.py serves it and calls start and close itself) --
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._http(scope, receive, send)

    async def start(self) -> None:
        await self._upstreams.start()

    async def close(self) -> None:
        await self._keys.close()
        await self._upstreams.close()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if self._cors is not None:
            origin = self._cors.origin(scope)
            if method == "OPTIONS" and self._cors.requested(scope):
                await self._preflight(scope, send, origin)
                return
            if origin is not None:
                send = self._cors.wrap(send, origin)
        route = self._routes.get(path)
        if route is not None:
            endpoint, handler, allowed = route
        elif path.startswith(MODEL_PREFIX):
            endpoint, handler, allowed = "models", self._list_models, "GET"
        elif path in (HEALTH, OPENAPI):
            await self._outside(send, path, method)
            return
        else:
            err = ApiError(404, "unknown_url", f"Unknown request URL: {method} {path}.")
            await self._plain(send, 404, err.body(), [(b"x-request-id", self._request_id().encode())])
            return
        call = Call(endpoint, scope, self._request_id())
        try:
            if method != allowed:
                raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}; use {allowed}",
                               allow=allowed)
            key = await self._authenticate(call, scope)
            call.key = key
            await handler(call, key, scope, receive, send)
        except ApiError as exc:
            if call.key is not None and call.admission is None and exc.status in _CALLERS_FAULT:
                exc = await self._count_refused(call, call.key, exc)
            await self._error(call, send, exc)
        except LimiterUnavailable as exc:
            # The shared limiter (Redis) is down and its failure policy refuses: nothing was forwarded.
            await self._error(call, send, ApiError(503, exc.code, "Rate limits cannot be checked right now; "
                                                   "retry shortly.", retry_after=exc.retry_after))
        except Exception:
            log.exception("request %s failed", call.request_id)
            if call.admission is not None and call.key is not None:
                # Whatever failed, the reservation must not outlive the request (settling is idempotent
                # per reservation: one already settled stays as it was).
                with contextlib.suppress(Exception):
                    await self._settle(call.key, call.admission, 0)
            await self._error(call, send, ApiError(500, "internal_error", "the gateway failed on this request; "
                                                   f"request id {call.request_id}"))

    async def _preflight(self, scope: Scope, send: Send, origin: bytes | None) -> None:
        rid = (b"x-request-id", self._request_id().encode())
        if origin is None:
            err = ApiError(403, "origin_not_allowed", "This origin may not call the API from a browser "
                           "(QUOTAGATE_CORS_ORIGINS).")
            await self._plain(send, 403, err.body(), [rid])
            return
        assert self._cors is not None
        await send({"type": "http.response.start", "status": 204,
                    "headers": [*self._cors.preflight_headers(scope, origin), rid]})
        await send({"type": "http.response.body", "body": b""})

    async def _outside(self, send: Send, path: str, method: str) -> None:
        """/healthz and /openapi.json: no key, GET (or HEAD) only."""
        rid = (b"x-request-id", self._request_id().encode())
        if method not in ("GET", "HEAD"):
            err = ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}; use GET")
            await self._plain(send, 405, err.body(), [rid, (b"allow", b"GET, HEAD")])
        elif path == HEALTH:
            await self._plain(send, 200, b'{"status":"ok"}', [rid])
        else:
            if self._openapi is None:  # built on first use: a process that is never asked pays nothing
                from quotagate.openapi.document import llm_document
                self._openapi = orjson.dumps(llm_document({m.id: m.type for m in self._models.values()}))
            await self._plain(send, 200, self._openapi, [rid])

    # -- responses and metering ------------------------------------------------------------------
    @staticmethod
    async def _plain(send: Send, status: int, body: bytes, extra: Headers) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [_JSON, (b"content-length", b"%d" % len(body)), *extra]})
        await send({"type": "http.response.body", "body": body})

    async def _respond(self, call: Call, send: Send, status: int, body: bytes, *, error_code: str | None = None,
                       prompt: int = 0, completion: int = 0, extra: Headers | None = None) -> None:
        hdrs = [_JSON, (b"content-length", b"%d" % len(body)), (b"x-request-id", call.request_id.encode()),
                rl.processing_ms(call.t0), *call.rate_headers]
        if extra:
            hdrs.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        self._record(call, status, error_code, prompt, completion, None)
        await send({"type": "http.response.body", "body": body})

    async def _error(self, call: Call, send: Send, exc: ApiError) -> None:
        extra: Headers = [] if exc.allow is None else [(b"allow", exc.allow.encode())]
        if exc.status == 429 or exc.retry_after is not None:
            extra += rl.retry_after(exc.retry_after or 1.0)
            retry = exc.should_retry if exc.should_retry is not None else (exc.retry_after or 0) <= 60
            extra.append((b"x-should-retry", b"true" if retry else b"false"))
        if exc.status != 503 and call.key is not None and not call.rate_headers and self._rt.limiter is not None:
            with contextlib.suppress(Exception):
                call.rate_headers = rl.from_state(await self._rt.limiter.state(call.key), call.model)
        await self._respond(call, send, exc.status, exc.body(), error_code=exc.code, extra=extra)

    def _record(self, call: Call, status: int, error_code: str | None, prompt: int, completion: int,
                ttft_ms: float | None) -> None:
        meter = self._rt.meter
        if meter is None:
            return
        key = call.key
        # Only the catalog's model ids are kept (metric labels, usage rows): a name the caller made up
        # would be a new label and a new row each time (50 names of 4 MiB once took 200 MB for good).
        model = call.model if call.model is None or call.model in self._models else UNKNOWN_MODEL
        try:
            meter.record(UsageEvent(
                request_id=call.request_id, created_at=call.started, key_id=key.id if key else None,
                project_id=key.project_id if key else None, model=model, endpoint=call.endpoint,
                status_code=status, error_code=error_code, stream=call.stream, prompt_tokens=prompt,
                completion_tokens=completion, latency_ms=(time.perf_counter() - call.t0) * 1000,
                ttft_ms=ttft_ms, client_ip=call.client_ip, user_agent=call.user_agent))
        except Exception:
            log.exception("could not meter request %s", call.request_id)

    # -- authentication and checks ---------------------------------------------------------------
    async def _authenticate(self, call: Call, scope: Scope) -> KeyRecord:
        auth: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if auth is not None:  # servers and proxies differ on which one counts: neither does
                    raise bad_request("the request has more than one Authorization header")
                auth = value
            elif name == b"user-agent":
                call.user_agent = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                call.client_ip = self._forwarded.client(call.client_ip, value)
        if auth is None:
            raise ApiError(401, "invalid_api_key", "You didn't provide an API key. Send it as "
                           "'Authorization: Bearer <inference-key>'.")
        scheme, _, secret_bytes = auth.partition(b" ")
        secret = secret_bytes.strip().decode("latin-1")
        if scheme.lower() != b"bearer" or not is_well_formed(secret, INFERENCE_KEY_KIND):
            raise ApiError(401, "invalid_api_key", "Incorrect API key provided.")
        throttle, address = self._failed_auth, call.client_ip
        try:
            key = await self._keys.get(hash_secret(secret), lambda: throttle.check(address))
        except ApiError:
            raise
        except Exception:
            log.exception("could not look a key up in the store")
            raise ApiError(503, "service_unavailable", "The key store is unavailable; retry shortly.",
                           retry_after=1.0) from None
        if key is None:
            throttle.failed(address)
            raise ApiError(401, "invalid_api_key", "Incorrect API key provided.")
        call.key = key
        if key.revoked:
            raise ApiError(401, "key_revoked", "This API key has been revoked.")
        now = time.time()
        if key.expires_at is not None and key.expires_at <= now:
            raise ApiError(401, "key_expired", "This API key has expired.")
        if key.networks is not None and not key.allows(call.client_ip):
            raise ApiError(403, "network_not_allowed", f"This API key may not be used from {call.client_ip}; "
                           "its allowed_networks do not include that address.")
        return key

    def _usable(self, key: KeyRecord, model: str, kind: str) -> ModelSpec:
        spec = self._models.get(model)
        if spec is None:
            raise ApiError(404, "model_not_found", f"The model '{echo(model)}' does not exist.", param="model")
        if not key.may_use(model):
            raise ApiError(403, "model_not_allowed", f"This key may not use the model '{model}'.", param="model")
        if spec.type != kind:
            raise bad_request(f"The model '{model}' is a {spec.type} model; it cannot serve this endpoint.", "model")
        return spec

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._max_body
        encoding: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise bad_request("invalid Content-Length") from None
                if declared > limit:
                    raise ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")
            elif name == b"content-encoding":
                encoding = value
        body = await self._read_raw(scope, receive, limit)
        return body if encoding is None else decode_body(body, encoding, limit)

    async def _read_raw(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        message = await receive()
        if message["type"] != "http.request":
            raise self._body_lost(scope)
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            return body
        parts = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":
                raise self._body_lost(scope)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    @staticmethod
    def _body_lost(scope: Scope) -> ApiError:
        """The body ended in a disconnect: why, the server noted in the scope (httpserver.BODY_ERROR)."""
        error = scope.get(BODY_ERROR)
        if error == "timeout":  # the client is there but its body stalled
            return ApiError(408, "request_timeout", "the request body stopped arriving; send it whole, at once")
        if error == "malformed":  # the body's framing broke (a bad chunk size)
            return bad_request("malformed HTTP request body (its chunked framing)")
        return ApiError(400, "invalid_request_error", "the client went away while sending the body")

    async def _admit(self, call: Call, key: KeyRecord, prompt: int, max_completion: int,
                     min_completion: int) -> Admission:
        limiter = self._rt.limiter
        if limiter is None:
            return _NOT_ADMITTED
        adm = await limiter.admit(key, prompt, max_completion, min_completion, call.model)
        call.rate_headers = rl.from_admission(adm)
        if not adm.admitted:
            if adm.refusal == "key_revoked":
                # Revoked elsewhere (with Redis: another instance's marker) before this cache heard of it.
                self._keys.revoked(key.secret_hash)
                raise ApiError(401, "key_revoked", "This API key has been revoked.")
            raise refusal_error(key, adm, prompt + min_completion, call.model)
        call.admission = adm
        return adm

    async def _count_refused(self, call: Call, key: KeyRecord, exc: ApiError) -> ApiError:
        """A request refused before admission for the caller's fault (a bad body, a model it may not use)
        still counts against the key's rpm: otherwise a key with rpm=1 sent 3,000 such requests in 0.9 s.
        Nothing is reserved; once the window is full, the answer is the rpm's 429 instead."""
        limiter = self._rt.limiter
        if limiter is None or not key.limits_requests():
            return exc
        try:
            adm = await limiter.admit(key, 0, 0, 0)
        except LimiterUnavailable:
            return exc
        call.rate_headers = rl.from_admission(adm)
        if adm.admitted:
            await self._settle(key, adm, 0)
            return exc
        if adm.refusal == "rate_limit_exceeded":
            return refusal_error(key, adm, 0, None)
        return exc

    async def _settle(self, key: KeyRecord, adm: Admission, tokens: int) -> None:
        limiter = self._rt.limiter
        if limiter is not None and adm.reservation is not None:
            await limiter.settle(key, adm, tokens)

    # -- endpoints -----------------------------------------------------------------------------
    async def _list_models(self, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        if self._rt.limiter is not None:
            # The headers are informative here: a limiter that is down leaves them out (no 503 to list models).
            with contextlib.suppress(LimiterUnavailable):
                call.rate_headers = rl.from_state(await self._rt.limiter.state(key))
        path: str = scope["path"]
        if path.startswith("/v1/models/") and path != "/v1/models/":
            model = path[len("/v1/models/"):]
            call.model = model
            spec = self._models.get(model)
            if spec is None or not key.may_use(model):
                raise ApiError(404, "model_not_found", f"The model '{echo(model)}' does not exist.", param="model")
            await self._respond(call, send, 200, orjson.dumps(self._model_object(spec)))
            return
        body = self._model_lists.get(key.models)
        if body is None:
            data = [self._model_object(s) for s in self._models.values() if key.may_use(s.id)]
            body = self._model_lists[key.models] = orjson.dumps({"object": "list", "data": data})
        await self._respond(call, send, 200, body)

    @staticmethod
    def _model_object(spec: ModelSpec) -> dict[str, Any]:
        return {"id": spec.id, "object": "model", "created": spec.created, "owned_by": "quotagate", "type": spec.type}

    async def _chat(self, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await self._read_body(scope, receive)
        req = parse_chat(raw)
        call.model = req.model
        call.stream = req.stream
        spec = self._usable(key, req.model, "chat")
        counter = self._counters.get(req.model)
        prompt, exact = await chat_prompt(counter, req, spec)
        await self._generate(call, key, req, spec, prompt, prompt if exact else 0, counter, send, receive, CHAT)

    async def _completions(self, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await self._read_body(scope, receive)
        req = parse_completions(raw)
        call.model = req.model
        call.stream = req.stream
        spec = self._usable(key, req.model, "chat")
        counter = self._counters.get(req.model)
        prompt, longest, exact = completion_prompt(counter, req, spec)
        await self._generate(call, key, req, spec, prompt, longest if exact else 0, counter, send, receive,
                             COMPLETIONS)

    async def _generate(self, call: Call, key: KeyRecord, req: ChatRequest, spec: ModelSpec, prompt: int,
                        used: int, counter: TokenCounter | None, send: Send, receive: Receive,
                        dialect: Dialect) -> None:
        """Admit, forward and answer a generation request (chat or completion) whose ``prompt`` tokens are
        counted (or bounded); ``used`` is how much of the context the longest prompt takes, if it is known."""
        # The most a choice can generate: what the client asked for, else what is left of the model's
        # context (a completion never outgrows it), else nothing bounds it and the gateway's default is the limit.
        room = None if spec.context_length is None else spec.context_length - used
        natural = room if req.max_tokens is None else req.max_tokens if room is None else min(req.max_tokens, room)
        # A stream of a key with token limits reserves its completion as it is generated (a Lease), so
        # concurrent streams are not refused for tokens nobody will spend: the first block now. A
        # non-streamed request with no length of its own would have to reserve the rest of the context (or
        # be given a length it did not ask for): it is forwarded as a stream too, and answered in one piece.
        # So is one of several choices without a tokenizer to count them: servers have reported one choice's
        # tokens for all (llama-server), and a stream's deltas are counted choice by choice.
        limited = self._rt.limiter is not None and key.limits_tokens(req.model)
        collect = limited and not req.stream and req.streamable and (
            req.max_tokens is None or (req.n > 1 and counter is None))
        leasing = limited and (req.stream or collect)
        wanted = natural or self._default_max_tokens
        first = min(wanted, Lease.FIRST) if leasing else wanted
        adm = await self._admit(call, key, prompt, req.n * first, req.n)
        body = req.body
        changed = False
        lease: Lease | None = None
        if adm.granted is not None and leasing:
            # Cut off by the relay when nothing more can be reserved: no length to add; the client's own
            # are made one (its smallest), so that every server reads the same.
            changed = _lengths(body, req.max_tokens, cap=False) if req.max_tokens is not None else False
            limiter = self._rt.limiter
            assert limiter is not None
            lease = Lease(lambda tokens: limiter.extend(key, adm, tokens), first=first,
                          ceiling=None if natural is None else req.n * natural)
        elif adm.granted is not None:
            per_choice = min(wanted, adm.granted // req.n)
            # Every length field sent says the grant; one is added only where without it a limit could
            # be overrun (the client sent none, and nothing else bounds the completion within the grant).
            unbounded = req.max_tokens is None and (natural is None or per_choice < natural)
            changed = _lengths(body, per_choice, cap=unbounded)
        if (req.stream and not req.include_usage) or collect:
            changed = True
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if collect:
            body["stream"] = True
        if spec.upstream_model is not None:
            body["model"] = spec.upstream_model
            changed = True
        payload = orjson.dumps(body) if changed else req.canonical
        granted = None if adm.granted is None else (adm.granted // req.n) * req.n
        response = await self._forward(call, key, adm, req.model, dialect.path, payload)
        if req.stream and response.status == 200:
            await self._relay_stream(call, key, adm, response, send, receive, prompt, granted,
                                     req.include_usage, req.n, counter, lease, dialect)
            return
        if collect and response.status == 200:
            await self._collect_stream(call, key, adm, response, send, receive, prompt, granted, req.n, counter,
                                       lease, dialect)
            return
        await self._finish_plain(call, key, adm, response, send, prompt, granted, counter, dialect)

    async def _responses(self, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        await responses.serve(self, call, key, scope, receive, send)

    async def _embeddings(self, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await self._read_body(scope, receive)
        req = parse_embeddings(raw)
        call.model = req.model
        spec = self._usable(key, req.model, "embedding")
        prompt = embeddings_prompt(self._counters.get(req.model), req, spec)
        adm = await self._admit(call, key, prompt, 0, 0)
        response = await self._forward(call, key, adm, req.model, "/embeddings", _upstream_body(req, spec))
        granted = None if adm.granted is None else 0
        await self._finish_plain(call, key, adm, response, send, prompt, granted, None, None)

    async def _rerank(self, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pairs(call, key, parse_rerank(await self._read_body(scope, receive)), "/rerank", "results", send)

    async def _score(self, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pairs(call, key, parse_score(await self._read_body(scope, receive)), "/score", "data", send)

    async def _pairs(self, call: Call, key: KeyRecord, req: PairsRequest, path: str, listing: str,
                     send: Send) -> None:
        """A rerank or score request: prompt tokens only, one prompt per (query, document) pair."""
        call.model = req.model
        spec = self._usable(key, req.model, "rerank")
        prompt = pairs_prompt(self._counters.get(req.model), req, spec)
        adm = await self._admit(call, key, prompt, 0, 0)
        response = await self._forward(call, key, adm, req.model, path, _upstream_body(req, spec))
        granted = None if adm.granted is None else 0
        await self._finish_plain(call, key, adm, response, send, prompt, granted, None, None, listing=listing)

    async def _forward(self, call: Call, key: KeyRecord, adm: Admission, model: str, path: str,
                       payload: bytes) -> Response:
        try:
            return await self._upstreams.post(model, path, payload, call.request_id)
        except UpstreamError as exc:
            await self._settle(key, adm, 0)
            raise ApiError(exc.status, exc.code, str(exc), retry_after=exc.retry_after) from None
        except BaseException:
            await self._settle(key, adm, 0)
            raise

    async def _finish_plain(self, call: Call, key: KeyRecord, adm: Admission, response: Response,
                            send: Send, prompt_bound: int, granted: int | None, counter: TokenCounter | None,
                            dialect: Dialect | None, *, listing: str = "data") -> None:
        """A non-streamed answer (of a generation ``dialect``, or else of embeddings, rerank or score, whose
        results are in ``listing``): read it whole, check it, charge it, send it on."""
        try:
            try:
                data = await response.read()
            except UpstreamTimeout:
                raise ApiError(504, "upstream_timeout", "the model server did not answer within the timeout") \
                    from None
            except UpstreamError:
                raise ApiError(502, "upstream_error", "the model server's answer broke off") from None
            finally:
                response.release()
            status = response.status
            if status != 200:
                raise upstream_failure(status, data)
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict) or not isinstance(obj.get("choices" if dialect else listing), list):
                raise ApiError(502, "upstream_error", "the model server answered with something that is not a "
                               "valid response")
        except BaseException:
            await self._settle(key, adm, 0)
            raise
        report = reported(obj.get("usage"), prompt_only=dialect is None)
        fallback = counted = 0
        if dialect is not None:
            parts = [dialect.part(c, False) for c in obj["choices"] if isinstance(c, dict)]
            if counter is not None and (report is None or len(obj["choices"]) > 1):
                # Counted where the server said nothing, or may have said too little: servers have reported
                # one choice's tokens for several (llama-server with n: 2).
                counted = answer_tokens(counter, parts, dialect.texts)
                fallback = counted
            elif report is None:
                fallback = text_bytes(parts if dialect is CHAT else [dialect.texts(p) for p in parts
                                                                      if isinstance(p, dict)])
                if granted is not None:
                    fallback = min(fallback, granted)
        prompt, completion = charge(report, prompt_bound, granted, counted=counted, fallback_completion=fallback,
                                    request_id=call.request_id)
        if report != (prompt, completion):
            obj["usage"] = usage_object(prompt, completion) if dialect else {"prompt_tokens": prompt,
                                                                          "total_tokens": prompt}
            data = orjson.dumps(obj)
        await self._settle(key, adm, prompt + completion)
        await self._respond(call, send, 200, data, prompt=prompt, completion=completion)

    async def _relay_stream(self, call: Call, key: KeyRecord, adm: Admission, response: Response,
                            send: Send, receive: Receive, prompt_bound: int, granted: int | None,
                            include_usage: bool, n: int, counter: TokenCounter | None, lease: Lease | None,
                            dialect: Dialect) -> None:
        hdrs = [*rl.SSE, (b"x-request-id", call.request_id.encode()), rl.processing_ms(call.t0), *call.rate_headers]
        relay = StreamRelay(request_id=call.request_id, response=response, send=send, receive=receive,
                            headers=hdrs, prompt_bound=prompt_bound, granted=granted, include_usage=include_usage,
                            n=n, started_at=call.t0, clock=time.perf_counter, counter=counter, lease=lease,
                            dialect=dialect, writer=direct_writer(send))
        settled = False

        async def finish(prompt: int, completion: int, error_code: str | None) -> None:
            nonlocal settled
            settled = True
            await self._settle(key, adm, prompt + completion)
            if relay.started or error_code is None or error_code == "client_disconnected":
                self._record(call, 200, error_code, prompt, completion, relay.ttft_ms)

        try:
            await relay.run(finish)
        except ApiError as exc:
            # Nothing had been relayed: the error goes out as a plain answer (metered there).
            response.close()
            if not settled:
                await self._settle(key, adm, 0)
            raise exc from None
        except BaseException:
            response.close()
            if not settled:
                await self._settle(key, adm, 0)
            raise
        finally:
            response.release()

    async def _collect_stream(self, call: Call, key: KeyRecord, adm: Admission, response: Response, send: Send,
                              receive: Receive, prompt_bound: int, granted: int | None, n: int,
                              counter: TokenCounter | None, lease: Lease | None, dialect: Dialect) -> None:
        """A non-streamed request forwarded as a stream: relayed into a buffer (with the stream's
        accounting: leases, cut-off, usage), then answered as one ``chat.completion`` (or ``text_completion``)."""
        events: list[bytes] = []

        async def keep(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                events.append(message.get("body", b""))

        relay = StreamRelay(request_id=call.request_id, response=response, send=keep, receive=receive, headers=[],
                            prompt_bound=prompt_bound, granted=granted, include_usage=True, n=n, started_at=call.t0,
                            clock=time.perf_counter, counter=counter, lease=lease, dialect=dialect)
        settled = False

        async def finish(prompt: int, completion: int, error_code: str | None) -> None:
            nonlocal settled
            settled = True
            await self._settle(key, adm, prompt + completion)

        try:
            outcome = await relay.run(finish)
        except BaseException:
            response.close()
            if not settled:
                await self._settle(key, adm, 0)
            raise
        finally:
            response.release()
        prompt, completion = outcome.prompt_tokens, outcome.completion_tokens
        if outcome.client_gone:
            self._record(call, 200, "client_disconnected", prompt, completion, None)
            return
        if outcome.error is not None:  # the stream broke off after it had begun: an error, not half an answer
            raise outcome.error
        answer = (assemble if dialect is CHAT else assemble_completion)(b"".join(events))
        if answer is None:
            raise ApiError(502, "upstream_error", "the model server's stream held no answer")
        await self._respond(call, send, 200, orjson.dumps(answer), prompt=prompt, completion=completion)


def _upstream_body(req: EmbeddingsRequest | PairsRequest, spec: ModelSpec) -> bytes:
    """What is forwarded of a request the gateway does not rewrite: the canonical body, with the model's
    upstream name if the catalog gives one."""
    if spec.upstream_model is None:
        return req.canonical
    return orjson.dumps({**req.body, "model": spec.upstream_model})


def _lengths(body: dict[str, Any], per_choice: int, *, cap: bool) -> bool:
    """Write ``per_choice`` into every completion length field of ``body`` (and ``max_tokens`` if ``cap``
    and it has none); ``min_tokens`` follows it down. Returns whether the body changed."""
    present = [name for name in LENGTH_FIELDS if body.get(name) is not None]
    if not cap and all(body[name] == per_choice for name in present):
        return False
    for name in present:
        body[name] = per_choice
    if cap and "max_tokens" not in present and "max_completion_tokens" not in present:
        body["max_tokens"] = per_choice
    min_tokens = body.get("min_tokens")
    if type(min_tokens) is int and min_tokens > per_choice:
        body["min_tokens"] = per_choice
    return True


def build_llm_app(rt: Runtime) -> LLMApp:
    """The LLM listener's ASGI app."""
    return LLMApp(rt)
