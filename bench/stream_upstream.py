"""A model server for the streams benchmark: long streams, one token every ``delay`` seconds, thousands at once.

    python bench/stream_upstream.py PORT [--delay 0.05]

A streamed chat request gets its answer's head and first token chunk at once, then one token chunk every
``delay`` seconds until it has sent ``max_tokens`` of them (one token each, as vLLM, llama.cpp and Ollama
send), then the finish chunk, the usage chunk (when asked) and ``[DONE]`` with the last token. The body is
chunked, one HTTP chunk per event, as uvicorn-served model servers write it. A request that is not a
stream gets a small fixed answer.

Why not bench/upstream.py's uvicorn: at 3,000 streams of 20 tokens a second (60,000 writes a second) an
ASGI server's per-send cost would make the upstream, not the gateway, the bottleneck of the benchmark. So
this speaks HTTP/1.1 with a raw asyncio protocol on uvloop (httptools parses the requests), and each stream
is a timer scheduled at absolute times (start + k * delay), so that a busy moment does not shift the rest.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import httptools
import orjson
import uvloop

_ID = b'"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"bench"'
_TOKEN = b'data: {' + _ID + b',"choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}\n\n'
_FINISH = b'data: {' + _ID + b',"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
_USAGE = b'data: {' + _ID + b',"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":%d,"total_tokens":%d}}\n\n'
_DONE = b"data: [DONE]\n\n"
_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
         b"transfer-encoding: chunked\r\n\r\n")
_CHAT = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_TOKEN_CHUNK = _chunk(_TOKEN)


class _Stream:
    """One streamed answer: a token at each tick, on the loop's clock."""

    __slots__ = ("conn", "delay", "left", "next_at", "tail", "timer")

    def __init__(self, conn: _Connection, tokens: int, delay: float, include_usage: bool) -> None:
        self.conn = conn
        self.delay = delay
        self.left = tokens
        tail = _FINISH + (_USAGE % (tokens, tokens + 9) if include_usage else b"") + _DONE
        self.tail = _chunk(tail) + b"0\r\n\r\n"
        self.next_at = conn.loop.time()
        self.timer: asyncio.TimerHandle | None = None

    def tick(self, first: bool = False) -> None:
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            return
        self.left -= 1
        data = _TOKEN_CHUNK if self.left > 0 else _TOKEN_CHUNK + self.tail
        transport.write(_HEAD + data if first else data)
        if self.left > 0:
            self.next_at += self.delay
            self.timer = self.conn.loop.call_at(self.next_at, self.tick)
        else:
            self.conn.stream = None


class _Connection(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.stream: _Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stream is not None and self.stream.timer is not None:
            self.stream.timer.cancel()
        self.stream = None

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        try:
            request: Any = orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError:
            request = {}
        if not isinstance(request, dict) or not request.get("stream"):
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(_CHAT), _CHAT))
            return
        tokens = request.get("max_tokens") or 16
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        self.stream = _Stream(self, max(1, int(tokens)), self.delay, include_usage)
        self.stream.tick(first=True)


async def serve(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(delay), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between token chunks")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.delay))


if __name__ == "__main__":
    main()
