"""Relaying a Responses API stream (typed SSE events) from a model server to the client, event by event.

Each complete event goes on as soon as it has arrived, its ``event:`` line and data as the server wrote
them. The relay parses each event's JSON to count what was generated, find the usage and notice errors:

- every ``*.delta`` event with a non-empty ``delta`` (``response.output_text.delta``,
  ``response.function_call_arguments.delta``, ``response.reasoning_text.delta``, refusals, summaries)
  carries at least one token: their count is a lower bound of the completion;
- the last event (``response.completed``, ``response.incomplete`` or ``response.failed``) carries the
  response with its ``usage``; it is held back, its usage written again if the charge differs, and sent
  after the request is settled and metered;
- a delta past the reservation first reserves the next block of the ``Lease`` (as chat's relay does); when
  the key has nothing more, the stream is cut off there: the client gets a ``response.incomplete`` with
  ``incomplete_details.reason: "max_output_tokens"`` (what OpenAI sends when a response reaches its
  ``max_output_tokens``), the output relayed so far and the usage charged, and the upstream is closed;
- an error event before anything was relayed becomes a plain error answer; after, the client gets an
  ``error`` event (the SDKs raise ``APIError``) and the stream ends;
- the events of a server that numbers none (llama-server) are numbered and written again (``_fill``): the
  SDKs' stream helpers need ``sequence_number``, ``output_index`` and ``content_index``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from quotagate.gateway.errors import ApiError
from quotagate.gateway.responses.usage import reported, usage_object
from quotagate.gateway.streaming import Lease
from quotagate.gateway.upstream_errors import stream_failure
from quotagate.gateway.usage import charge
from quotagate.tokens.counter import TokenCounter
from quotagate.upstreams.client import Response, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Events of one content part of an item, which carry its content_index.
_PART_EVENTS = ("response.content_part.", "response.output_text.", "response.refusal.", "response.reasoning_text.")


@dataclass(slots=True)
class Outcome:
    prompt_tokens: int
    completion_tokens: int
    error_code: str | None
    ttft_ms: float | None
    client_gone: bool


class _Output:
    """The output items a stream has built so far (for the ``response.incomplete`` of a cut-off): items
    by their output index (or id, for servers that send no index), with the text and arguments deltas
    kept as pieces, joined only if a cut-off needs them. The events' parsed objects are kept as they are:
    what is relayed is the server's bytes, never these."""

    __slots__ = ("_items", "_pieces")

    def __init__(self) -> None:
        self._items: dict[Any, dict[str, Any]] = {}
        self._pieces: dict[tuple[Any, str, int], list[str]] = {}  # (item, "text"/"arguments", part index)

    @staticmethod
    def _key(event: dict[str, Any]) -> Any:
        index = event.get("output_index")
        if type(index) is int:
            return index
        item = event.get("item")
        return event.get("item_id") or (item.get("id") if isinstance(item, dict) else None)

    def item(self, event: dict[str, Any], done: bool) -> None:
        """response.output_item.added or .done: the item as it stands (done: whole, its pieces dropped)."""
        if isinstance(event.get("item"), dict):
            key = self._key(event)
            self._items[key] = event["item"]
            if done and self._pieces:
                self._pieces = {k: v for k, v in self._pieces.items() if k[0] != key}

    def part(self, event: dict[str, Any]) -> None:
        """response.content_part.added: a new (empty) part of a message."""
        target = self._items.get(self._key(event))
        if target is not None and isinstance(event.get("part"), dict):
            parts = target.get("content")
            if not isinstance(parts, list):
                parts = target["content"] = []
            parts.append(event["part"])

    def delta(self, kind: str, event: dict[str, Any], delta: str) -> None:
        if kind == "response.output_text.delta":
            index = event.get("content_index", -1)
            self._pieces.setdefault((self._key(event), "text", index if type(index) is int else -1), []).append(delta)
        elif kind == "response.function_call_arguments.delta":
            self._pieces.setdefault((self._key(event), "arguments", 0), []).append(delta)

    def items(self) -> list[dict[str, Any]]:
        for (key, field, index), pieces in self._pieces.items():
            target = self._items.get(key)
            if target is None:
                continue
            if field == "arguments":
                target["arguments"] = (target.get("arguments") or "") + "".join(pieces)
                continue
            parts = target.get("content")
            if isinstance(parts, list) and parts and -len(parts) <= index < len(parts) \
                    and isinstance(parts[index], dict):
                parts[index]["text"] = (parts[index].get("text") or "") + "".join(pieces)
        self._pieces = {}
        out = []
        for item in self._items.values():
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"
            out.append(item)
        return out


class _More:
    """A delta that needs more output tokens than are reserved (the relay leases them, then handles it again)."""


_MORE = _More()


class ResponsesRelay:
    """One Responses stream's relay. ``finish(prompt, completion, error_code)`` settles and meters; it is
    awaited before the last bytes go out."""

    def __init__(self, *, request_id: str, response: Response, send: Send, receive: Receive,
                 headers: list[tuple[bytes, bytes]], prompt_bound: int, granted: int | None, started_at: float,
                 clock: Callable[[], float], counter: TokenCounter | None = None, lease: Lease | None = None) -> None:
        self._rid = request_id
        self._resp = response
        self._send = send
        self._receive = receive
        self._headers = headers
        self._bound = prompt_bound
        self._granted = granted
        self._t0 = started_at
        self._clock = clock
        self._counter = counter
        self._lease = lease
        self._started = False
        self._gone = False
        self._ttft: float | None = None
        self._counted = 0
        self._cut = False
        self._head: dict[str, Any] = {}        # the response of response.created, for an event the gateway writes
        self._last: dict[str, Any] | None = None  # the final event, held back
        self._last_name = b""
        self._last_raw = b""
        self._sequence: int | None = None
        self._indices: dict[Any, int] = {}  # output_index by item id, for a server that sends none
        self._output = _Output()
        self._texts: list[str] | None = [] if counter is not None else None

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

    async def run(self, finish: Callable[[int, int, str | None], Awaitable[None]]) -> Outcome:
        watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            error = await self._pump()
        finally:
            watcher.cancel()
        if self._gone:
            error = None
        elif error is not None and not self._started:
            await finish(0, 0, error.code)  # nothing reached the client: a plain error answer instead
            raise error
        usage = self._last.get("response", {}).get("usage") if self._last is not None else None
        report = None if error is not None or self._cut else reported(usage)
        if report is not None and self._granted is not None and self._lease is not None \
                and report[1] > self._granted:
            # The server says it generated more than was reserved (several tokens in one delta): reserve the
            # rest if the budget has it, so that the charge is the server's count, not the reservation.
            self._granted += await self._lease.more(report[1] - self._granted, self._granted)
        counted = self._counted
        if report is None and self._counter is not None and self._texts:
            counted = max(counted, self._counter.text("".join(self._texts)))
        if self._cut:
            prompt, completion = charge(None, self._bound, self._granted, counted=self._granted or 0)
        else:
            prompt, completion = charge(report, self._bound, self._granted, counted=counted, request_id=self._rid)
        tail = b""
        if not self._gone:
            if self._cut:
                tail = self._incomplete(prompt, completion)
            elif error is not None:
                tail = self._error_event(error)
            elif self._last is not None:
                tail = self._final(report, usage, prompt, completion)
        code = "client_disconnected" if self._gone else (error.code if error is not None else None)
        await finish(prompt, completion, code)
        if not self._gone:
            await self._start()
            await self._send({"type": "http.response.body", "body": tail, "more_body": False})
        return Outcome(prompt, completion, code, self._ttft, self._gone)

    # -- the events the gateway writes ------------------------------------------------------------
    def _next_sequence(self) -> int | None:
        if self._sequence is None:
            return None
        self._sequence += 1
        return self._sequence

    @staticmethod
    def _sse(name: str, obj: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    def _final(self, report: tuple[int, int] | None, usage: Any, prompt: int, completion: int) -> bytes:
        last = self._last
        assert last is not None
        if report is not None and report == (prompt, completion):
            return self._last_raw
        response = last.get("response")
        if isinstance(response, dict):
            response["usage"] = usage_object(prompt, completion, usage)
        name = self._last_name or str(last.get("type", "")).encode()
        return b"event: " + name + b"\ndata: " + orjson.dumps(last) + b"\n\n"

    def _incomplete(self, prompt: int, completion: int) -> bytes:
        response = dict(self._head)
        response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"},
                        output=self._output.items(), usage=usage_object(prompt, completion))
        response.setdefault("object", "response")
        response.setdefault("id", self._rid)
        event: dict[str, Any] = {"type": "response.incomplete", "response": response}
        sequence = self._next_sequence()
        if sequence is not None:
            event["sequence_number"] = sequence
        return self._sse("response.incomplete", event)

    def _error_event(self, error: ApiError) -> bytes:
        # OpenAI's error event (type, code, message, param) and chat's {"error": {...}}, on which the SDKs
        # raise APIError.
        event: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message, "param": None,
                                 "error": {"message": error.message, "type": "upstream_error", "code": error.code,
                                           "param": None}}
        sequence = self._next_sequence()
        if sequence is not None:
            event["sequence_number"] = sequence
        return self._sse("error", event)

    # -- reading the upstream -------------------------------------------------------------------
    async def _pump(self) -> ApiError | None:
        """Relay until the final event, the end of the upstream's body, a cut-off or an error (returned)."""
        read_chunk = self._resp.read_chunk
        buf = b""
        while True:
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
                if self._last is not None:
                    break
                return ApiError(502, "upstream_error", "the model server's stream ended before it finished")
            buf += chunk
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            out: list[bytes] = []
            done: ApiError | bool | _More | None = None
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                event, buf = buf[:end], buf[end + 2:]
                done = self._event(event, out)
                while done is _MORE:
                    done = await self._lease_more(event, out)
                if done is not None:
                    break
            if out:
                await self._relay(out)
            if isinstance(done, ApiError):
                return done
            if done:
                break
        self._resp.close() if self._cut else self._resp.release()
        return None

    async def _relay(self, out: list[bytes]) -> None:
        if self._ttft is None:
            self._ttft = (self._clock() - self._t0) * 1000
        await self._start()
        await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": True})

    async def _lease_more(self, event: bytes, out: list[bytes]) -> ApiError | bool | _More | None:
        """The event needs a token more than is reserved: lease the next block and handle it again, or cut
        the stream off before it if the key has nothing more."""
        assert self._lease is not None and self._granted is not None
        got = await self._lease.more(self._counted + 1 - self._granted, self._granted)
        self._granted += got
        if got == 0:
            log.info("request %s: its tokens per minute or budget has nothing more for it; cutting the stream off "
                     "at %d output tokens", self._rid, self._counted)
            self._cut = True
            return True
        return self._event(event, out)

    def _event(self, event: bytes, out: list[bytes]) -> ApiError | bool | _More | None:
        """Handle one SSE event: append what to relay to ``out``; True when the stream is over."""
        # Servers write "event: <type>\ndata: <json>": read that shape without splitting it into lines.
        name = b""
        rest = event
        if event.startswith(b"event:"):
            newline = event.find(b"\n")
            if newline < 0:
                return None  # a name and no data
            name, rest = event[6:newline].strip(), event[newline + 1:]
        if rest.startswith(b"data:") and b"\n" not in rest:
            payload = rest[5:].lstrip(b" ")
        else:
            data = []
            for line in rest.split(b"\n"):
                if line.startswith(b"data:"):
                    data.append(line[5:].lstrip(b" "))
                elif line.startswith(b"event:"):
                    name = line[6:].strip()
            if not data:
                return None  # a comment or keep-alive
            payload = b"\n".join(data)
        if payload == b"[DONE]":
            return True if self._last is not None else None
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ApiError(502, "upstream_error", "the model server sent a malformed stream event")
        if not isinstance(obj, dict):
            return ApiError(502, "upstream_error", "the model server sent a malformed stream event")
        kind = obj.get("type")
        if kind == "error" or (kind is None and ("error" in obj or obj.get("object") == "error")):
            return stream_failure(obj if kind is None else {"error": obj})
        if not isinstance(kind, str):
            return ApiError(502, "upstream_error", "the model server sent a stream event without a type")
        delta: str | None = None  # the generated text of an event that counts as a token
        if kind.endswith(".delta"):
            text = obj.get("delta")
            if isinstance(text, str) and text:
                delta = text
                granted = self._granted
                if granted is not None and self._counted >= granted:
                    lease = self._lease
                    if lease is not None and lease.more_allowed(granted):
                        return _MORE
                    log.warning("request %s: the model server went past max_output_tokens; cutting the stream off "
                                "at its reservation (%d output tokens)", self._rid, granted)
                    self._cut = True
                    return True
        # (Past this point the event is taken: _MORE above may have it handled again, and nothing before
        # changes the relay's state.)
        filled = "sequence_number" not in obj
        if filled:
            self._fill(kind, obj)
        elif type(obj["sequence_number"]) is int:
            self._sequence = obj["sequence_number"]
        if delta is not None:
            self._counted += 1
            if self._texts is not None:
                self._texts.append(delta)
            self._output.delta(kind, obj, delta)
        elif kind in TERMINAL:
            if not isinstance(obj.get("response"), dict):
                return ApiError(502, "upstream_error", f"the model server sent {kind} without its response")
            self._last, self._last_name = obj, name
            self._last_raw = self._sse(kind, obj) if filled else event + b"\n\n"
            return True
        elif kind == "response.output_item.added" or kind == "response.output_item.done":
            self._output.item(obj, kind == "response.output_item.done")
        elif kind == "response.content_part.added":
            self._output.part(obj)
        elif not self._head and isinstance(obj.get("response"), dict):
            self._head = {k: v for k, v in obj["response"].items() if k not in ("output", "usage")}
        out.append(self._sse(kind, obj) if filled else event + b"\n\n")
        return None

    def _fill(self, kind: str, obj: dict[str, Any]) -> None:
        """Number an event of a server that numbers none (llama-server sends no ``sequence_number``, and no
        ``output_index`` or ``content_index``, which the SDKs' stream helpers need to put the output
        together): the event's number, its item's index (in the order the items were added) and, for a
        part's event, the index of its part (servers that leave it out write one part per item)."""
        self._sequence = 0 if self._sequence is None else self._sequence + 1
        obj["sequence_number"] = self._sequence
        item = obj.get("item")
        key = obj.get("item_id") or (item.get("id") if isinstance(item, dict) else None)
        if key is None:
            return
        if "output_index" not in obj:
            obj["output_index"] = self._indices.setdefault(key, len(self._indices))
        if "content_index" not in obj and kind.startswith(_PART_EVENTS):
            obj["content_index"] = 0
