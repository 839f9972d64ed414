"""The prompt tokens of a Responses request, counted with the model's tokenizer where the catalog names one.

Servers serve the Responses API by turning the request into a chat request and rendering the model's chat
template (vLLM, and llama-server's ``server_chat_convert_responses_to_chatcmpl``): ``instructions`` first as
a system message, a string ``input`` as one user message, and the items in order — a message as a message,
a ``function_call`` as an assistant tool call (joined to the assistant message before it, as llama-server
does), a ``function_call_output`` as a tool message; the flat function tools as chat tools. The gateway
does the same and counts the chat body as chat counts one (``tokens/counter.py``).

A content given as several parts is rendered in each server's own way (joined with newlines for a template
that takes strings, passed as parts to one that takes parts): such a prompt, like one with a ``reasoning``
item or an item the gateway does not know, keeps the byte bound.
"""

from __future__ import annotations

from typing import Any

from quotagate.config import ModelSpec
from quotagate.gateway.counting import chat_prompt
from quotagate.gateway.parsing import ChatRequest
from quotagate.gateway.responses.parsing import ResponsesRequest
from quotagate.tokens.counter import TokenCounter

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


async def responses_prompt(counter: TokenCounter | None, req: ResponsesRequest, spec: ModelSpec) -> tuple[int, bool]:
    """(prompt tokens to reserve, whether that is an exact count); a prompt at the model's context length
    or beyond is a 400 ``context_length_exceeded``, as for chat."""
    if counter is None:
        return req.prompt_bound, False
    chat = as_chat(req.body)
    if chat is None:
        return req.prompt_bound, False
    shim = ChatRequest(body=chat, canonical=b"", model=req.model, stream=False, include_usage=False, n=1,
                       max_tokens=None, prompt_bound=req.prompt_bound)
    return await chat_prompt(counter, shim, spec)


def as_chat(body: dict[str, Any]) -> dict[str, Any] | None:
    """The chat body a server renders for the Responses ``body``; None where it cannot be known."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        messages.append({"role": "system", "content": instructions})
    value = body["input"]
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    else:
        for item in value:
            if not _add(messages, item):
                return None
    chat: dict[str, Any] = {"messages": messages}
    tools = body.get("tools")
    if tools:
        if any(tool["type"] != "function" for tool in tools):
            return None  # a custom (free-form) tool: servers render it, if at all, in their own ways
        chat["tools"] = [_tool(tool) for tool in tools]
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        chat["chat_template_kwargs"] = kwargs
    return chat


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    # llama-server adds "strict": true where it is absent, but renders its tools without it (measured:
    # the same count with and without); a strict the client sent is kept, the count then errs high.
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


def _text(content: Any) -> str | None:
    """A content as the one string a template gets: a string, or a single text part."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and len(content) == 1 and content[0].get("type") in _TEXT_PARTS \
            and isinstance(content[0].get("text"), str):
        text: str = content[0]["text"]
        return text
    return None


def _assistant(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The assistant message at the end, which a tool call or reasoning item joins (llama-server)."""
    return messages[-1] if messages and messages[-1].get("role") == "assistant" else None


def _add(messages: list[dict[str, Any]], item: dict[str, Any]) -> bool:
    kind = item.get("type")
    if kind in (None, "message"):
        text = _text(item.get("content"))
        if text is None:
            return False
        if item["role"] == "assistant" and _assistant(messages) is not None:
            return False  # joined to the one before as several parts
        messages.append({"role": item["role"], "content": text})
        return True
    if kind == "function_call":
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        last = _assistant(messages)
        if last is not None:
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        return True
    if kind == "function_call_output":
        output = _text(item["output"])
        if output is None:
            return False
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        return True
    return False
