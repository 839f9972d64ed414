"""Reading request bodies once, refusing bad ones with a 400, and bounding their prompt tokens.

The prompt bound needs no tokenizer: every token of a byte-level BPE tokenizer (the kind every current
open model uses) stands for at least one byte of text, so a text of N UTF-8 bytes is at most N tokens.
The model sees the text of the messages plus what its chat template wraps around them (role markers,
a default system prompt, tool instructions); those get a fixed allowance per request, per message and
for tools. Images and audio get a fixed allowance per part. See docs/gateway.md.
"""

from __future__ import annotations

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

# Optional fields the gateway type-checks so that a wrong type is a 400 here, not an upstream's 500.
_NUMBER = (int, float)
_CHECKED: dict[str, tuple[tuple[type, ...], str]] = {
    "temperature": (_NUMBER, "a number"), "top_p": (_NUMBER, "a number"),
    "presence_penalty": (_NUMBER, "a number"), "frequency_penalty": (_NUMBER, "a number"),
    "seed": ((int,), "an integer"), "user": ((str,), "a string"), "stop": ((str, list), "a string or a list"),
    "tools": ((list,), "a list"), "logit_bias": ((dict,), "an object"),
}


@dataclass(slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool            # the client asked for the usage chunk of a stream
    n: int
    max_tokens: int | None         # the client's completion allowance per choice, if it gave one
    prompt_bound: int


@dataclass(slots=True)
class EmbeddingsRequest:
    body: dict[str, Any]
    model: str
    prompt_bound: int


# orjson reads JSON nested up to 1,024 levels but writes no deeper than 254, and a body may have to be
# written again (max_tokens lowered, usage asked for) after its tokens were reserved: deeper bodies are
# refused here, before anything is reserved. (No API body comes near it; Python code that walks one, such
# as text_bytes, stays far from the interpreter's recursion limit too.)
MAX_DEPTH = 254


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    # Counting brackets is C-fast and rules out almost every body; only one with more than MAX_DEPTH of
    # them (a long conversation, say) is written once to find out.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        try:
            orjson.dumps(body)
        except TypeError:
            raise bad_request(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    return body


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


def text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string inside ``value``; media parts count as MEDIA_PART_ALLOWANCE."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(text_bytes(v) for v in value)
    if isinstance(value, dict):
        if value.get("type") in _MEDIA_TYPES:
            return MEDIA_PART_ALLOWANCE
        return sum(text_bytes(v) for v in value.values())
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int | float):
        return len(str(value))
    return 0


def _parts(content: Any) -> bool:
    """Whether a message's content is a list of parts, each an object with a string ``type``."""
    return isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)


def parse_chat(raw: bytes) -> ChatRequest:
    body = parse_object(raw)
    model = _model(body)
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
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream: must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options: must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    for name, (types, what) in _CHECKED.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise bad_request(f"{name}: must be {what}", name)
    tools = body.get("tools")
    if tools:
        # Templates print tool schemas as JSON with spaces after ',' and ':': at most twice the compact form.
        bound += TOOLS_ALLOWANCE + 2 * len(orjson.dumps(tools))
    functions = body.get("functions")
    if functions:
        bound += TOOLS_ALLOWANCE + 2 * len(orjson.dumps(functions))
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    limits = [v for v in (_int(body, "max_completion_tokens", 1, MAX_TOKENS_CEILING),
                          _int(body, "max_tokens", 1, MAX_TOKENS_CEILING)) if v is not None]
    return ChatRequest(body=body, model=model, stream=stream, include_usage=include_usage, n=n,
                       max_tokens=min(limits) if limits else None, prompt_bound=bound)


def parse_embeddings(raw: bytes) -> EmbeddingsRequest:
    body = parse_object(raw)
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
    return EmbeddingsRequest(body=body, model=model, prompt_bound=bound)
