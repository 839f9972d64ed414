"""The two generation APIs the gateway meters the same way: chat completions and (legacy) completions.

They differ only in where a choice keeps its text: a chat choice has a ``message`` (a stream's chunks a
``delta``) with content, reasoning, refusal and tool calls; a completion choice has its ``text`` right on
it, streamed or not. Everything else (admission, leases, cut-off, usage) is one code path; a ``Dialect``
tells it which shape it handles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quotagate.gateway.counting import GENERATED_TEXT, generated_texts


@dataclass(frozen=True, slots=True)
class Dialect:
    endpoint: str        # the usage rows' and metrics' name
    path: str            # the upstream path, under the model's base URL
    answer_object: str   # ``object`` of a whole answer
    chunk_object: str    # ``object`` of a stream's chunks
    # A choice's generated part: a chat choice's message (``streamed``: its delta), a completion choice itself.
    part: Callable[[dict[str, Any], bool], Any]
    # The strings a part holds that the model generated (counted when the server does not say).
    texts: Callable[[dict[str, Any]], list[str]]
    # Whether a stream's part holds generated text (each such chunk carries at least one token).
    carries_token: Callable[[dict[str, Any]], bool]
    # A choice the gateway writes when it cuts a stream off.
    cut_choice: Callable[[int], dict[str, Any]]
    # The fields of a streamed part that may carry generated text, and those of them that are plain strings
    # (the stream relay counts a part with one such field, and no other, from its bytes: streaming.py).
    token_fields: tuple[str, ...]
    text_fields: tuple[str, ...]


def _delta_carries_token(delta: dict[str, Any]) -> bool:
    """Whether a chat delta holds generated text. A tool call's first delta (its id, type and name, with
    empty arguments) is the server's framing, not a token, and neither is an empty string."""
    for name in GENERATED_TEXT:
        if delta.get(name):
            return True
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and function.get("arguments"):
                return True
    function = delta.get("function_call")
    return isinstance(function, dict) and bool(function.get("arguments"))


def _text_carries_token(choice: dict[str, Any]) -> bool:
    return bool(choice.get("text"))


def _chat_part(choice: dict[str, Any], streamed: bool) -> Any:
    return choice.get("delta" if streamed else "message")


def _completion_part(choice: dict[str, Any], streamed: bool) -> Any:
    return choice


def _completion_texts(part: dict[str, Any]) -> list[str]:
    text = part.get("text")
    return [text] if isinstance(text, str) else []


CHAT = Dialect(endpoint="chat.completions", path="/chat/completions", answer_object="chat.completion",
               chunk_object="chat.completion.chunk", part=_chat_part, texts=generated_texts,
               carries_token=_delta_carries_token,
               cut_choice=lambda i: {"index": i, "delta": {}, "finish_reason": "length"},
               token_fields=(*GENERATED_TEXT, "tool_calls", "function_call"), text_fields=GENERATED_TEXT)

COMPLETIONS = Dialect(endpoint="completions", path="/completions", answer_object="text_completion",
                      chunk_object="text_completion", part=_completion_part, texts=_completion_texts,
                      carries_token=_text_carries_token,
                      cut_choice=lambda i: {"index": i, "text": "", "logprobs": None, "finish_reason": "length"},
                      token_fields=("text",), text_fields=("text",))
