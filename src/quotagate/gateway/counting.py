"""The prompt tokens a request reserves: counted with the model's tokenizer where the catalog gives one
(``tokens/``), else the byte bound of ``parsing.py``; and the answers' tokens, where they must be
counted because the model server did not (or could not be trusted to) say."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quotagate.config import ModelSpec
from quotagate.gateway.errors import ApiError, bad_request
from quotagate.gateway.parsing import PAIR_ALLOWANCE, ChatRequest, EmbeddingsRequest, PairsRequest, text_bytes
from quotagate.tokens.counter import TemplateError, TokenCounter


async def chat_prompt(counter: TokenCounter | None, req: ChatRequest, spec: ModelSpec) -> tuple[int, bool]:
    """(prompt tokens to reserve, whether that is an exact count). A prompt counted at the model's
    context length or beyond is a 400 ``context_length_exceeded`` before anything is reserved."""
    if counter is None:
        return req.prompt_bound, False
    try:
        counted = await counter.prompt_async(req.body)
    except TemplateError as exc:
        raise bad_request(f"the model's chat template refused the conversation: {exc}", "messages") from None
    if counted is None:
        return req.prompt_bound, False
    context = spec.context_length
    if context is not None and counted >= context:
        raise ApiError(400, "context_length_exceeded", f"This model's maximum context length is {context} tokens. "
                       f"However, your messages resulted in {counted} tokens. Please reduce the length of the "
                       "messages.", param="messages")
    return counted, True


def completion_prompt(counter: TokenCounter | None, req: ChatRequest, spec: ModelSpec) -> tuple[int, int, bool]:
    """(prompt tokens to reserve for all prompts, the longest prompt's, whether they are exact counts) of a
    ``/v1/completions`` request: each prompt is tokenized as the server does (special tokens added), each
    sequence generated from it shares it. A prompt at the context length or beyond is a 400."""
    prompts = req.prompts or []
    if counter is None:
        return req.prompt_bound, req.prompt_bound, False
    suffix = req.body.get("suffix")
    extra = counter.text(suffix) if isinstance(suffix, str) and suffix else 0  # servers differ on how they add it
    counts = [(counter.input(p) if isinstance(p, str) else len(p)) + extra for p in prompts]
    longest = max(counts)
    context = spec.context_length
    if context is not None and longest >= context:
        raise ApiError(400, "context_length_exceeded", f"This model's maximum context length is {context} tokens. "
                       f"However, your prompt resulted in {longest} tokens. Please reduce the length of the "
                       "prompt.", param="prompt")
    return sum(counts), longest, not extra


def embeddings_prompt(counter: TokenCounter | None, req: EmbeddingsRequest, spec: ModelSpec) -> int:
    """The tokens of an embeddings request's inputs: counted with the tokenizer (special tokens added), else
    bounded. An input longer than the context is a 400."""
    if counter is None:
        return req.prompt_bound
    value = req.body["input"]
    inputs: list[Any] = [value] if isinstance(value, str) else value
    if inputs and all(type(t) is int for t in inputs):
        inputs = [inputs]
    total = 0
    for item in inputs:
        tokens = counter.input(item) if isinstance(item, str) else len(item)
        if spec.context_length is not None and tokens > spec.context_length:
            raise ApiError(400, "context_length_exceeded", f"This model's maximum context length is "
                           f"{spec.context_length} tokens. However, an input resulted in {tokens} tokens.",
                           param="input")
        total += tokens
    return total


GENERATED_TEXT = ("content", "reasoning_content", "reasoning", "refusal")


def generated_texts(part: dict[str, Any]) -> list[str]:
    """The generated text in a message or a stream's delta: its text fields and its tool calls' arguments."""
    texts = [text for name in GENERATED_TEXT if isinstance(text := part.get(name), str)]
    calls = part.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                texts.append(function["arguments"])
    return texts


def answer_tokens(counter: TokenCounter, parts: list[Any],
                  texts: Callable[[dict[str, Any]], list[str]] = generated_texts) -> int:
    """Tokens of the generated text of a non-streamed answer's parts (a chat choice's message: content,
    reasoning, refusal, tool-call arguments; a completion choice's text), counted with the tokenizer."""
    return sum(counter.text(text) for part in parts if isinstance(part, dict) for text in texts(part))


def pairs_prompt(counter: TokenCounter | None, req: PairsRequest, spec: ModelSpec) -> int:
    """The tokens of a rerank or score request: each (query, document) pair read as one prompt. With a
    tokenizer, both texts are counted with their special tokens, plus the allowance for the pair's own
    separators (a cross-encoder's pair template adds no more than that): a bound a little above the exact
    count, settled to the server's. A pair longer than the context is a 400."""
    if counter is None:
        return req.prompt_bound
    total = 0
    for first, second in req.pairs:
        tokens = PAIR_ALLOWANCE + _pair_side(counter, first) + _pair_side(counter, second)
        if spec.context_length is not None and tokens - PAIR_ALLOWANCE > spec.context_length:
            raise ApiError(400, "context_length_exceeded", f"This model's maximum context length is "
                           f"{spec.context_length} tokens. However, a query and document together resulted in "
                           f"{tokens - PAIR_ALLOWANCE} tokens.", param="documents")
        total += tokens
    return total


def _pair_side(counter: TokenCounter, value: Any) -> int:
    """Tokens of one text of a pair: a string, or ``{"text": ...}``, counted; any other object (a media
    part, say) bounded as without a tokenizer."""
    if isinstance(value, dict) and set(value) == {"text"} and isinstance(value["text"], str):
        value = value["text"]
    return counter.input(value) if isinstance(value, str) else text_bytes(value)
