"""Reading a ``POST /v1/responses`` body once: the checks accounting needs, a 400 naming the field
for what is plainly wrong, and the prompt's byte bound.

The same body policy as chat (``gateway/parsing.py``): a repeated key is a 400, what is forwarded is the
body as parsed, and every completion length a server may read is rewritten to the grant. For the
Responses API that is ``max_output_tokens``, and also chat's length fields: llama-server turns a
Responses body into a chat body keeping every other field, so a ``max_tokens`` or ``n_predict`` sent
alongside would be obeyed there.

What the gateway cannot count is refused, saying why: a prompt held on the server (``previous_response_id``,
``conversation``, an ``item_reference`` input item, a stored ``prompt`` template) is not in the body, and a
response run in the ``background`` or ``store``\\ d would be read back later, past the metering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from quotagate.gateway.errors import bad_request
from quotagate.gateway.parsing import (
    CHAT_TEMPLATE_ALLOWANCE,
    LENGTH_FIELDS,
    MAX_TOKENS_CEILING,
    MESSAGE_ALLOWANCE,
    REFUSED_FIELDS,
    TOOLS_ALLOWANCE,
    field_bytes,
    parse_object,
    text_bytes,
)

# The Responses API's completion length, then chat's (forwarded to servers that read them).
RESPONSES_LENGTH_FIELDS = ("max_output_tokens", *LENGTH_FIELDS)

_SEND_WHOLE = "send the whole conversation in 'input' (with \"store\": false)"
# Fields whose value refers to state held on a model server: the prompt it stands for cannot be counted.
_STATEFUL = {
    "previous_response_id": "the gateway counts a prompt before forwarding it, and a previous response is "
                            f"held on the model server, out of its sight: {_SEND_WHOLE}",
    "conversation": "the gateway counts a prompt before forwarding it, and a conversation is held on the "
                    f"model server, out of its sight: {_SEND_WHOLE}",
    "prompt": "a stored prompt template is held on the model server, where the gateway cannot count it: send "
              "its text in 'instructions' and 'input'",
}
# Tools the client runs (it sends their results back as input items); built-in tools (web search, file
# search, code interpreter, MCP...) are run by the model server, their results put into the prompt there.
_CLIENT_TOOLS = frozenset({"function", "custom"})
_NUMBER = (int, float)
_CHECKED: dict[str, tuple[tuple[type, ...], str]] = {
    "instructions": ((str,), "a string"), "temperature": (_NUMBER, "a number"), "top_p": (_NUMBER, "a number"),
    "tools": ((list,), "a list"), "tool_choice": ((str, dict), "a string or an object"),
    "text": ((dict,), "an object"), "reasoning": ((dict,), "an object"), "metadata": ((dict,), "an object"),
    "user": ((str,), "a string"), "parallel_tool_calls": ((bool,), "a boolean"), "include": ((list,), "a list"),
    "truncation": ((str,), "a string"), "top_logprobs": ((int,), "an integer"),
    "max_tool_calls": ((int,), "an integer"), "seed": ((int,), "an integer"),
}
# Fields whose strings are not prompt text: the model name, lengths and options. Everything else counts.
_NOT_PROMPT = frozenset({"model", "input", "instructions", "tools", "stream", "store", "background",
                         *RESPONSES_LENGTH_FIELDS, "temperature", "top_p", "seed", "user", "metadata",
                         "tool_choice", "parallel_tool_calls", "include", "truncation", "top_logprobs",
                         "max_tool_calls", "service_tier", "stream_options", "n", "best_of"})


@dataclass(slots=True)
class ResponsesRequest:
    body: dict[str, Any]
    canonical: bytes               # the body as parsed, written again: what is forwarded if nothing changes
    model: str
    stream: bool
    max_output_tokens: int | None  # the client's completion allowance (the smallest length field it sent)
    prompt_bound: int


def parse_responses(raw: bytes) -> ResponsesRequest:
    body, canonical = parse_object(raw)
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", "model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: must be a non-empty string", "model")
    for name, why in {**_STATEFUL, **REFUSED_FIELDS}.items():
        if body.get(name) is not None:
            raise bad_request(f"{name}: not accepted: {why}", name)
    _flags(body)
    for name, (types, what) in _CHECKED.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise bad_request(f"{name}: must be {what}", name)
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            raise bad_request(f"{name}: the Responses API generates one output; use /v1/chat/completions for "
                              "several choices", name)
    bound = CHAT_TEMPLATE_ALLOWANCE + _input_bound(body.get("input"))
    instructions = body.get("instructions")
    if instructions:
        bound += MESSAGE_ALLOWANCE + text_bytes(instructions)
    tools = body.get("tools")
    if tools:
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                raise bad_request(f"tools[{i}]: must be an object with a string 'type'", f"tools[{i}]")
            if tool["type"] not in _CLIENT_TOOLS:
                raise bad_request(f"tools[{i}].type: '{tool['type'][:100]}' is not accepted: a built-in tool is run by "
                                  "the model server, which puts its results into the prompt out of the gateway's "
                                  "sight (it counts a prompt before forwarding it). Use function tools, run by "
                                  "your program", f"tools[{i}].type")
            if not isinstance(tool.get("name"), str):
                raise bad_request(f"tools[{i}].name: a {tool['type']} tool needs a string 'name'", f"tools[{i}].name")
        # Templates print tool schemas as JSON with spaces after ',' and ':': at most twice the compact form.
        bound += TOOLS_ALLOWANCE + 2 * len(orjson.dumps(tools))
    bound += field_bytes(body, _NOT_PROMPT)
    limits = [v for name in RESPONSES_LENGTH_FIELDS if name in body and (v := _length(body, name)) is not None]
    return ResponsesRequest(body=body, canonical=canonical, model=model, stream=body.get("stream") is True,
                            max_output_tokens=min(limits) if limits else None, prompt_bound=bound)


def _flags(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream: must be a boolean", "stream")
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise bad_request("store: must be a boolean", "store")
    if store:
        raise bad_request("store: true is not accepted: the gateway does not keep responses, and one kept on the "
                          "model server would be read back past the gateway's metering. Send \"store\": false "
                          "(the gateway sends that for you when store is absent)", "store")
    background = body.get("background")
    if background is not None and not isinstance(background, bool):
        raise bad_request("background: must be a boolean", "background")
    if background:
        raise bad_request("background: true is not accepted: a background response is fetched from the model "
                          "server later, past the gateway's limits and metering. Send the request without it "
                          "(streamed, if it is long)", "background")


def _length(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if name in ("n_predict", "num_predict") and type(value) is int and value < 0:
        return None  # llama.cpp's and Ollama's "no limit"
    if type(value) is not int:
        raise bad_request(f"{name}: must be an integer", name)
    if not 1 <= value <= MAX_TOKENS_CEILING:
        raise bad_request(f"{name}: must be between 1 and {MAX_TOKENS_CEILING}, got {value}", name)
    return value


def _input_bound(value: Any) -> int:
    """The byte bound of ``input``, checking its shape: a string, or a non-empty list of items."""
    if value is None:
        raise bad_request("you must provide an input parameter", "input")
    if isinstance(value, str):
        return MESSAGE_ALLOWANCE + text_bytes(value)
    if not isinstance(value, list) or not value:
        raise bad_request("input: must be a string or a non-empty list of input items", "input")
    bound = 0
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where}: must be an object", where)
        kind = item.get("type")
        if kind is not None and not isinstance(kind, str):
            raise bad_request(f"{where}.type: must be a string", f"{where}.type")
        if kind == "item_reference":
            raise bad_request(f"{where}: an item_reference names an item held on the model server, which the "
                              f"gateway cannot count: {_SEND_WHOLE}", where)
        if kind in (None, "message"):
            _message(item, where)
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise bad_request(f"{where}.{name}: a function_call item needs a string '{name}'",
                                      f"{where}.{name}")
            # Servers parse the arguments and templates print them again with spaces after ',' and ':'.
            bound += text_bytes(item["arguments"])
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request(f"{where}.call_id: a function_call_output item needs a string 'call_id'",
                                  f"{where}.call_id")
            output = item.get("output")
            if not isinstance(output, str) and not _parts(output):
                raise bad_request(f"{where}.output: must be a string or a list of parts (objects with a string "
                                  "'type')", f"{where}.output")
        bound += MESSAGE_ALLOWANCE + text_bytes(item, keys=kind not in (None, "message"))
    return bound


def _message(item: dict[str, Any], where: str) -> None:
    if not isinstance(item.get("role"), str):
        raise bad_request(f"{where}.role: a message needs a string 'role'", f"{where}.role")
    content = item.get("content")
    if not isinstance(content, str) and not _parts(content):
        raise bad_request(f"{where}.content: must be a string or a list of parts (objects with a string 'type')",
                          f"{where}.content")


def _parts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in value)
