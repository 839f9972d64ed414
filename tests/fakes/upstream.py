"""A controllable OpenAI-compatible model server for the gateway's tests, served by uvicorn in a thread.

Server-wide behaviour is set with ``mode`` ("ok", "error500", "garbage", "hang"); per-request behaviour
with a ``fake`` object in the request body (the gateway forwards unknown fields; the openai SDK sends it
with ``extra_body={"fake": {...}}``):

    tokens          completion tokens per choice when max_tokens allows (default 8)
    ignore_max      generate ``tokens`` whatever max_tokens says
    usage           a usage object to report instead of the true one (a lying server)
    no_usage        report no usage at all
    status          answer with this status and an OpenAI-shaped error
    garbage         answer 200 with a body that is not JSON
    hang            never answer
    hang_after      (stream) hang after this many token chunks
    die_after       (stream) drop the connection after this many token chunks
    token_delay     (stream) seconds between token chunks

Every request body received is appended to ``requests``, so tests can check what was (not) forwarded.
Reported prompt tokens are the prompt's text bytes // 2: always within the gateway's honest bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import orjson
import uvicorn

from tests.support import free_port

Scope = dict[str, Any]


def _text(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_text(v) for v in value)
    if isinstance(value, dict):
        return sum(_text(v) for v in value.values())
    return 0


class FakeUpstream:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.disconnects = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning",
                                loop="asyncio", http="h11", timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "messages" in r]

    # -- the ASGI app ------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            body = orjson.loads(b"".join(parts))
        except orjson.JSONDecodeError:
            body = {}
        self.requests.append(body)
        auth = dict(scope["headers"]).get(b"authorization")
        self.authorizations.append(auth.decode() if auth else None)
        fake = body.get("fake") or {}
        if self.mode == "hang" or fake.get("hang"):
            await asyncio.sleep(3600)
        status = 500 if self.mode == "error500" else fake.get("status")
        if status:
            await self._json(send, status, {"error": {"message": f"fake failure {status}", "type": "server_error"}})
            return
        if self.mode == "garbage" or fake.get("garbage"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"<html>definitely not json"})
            return
        if scope["path"].endswith("/embeddings"):
            await self._embeddings(send, body, fake)
        else:
            await self._chat(send, receive, body, fake)

    @staticmethod
    async def _json(send: Any, status: int, obj: Any) -> None:
        data = orjson.dumps(obj)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})

    async def _embeddings(self, send: Any, body: dict[str, Any], fake: dict[str, Any]) -> None:
        value = body.get("input")
        inputs = [value] if isinstance(value, str) else list(value or [])
        prompt = max(1, _text(inputs) // 2)
        usage = fake.get("usage") or {"prompt_tokens": prompt, "total_tokens": prompt}
        data = [{"object": "embedding", "index": i,
                 "embedding": "AACAPwAAAEA=" if body.get("encoding_format") == "base64" else [1.0, 2.0]}
                for i in range(len(inputs))]
        obj: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
        if not fake.get("no_usage"):
            obj["usage"] = usage
        await self._json(send, 200, obj)

    async def _chat(self, send: Any, receive: Any, body: dict[str, Any], fake: dict[str, Any]) -> None:
        natural = int(fake.get("tokens", 8))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        count = natural if fake.get("ignore_max") or not limit else min(natural, limit)
        n = body.get("n") or 1
        prompt = max(1, _text(body.get("messages")) // 2)
        usage = {"prompt_tokens": prompt, "completion_tokens": count * n, "total_tokens": prompt + count * n}
        if fake.get("usage"):
            usage = fake["usage"]
        base = {"id": "chatcmpl-fake", "created": 1, "model": body.get("model")}
        finish = "length" if count < natural else "stop"
        if not body.get("stream"):
            obj: dict[str, Any] = {**base, "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": " tok" * count}, "finish_reason": finish}
                for i in range(n)]}
            if not fake.get("no_usage"):
                obj["usage"] = usage
            await self._json(send, 200, obj)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def event(obj: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(obj) + b"\n\n",
                        "more_body": True})

        chunk = {**base, "object": "chat.completion.chunk"}
        await event({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}
                                          for i in range(n)]})
        delay = float(fake.get("token_delay", 0))
        for t in range(count):
            if fake.get("hang_after") == t:
                await asyncio.sleep(3600)
            if fake.get("die_after") == t:
                raise RuntimeError("fake upstream dies mid-stream")
            if delay:
                await asyncio.sleep(delay)
            await event({**chunk, "choices": [{"index": i, "delta": {"content": " tok"}, "finish_reason": None}
                                              for i in range(n)]})
        await event({**chunk, "choices": [{"index": i, "delta": {}, "finish_reason": finish} for i in range(n)]})
        options = body.get("stream_options") or {}
        if options.get("include_usage") and not fake.get("no_usage"):
            await event({**chunk, "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
