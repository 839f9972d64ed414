"""A SIMULATED OpenAI-compatible model server, for the demo configuration and for trying quotagate out
without a GPU. It runs no model: it writes deterministic made-up text at ``tokens_per_second`` and
reports usage the way vLLM does (``stream_options.include_usage`` included). Every answer says so:
``system_fingerprint: "quotagate-simulator"`` and an ``x-quotagate-simulated: true`` header.

Token counts are a real tokenizer's: the simulated models have one (``simulator/tokenizer/``, a small
byte-level BPE with a ChatML template, the demo catalog's ``tokenizer``), so prompts are counted as a real
server counts them (chat template applied) and the gateway's exact counts can be tried on the demo. The
made-up answers are words that are one token each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from quotagate.gateway.responses.prompt import as_chat
from quotagate.tokens.counter import TokenCounter

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

FINGERPRINT = "quotagate-simulator"
DEFAULT_COMPLETION = (12, 48)   # natural answer length range, in tokens, when max_tokens allows
EMBEDDING_DIMENSIONS = 32
_WORDS = ("the", "gateway", "simulated", "model", "answers", "with", "made-up", "tokens", "and", "honest",
          "usage", "so", "that", "limits", "budgets", "streams", "can", "be", "tried", "without", "a", "GPU",
          "quota", "key", "request", "window", "minute", "token", "reply", "text")
_HEADERS = [(b"content-type", b"application/json"), (b"x-quotagate-simulated", b"true")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-quotagate-simulated", b"true")]


def _seed(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _prompt_tokens(messages: Any) -> int:
    size = len(orjson.dumps(messages)) if messages is not None else 0
    count = len(messages) if isinstance(messages, list) else 1
    return max(1, size // 4) + 3 * count


def demo_counter() -> TokenCounter:
    """The simulated models' tokenizer and chat template, shipped with the package."""
    path = resources.files("quotagate").joinpath("simulator", "tokenizer", "tokenizer.json")
    return TokenCounter.from_files(Path(str(path)))


class SimulatorApp:
    def __init__(self, tokens_per_second: float, counter: TokenCounter | None = None) -> None:
        self._delay = 1.0 / tokens_per_second
        self._counter = counter
        # Words that are one token each (with the space before them), so that each is one token generated.
        single = [w for w in _WORDS if counter.text(" " + w) == 1] if counter is not None else []
        self._vocabulary = tuple(single) or _WORDS

    def _words(self, seed: int, count: int) -> list[str]:
        vocabulary = self._vocabulary
        return [" " + vocabulary[((seed >> (i % 48)) ^ i) % len(vocabulary)] for i in range(count)]

    def _prompt(self, body: dict[str, Any]) -> int:
        counted = None
        if self._counter is not None:
            with contextlib.suppress(Exception):  # a shape the template does not take: made-up counts
                counted = self._counter.prompt(body)
        return counted if counted is not None else _prompt_tokens(body.get("messages"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path.endswith("/chat/completions") and scope["method"] == "POST":
            await self._chat(await _body(receive), send)
        elif path.endswith("/v1/completions") and scope["method"] == "POST":
            await self._chat(await _body(receive), send, text=True)
        elif path.endswith("/v1/responses") and scope["method"] == "POST":
            await self._responses(await _body(receive), send)
        elif path.endswith("/embeddings") and scope["method"] == "POST":
            await _json(send, 200, self._embeddings(await _body(receive)))
        elif path.endswith("/models"):
            await _json(send, 200, {"object": "list", "data": [
                {"id": "simulated", "object": "model", "created": 0, "owned_by": FINGERPRINT}]})
        elif path in ("/health", "/healthz"):
            await _json(send, 200, {"status": "ok", "simulated": True})
        else:
            await _json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    async def _chat(self, raw: bytes, send: Send, *, text: bool = False) -> None:
        """A chat completion, or with ``text`` a (legacy) completion of one string prompt."""
        field = "prompt" if text else "messages"
        try:
            body = orjson.loads(raw)
            if not isinstance(body[field], str if text else list):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            await _json(send, 400, {"error": {"message": f"a JSON body with {field} is required"
                                              + (" (one string)" if text else ""), "type": "invalid_request_error"}})
            return
        seed = _seed(raw)
        natural = DEFAULT_COMPLETION[0] + seed % (DEFAULT_COMPLETION[1] - DEFAULT_COMPLETION[0])
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        count = min(natural, limit) if isinstance(limit, int) and limit > 0 else natural
        finish = "length" if count < natural else "stop"
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 1) > 0 else 1
        prompt = self._counter.input(body["prompt"]) if text and self._counter is not None else \
            max(1, len(body["prompt"]) // 4) if text else self._prompt(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": count * n, "total_tokens": prompt + count * n}
        base = {"id": f"{'cmpl' if text else 'chatcmpl'}-sim-{seed:016x}", "created": int(time.time()),
                "model": body.get("model", ""), "system_fingerprint": FINGERPRINT}
        words = self._words(seed, count)
        if not body.get("stream"):
            if self._delay * count > 0.0005:
                await asyncio.sleep(self._delay * count)
            choices: list[dict[str, Any]]
            if text:
                choices = [{"index": i, "text": "".join(words), "finish_reason": finish, "logprobs": None}
                           for i in range(n)]
            else:
                choices = [{"index": i, "message": {"role": "assistant", "content": "".join(words)},
                            "finish_reason": finish, "logprobs": None} for i in range(n)]
            await _json(send, 200, {**base, "object": "text_completion" if text else "chat.completion",
                                    "choices": choices, "usage": usage})
            return
        options = body.get("stream_options") or {}
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})

        async def event(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**base, "object": "text_completion" if text else "chat.completion.chunk", "choices": choices,
                     **extra}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                        "more_body": True})

        if not text:
            await event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])
        for word in words:
            await asyncio.sleep(self._delay)
            await event([{"index": i, "text": word, "finish_reason": None} if text else
                         {"index": i, "delta": {"content": word}, "finish_reason": None} for i in range(n)])
        await event([{"index": i, "text": "", "finish_reason": finish} if text else
                     {"index": i, "delta": {}, "finish_reason": finish} for i in range(n)])
        if isinstance(options, dict) and options.get("include_usage"):
            await event([], usage=usage)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _responses(self, raw: bytes, send: Send) -> None:
        """A response of the Responses API (as vLLM serves it): one ``response``, or its typed events."""
        try:
            body = orjson.loads(raw)
            if not isinstance(body["input"], str | list):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            await _json(send, 400, {"error": {"message": "a JSON body with input is required",
                                              "type": "invalid_request_error"}})
            return
        seed = _seed(raw)
        natural = DEFAULT_COMPLETION[0] + seed % (DEFAULT_COMPLETION[1] - DEFAULT_COMPLETION[0])
        limit = body.get("max_output_tokens")
        count = min(natural, limit) if isinstance(limit, int) and limit > 0 else natural
        chat = None
        with contextlib.suppress(Exception):  # a shape the conversion does not take: made-up counts
            chat = as_chat(body)
        prompt = self._prompt(chat) if chat is not None else _prompt_tokens(body["input"])
        words = self._words(seed, count)
        rid, mid = f"resp_sim{seed:016x}", f"msg_sim{seed:016x}"
        head = {"id": rid, "object": "response", "created_at": int(time.time()), "model": body.get("model", ""),
                "status": "in_progress", "incomplete_details": None, "output": [], "usage": None, "store": False}
        part = {"type": "output_text", "text": "".join(words), "annotations": []}
        item = {"type": "message", "id": mid, "role": "assistant", "status": "completed", "content": [part]}
        final = {**head, "status": "incomplete" if count < natural else "completed", "output": [item],
                 "incomplete_details": {"reason": "max_output_tokens"} if count < natural else None,
                 "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                           "output_tokens": count, "output_tokens_details": {"reasoning_tokens": 0},
                           "total_tokens": prompt + count}}
        if not body.get("stream"):
            if self._delay * count > 0.0005:
                await asyncio.sleep(self._delay * count)
            await _json(send, 200, final)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        sequence = 0

        async def event(kind: str, **fields: Any) -> None:
            nonlocal sequence
            data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
            sequence += 1
            await send({"type": "http.response.body", "body": b"event: " + kind.encode() + b"\ndata: " + data
                        + b"\n\n", "more_body": True})

        at = {"item_id": mid, "output_index": 0, "content_index": 0}
        await event("response.created", response=head)
        await event("response.in_progress", response=head)
        await event("response.output_item.added", output_index=0, item={**item, "status": "in_progress",
                                                                        "content": []})
        await event("response.content_part.added", **at, part={**part, "text": ""})
        for word in words:
            await asyncio.sleep(self._delay)
            await event("response.output_text.delta", **at, delta=word, logprobs=[])
        await event("response.output_text.done", **at, text=part["text"], logprobs=[])
        await event("response.content_part.done", **at, part=part)
        await event("response.output_item.done", output_index=0, item=item)
        await event("response.incomplete" if count < natural else "response.completed", response=final)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _embeddings(self, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
            value = body["input"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return {"error": {"message": "a JSON body with input is required"}}
        inputs = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
        dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else EMBEDDING_DIMENSIONS
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = orjson.dumps(item)
            if isinstance(item, list):
                tokens += len(item)
            else:
                tokens += self._counter.input(item) if self._counter is not None else max(1, len(text) // 4)
            seed = _seed(text)
            raw_vec = [math.sin(seed % 1000 + j * 0.7) for j in range(dims)]
            norm = math.sqrt(sum(v * v for v in raw_vec)) or 1.0
            vec = [v / norm for v in raw_vec]
            emb: Any = vec
            if body.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": body.get("model", ""),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _json(send: Send, status: int, obj: Any) -> None:
    body = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [*_HEADERS, (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def build_simulator_app(tokens_per_second: float) -> SimulatorApp:
    """The simulated model server's ASGI app (made-up tokens; see the module docstring)."""
    log.warning("the simulated model server writes made-up text at %g tokens/s; it runs no model",
                tokens_per_second)
    return SimulatorApp(tokens_per_second, demo_counter())
