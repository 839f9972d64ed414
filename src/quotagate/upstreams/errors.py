"""What can go wrong with a model server, as the gateway answers it.

    UpstreamError        502  upstream_error     every upstream of the model refused, failed (5xx) or
     ├── UpstreamTimeout  504  upstream_timeout   answered with something that is not a usable response;
     │                                           the model server went silent for longer than the model's
     │                                           ``timeout_seconds`` after it accepted the request
     ├── OutOfSockets     503  service_unavailable  this process is out of file descriptors (no failover)
     └── Unreachable      502  upstream_error     no connection could be made (refused, no route, TLS
          └── Stale                              failure, connect timeout): the next upstream is tried;
                                                 a reused keep-alive connection the server had closed
                                                 before sending a byte: retried once on a new one

Any other UpstreamError before the answer's head (the server closed a new connection without answering,
or answered with something that is not HTTP) also moves on to the next upstream: nothing has reached
the client yet. A timeout does not (the server may still be working on it).
"""

from __future__ import annotations


class UpstreamError(Exception):
    """The model server failed; rendered as 502 ``upstream_error``."""

    status = 502
    code = "upstream_error"
    retry_after: float | None = None


class UpstreamTimeout(UpstreamError):
    """The model server did not answer within the model's timeout; rendered as 504."""

    status = 504
    code = "upstream_timeout"


class Unreachable(UpstreamError):
    """No connection to the model server (nothing was sent): the next upstream is tried."""


class OutOfSockets(UpstreamError):
    """This process has no file descriptor left for a new connection (EMFILE/ENFILE): the gateway is
    overloaded, not the model server, so no upstream is put aside for it. Rendered as 503, retry shortly."""

    status = 503
    code = "service_unavailable"
    retry_after = 1.0


class Stale(Unreachable):
    """A reused keep-alive connection was closed by the server before it sent a byte of an answer.

    Servers close idle connections on their own schedule, so a request can cross the close on the wire;
    the server then never read it, and sending it again on a new connection is safe."""
