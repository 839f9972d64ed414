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
    tool_call       (stream) answer with one forced tool call: a name chunk, then one chunk per argument
                    token, finish_reason "tool_calls"
    usage_on_finish (stream) put the usage on the finish chunk (as some servers do) instead of a chunk of its own
    error_body      with ``status``: this JSON body instead of the OpenAI-shaped error
    stream_error    (stream) send this object as the first event, then end (a server failing mid-stream)
    raw             (stream) send these strings as the body, as they are (UTF-8), each in a write of its own,
                    ``token_delay`` apart: events cut anywhere, CRLF line ends, bytes no encoder would write

``/v1/responses`` answers as vLLM does (a ``response`` object, or its typed event stream: response.created,
output item and content part events, one ``response.output_text.delta`` per token, then
``response.completed``, or ``response.incomplete`` when ``max_output_tokens`` cut it short, carrying the
usage with ``input_tokens_details`` and ``output_tokens_details``). Besides ``tokens``, ``ignore_max``,
``usage`` (a Responses usage object), ``no_usage``, ``token_delay``, ``die_after``, ``hang_after``,
``tool_call`` and ``stream_error``, it takes ``reasoning`` (reasoning tokens generated before the text,
counted in ``output_tokens_details.reasoning_tokens``) and ``cached`` (``input_tokens_details.cached_tokens``).

Like real servers, it obeys every completion length field it knows: llama.cpp's ``n_predict`` first
(it overrides ``max_tokens`` there), then ``max_completion_tokens``, then ``max_tokens``; and ``best_of``
candidates are generated (and reported) besides the ``n`` returned, as vLLM does. With
``require_uuid_request_id`` set it answers 400 with an empty body to an X-Request-Id that is not a UUID,
as llama-cpp-python's server does.

Every request body received is appended to ``requests``, so tests can check what was (not) forwarded.
Reported prompt tokens are the prompt's text bytes // 2: always within the gateway's honest bound; with
``counter`` set (a model's ``TokenCounter``), they are counted with it, as a real server counts them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
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
        self.paths: list[str] = []  # the path of each of requests
        self.authorizations: list[str | None] = []
        self.disconnects = 0
        self.request_ids: list[str | None] = []
        self.require_uuid_request_id = False
        self.counter: Any = None  # a TokenCounter: count prompts as a real server of that model does
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

    def responses_requests(self) -> list[dict[str, Any]]:
        return [r for r, path in zip(self.requests, self.paths, strict=True) if path.endswith("/responses")]

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
        self.paths.append(scope["path"])
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        self.authorizations.append(auth.decode() if auth else None)
        rid = headers.get(b"x-request-id")
        self.request_ids.append(rid.decode() if rid is not None else None)
        if self.require_uuid_request_id and rid is not None:
            try:
                uuid.UUID(rid.decode())
            except ValueError:
                await send({"type": "http.response.start", "status": 400, "headers": [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
        fake = body.get("fake") or {}
        if self.mode == "hang" or fake.get("hang"):
            await asyncio.sleep(3600)
        status = 500 if self.mode == "error500" else fake.get("status")
        if status:
            await self._json(send, status, fake.get("error_body") or
                             {"error": {"message": f"fake failure {status}", "type": "server_error"}})
            return
        if self.mode == "garbage" or fake.get("garbage"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"<html>definitely not json"})
            return
        if scope["path"].endswith("/embeddings"):
            await self._embeddings(send, body, fake)
        elif scope["path"].endswith("/v1/completions"):
            await self._completions(send, body, fake)
        elif scope["path"].endswith(("/rerank", "/score")):
            await self._pairs(send, body, fake, scope["path"].endswith("/rerank"))
        elif scope["path"].endswith("/responses"):
            await self._responses(send, body, fake)
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
        prompt = max(1, _text(inputs) // 2) if self.counter is None else sum(self.counter.input(i) for i in inputs)
        usage = fake.get("usage") or {"prompt_tokens": prompt, "total_tokens": prompt}
        data = [{"object": "embedding", "index": i,
                 "embedding": "AACAPwAAAEA=" if body.get("encoding_format") == "base64" else [1.0, 2.0]}
                for i in range(len(inputs))]
        obj: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
        if not fake.get("no_usage"):
            obj["usage"] = usage
        await self._json(send, 200, obj)

    async def _pairs(self, send: Any, body: dict[str, Any], fake: dict[str, Any], rerank: bool) -> None:
        """``/rerank`` and ``/score`` as vLLM answers them: rerank's usage has only ``total_tokens``."""
        if rerank:
            docs = body.get("documents") or []
            pairs = [(body.get("query"), d) for d in docs]
        else:
            first, second = body.get("text_1"), body.get("text_2")
            second = second if isinstance(second, list) else [second]
            first = first if isinstance(first, list) else [first] * len(second)
            pairs = list(zip(first, second, strict=False))
        tokens = sum(max(1, _text([a, b]) // 2) if self.counter is None else
                     self.counter.input(str(a)) + self.counter.input(str(b)) for a, b in pairs)
        scores = [1.0 / (1 + i) for i in range(len(pairs))]
        obj: dict[str, Any] = {"id": "rerank-fake" if rerank else "score-fake", "model": body.get("model")}
        if rerank:
            results = [{"index": i, "relevance_score": scores[i]} for i in range(len(pairs))]
            if body.get("return_documents"):
                for r in results:
                    r["document"] = {"text": pairs[r["index"]][1]}
            obj["results"] = results[:body.get("top_n") or len(results)]
            usage: dict[str, Any] = {"total_tokens": tokens}
        else:
            obj.update({"object": "list", "created": 1,
                        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]})
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        if not fake.get("no_usage"):
            obj["usage"] = fake.get("usage") or usage
        await self._json(send, 200, obj)

    async def _completions(self, send: Any, body: dict[str, Any], fake: dict[str, Any]) -> None:
        """``/v1/completions`` as vLLM answers it: ``max(n, best_of)`` sequences per prompt (n returned),
        choices indexed prompt by prompt, each prompt's tokens counted once."""
        natural = int(fake.get("tokens", 8))
        limit = body.get("max_tokens")
        count = natural if fake.get("ignore_max") or not limit else min(natural, limit)
        value = body.get("prompt")
        prompts = [value] if isinstance(value, str) or (value and type(value[0]) is int) else list(value or [])
        n = body.get("n") or 1
        generated = max(n, body.get("best_of") or 1) * len(prompts)
        prompt = sum(len(p) if isinstance(p, list) else max(1, len(p.encode()) // 2) if self.counter is None
                     else self.counter.input(p) for p in prompts)
        usage = fake.get("usage") or {"prompt_tokens": prompt, "completion_tokens": count * generated,
                                      "total_tokens": prompt + count * generated}
        base = {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": body.get("model")}
        finish = "length" if count < natural else "stop"
        returned = n * len(prompts)
        if not body.get("stream"):
            obj: dict[str, Any] = {**base, "choices": [
                {"index": i, "text": " tok" * count, "logprobs": None, "finish_reason": finish}
                for i in range(returned)]}
            if not fake.get("no_usage"):
                obj["usage"] = usage
            await self._json(send, 200, obj)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def event(obj: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(obj) + b"\n\n",
                        "more_body": True})

        delay = float(fake.get("token_delay", 0))
        for t in range(count):
            if fake.get("die_after") == t:
                raise RuntimeError("fake upstream dies mid-stream")
            if delay:
                await asyncio.sleep(delay)
            await event({**base, "choices": [{"index": i, "text": " tok", "logprobs": None, "finish_reason": None}
                                             for i in range(returned)]})
        await event({**base, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": finish}
                                         for i in range(returned)]})
        if (body.get("stream_options") or {}).get("include_usage") and not fake.get("no_usage"):
            await event({**base, "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _chat(self, send: Any, receive: Any, body: dict[str, Any], fake: dict[str, Any]) -> None:
        natural = int(fake.get("tokens", 8))
        n_predict = body.get("n_predict")
        limit = (n_predict if isinstance(n_predict, int) and n_predict >= 0 else None) \
            or body.get("max_completion_tokens") or body.get("max_tokens")
        count = natural if fake.get("ignore_max") or not limit else min(natural, limit)
        n = body.get("n") or 1
        generated = max(n, body.get("best_of") or 1)
        prompt = max(1, _text(body.get("messages")) // 2) if self.counter is None else self.counter.prompt(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": count * generated,
                 "total_tokens": prompt + count * generated}
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
        delay = float(fake.get("token_delay", 0))
        if fake.get("raw") is not None:
            for i, piece in enumerate(fake["raw"]):
                if delay and i:
                    await asyncio.sleep(delay)
                await send({"type": "http.response.body", "body": piece.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if fake.get("stream_error"):
            await event(fake["stream_error"])
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if fake.get("tool_call"):
            await self._tool_call_stream(event, chunk, count, usage, body, fake)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return
        await event({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}
                                          for i in range(n)]})
        for t in range(count):
            if fake.get("hang_after") == t:
                await asyncio.sleep(3600)
            if fake.get("die_after") == t:
                raise RuntimeError("fake upstream dies mid-stream")
            if delay:
                await asyncio.sleep(delay)
            await event({**chunk, "choices": [{"index": i, "delta": {"content": " tok"}, "finish_reason": None}
                                              for i in range(n)]})
        final = {**chunk, "choices": [{"index": i, "delta": {}, "finish_reason": finish} for i in range(n)]}
        options = body.get("stream_options") or {}
        wants_usage = options.get("include_usage") and not fake.get("no_usage")
        if wants_usage and fake.get("usage_on_finish"):
            final["usage"] = usage
        await event(final)
        if wants_usage and not fake.get("usage_on_finish"):
            await event({**chunk, "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _responses(self, send: Any, body: dict[str, Any], fake: dict[str, Any]) -> None:
        natural = int(fake.get("tokens", 8))
        reasoning = int(fake.get("reasoning", 0))
        n_predict = body.get("n_predict")
        limit = (n_predict if isinstance(n_predict, int) and n_predict >= 0 else None) \
            or body.get("max_output_tokens") or body.get("max_completion_tokens") or body.get("max_tokens")
        total = natural + reasoning
        count = total if fake.get("ignore_max") or not limit else min(total, limit)
        if self.counter is None:
            prompt = max(1, (_text(body.get("input")) + _text(body.get("instructions"))) // 2)
        else:
            from quotagate.gateway.responses.prompt import as_chat
            prompt = self.counter.prompt(as_chat(body))
        usage = fake.get("usage") or {
            "input_tokens": prompt, "input_tokens_details": {"cached_tokens": int(fake.get("cached", 0))},
            "output_tokens": count, "output_tokens_details": {"reasoning_tokens": min(reasoning, count)},
            "total_tokens": prompt + count}
        incomplete = count < total
        head = {"id": "resp_fake", "object": "response", "created_at": 1, "model": body.get("model"),
                "status": "in_progress", "incomplete_details": None, "output": [], "usage": None,
                "max_output_tokens": body.get("max_output_tokens"), "store": body.get("store")}
        thinking = min(reasoning, count)
        items: list[dict[str, Any]] = []
        if thinking:
            items.append({"type": "reasoning", "id": "rs_fake", "summary": [], "status": "completed",
                          "content": [{"type": "reasoning_text", "text": " think" * thinking}]})
        words = count - thinking
        if fake.get("tool_call"):
            arguments = '{"q": "' + "x" * max(0, words - 2) + '"}' if words else ""
            items.append({"type": "function_call", "id": "fc_fake", "call_id": "call_fake", "name": "lookup",
                          "arguments": arguments, "status": "completed"})
        else:
            items.append({"type": "message", "id": "msg_fake", "role": "assistant", "status": "completed",
                          "content": [{"type": "output_text", "text": " tok" * words, "annotations": []}]})
        final = {**head, "status": "incomplete" if incomplete else "completed",
                 "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "output": items}
        if not fake.get("no_usage"):
            final["usage"] = usage
        if not body.get("stream"):
            await self._json(send, 200, final)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        sequence = 0

        async def event(kind: str, fields: dict[str, Any]) -> None:
            nonlocal sequence
            data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
            sequence += 1
            await send({"type": "http.response.body", "body": b"event: " + kind.encode() + b"\ndata: " + data
                        + b"\n\n", "more_body": True})

        if fake.get("stream_error"):
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(fake["stream_error"])
                        + b"\n\n", "more_body": False})
            return
        await event("response.created", {"response": head})
        await event("response.in_progress", {"response": head})
        delay = float(fake.get("token_delay", 0))
        emitted = 0

        async def token() -> None:
            nonlocal emitted
            if fake.get("hang_after") == emitted:
                await asyncio.sleep(3600)
            if fake.get("die_after") == emitted:
                raise RuntimeError("fake upstream dies mid-stream")
            if delay:
                await asyncio.sleep(delay)
            emitted += 1

        for index, item in enumerate(items):
            kind = item["type"]
            if kind == "reasoning":
                await event("response.output_item.added", {"output_index": index, "item": {**item, "content": [],
                                                                                          "status": "in_progress"}})
                for _ in range(thinking):
                    await token()
                    await event("response.reasoning_text.delta", {"item_id": item["id"], "output_index": index,
                                                                  "content_index": 0, "delta": " think"})
            elif kind == "function_call":
                await event("response.output_item.added", {"output_index": index, "item": {
                    **item, "arguments": "", "status": "in_progress"}})
                pieces = ['{"q": "'] + ["x"] * max(0, words - 2) + ['"}'] if words else []
                for piece in pieces[:words]:
                    await token()
                    await event("response.function_call_arguments.delta", {
                        "item_id": item["id"], "output_index": index, "delta": piece})
            else:
                await event("response.output_item.added", {"output_index": index, "item": {
                    **item, "content": [], "status": "in_progress"}})
                await event("response.content_part.added", {"item_id": item["id"], "output_index": index,
                                                            "content_index": 0, "part": {
                                                                "type": "output_text", "text": "", "annotations": []}})
                for _ in range(words):
                    await token()
                    await event("response.output_text.delta", {"item_id": item["id"], "output_index": index,
                                                               "content_index": 0, "delta": " tok", "logprobs": []})
                await event("response.output_text.done", {"item_id": item["id"], "output_index": index,
                                                          "content_index": 0, "text": " tok" * words, "logprobs": []})
                await event("response.content_part.done", {"item_id": item["id"], "output_index": index,
                                                           "content_index": 0, "part": item["content"][0]})
            await event("response.output_item.done", {"output_index": index, "item": item})
        await event("response.incomplete" if incomplete else "response.completed", {"response": final})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _tool_call_stream(event: Any, chunk: dict[str, Any], count: int, usage: dict[str, Any],
                                body: dict[str, Any], fake: dict[str, Any]) -> None:
        """A forced tool call as vLLM and llama.cpp stream one: the call's id and name with empty
        arguments first, then one argument token per chunk."""
        call = {"index": 0, "id": "call_fake", "type": "function", "function": {"name": "lookup", "arguments": ""}}
        await event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]},
                                           "finish_reason": None}]})
        for t in range(count):
            piece = '{"q": "' if t == 0 else ("x" if t < count - 1 else '"}')
            await event({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": piece}}]}, "finish_reason": None}]})
        await event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        if (body.get("stream_options") or {}).get("include_usage") and not fake.get("no_usage"):
            await event({**chunk, "choices": [], "usage": usage})
