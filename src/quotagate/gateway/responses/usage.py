"""The Responses API's ``usage``: read as the server reported it, written again as charged.

Its names differ from chat's (``input_tokens``, ``output_tokens``, ``total_tokens``, with
``input_tokens_details.cached_tokens`` and ``output_tokens_details.reasoning_tokens``); the rule is chat's
(``gateway/usage.py``): never more than was reserved, and what the client is told is what it is charged.
"""

from __future__ import annotations

from typing import Any


def reported(usage: Any) -> tuple[int, int] | None:
    """(input_tokens, output_tokens) from a Responses ``usage`` object, or None if it is not a usable one."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("input_tokens")
    completion = usage.get("output_tokens", 0)
    if completion is None:
        completion = 0
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return prompt, completion


def usage_object(prompt: int, completion: int, original: Any = None) -> dict[str, Any]:
    """The ``usage`` of a response charged ``prompt`` + ``completion``; the server's details (cached and
    reasoning tokens) kept, each at most the figure it is part of."""
    cached = reasoning = 0
    if isinstance(original, dict):
        cached = _detail(original.get("input_tokens_details"), "cached_tokens", prompt)
        reasoning = _detail(original.get("output_tokens_details"), "reasoning_tokens", completion)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def _detail(details: Any, name: str, most: int) -> int:
    value = details.get(name) if isinstance(details, dict) else None
    return min(value, most) if type(value) is int and value > 0 else 0
