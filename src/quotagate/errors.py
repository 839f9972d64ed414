"""The control plane's errors. Each maps to one HTTP status and one stable ``code``.

    QuotagateError
     ├── InvalidRequest   400  invalid_request     (``field`` names the offending input)
     ├── Unauthenticated  401  unauthenticated
     ├── Forbidden        403  forbidden           (role too low)
     ├── NotFound         404  not_found           (also: exists but is not yours)
     ├── Conflict         409  conflict            (the resource's state forbids it)
     └── PayloadTooLarge  413  payload_too_large

The console API renders them as ``{"error": {"code", "message", "field"?}}``; services raise them.
"""

from __future__ import annotations


class QuotagateError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code


class InvalidRequest(QuotagateError):
    status = 400
    code = "invalid_request"


class Unauthenticated(QuotagateError):
    status = 401
    code = "unauthenticated"


class Forbidden(QuotagateError):
    status = 403
    code = "forbidden"


class NotFound(QuotagateError):
    status = 404
    code = "not_found"


class Conflict(QuotagateError):
    status = 409
    code = "conflict"


class PayloadTooLarge(QuotagateError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(QuotagateError):
    """The request body did not arrive whole: it stalled past the listener's body timeout, or the client
    went away (then nobody reads the answer)."""

    status = 408
    code = "request_timeout"
