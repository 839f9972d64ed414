"""Reading a model server's error, in any of the shapes servers use, into the LLM API's own error.

Shapes seen: OpenAI's ``{"error": {"message", "type", "code"}}`` (vLLM ≥ 0.10.1, llama.cpp, Ollama);
``{"object": "error", "message", "type", "code"}`` (vLLM before 0.10.1, SGLang); ``{"detail": "..."}``
(FastAPI-based servers, llama-cpp-python); ``{"error": "..."}``; an empty or non-JSON body.

The server's message reaches the client unchanged in meaning. A prompt too long for the model is
``context_length_exceeded`` (OpenAI's code, what clients look for to trim a conversation): servers say it
in their own words, recognised here by code, type or message.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from quotagate.gateway.errors import ApiError, bad_request

_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error", "context_window_exceeded"})
# vLLM "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens ...";
# SGLang "The input (3000 tokens) is longer than the model's context length (2048 tokens)."; llama.cpp
# "the request exceeds the available context size"; llama-cpp-python "Requested tokens (3000) exceed
# context window of 2048"; TGI "`inputs` tokens + `max_new_tokens` must be <= 2048".
_CONTEXT_MESSAGE = re.compile(r"context (length|window|size)|maximum context|must be <= \d+", re.IGNORECASE)


def read_error(obj: Any) -> tuple[str | None, str | None]:
    """(message, code or type) of an error object in any known shape; (None, None) if there is none."""
    if not isinstance(obj, dict):
        return None, None
    err = obj.get("error")
    if isinstance(err, dict):
        source: dict[str, Any] = err
    elif isinstance(err, str):
        return err, None
    elif obj.get("object") == "error":
        source = obj
    elif isinstance(obj.get("detail"), str):
        return obj["detail"], None
    else:
        return None, None
    message = source.get("message")
    code = source.get("code")
    kind = source.get("type")
    label = code if isinstance(code, str) and code else kind if isinstance(kind, str) else None
    if isinstance(kind, str) and kind in _CONTEXT_CODES:
        label = kind
    return (message if isinstance(message, str) else None), label


def _context_exceeded(message: str | None, label: str | None) -> bool:
    return label in _CONTEXT_CODES or (message is not None and _CONTEXT_MESSAGE.search(message) is not None)


def upstream_failure(status: int, data: bytes) -> ApiError:
    """The LLM API's answer to a model server's non-200 answer ``data`` with ``status``."""
    try:
        message, label = read_error(orjson.loads(data))
    except orjson.JSONDecodeError:
        message, label = None, None
    if status in (400, 413, 422):
        # The model server refused the request itself (context too long, bad parameter): the client's error.
        return client_error(message, label)
    return ApiError(502, "upstream_error", f"the model server answered {status}" + (f": {message}" if message else ""))


def client_error(message: str | None, label: str | None) -> ApiError:
    """A 400 for a request the model server refused as the client's fault."""
    if _context_exceeded(message, label):
        return ApiError(400, "context_length_exceeded", message or "the prompt is longer than the model's context",
                        param="messages")
    return bad_request(f"the model server refused the request: {message or 'no reason given'}")


def stream_failure(obj: dict[str, Any]) -> ApiError:
    """The error for an error event in a stream: the client's (400) if the server says so, else a 502."""
    message, label = read_error(obj)
    err = obj.get("error")
    status = err.get("code") if isinstance(err, dict) else obj.get("code")
    if _context_exceeded(message, label) or (type(status) is int and 400 <= status < 500 and status != 429) \
            or label == "invalid_request_error":
        return client_error(message, label)
    return ApiError(502, "upstream_error", f"the model server failed mid-stream: {message or 'no reason given'}")
