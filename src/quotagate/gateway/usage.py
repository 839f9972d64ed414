"""What a request is charged, from what the model server reported and what the gateway reserved.

The rule, everywhere: a request is never charged more than it reserved (``prompt_bound + granted``),
so a key's limits hold even when a model server ignores ``max_tokens`` or over-reports; and the
``usage`` a client is sent is exactly what it is charged (rewritten when the two would differ).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def reported(usage: Any, *, prompt_only: bool = False) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from a ``usage`` object, or None if it is not a usable one.
    ``prompt_only`` (embeddings, rerank, score: nothing is generated): a usage with only ``total_tokens``
    (vLLM's rerank answers) is all prompt."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    if prompt is None and prompt_only:
        prompt = usage.get("total_tokens")
    completion = usage.get("completion_tokens", 0)
    if completion is None:
        completion = 0
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return prompt, completion


def charge(report: tuple[int, int] | None, prompt_bound: int, granted: int | None, *,
           counted: int = 0, fallback_completion: int = 0, request_id: str = "") -> tuple[int, int]:
    """The (prompt, completion) tokens to charge.

    ``counted`` is a lower bound of the completion tokens the gateway saw relayed (streams);
    ``fallback_completion`` is used when nothing was reported. ``granted`` is None when the key has no
    token limits: the report is then taken as it is.
    """
    if report is None:
        prompt, completion = prompt_bound, max(counted, fallback_completion)
    else:
        prompt, completion = report[0], max(report[1], counted)
        if completion > report[1]:
            log.warning("request %s: the model server reported %d completion tokens but relayed at least %d; "
                        "charging %d", request_id, report[1], counted, completion)
    if granted is not None:
        if prompt > prompt_bound or completion > granted:
            log.warning("request %s: the model server reported usage (%d prompt, %d completion) beyond the "
                        "reservation (%d, %d); charging the reservation", request_id, prompt, completion,
                        prompt_bound, granted)
        prompt, completion = min(prompt, prompt_bound), min(completion, granted)
    return prompt, completion


def usage_object(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
