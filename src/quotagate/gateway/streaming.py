"""Relaying a chat completion (or completion: ``dialects.py``) stream (SSE) from a model server to the
client, event by event.

Each complete event is sent on as soon as it has arrived (nothing is held back but a partial event), what
one read brought in one write. The relay parses only what it must: an event's JSON, to count token-carrying
deltas, to notice the usage chunk and errors; and not even that for a token delta whose bytes are those of
an earlier one but for its text (``_Shape``), which is most of a stream. It asks the model server for
usage (the caller sets ``stream_options.include_usage``), passes the usage chunk on only if the client asked for it, and
cuts the stream off, with ``finish_reason: "length"`` and ``[DONE]``, before a chunk that would take
it past its reservation. Each delta chunk carries at least one token, so the count is a lower bound
of what was generated and an honest model server is never cut off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

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


class Writer(Protocol):
    """The client connection's body, written without a coroutine (httpserver.direct_writer)."""

    def write(self, body: bytes) -> bool:
        """Write ``body`` now (once ``send`` has sent body bytes); whether the client takes more at once."""


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


_SHAPES = 8  # shapes kept per stream (one per choice for most servers, and one for the first delta)
_PROBE, _PROBE_JSON = "\x01", b'\\u0001'  # a text put in place of a delta's to check its shape


class _Shape(NamedTuple):
    """The bytes of a plain token delta event around its text: an event that is ``prefix``, a JSON string's
    body and ``tail`` is that delta with another text (one token-carrying delta if the text is not empty),
    and nothing else: no finish, no usage, no error, no tool call, the same choice."""

    prefix: bytes   # from "data: " to the text's opening quote, included
    tail: bytes     # from the text's closing quote, included, to the end of the event and its blank line
    choice: int     # the index of its choice


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
                 dialect: Dialect = CHAT, writer: Writer | None = None) -> None:
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
        self._shapes: list[_Shape] = []  # of the plain token deltas seen (see _plain)
        self._writer = writer            # the client's body, written from the upstream's callback (_push)
        self._buf = b""                  # a partial event, waiting for the rest of it

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
            if self._granted is not None and self._lease is not None and counted > self._granted and not self._cut:
                # The text holds more tokens than deltas (several tokens a chunk): as for a report above.
                self._granted += await self._lease.more(counted - self._granted, self._granted)
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
        """Relay until [DONE], the end of the upstream's body, a cut-off or an error (returned).

        What one read brings is relayed in one send: the complete events in it as they came (a slice of the
        read, not rebuilt), with what an event parsed in full became in its place. A partial event at the
        end waits for the next read. With a ``writer``, once the stream's token deltas have a known shape,
        the reads in between are relayed from the upstream connection's callback instead (``_push``)."""
        read_chunk = self._resp.read_chunk
        push = self._resp.push if self._writer is not None else None
        send = self._send
        while True:
            if push is not None and self._shapes and not self._gone:
                push(self._push)  # (a shape is learnt from an event that was sent: the answer's body has begun)
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
            block = self._split(chunk)
            if block is None:
                continue
            pos = self._plain(block, 0) if self._shapes else 0
            if pos == len(block):  # the usual read: token deltas only, relayed as they came
                if self._ttft is None:
                    self._ttft = (self._clock() - self._t0) * 1000
                if not self._started:
                    await self._start()
                await send({"type": "http.response.body", "body": block, "more_body": True})
                continue
            out = [block[:pos]] if pos else []
            result: ApiError | bool | _More | None = None
            while pos < len(block):
                end = block.find(b"\n\n", pos)
                event = block[pos:end]
                pos = end + 2
                result = self._event(event, out)
                while result is _MORE:
                    result = await self._reserve_more(event, out)
                if result is not None:
                    break
                plain = self._plain(block, pos) if self._shapes else pos
                if plain > pos:
                    out.append(block[pos:plain])
                    pos = plain
            if out:
                await self._relay(out)
            if isinstance(result, ApiError):
                return result
            if result is not None:
                break
        self._resp.close() if self._cut else self._resp.release()
        return None

    def _split(self, data: bytes) -> bytes | None:
        """``data`` after the partial event held: the complete events now at hand (the rest is held), or None."""
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")  # (a CR at the end is held until its LF comes)
        last = buf.rfind(b"\n\n")
        if last < 0:
            self._buf = buf
            return None
        if last + 2 == len(buf):
            self._buf = b""
            return buf
        self._buf = buf[last + 2:]
        return buf[:last + 2]

    def _push(self, data: bytes) -> bytes | None:
        """The upstream's bytes as they arrive while ``_pump`` waits for them (``Response.push``): the token
        deltas of a known shape are counted and written to the client here and now, with no task to wake;
        from the first event that needs more (a full parse, a reservation, a client that does not keep up),
        the rest is handed back, for ``_pump`` to read next."""
        writer = self._writer
        assert writer is not None
        if self._gone:
            rest = self._buf + data
            self._buf = b""
            return rest
        if not self._buf and data.endswith(b"\n\n"):
            block = data  # (one whole event, most often: no partial one to join it to)
        else:
            split = self._split(data)
            if split is None:
                return None
            block = split
        pos = self._plain(block, 0)
        if pos == len(block):
            return None if writer.write(block) else b""  # (b"": taken, but the client is behind: no more)
        if pos:
            writer.write(block[:pos])
        rest = block[pos:] + self._buf
        self._buf = b""
        return rest

    def _plain(self, block: bytes, pos: int) -> int:
        """Account for the events of ``block`` from ``pos`` on that have the shape of an earlier token delta
        (``_Shape``): the position of the first that has not (to be parsed in full), or the end."""
        shapes = self._shapes
        size = len(block)
        while pos < size:
            for shape in shapes:
                if block.startswith(shape.prefix, pos):
                    break
            else:
                return pos
            start = pos + len(shape.prefix)
            end = block.find(shape.tail, start)
            if end < 0:
                return pos
            try:
                # What lies between must be exactly one JSON string (no quote ending it early, no escape
                # running into the tail, no line break, valid UTF-8): then this event is the shape with
                # another text. (Spanning two events, it would hold their blank line: never a string.)
                text = orjson.loads(b'"' + block[start:end] + b'"')
            except orjson.JSONDecodeError:
                return pos
            if text:
                if self._granted is not None and self._counted >= self._granted:
                    return pos  # past the reservation: the full path reserves more or cuts the stream off
                self._counted += 1
                if self._texts is not None:
                    self._texts.setdefault(shape.choice, []).append(text)
            pos = end + len(shape.tail)
        return pos

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
        await self._send({"type": "http.response.body", "body": out[0] if len(out) == 1 else b"".join(out),
                          "more_body": True})

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
        elif not finished and len(choices) == 1 and len(self._shapes) < _SHAPES \
                and len(event) == len(payload) + 6 and event.startswith(b"data: "):  # relayed as it came
            self._learn(event, obj, choices[0])
        out.append(b"data: " + payload + b"\n\n")
        return None

    def _learn(self, event: bytes, obj: dict[str, Any], choice: Any) -> None:
        """Keep the shape of a plain token delta (one choice, one text, nothing else that varies) so that the
        events after it that differ from it only in that text are counted without being parsed."""
        dialect = self._dialect
        part = dialect.part(choice, True) if isinstance(choice, dict) else None
        if not isinstance(part, dict):
            return
        present = [name for name in dialect.token_fields if part.get(name) is not None]
        if len(present) != 1 or present[0] not in dialect.text_fields or not isinstance(part[present[0]], str):
            return
        key = b'"%s":"' % present[0].encode()
        at = event.find(key)
        if at < 0 or event.find(key, at + 1) >= 0:
            return  # not found as written (spaces), or found twice: no shape
        start = end = at + len(key)
        while True:  # the quote that ends the string: one not escaped by an odd run of backslashes
            end = event.find(b'"', end)
            if end < 0:
                return
            run = end
            while event[run - 1] == 0x5C:  # backslash
                run -= 1
            if (end - run) % 2 == 0:
                break
            end += 1
        # The bytes between must be the text and nothing else (not a string of the same value elsewhere): with
        # another text there, the event must parse as the same object but for that text.
        name, value = present[0], part[present[0]]
        if value == _PROBE:
            return
        try:
            twin = orjson.loads(event[6:start] + _PROBE_JSON + event[end:])
        except orjson.JSONDecodeError:
            return
        part[name] = _PROBE
        same = twin == obj
        part[name] = value
        if not same:
            return
        index = choice.get("index", 0)
        shape = _Shape(event[:start], event[end:] + b"\n\n", index if type(index) is int else 0)
        if shape not in self._shapes:
            self._shapes.insert(0, shape)  # the latest first (the first delta, with its role, is often alone)
