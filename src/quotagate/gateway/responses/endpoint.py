"""``POST /v1/responses``: checked, counted, admitted, forwarded natively to the model server's own
``/v1/responses`` (vLLM and llama-server serve it), settled from the usage it reports.

The accounting is chat's (``gateway/app.py``): the prompt counted with the model's tokenizer where the
catalog names one, else bounded by its bytes; a stream of a key with tpm or a budget reserves its output
as it is generated (``Lease``) and is cut off when nothing more can be reserved; a non-streamed request
reserves its output up front, and ``max_output_tokens`` (with every other length field) says the grant.
``store`` is forwarded as false: the gateway keeps no responses, and one kept on the model server would be
read back past the gateway's limits and metering.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from quotagate.gateway.errors import ApiError
from quotagate.gateway.headers import SSE, processing_ms
from quotagate.gateway.parsing import text_bytes
from quotagate.gateway.responses.parsing import RESPONSES_LENGTH_FIELDS, parse_responses
from quotagate.gateway.responses.prompt import responses_prompt
from quotagate.gateway.responses.relay import ResponsesRelay
from quotagate.gateway.responses.usage import reported, usage_object
from quotagate.gateway.streaming import Lease
from quotagate.gateway.upstream_errors import upstream_failure
from quotagate.gateway.usage import charge
from quotagate.keys.models import KeyRecord
from quotagate.limits.interfaces import Admission
from quotagate.tokens.counter import TokenCounter
from quotagate.upstreams.client import Response, UpstreamError, UpstreamTimeout

if TYPE_CHECKING:
    from quotagate.gateway.app import Call, LLMApp, Receive, Scope, Send


ENDPOINT = "responses"  # the endpoint's name in usage rows, activity and metrics



async def serve(app: LLMApp, call: Call, key: KeyRecord, scope: Scope, receive: Receive, send: Send) -> None:
    raw = await app._read_body(scope, receive)
    req = parse_responses(raw)
    call.model = req.model
    call.stream = req.stream
    spec = app._usable(key, req.model, "chat")
    counter = app._counters.get(req.model)
    prompt, exact = await responses_prompt(counter, req, spec)
    # The most the response can generate: what the client asked for, else what is left of the context,
    # else nothing bounds it and the gateway's default is the limit (as for chat).
    room = None if spec.context_length is None else spec.context_length - (prompt if exact else 0)
    asked = req.max_output_tokens
    natural = room if asked is None else asked if room is None else min(asked, room)
    limiter = app._rt.limiter
    leasing = req.stream and limiter is not None and key.limits_tokens(req.model)
    wanted = natural or app._default_max_tokens
    first = min(wanted, Lease.FIRST) if leasing else wanted
    adm = await app._admit(call, key, prompt, first, 1)
    body = req.body
    changed = False
    if body.get("store") is None:
        body["store"] = False
        changed = True
    lease: Lease | None = None
    if adm.granted is not None and leasing:
        # Cut off by the relay when nothing more can be reserved: the client's own lengths are made one (its
        # smallest), so that every server reads the same.
        changed = (asked is not None and _lengths(body, asked, cap=False)) or changed
        assert limiter is not None
        lease = Lease(lambda tokens: limiter.extend(key, adm, tokens), first=first, ceiling=natural)
    elif adm.granted is not None:
        grant = min(wanted, adm.granted)
        # Every length field sent says the grant; max_output_tokens is added only where without it a limit
        # could be overrun (none sent, and nothing else bounds the output within the grant).
        changed = _lengths(body, grant, cap=asked is None and (natural is None or grant < natural)) or changed
    if spec.upstream_model is not None:
        body["model"] = spec.upstream_model
        changed = True
    payload = orjson.dumps(body) if changed else req.canonical
    response = await app._forward(call, key, adm, req.model, "/responses", payload)
    if req.stream and response.status == 200:
        await _relay(app, call, key, adm, response, send, receive, prompt, counter, lease)
        return
    await _answer(app, call, key, adm, response, send, prompt, counter)


def _lengths(body: dict[str, Any], grant: int, *, cap: bool) -> bool:
    """Write ``grant`` into every length field of ``body`` (and ``max_output_tokens`` if ``cap`` and it has
    none); ``min_tokens`` follows it down. Returns whether the body changed."""
    present = [name for name in RESPONSES_LENGTH_FIELDS if body.get(name) is not None]
    if not cap and all(body[name] == grant for name in present):
        return False
    for name in present:
        body[name] = grant
    if cap and "max_output_tokens" not in present:
        body["max_output_tokens"] = grant
    min_tokens = body.get("min_tokens")
    if type(min_tokens) is int and min_tokens > grant:
        body["min_tokens"] = grant
    return True


async def _relay(app: LLMApp, call: Call, key: KeyRecord, adm: Admission, response: Response, send: Send,
                 receive: Receive, prompt_bound: int, counter: TokenCounter | None, lease: Lease | None) -> None:
    hdrs = [*SSE, (b"x-request-id", call.request_id.encode()), processing_ms(call.t0), *call.rate_headers]
    relay = ResponsesRelay(request_id=call.request_id, response=response, send=send, receive=receive, headers=hdrs,
                           prompt_bound=prompt_bound,
                           granted=adm.granted, started_at=call.t0, clock=time.perf_counter, counter=counter,
                           lease=lease)
    settled = False

    async def finish(prompt: int, completion: int, error_code: str | None) -> None:
        nonlocal settled
        settled = True
        await app._settle(key, adm, prompt + completion)
        if relay.started or error_code is None or error_code == "client_disconnected":
            app._record(call, 200, error_code, prompt, completion, relay.ttft_ms)

    try:
        await relay.run(finish)
    except BaseException:
        response.close()
        if not settled:
            await app._settle(key, adm, 0)
        raise
    finally:
        response.release()


def output_texts(output: Any) -> list[str]:
    """The generated text of a response's output items: message text and refusals, tool-call arguments,
    reasoning text and summaries."""
    texts: list[str] = []
    if not isinstance(output, list):
        return texts
    for item in output:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            texts.append(item["arguments"])
        for name in ("content", "summary"):
            parts = item.get(name)
            if isinstance(parts, list):
                for part in parts:
                    if isinstance(part, dict):
                        texts.extend(v for k in ("text", "refusal") if isinstance(v := part.get(k), str))
    return texts


async def _answer(app: LLMApp, call: Call, key: KeyRecord, adm: Admission, response: Response, send: Send,
                  prompt_bound: int, counter: TokenCounter | None) -> None:
    """A non-streamed answer (or an upstream's error): read it whole, check it, charge it, send it on."""
    try:
        try:
            data = await response.read()
        except UpstreamTimeout:
            raise ApiError(504, "upstream_timeout", "the model server did not answer within the timeout") from None
        except UpstreamError:
            raise ApiError(502, "upstream_error", "the model server's answer broke off") from None
        finally:
            response.release()
        if response.status != 200:
            raise upstream_failure(response.status, data)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("output"), list):
            raise ApiError(502, "upstream_error", "the model server answered with something that is not a "
                           "valid response")
    except BaseException:
        await app._settle(key, adm, 0)
        raise
    granted = adm.granted
    usage = obj.get("usage")
    report = reported(usage)
    fallback = 0
    if report is None:
        texts = output_texts(obj["output"])
        fallback = sum(counter.text(t) for t in texts) if counter is not None else text_bytes(texts)
        if granted is not None:
            fallback = min(fallback, granted)
    prompt, completion = charge(report, prompt_bound, granted, fallback_completion=fallback,
                                request_id=call.request_id)
    if report != (prompt, completion):
        obj["usage"] = usage_object(prompt, completion, usage)
        data = orjson.dumps(obj)
    await app._settle(key, adm, prompt + completion)
    await app._respond(call, send, 200, data, prompt=prompt, completion=completion)
