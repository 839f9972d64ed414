"""Reading request bodies once, refusing bad ones with a 400, and bounding their prompt tokens.

The prompt bound needs no tokenizer: every token of a byte-level BPE tokenizer (the kind every current
open model uses) stands for at least one byte of text, so a text of N UTF-8 bytes is at most N tokens.
The model sees the text of the messages plus what its chat template wraps around them (role markers,
a default system prompt, tool instructions); those get a fixed allowance per request, per message and
for tools. Images and audio get a fixed allowance per part. Every string of the body but the model's name
counts, not only the messages': servers put more than the messages into the prompt (tools, vLLM's
``documents`` and ``chat_template_kwargs``, ...), and a field the gateway does not know may be one of them.

One body policy (docs/gateway.md, "What is forwarded"): a body with a duplicate key is refused (servers
disagree on which of the two values counts); every field a supported server family reads as a completion
length (``max_tokens``, ``max_completion_tokens``, llama.cpp's ``n_predict``, TGI's ``max_new_tokens``,
Ollama's ``num_predict``) or a choice count (``n``, vLLM's ``best_of``) is read here, and the gateway
rewrites them all to what it granted; a client's own chat template is refused (it could put anything
into the prompt); and what is forwarded is the body as parsed and checked, never the raw bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from quotagate.gateway.errors import bad_request

MAX_TOKENS_CEILING = 10_000_000
MAX_CHOICES = 128
MAX_EMBEDDING_INPUTS = 4096
CHAT_TEMPLATE_ALLOWANCE = 64      # template text around the conversation, incl. a default system prompt
MESSAGE_ALLOWANCE = 8             # role markers and separators around each message
TOOLS_ALLOWANCE = 512             # the template's instructions for tool use
MEDIA_PART_ALLOWANCE = 16_384     # an image/audio/video part: the largest common vision encoders' output
EMBEDDING_INPUT_ALLOWANCE = 2     # special tokens (CLS/SEP, BOS/EOS) around each input
_MEDIA_TYPES = frozenset({"image_url", "input_audio", "audio_url", "video_url", "image", "input_image"})

# Completion lengths per choice, as the server families read them: all are rewritten to the grant.
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict", "max_new_tokens", "num_predict")
# Sequences generated per request: n choices, or vLLM's best_of candidates of which n are returned.
CHOICE_FIELDS = ("n", "best_of")
# Fields that would let the client change what the server puts into the prompt beyond counting.
REFUSED_FIELDS = {"chat_template": "a chat template of the client's own cannot be counted; use the model's"}

# Optional fields the gateway type-checks so that a wrong type is a 400 here, not an upstream's 500.
_NUMBER = (int, float)
_CHECKED: dict[str, tuple[tuple[type, ...], str]] = {
    "temperature": (_NUMBER, "a number"), "top_p": (_NUMBER, "a number"),
    "presence_penalty": (_NUMBER, "a number"), "frequency_penalty": (_NUMBER, "a number"),
    "seed": ((int,), "an integer"), "user": ((str,), "a string"), "stop": ((str, list), "a string or a list"),
    "tools": ((list,), "a list"), "functions": ((list,), "a list"), "logit_bias": ((dict,), "an object"),
}


@dataclass(slots=True)
class ChatRequest:
    body: dict[str, Any]
    canonical: bytes               # the body as parsed, written again: what is forwarded if nothing changes
    model: str
    stream: bool
    include_usage: bool            # the client asked for the usage chunk of a stream
    n: int                         # sequences generated (the largest of n and best_of)
    max_tokens: int | None         # the client's completion allowance per choice, if it gave one
    prompt_bound: int
    streamable: bool = True        # whether the server can be asked for a stream instead (not with best_of > n)
    prompts: list[Any] | None = None  # /v1/completions: the prompts, each a string or a token array


@dataclass(slots=True)
class EmbeddingsRequest:
    body: dict[str, Any]
    canonical: bytes
    model: str
    prompt_bound: int


# orjson reads JSON nested up to 1,024 levels but writes no deeper than 254, and a body may have to be
# written again (max_tokens lowered, usage asked for) after its tokens were reserved: deeper bodies are
# refused here, before anything is reserved. (No API body comes near it; Python code that walks one, such
# as text_bytes, stays far from the interpreter's recursion limit too.)
MAX_DEPTH = 254


def parse_object(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object, and the same written again (compact); a 400 if it is not one, is
    nested too deep or repeats a key."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        canonical = orjson.dumps(body)
    except TypeError:
        raise bad_request(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    if _has_duplicate_key(raw, canonical):
        raise bad_request("the request body repeats a key in an object; each key may appear once "
                          "(servers differ on which of the values they use)")
    return body, canonical


def _has_duplicate_key(raw: bytes, canonical: bytes) -> bool:
    """Whether a JSON object in ``raw`` repeats a key (``canonical`` is its parse written again).

    Every key is followed by a colon, and a colon in a string is the same character in both texts
    (orjson never escapes one). Parsing keeps one of the repeated keys, so with a duplicate the raw text
    has more colons than the canonical one: each key dropped takes its own colon with it, and the
    colons of its value. Counting a byte is C-fast (a stdlib parse with a hook to see every key cost
    ~6x orjson). Only a colon written as an escape (``\\u003a``) breaks the count: then the slow way.
    """
    if b"\\" in raw and (b"\\u003a" in raw or b"\\u003A" in raw):
        try:
            json.loads(raw, object_pairs_hook=_unique_pairs)
        except _DuplicateKey:
            return True
        return False
    return raw.count(b":") != canonical.count(b":")


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", "model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: must be a non-empty string", "model")
    return model


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise bad_request(f"{name}: must be an integer", name)
    if not low <= value <= high:
        raise bad_request(f"{name}: must be between {low} and {high}, got {value}", name)
    return value


def field_bytes(body: dict[str, Any], skip: frozenset[str]) -> int:
    """UTF-8 bytes of the keys and strings of every field of ``body`` but those in ``skip``."""
    return sum(len(name) + text_bytes(value, keys=True) for name, value in body.items() if name not in skip)


def text_bytes(value: Any, *, keys: bool = False) -> int:
    """UTF-8 bytes of every string inside ``value`` (and of the objects' keys, with ``keys``: a template
    may print those too); media parts count as MEDIA_PART_ALLOWANCE."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(text_bytes(v, keys=keys) for v in value)
    if isinstance(value, dict):
        if value.get("type") in _MEDIA_TYPES:
            return MEDIA_PART_ALLOWANCE
        if keys:
            return sum(len(k) + text_bytes(v, keys=True) for k, v in value.items())
        return sum(text_bytes(v) for v in value.values())
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int | float):
        return len(str(value))
    return 0


def _parts(content: Any) -> bool:
    """Whether a message's content is a list of parts, each an object with a string ``type``."""
    return isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)


# Chat fields whose strings are not prompt text (the model's name is checked, the rest are options).
_NOT_PROMPT = frozenset({"model", "messages", "stream", "stream_options", *LENGTH_FIELDS, *CHOICE_FIELDS,
                         "temperature", "top_p", "seed", "user", "logit_bias", "stop"})
_NOT_PROMPT_OR_TOOLS = _NOT_PROMPT | {"tools", "functions"}  # tools have an allowance of their own


def parse_chat(raw: bytes) -> ChatRequest:
    body, canonical = parse_object(raw)
    model = _model(body)
    for name, why in REFUSED_FIELDS.items():
        if name in body and body[name] is not None:
            raise bad_request(f"{name}: not accepted: {why}", name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty list of messages", "messages")
    bound = CHAT_TEMPLATE_ALLOWANCE + MESSAGE_ALLOWANCE * len(messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}]: must be an object with a string 'role'", f"messages[{i}]")
        content = message.get("content")
        if content is not None and not isinstance(content, str) and not _parts(content):
            raise bad_request(f"messages[{i}].content: must be a string or a list of parts (objects with "
                              "a string 'type')", f"messages[{i}].content")
        bound += text_bytes(message)
    stream, include_usage = _streaming(body)
    _check_types(body, _CHECKED)
    for name in ("tools", "functions"):
        value = body.get(name)
        if value:
            # Templates print tool schemas as JSON with spaces after ',' and ':': at most twice the compact form.
            bound += TOOLS_ALLOWANCE + 2 * len(orjson.dumps(value))
    # Everything else the server might put into the prompt (documents, template arguments, unknown fields).
    bound += field_bytes(body, _NOT_PROMPT_OR_TOOLS)
    n = max(_int(body, "n", 1, MAX_CHOICES) or 1, _int(body, "best_of", 1, MAX_CHOICES) or 1)
    max_tokens = _max_tokens(body)
    best_of = body.get("best_of")
    return ChatRequest(body=body, canonical=canonical, model=model, stream=stream, include_usage=include_usage,
                       n=n, max_tokens=max_tokens, prompt_bound=bound,
                       streamable=best_of is None or best_of <= (body.get("n") or 1))


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(``stream``, whether ``stream_options.include_usage`` asks for the usage chunk), checked."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream: must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options: must be an object", "stream_options")
    return stream, bool(options and options.get("include_usage") is True)


def _check_types(body: dict[str, Any], checked: dict[str, tuple[tuple[type, ...], str]]) -> None:
    """A 400 for an optional field of the wrong type (a boolean is no number, unless booleans are asked for)."""
    for name, (types, what) in checked.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise bad_request(f"{name}: must be {what}", name)


def _max_tokens(body: dict[str, Any]) -> int | None:
    """The client's completion length: the smallest of the length fields it sent (only those present are
    read: this runs on every request); ``min_tokens`` above it is a 400."""
    limits = [v for name in LENGTH_FIELDS if name in body and (v := _length(body, name)) is not None]
    min_tokens = _int(body, "min_tokens", 0, MAX_TOKENS_CEILING)
    if min_tokens is not None and limits and min_tokens > min(limits):
        raise bad_request(f"min_tokens: must not exceed the completion limit ({min(limits)}), got {min_tokens}",
                          "min_tokens")
    return min(limits) if limits else None


def _length(body: dict[str, Any], name: str) -> int | None:
    """A completion length field; llama.cpp's ``n_predict`` and Ollama's ``num_predict`` say "no limit"
    with a negative number, which counts as absent."""
    if name in ("n_predict", "num_predict"):
        value = body.get(name)
        if type(value) is int and value < 0:
            return None
    return _int(body, name, 1, MAX_TOKENS_CEILING)


# Completion fields whose strings are not prompt text.
_COMPLETION_NOT_PROMPT = _NOT_PROMPT - {"messages"} | {"prompt", "echo", "logprobs"}
_COMPLETION_CHECKED: dict[str, tuple[tuple[type, ...], str]] = {
    **_CHECKED, "suffix": ((str,), "a string"), "echo": ((bool,), "a boolean"), "logprobs": ((int,), "an integer"),
}


def _prompts(value: Any) -> list[Any]:
    """A completion request's ``prompt``: a string, a list of strings, a token array or a list of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(type(t) is int for t in value):
            return [value]
        if all(isinstance(p, str) or (isinstance(p, list) and p and all(type(t) is int for t in p)) for p in value):
            return value
    raise bad_request("prompt: must be a string, a list of strings, a list of token ids, or a list of lists of "
                      "token ids (non-empty)", "prompt")


def parse_completions(raw: bytes) -> ChatRequest:
    """A ``/v1/completions`` body: what the generation path needs, as for chat. Its ``n`` is the sequences
    generated in all: ``max(n, best_of)`` per prompt, for every prompt."""
    body, canonical = parse_object(raw)
    model = _model(body)
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("you must provide a prompt parameter", "prompt")
    prompts = _prompts(body["prompt"])
    bound = 0
    for prompt in prompts:
        bound += EMBEDDING_INPUT_ALLOWANCE + (text_bytes(prompt) if isinstance(prompt, str) else len(prompt))
    stream, include_usage = _streaming(body)
    _check_types(body, _COMPLETION_CHECKED)
    bound += field_bytes(body, _COMPLETION_NOT_PROMPT)  # the suffix, and whatever else a server may read
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    best_of = _int(body, "best_of", 1, MAX_CHOICES)
    if best_of is not None and best_of < n:
        raise bad_request(f"best_of: must be at least n ({n}), got {best_of}", "best_of")
    sequences = max(n, best_of or 1) * len(prompts)
    if sequences > MAX_CHOICES:
        raise bad_request(f"prompt: {len(prompts)} prompts of {max(n, best_of or 1)} sequences each is more than "
                          f"the {MAX_CHOICES} sequences a request may generate", "prompt")
    max_tokens = _max_tokens(body)
    return ChatRequest(body=body, canonical=canonical, model=model, stream=stream, include_usage=include_usage,
                       n=sequences, max_tokens=max_tokens, prompt_bound=bound,
                       streamable=best_of is None or best_of <= n, prompts=prompts)


def parse_embeddings(raw: bytes) -> EmbeddingsRequest:
    body, canonical = parse_object(raw)
    model = _model(body)
    value = body.get("input")
    if value is None:
        raise bad_request("you must provide an input parameter", "input")
    if isinstance(value, str):
        inputs: list[Any] = [value]
    elif isinstance(value, list) and value:
        inputs = value if not all(type(v) is int for v in value) else [value]
    else:
        raise bad_request("input: must be a string, a list of strings, or token arrays (non-empty)", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request", "input")
    bound = 0
    for item in inputs:
        if isinstance(item, str):
            bound += text_bytes(item)
        elif isinstance(item, list) and item and all(type(t) is int for t in item):
            bound += len(item)  # already tokens
        else:
            raise bad_request("input: must be a string, a list of strings, or token arrays (non-empty)", "input")
        bound += EMBEDDING_INPUT_ALLOWANCE
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad_request("encoding_format: must be 'float' or 'base64'", "encoding_format")
    _int(body, "dimensions", 1, 65_536)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user: must be a string", "user")
    return EmbeddingsRequest(body=body, canonical=canonical, model=model, prompt_bound=bound)


PAIR_ALLOWANCE = 8  # special tokens and separators a cross-encoder's template puts around a (query, document) pair


@dataclass(slots=True)
class PairsRequest:
    """A rerank or score request: the (query, document) pairs the model reads, one prompt each."""

    body: dict[str, Any]
    canonical: bytes
    model: str
    pairs: list[tuple[Any, Any]]
    prompt_bound: int


def _document(value: Any, name: str) -> Any:
    """A document or text of a pair: a string, or an object (``{"text": ...}``, or a content part)."""
    if isinstance(value, str) or (isinstance(value, dict) and value):
        return value
    raise bad_request(f"{name}: must be a string or an object", name)


def _pairs_request(body: dict[str, Any], canonical: bytes, pairs: list[tuple[Any, Any]],
                   options: frozenset[str]) -> PairsRequest:
    if len(pairs) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"at most {MAX_EMBEDDING_INPUTS} pairs per request", "documents")
    bound = sum(PAIR_ALLOWANCE + text_bytes(a) + text_bytes(b) for a, b in pairs)
    bound += field_bytes(body, options)  # whatever else the server may read
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user: must be a string", "user")
    return PairsRequest(body=body, canonical=canonical, model=_model(body), pairs=pairs, prompt_bound=bound)


_RERANK_OPTIONS = frozenset({"model", "query", "documents", "top_n", "return_documents", "user"})
_SCORE_OPTIONS = frozenset({"model", "text_1", "text_2", "user", "encoding_format"})


def parse_rerank(raw: bytes) -> PairsRequest:
    """A ``/v1/rerank`` body (Cohere's and Jina's shape, as vLLM and llama.cpp serve it): ``query``, a
    non-empty list of ``documents``, optional ``top_n`` and ``return_documents``."""
    body, canonical = parse_object(raw)
    _model(body)
    query = body.get("query")
    if query is None:
        raise bad_request("you must provide a query parameter", "query")
    query = _document(query, "query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise bad_request("documents: must be a non-empty list of strings or objects", "documents")
    pairs = [(query, _document(d, f"documents[{i}]")) for i, d in enumerate(documents)]
    _int(body, "top_n", 1, MAX_EMBEDDING_INPUTS)
    flag = body.get("return_documents")
    if flag is not None and not isinstance(flag, bool):
        raise bad_request("return_documents: must be a boolean", "return_documents")
    return _pairs_request(body, canonical, pairs, _RERANK_OPTIONS)


def parse_score(raw: bytes) -> PairsRequest:
    """A ``/v1/score`` body (vLLM's): ``text_1`` and ``text_2``, each a string or a list; one ``text_1``
    is scored against every ``text_2``, two lists pair by position."""
    body, canonical = parse_object(raw)
    _model(body)
    sides = []
    for name in ("text_1", "text_2"):
        value = body.get(name)
        if value is None:
            raise bad_request(f"you must provide a {name} parameter", name)
        items = value if isinstance(value, list) else [value]
        if not items:
            raise bad_request(f"{name}: must be a string or a non-empty list", name)
        sides.append([_document(v, f"{name}[{i}]" if isinstance(value, list) else name) for i, v in enumerate(items)])
    first, second = sides
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise bad_request(f"text_1 and text_2: lists must be as long as each other ({len(first)} and "
                          f"{len(second)}), or text_1 a single text", "text_2")
    return _pairs_request(body, canonical, list(zip(first, second, strict=True)), _SCORE_OPTIONS)
