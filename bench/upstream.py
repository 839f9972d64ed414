"""A fast local OpenAI-compatible upstream for the benchmark: fixed answers, no delay.

    python bench/upstream.py PORT

Non-streaming chat answers one small completion with usage; streaming chat answers 16 token chunks,
a finish chunk, the usage chunk when asked, and [DONE], all written at once.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
import uvicorn

_CHAT = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, this is a benchmark."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}})
_CHUNK = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"bench",' \
         b'"choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}\n\n'
_FINISH = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"bench",' \
          b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
_USAGE = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"bench",' \
         b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":16,"total_tokens":25}}\n\n'
_DONE = b"data: [DONE]\n\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if b'"stream":true' in body.replace(b" ", b""):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})  # first token at once
        tail = _CHUNK * 15 + _FINISH + (_USAGE if b"include_usage" in body else b"") + _DONE
        await send({"type": "http.response.body", "body": tail})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_CHAT))]})
    await send({"type": "http.response.body", "body": _CHAT})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", lifespan="off",
                log_level="warning", access_log=False)
