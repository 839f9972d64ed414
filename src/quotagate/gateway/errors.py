"""The LLM API's errors, rendered in OpenAI's shape ``{"error": {"message", "type", "code", "param"}}``.

    ApiError
     ├── status 400  invalid_request_error   a bad body (``param`` names the field)
     ├── status 401  invalid_api_key / key_revoked / key_expired
     ├── status 403  model_not_allowed, network_not_allowed (the key's allowed_networks)
     ├── status 404  model_not_found, unknown_url
     ├── status 405  method_not_allowed
     ├── status 408  request_timeout       the request body stalled (httpserver.py, BODY_TIMEOUT)
     ├── status 413  payload_too_large
     ├── status 415  unsupported_media_type  a Content-Encoding other than gzip/deflate (gateway/encoding.py)
     ├── status 403  origin_not_allowed    a CORS preflight from an origin not allowed (gateway/cors.py)
     ├── status 429  rate_limit_exceeded / token_limit_exceeded (always with Retry-After and
     │               x-should-retry: whether waiting can help; gateway/refusals.py)
     ├── status 502  upstream_error
     ├── status 503  limiter_unavailable   the shared limiter (Redis) is down and its failure policy
     │                                     refuses (always with Retry-After; nothing was forwarded)
     │               service_unavailable   the key store could not be reached on a key-cache miss
     └── status 504  upstream_timeout

One class carries them all (status, code, type); the helpers below name the common ones, so that the
handler that renders them is the only place that knows the JSON shape.
"""

from __future__ import annotations

import orjson

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 431: "invalid_request_error",
          429: "rate_limit_error", 502: "upstream_error", 503: "server_error", 504: "upstream_error"}


class ApiError(Exception):
    """An error the LLM API answers with; ``retry_after`` (seconds) goes into Retry-After (always on 429)."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 retry_after: float | None = None, should_retry: bool | None = None,
                 allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        # x-should-retry on an answer with Retry-After; None: retrying helps if the wait is a minute at most.
        self.should_retry = should_retry
        self.allow = allow  # a 405's Allow header: the methods the path has (RFC 9110)

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": _TYPES.get(self.status, "api_error"),
                                       "code": self.code, "param": self.param}})


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400 for a body the gateway will not forward."""
    return ApiError(400, "invalid_request_error", message, param=param)
