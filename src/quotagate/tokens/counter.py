"""One model's token counter: its tokenizer and chat template, as its model server applies them.

The prompt of a chat request is what the server builds from it: the chat template rendered with the
messages, ``tools``, ``documents`` and the client's ``chat_template_kwargs``, with the generation prompt
added, then tokenized with special tokens parsed and none added (what vLLM, SGLang and llama.cpp do for
a chat request, and transformers' ``apply_chat_template(tokenize=True)``). The template is rendered the
way transformers renders it: a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``,
loop controls, ``raise_exception``, ``strftime_now`` and a ``tojson`` that is Python's ``json.dumps``
keeping non-ASCII text.

What cannot be counted exactly returns None, and the caller keeps its byte bound: content given as a
list of parts (servers join and place them in their own ways, and an image's tokens are the vision
encoder's), the legacy ``functions``, and a template that fails on something other than its own
``raise_exception`` (a template that refuses the conversation is the client's error: ``TemplateError``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2 import TemplateError as JinjaError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from quotagate.config import ConfigError, ModelSpec

log = logging.getLogger(__name__)

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
# New text longer than this (~5,000 tokens, ~2.5 ms of tokenizing) is tokenized off the event loop.
OFFLOAD_CHARS = 16_384


class TemplateError(ValueError):
    """The chat template refused the conversation (its ``raise_exception``): the message says why."""


class TokenizerConfigError(ValueError):
    """A model's tokenizer files are missing or unusable; the message names the file."""


class _Refusal(Exception):
    """Raised by the template's ``raise_exception``; becomes TemplateError outside Jinja."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _raise_exception(message: str) -> None:
    raise _Refusal(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)


def compile_template(source: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _special(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an object with ``content``."""
    if isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, dict) else None
    return content if isinstance(content, str) else None


def _parsed_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its tool calls' ``arguments`` as objects where they are JSON objects: servers
    parse them before rendering (vLLM, llama.cpp: templates expect a mapping, as transformers documents),
    so a template prints them in its own JSON form, not the client's string. The request body itself
    is not changed (it is forwarded as sent)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                value = json.loads(arguments)
            except ValueError:
                value = None
            if isinstance(value, dict):
                call = {**call, "function": {**function, "arguments": value}}  # type: ignore[dict-item]
        parsed.append(call)
    return {**message, "tool_calls": parsed}


class _Segments:
    """Counting a text piece by piece, the pieces between its added tokens (``<|im_start|>`` and the like),
    with the pieces' counts kept: a conversation's system prompt, tool schemas and earlier turns come
    back in every request, and tokenizing is most of the cost of counting (about 0.5 µs a token).

    Exact because a tokenizer splits a text at its added tokens before anything else and tokenizes the
    pieces apart (no token spans one). Used only where that holds as plainly as this code assumes: added
    tokens that strip no whitespace, match inside words and are not normalized, and no pre-tokenizer that
    adds a space in front of a text; and only if the two ways agree on a sample at load."""

    MAX_CHARS = 16 << 20  # the cache's size: the characters of the pieces it keeps

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
        self._tokenizer = tokenizer
        tokens = sorted((t["content"] for t in config.get("added_tokens", [])), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._chars = 0

    @staticmethod
    def usable(config: dict[str, Any]) -> bool:
        plain = all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"))
                    for t in config.get("added_tokens", []))
        return plain and '"add_prefix_space": true' not in json.dumps(config.get("pre_tokenizer"))

    def lookup(self, text: str) -> tuple[int, list[str]]:
        """(tokens of the added tokens and of the pieces already known, the pieces not known yet)."""
        split = self._split
        parts = split.split(text) if split is not None else [text]
        # split() puts the added tokens at the odd places, the pieces between them at the even ones.
        total = len(parts) // 2
        counts = self._counts
        missing: list[str] = []
        for piece in parts[::2]:
            if piece:
                known = counts.get(piece)
                if known is None:
                    missing.append(piece)
                else:
                    counts.move_to_end(piece)
                    total += known
        return total, missing

    def tokenize(self, pieces: list[str]) -> list[int]:
        """The token counts of ``pieces`` (safe to call from a worker thread: it keeps nothing)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False)]

    def learn(self, pieces: list[str], counts: list[int]) -> None:
        """Keep the counts of ``pieces`` (on the thread that looks them up)."""
        known = self._counts
        for piece, n in zip(pieces, counts, strict=True):
            if piece not in known:
                known[piece] = n
                self._chars += len(piece)
        while self._chars > self.MAX_CHARS:
            old, _ = known.popitem(last=False)
            self._chars -= len(old)

    def count(self, text: str) -> int:
        total, missing = self.lookup(text)
        if missing:
            counts = self.tokenize(missing)
            self.learn(missing, counts)
            total += sum(counts)
        return total


class TokenCounter:
    """Counts a model's tokens. ``prompt`` for chat requests, ``text`` for generated text, ``input`` for
    an embedding input."""

    def __init__(self, tokenizer: Tokenizer, template: Template | None, special: dict[str, str]) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._special = special
        config = json.loads(tokenizer.to_str())
        self._segments = _Segments(tokenizer, config) if _Segments.usable(config) else None
        if self._segments is not None and not self._agrees():
            log.warning("tokenizer: counting piece by piece does not agree with counting whole; not caching")
            self._segments = None

    def _agrees(self) -> bool:
        sample = "".join(f"{token} a b\n  café {i}!" for i, token in enumerate(
            [t.content for t in self._tokenizer.get_added_tokens_decoder().values()] + ["", " x"]))
        whole = len(self._tokenizer.encode(sample, add_special_tokens=False).ids)
        return self._segments is not None and self._segments.count(sample) == whole

    @classmethod
    def from_files(cls, tokenizer_path: Path, template_path: Path | None = None) -> TokenCounter:
        """Load ``tokenizer.json``; the chat template and special tokens come from the
        ``tokenizer_config.json`` beside it, the template from ``template_path`` if given."""
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise TokenizerConfigError(f"cannot load the tokenizer {tokenizer_path}: {exc}") from None
        config: dict[str, Any] = {}
        config_path = tokenizer_path.parent / "tokenizer_config.json"
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TokenizerConfigError(f"cannot read {config_path}: {exc}") from None
        source: Any = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one is the chat template
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if template_path is not None:
            try:
                source = template_path.read_text(encoding="utf-8")
            except OSError as exc:
                raise TokenizerConfigError(f"cannot read the chat template {template_path}: {exc.strerror}") from None
        template = None
        if isinstance(source, str):
            try:
                template = compile_template(source)
            except JinjaError as exc:
                raise TokenizerConfigError(f"the chat template of {tokenizer_path} does not compile: {exc}") from None
        special = {name: token for name in _SPECIAL if (token := _special(config.get(name))) is not None}
        return cls(tokenizer, template, special)

    @property
    def has_template(self) -> bool:
        return self._template is not None

    def text(self, text: str) -> int:
        """Tokens of ``text`` as it stands (special tokens in it parsed, none added)."""
        if not text:
            return 0
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def input(self, text: str) -> int:
        """Tokens of an embedding input: the text with the tokenizer's special tokens added (BOS, EOS, CLS...)."""
        return len(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def render(self, body: dict[str, Any]) -> str | None:
        """The prompt text a server builds from a chat request ``body``; None if it cannot be known."""
        template = self._template
        if template is None or body.get("functions"):
            return None
        messages = body["messages"]
        for message in messages:
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                return None
        if any(message.get("tool_calls") for message in messages):
            messages = [_parsed_arguments(message) for message in messages]
        context: dict[str, Any] = dict(self._special)
        kwargs = body.get("chat_template_kwargs")
        if isinstance(kwargs, dict):
            context.update(kwargs)
        context["messages"] = messages
        context["tools"] = body.get("tools") or None
        context["documents"] = body.get("documents") or None
        context["add_generation_prompt"] = body.get("add_generation_prompt", True) is not False
        try:
            return template.render(context)
        except _Refusal as refusal:
            raise TemplateError(refusal.message) from None
        except Exception:  # a template bug or a shape it does not expect: the byte bound still holds
            log.debug("chat template failed; counting by the byte bound", exc_info=True)
            return None

    def prompt(self, body: dict[str, Any]) -> int | None:
        """Tokens of the prompt a server builds from a chat request ``body``; None if it cannot be known."""
        rendered = self.render(body)
        if rendered is None:
            return None
        # A prompt's pieces come back request after request (system prompt, tools, earlier turns): kept.
        return self._segments.count(rendered) if self._segments is not None else self.text(rendered)

    async def prompt_async(self, body: dict[str, Any]) -> int | None:
        """``prompt``, with what is new in a long prompt tokenized in a worker thread: tokenizing runs at
        about 0.5 µs a token, so a 100,000-token document would hold the event loop (every other request
        of the process) for ~50 ms. The tokenizer works without the GIL."""
        rendered = self.render(body)
        if rendered is None:
            return None
        segments = self._segments
        if segments is None:
            if len(rendered) < OFFLOAD_CHARS:
                return self.text(rendered)
            return await asyncio.to_thread(self.text, rendered)
        total, missing = segments.lookup(rendered)
        if missing:
            if sum(len(p) for p in missing) < OFFLOAD_CHARS:
                counts = segments.tokenize(missing)
            else:
                counts = await asyncio.to_thread(segments.tokenize, missing)
            segments.learn(missing, counts)
            total += sum(counts)
        return total


def load_counters(models: Iterable[ModelSpec]) -> dict[str, TokenCounter]:
    """A counter for every model of the catalog that names a tokenizer (ConfigError if one cannot load)."""
    counters = {}
    for spec in models:
        if spec.tokenizer is not None:
            try:
                counters[spec.id] = TokenCounter.from_files(spec.tokenizer, spec.chat_template)
            except TokenizerConfigError as exc:
                raise ConfigError(f"model {spec.id}: {exc}") from None
            if spec.type == "chat" and not counters[spec.id].has_template:
                raise ConfigError(f"model {spec.id}: no chat template (tokenizer_config.json beside "
                                  f"{spec.tokenizer} has none): name one with chat_template")
    return counters
