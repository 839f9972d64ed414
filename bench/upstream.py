"""A fast local OpenAI-compatible upstream for the benchmark: fixed answers, no delay.

    python bench/upstream.py PORT

Non-streaming chat answers one small completion with usage; streaming chat answers 16 token chunks,
a finish chunk, the usage chunk when asked, and [DONE], all written at once. ``/v1/responses`` answers the
same in the Responses API's shapes: one ``response``, or its typed events (created, in progress, the output
item and content part, 16 ``response.output_text.delta`` events, the done events, ``response.completed``).
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

_RESP_HEAD = {"id": "resp_bench", "object": "response", "created_at": 1, "model": "bench", "status": "in_progress",
              "output": [], "usage": None}
_RESP_ITEM = {"type": "message", "id": "msg_bench", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "Hello there, this is a benchmark.", "annotations": []}]}
_RESP_USAGE = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 8,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 17}
_RESPONSE = orjson.dumps({**_RESP_HEAD, "status": "completed", "output": [_RESP_ITEM], "usage": _RESP_USAGE})


def _event(kind: str, sequence: int, **fields: Any) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


_RESP_FIRST = _event("response.created", 0, response=_RESP_HEAD)
_RESP_TAIL = b"".join([
    _event("response.in_progress", 1, response=_RESP_HEAD),
    _event("response.output_item.added", 2, output_index=0,
           item={**_RESP_ITEM, "content": [], "status": "in_progress"}),
    _event("response.content_part.added", 3, item_id="msg_bench", output_index=0, content_index=0,
           part={"type": "output_text", "text": "", "annotations": []}),
    *(_event("response.output_text.delta", 4 + i, item_id="msg_bench", output_index=0, content_index=0, delta=" tok",
             logprobs=[]) for i in range(16)),
    _event("response.output_text.done", 20, item_id="msg_bench", output_index=0, content_index=0, text=" tok" * 16,
           logprobs=[]),
    _event("response.content_part.done", 21, item_id="msg_bench", output_index=0, content_index=0,
           part={"type": "output_text", "text": " tok" * 16, "annotations": []}),
    _event("response.output_item.done", 22, output_index=0, item=_RESP_ITEM),
    _event("response.completed", 23, response={**_RESP_HEAD, "status": "completed", "output": [_RESP_ITEM],
                                               "usage": {**_RESP_USAGE, "output_tokens": 16, "total_tokens": 25}}),
])


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    responses = scope["path"].endswith("/responses")
    if b'"stream":true' in body.replace(b" ", b""):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if responses:
            await send({"type": "http.response.body", "body": _RESP_FIRST, "more_body": True})
            await send({"type": "http.response.body", "body": _RESP_TAIL})
            return
        await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})  # first token at once
        tail = _CHUNK * 15 + _FINISH + (_USAGE if b"include_usage" in body else b"") + _DONE
        await send({"type": "http.response.body", "body": tail})
        return
    answer = _RESPONSE if responses else _CHAT
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", lifespan="off",
                log_level="warning", access_log=False)
