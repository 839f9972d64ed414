"""The console API's plumbing: bounded bodies, bearer authentication, one error renderer."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from quotagate.accounts.models import Actor
from quotagate.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QuotagateError,
    RequestTimeout,
    Unauthenticated,
)
from quotagate.httpserver import BODY_ERROR
from quotagate.openapi.spec import Operation, operation_of
from quotagate.validation import parse_json_body

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: QuotagateError) -> JSON:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.field:
        body["field"] = exc.field
    headers = {"WWW-Authenticate": 'Bearer realm="quotagate"'} if exc.status == 401 else None
    return JSON({"error": body}, status_code=exc.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}


async def http_exception_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
    # Starlette's 405 names the methods the path has in an Allow header (RFC 9110 requires it): keep it.
    return JSON({"error": {"code": code, "message": message}}, status_code=exc.status_code, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("the Content-Length header is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise body_lost(request) from None
    return b"".join(chunks)


def body_lost(request: Request) -> QuotagateError:
    """The error for a body that did not arrive whole: a framing error is a 400; a stall (or a client
    gone, when nobody reads the answer) is a 408."""
    if request.scope.get(BODY_ERROR) == "malformed":
        return InvalidRequest("malformed HTTP request body (its chunked framing)")
    return RequestTimeout("the request body stopped arriving; send it whole, at once")


async def client_disconnect_handler(request: Request, _exc: Exception) -> Response:
    """A body the web console's forms were reading did not arrive whole: 400 or 408, not a 500."""
    return error_response(body_lost(request))


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated console API call, as handlers see it."""

    actor: Actor
    path: dict[str, str]
    query: QueryParams
    body: bytes
    operation: Operation

    def json(self, model: type[M]) -> M:
        if model is not self.operation.body:  # what the OpenAPI document says it takes, by construction
            raise TypeError(f"the handler parses {model.__name__}, its @operation says {self.operation.body}")
        return parse_json_body(model, self.body)

    def flag(self, name: str) -> bool:
        raw = self.query.get(name)
        if raw is None:
            return False
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise InvalidRequest(f"{name}: must be true or false, not {raw!r}", field=name)


Result = tuple[int, Any]
Handler = Callable[[Call], Result]
Authenticator = Callable[[Request], Awaitable[Actor]]


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def bearer_token(request: Request) -> str:
    if len(request.headers.getlist("authorization")) > 1:  # which one counts differs between servers: neither
        raise InvalidRequest("the request has more than one Authorization header")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing access token: send 'Authorization: Bearer <access-token>'")
    return token.strip()


# Every id the API hands out is a type prefix and base62 characters (see ``ids.new_id``).
_ID = re.compile(r"[A-Za-z0-9_]{1,64}")


def check_path_ids(params: dict[str, str]) -> None:
    """A path id that cannot be one of ours is simply not found (and never reaches the store)."""
    for name, value in params.items():
        if not _ID.fullmatch(value):
            raise NotFound(f"no such resource: {name} {value[:64]!r}")


def endpoint(handler: Handler, authenticate: Authenticator,
             body_limit: int) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a synchronous handler: read the bounded body, authenticate, run it off the event loop,
    render its result or its error. An unexpected error is logged and answered with a JSON 500."""
    op = operation_of(handler)  # no route without its place in the OpenAPI document

    async def run(request: Request) -> Response:
        try:
            body = await read_body(request, body_limit)
            actor = await authenticate(request)
            params = dict(request.path_params)
            check_path_ids(params)
            call = Call(actor=actor, path=params, query=request.query_params, body=body, operation=op)
            status, payload = await run_in_threadpool(handler, call)
        except QuotagateError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return JSON({"error": {"code": "internal_error", "message": "an unexpected error occurred; "
                                   "it has been logged"}}, status_code=500)
        if status == 204:
            return Response(status_code=204)
        if isinstance(payload, Response):  # a handler's own rendering (a CSV export)
            return payload
        return JSON(payload, status_code=status)

    return run


def admin_only(endpoint: Callable[[Request], Awaitable[Response]],
               authenticate: Callable[[str], tuple[Any, str]]) -> Callable[[Request], Awaitable[Response]]:
    """``endpoint`` behind an instance admin's access token (``authenticate``: the accounts service's):
    401 without a valid token, 403 for anyone else. For /metrics on the console port, which shows every
    project's ids and model names."""

    async def guarded(request: Request) -> Response:
        try:
            user, _ = await run_in_threadpool(authenticate, bearer_token(request))
            if not user.is_admin:
                raise Forbidden("/metrics is for instance admins (or scrape the metrics listener, "
                                "QUOTAGATE_METRICS_PORT)")
        except QuotagateError as exc:
            return error_response(exc)
        return await endpoint(request)

    return guarded
