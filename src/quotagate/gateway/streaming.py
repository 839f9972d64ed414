"""Relaying a chat completion (or completion: ``dialects.py``) stream (SSE) from a model server to the
client, event by event.

Each complete event is sent on as soon as it has arrived (nothing is held back but a partial event).
The relay parses only what it must: each event's JSON, to count token-carrying deltas, to notice the
usage chunk and errors. It asks the model server for usage (the caller sets
``stream_options.include_usage``), passes the usage chunk on only if the client asked for it, and
cuts the stream off, with ``finish_reason: "length"`` and ``[DONE]``, before a chunk that would take
it past its reservation. Each delta chunk carries at least one token, so the count is a lower bound
of what was generated and an honest model server is never cut off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from quotagate.gateway.dialects import CHAT, Dialect
from quotagate.gateway.errors import ApiError
from quotagate.gateway.upstream_errors import stream_failure
from quotagate.gateway.usage import charge, reported, usage_object
from quotagate.tokens.counter import TokenCounter
from quotagate.upstreams.client import Response, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

_DONE = b"data: [DONE]\n\n"


def _tokens_in(choices: list[Any], dialect: Dialect) -> tuple[int, bool]:
    """(token-carrying parts, whether any choice finished) of one chunk's choices."""
    count = 0
    finished = False
    carries, part = dialect.carries_token, dialect.part
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = part(choice, True)
        if isinstance(delta, dict) and carries(delta):
            count += 1
        if choice.get("finish_reason"):
            finished = True
    return count, finished


class _More:
    """An event that needs more completion tokens than are reserved (the relay reserves them, then
    handles it again)."""


_MORE = _More()


class Lease:
    """A stream's completion tokens, reserved block by block as they are generated instead of all at once.

    ``more(tokens)`` reserves at least ``tokens`` more if the key's tpm and budget have them (a block
    that doubles each time, up to ``ceiling``, so a long stream asks rarely); it returns how many it got.
    """

    FIRST = 16            # per choice: the first block, reserved at admission
    LARGEST = 1024        # the largest block asked for at once

    def __init__(self, extend: Callable[[int], Awaitable[int]], *, first: int, ceiling: int | None) -> None:
        self._extend = extend
        self._block = first
        self._ceiling = ceiling  # the most the request may reserve in all (None: its budget is the bound)

    def more_allowed(self, reserved: int) -> bool:
        return self._ceiling is None or reserved < self._ceiling

    async def more(self, need: int, reserved: int) -> int:
        """Reserve at least ``need`` more tokens (a whole block if it can), on top of ``reserved``."""
        self._block = min(self._block * 2, self.LARGEST)
        ask = max(need, self._block)
        if self._ceiling is not None:
            ask = min(ask, self._ceiling - reserved)
        return await self._extend(ask) if ask > 0 else 0


def _collect(choices: list[Any], texts: dict[int, list[str]], dialect: Dialect) -> None:
    """Append the generated text of each choice's delta to ``texts`` (by choice index)."""
    for choice in choices:
        if isinstance(choice, dict) and isinstance(delta := dialect.part(choice, True), dict):
            index = choice.get("index", 0)
            texts.setdefault(index if type(index) is int else 0, []).extend(dialect.texts(delta))


@dataclass(slots=True)
class StreamOutcome:
    prompt_tokens: int
    completion_tokens: int
    error_code: str | None
    ttft_ms: float | None
    client_gone: bool
    error: ApiError | None  # the stream broke off after it had begun (the client got an error event)


class StreamRelay:
    """One stream's relay. ``finish(prompt, completion, error_code)`` settles and meters; it is awaited
    before the last bytes go out."""

    def __init__(self, *, request_id: str, response: Response, send: Send, receive: Receive,
                 headers: list[tuple[bytes, bytes]], prompt_bound: int, granted: int | None,
                 include_usage: bool, n: int, started_at: float, clock: Callable[[], float],
                 counter: TokenCounter | None = None, lease: Lease | None = None,
                 dialect: Dialect = CHAT) -> None:
        self._rid = request_id
        self._dialect = dialect
        self._resp = response
        self._send = send
        self._receive = receive
        self._headers = headers
        self._bound = prompt_bound
        self._granted = granted
        self._include_usage = include_usage
        self._n = n
        self._t0 = started_at
        self._clock = clock
        self._started = False
        self._gone = False
        self._ttft: float | None = None
        self._counted = 0
        self._finished = False
        self._usage: Any = None            # the upstream's last usage object
        self._usage_chunk: dict[str, Any] | None = None
        self._usage_raw: bytes | None = None
        self._template: dict[str, Any] = {}  # id/created/model of the stream, for chunks the gateway writes
        self._cut = False
        self._counter = counter
        # With a tokenizer: the text relayed per choice, counted if the server reports no usage.
        self._texts: dict[int, list[str]] | None = {} if counter is not None else None
        self._lease = lease
        self._want = 0  # completion tokens the event being handled needs beyond the reservation

    @property
    def started(self) -> bool:
        return self._started

    @property
    def ttft_ms(self) -> float | None:
        return self._ttft

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                self._resp.close()  # stops the model server generating for no one
                return

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._send({"type": "http.response.start", "status": 200, "headers": self._headers})

    async def run(self, finish: Callable[[int, int, str | None], Awaitable[None]]) -> StreamOutcome:
        watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            error = await self._pump()
        finally:
            watcher.cancel()
        if self._gone:
            error = None
        elif error is not None and not self._started:
            # Nothing reached the client: answer with a plain error instead of a broken stream.
            await finish(0, 0, error.code)
            raise error
        report = None if error is not None else reported(self._usage)
        if report is not None and self._granted is not None and self._lease is not None \
                and report[1] > self._granted and not self._cut:
            # The server says it generated more than was reserved (several tokens in a chunk): reserve the
            # rest if the budget has it, so that the charge is the server's count, not the reservation.
            self._granted += await self._lease.more(report[1] - self._granted, self._granted)
        counted = self._counted
        if report is None and self._counter is not None and self._texts:
            counted = max(counted, sum(self._counter.text("".join(t)) for t in self._texts.values()))
        prompt, completion = charge(report, self._bound, self._granted, counted=counted, request_id=self._rid)
        if self._cut:
            prompt, completion = charge(None, self._bound, self._granted, counted=self._granted or 0)
        tail: list[bytes] = []
        if not self._gone:
            if self._cut:
                tail.append(self._chunk({"choices": [self._dialect.cut_choice(i) for i in range(self._n)]}))
            if self._include_usage:
                if (self._usage_raw is not None and report is not None
                        and (prompt, completion) == (report[0], report[1])):
                    tail.append(b"data: " + self._usage_raw + b"\n\n")
                else:
                    chunk = dict(self._usage_chunk or {})
                    chunk["choices"] = []
                    chunk["usage"] = usage_object(prompt, completion)
                    tail.append(self._chunk(chunk))
            if error is not None:
                tail.append(b"data: " + orjson.dumps({"error": {"message": error.message, "type": "upstream_error",
                                                                "code": error.code, "param": None}}) + b"\n\n")
            else:
                tail.append(_DONE)
        code = "client_disconnected" if self._gone else (error.code if error is not None else None)
        await finish(prompt, completion, code)
        if not self._gone:
            await self._start()
            await self._send({"type": "http.response.body", "body": b"".join(tail), "more_body": False})
        return StreamOutcome(prompt, completion, code, self._ttft, self._gone, None if self._gone else error)

    def _chunk(self, fields: dict[str, Any]) -> bytes:
        chunk = {"id": self._template.get("id", self._rid), "object": self._dialect.chunk_object,
                 "created": self._template.get("created", 0), "model": self._template.get("model", "")}
        chunk.update(fields)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _pump(self) -> ApiError | None:
        """Relay until [DONE], the end of the upstream's body, a cut-off or an error (returned)."""
        read_chunk = self._resp.read_chunk
        buf = b""
        done = False
        while not done:
            try:
                chunk = await read_chunk()
            except UpstreamTimeout:
                return ApiError(504, "upstream_timeout", "the model server stopped sending within the timeout")
            except UpstreamError:
                if self._gone:
                    return None
                return ApiError(502, "upstream_error", "the model server's stream broke off")
            if self._gone:
                return None
            if not chunk:
                if self._finished or self._usage is not None:
                    return None
                return ApiError(502, "upstream_error", "the model server's stream ended before it finished")
            buf += chunk
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            out: list[bytes] = []
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                event, buf = buf[:end], buf[end + 2:]
                result = self._event(event, out)
                while result is _MORE:
                    result = await self._reserve_more(event, out)
                if result is not None:
                    if isinstance(result, ApiError):
                        if out:
                            await self._relay(out)
                        return result
                    done = True
                    break
            if out:
                await self._relay(out)
        self._resp.close() if self._cut else self._resp.release()
        return None

    async def _reserve_more(self, event: bytes, out: list[bytes]) -> ApiError | bool | _More | None:
        """The event needs more completion tokens than are reserved: reserve the next block and handle it
        again, or cut the stream off before it if nothing more can be had."""
        assert self._lease is not None and self._granted is not None
        got = await self._lease.more(self._want, self._granted)
        self._granted += got
        if got < self._want:
            log.info("request %s: its tokens per minute or budget has nothing more for it; cutting the stream "
                     "off at %d completion tokens", self._rid, self._counted)
            self._cut = True
            return True
        return self._event(event, out)

    async def _relay(self, out: list[bytes]) -> None:
        if self._ttft is None:
            self._ttft = (self._clock() - self._t0) * 1000
        await self._start()
        await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": True})

    def _event(self, event: bytes, out: list[bytes]) -> ApiError | bool | _More | None:
        """Handle one SSE event: append what to relay to ``out``; True when the stream is over."""
        data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if not data:
            return None  # a comment or keep-alive
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if payload == b"[DONE]":
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ApiError(502, "upstream_error", "the model server sent a malformed stream event")
        if not isinstance(obj, dict):
            return ApiError(502, "upstream_error", "the model server sent a malformed stream event")
        choices = obj.get("choices")
        if choices is None and ("error" in obj or obj.get("object") == "error"):
            return stream_failure(obj)
        if not self._template:
            self._template = {k: obj.get(k) for k in ("id", "created", "model")}
        usage = obj.get("usage")
        if usage is not None:
            self._usage = usage
        if not choices:
            if usage is not None:
                self._usage_chunk, self._usage_raw = obj, payload  # held back; sent (or not) at the end
            return None
        if not isinstance(choices, list):
            return ApiError(502, "upstream_error", "the model server sent a malformed stream event")
        count, finished = _tokens_in(choices, self._dialect)
        granted = self._granted
        if granted is not None and self._counted + count > granted:
            lease = self._lease
            if lease is not None and lease.more_allowed(granted):
                self._want = self._counted + count - granted
                return _MORE
            log.warning("request %s: the model server went past max_tokens; cutting the stream off at its "
                        "reservation (%d completion tokens)", self._rid, granted)
            self._cut = True
            return True
        self._counted += count
        self._finished = self._finished or finished
        if self._texts is not None and count:
            _collect(choices, self._texts, self._dialect)
        if usage is not None:
            # Usage on a chunk with choices (some servers put it on the finish chunk): the client gets it
            # once, in the usage chunk at the end, and only if it asked for one.
            del obj["usage"]
            payload = orjson.dumps(obj)
        out.append(b"data: " + payload + b"\n\n")
        return None
