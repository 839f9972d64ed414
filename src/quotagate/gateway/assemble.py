"""One chat completion (or completion) put together from the events of a stream.

A non-streamed request of a key with tpm or a budget, with no length of its own, is forwarded as a stream
so that its completion can be reserved as it is generated (the relay's ``Lease``) instead of at its
worst case (the rest of the model's context) up front. The client asked for one JSON answer: this builds
it from the events, as OpenAI's API would have answered, choice by choice — ``content``,
``reasoning_content``/``reasoning`` and ``refusal`` joined, tool calls merged by their index (id, type,
name, the arguments joined), ``logprobs`` joined, the last ``finish_reason`` — with the stream's ``id``,
``created``, ``model``, ``system_fingerprint`` and ``usage``.
"""

from __future__ import annotations

from typing import Any

import orjson

_TEXT = ("content", "reasoning_content", "reasoning", "refusal")


class _Choice:
    __slots__ = ("calls", "finish", "logprobs", "role", "texts")

    def __init__(self) -> None:
        self.role = "assistant"
        self.texts: dict[str, list[str]] = {}
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: Any = None
        self.logprobs: list[Any] | None = None

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if isinstance(delta.get("role"), str):
                self.role = delta["role"]
            for name in _TEXT:
                text = delta.get(name)
                if isinstance(text, str):
                    self.texts.setdefault(name, []).append(text)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._call(call)
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            self.logprobs = (self.logprobs or []) + logprobs["content"]

    def _call(self, delta: dict[str, Any]) -> None:
        index = delta.get("index", len(self.calls))
        call = self.calls.setdefault(index if type(index) is int else len(self.calls),
                                     {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function")
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                call["function"]["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                call["function"]["arguments"] += function["arguments"]

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.texts["content"])
                                   if "content" in self.texts else None}
        for name in _TEXT[1:]:
            if name in self.texts:
                message[name] = "".join(self.texts[name])
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message

    def render(self, index: int) -> dict[str, Any]:
        return {"index": index, "message": self.message(),
                "logprobs": {"content": self.logprobs} if self.logprobs is not None else None,
                "finish_reason": self.finish}


class _TextChoice:
    """A completion choice: its text joined, its logprobs' lists joined, its last ``finish_reason``."""

    __slots__ = ("finish", "logprobs", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish: Any = None

    def add(self, choice: dict[str, Any]) -> None:
        text = choice.get("text")
        self.texts.append(text if isinstance(text, str) else "")
        if isinstance(choice.get("logprobs"), dict):
            joined = self.logprobs = self.logprobs or {}
            for name, values in choice["logprobs"].items():
                if isinstance(values, list):
                    joined.setdefault(name, []).extend(values)
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]

    def render(self, index: int) -> dict[str, Any]:
        return {"index": index, "text": "".join(self.texts), "logprobs": self.logprobs, "finish_reason": self.finish}


def assemble(events: bytes) -> dict[str, Any] | None:
    """The ``chat.completion`` the stream ``events`` (SSE bytes, as relayed) add up to; None if they hold
    no chunk at all."""
    return _assemble(events, "chat.completion", _Choice)


def assemble_completion(events: bytes) -> dict[str, Any] | None:
    """The ``text_completion`` a completions stream's ``events`` add up to; None if they hold no chunk."""
    return _assemble(events, "text_completion", _TextChoice)


def _assemble(events: bytes, kind: str, choice_type: type[_Choice] | type[_TextChoice]) -> dict[str, Any] | None:
    head: dict[str, Any] | None = None
    usage: Any = None
    choices: dict[int, _Choice | _TextChoice] = {}
    for chunk in _chunks(events):
        if head is None:
            head = chunk
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                choices.setdefault(index if type(index) is int else 0, choice_type()).add(choice)
    if head is None:
        return None
    answer: dict[str, Any] = {"id": head.get("id"), "object": kind, "created": head.get("created"),
                              "model": head.get("model")}
    if head.get("system_fingerprint") is not None:
        answer["system_fingerprint"] = head["system_fingerprint"]
    answer["choices"] = [c.render(i) for i, c in sorted(choices.items())]
    if usage is not None:
        answer["usage"] = usage
    return answer


def _chunks(events: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of relayed SSE ``events`` (not ``[DONE]``, not error events)."""
    chunks = []
    for line in events.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]" or not payload:
            continue
        chunk = orjson.loads(payload)
        if isinstance(chunk, dict) and "error" not in chunk:
            chunks.append(chunk)
    return chunks
