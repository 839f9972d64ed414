"""Compressed request bodies (``Content-Encoding: gzip`` or ``deflate``), inflated within the body limit.

Some clients compress large prompts. The limit applies to the inflated body too, checked as it grows: a
few kilobytes that inflate to gigabytes (a zip bomb) are refused with a 413 after at most ``limit`` bytes
were produced, never held whole in memory.
"""

from __future__ import annotations

import zlib

from quotagate.gateway.errors import ApiError

_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def decode_body(body: bytes, encoding: bytes, limit: int) -> bytes:
    """``body`` inflated as its ``Content-Encoding`` says; 415 for an encoding the gateway does not read,
    400 for data that is not what it claims, 413 past ``limit`` bytes inflated."""
    name = encoding.strip().lower()
    if name in (b"", b"identity"):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is "
                       "not supported; send the body as it is, or gzip or deflate it")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise ApiError(400, "invalid_request_error", f"the request body is not valid {name.decode()} data") \
            from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes once inflated")
    if not inflater.eof:
        raise ApiError(400, "invalid_request_error", f"the request body's {name.decode()} data is cut short")
    return out
