"""Count, don't bound: a model with a tokenizer in the catalog reserves its prompt's exact token count
(chat template applied, tools and documents included), refuses a prompt longer than its context before
touching any limit, and adds no max_tokens a limit does not need.

The expected counts come from the test model's own files rendered by the test harness
(``tests/realserver/model.py``: an implementation of its own of transformers' template rendering), not
from the gateway's code."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from quotagate.gateway.parsing import parse_chat
from quotagate.tokens.counter import TokenCounter
from tests.conftest import fresh_database
from tests.fakes.upstream import FakeUpstream
from tests.gateway.helpers import async_sdk, budget_remaining, hi, sdk
from tests.gateway.test_stream_relay import DONE, FINISH, FIRST, delta
from tests.realserver.model import CONTEXT_LENGTH, TinyModel, make_model
from tests.support import Console, Gateway, start_gateway

STRICT_TEMPLATE = """{%- if messages[0]['role'] != 'user' %}\
{{ raise_exception('the first message must be the user\\'s') }}{%- endif %}\
{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}\
{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"""

CONFIG = """
[[models]]
id = "counted"
type = "chat"
upstreams = ["{main}"]
tokenizer = "{tokenizer}"
context_length = {context}

[[models]]
id = "strict"
type = "chat"
upstreams = ["{main}"]
tokenizer = "{tokenizer}"
chat_template = "strict.jinja"

[[models]]
id = "counted-embed"
type = "embedding"
upstreams = ["{main}"]
tokenizer = "{tokenizer}"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return make_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def counting_upstream(tiny: TinyModel) -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    fake.counter = TokenCounter.from_files(tiny.tokenizer_path)  # reports usage as a server of the model would
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def cgw(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None, tiny: TinyModel,
        counting_upstream: FakeUpstream) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("counting")
    (directory / "strict.jinja").write_text(STRICT_TEMPLATE)
    config = directory / "gateway.toml"
    config.write_text(CONFIG.format(main=counting_upstream.base_url, tokenizer=tiny.tokenizer_path,
                                    context=CONTEXT_LENGTH))
    with fresh_database(directory, _pg_template, "c") as url:
        gateway = start_gateway(directory / "data", url, config)
        yield gateway
        gateway.stop()


@pytest.fixture(scope="module")
def owner(cgw: Gateway) -> tuple[Console, str]:
    console = cgw.user("counting@example.com", admin=True)
    return console, console.project("counting")["id"]


def _key(owner: tuple[Console, str], **limits: Any) -> str:
    console, project = owner
    return str(console.mint(project, **limits)["secret"])


def _chat(gw: Gateway, secret: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.llm_url}/chat/completions", json={"model": "counted", **body},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=30)


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Which day?"}, {"role": "user", "content": "Today, café au lait."}]


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_the_prompt_is_reserved_at_its_exact_count(cgw: Gateway, owner: tuple[Console, str], tiny: TinyModel,
                                                   tools: list[dict[str, Any]] | None) -> None:
    limit = 100_000
    secret = _key(owner, token_limit=limit, token_limit_period="day")
    body: dict[str, Any] = {"messages": CONVERSATION, "max_tokens": 10}
    if tools:
        body["tools"] = TOOLS
    exact = tiny.count(tiny.render(CONVERSATION, tools=tools))
    r = _chat(cgw, secret, body)
    assert r.status_code == 200, r.text
    # Taken at admission: the reservation is the exact prompt plus max_tokens (the byte bound was ~3x).
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == limit - exact - 10
    assert exact < parse_chat(orjson.dumps({"model": "counted", **body})).prompt_bound / 2
    assert r.json()["usage"]["prompt_tokens"] == exact
    assert budget_remaining(cgw, secret) == limit - r.json()["usage"]["total_tokens"]


def test_a_prompt_longer_than_the_context_is_refused_before_any_token_is_reserved(
        cgw: Gateway, owner: tuple[Console, str], counting_upstream: FakeUpstream) -> None:
    secret = _key(owner, rpm=2, token_limit=1_000_000, token_limit_period="day")
    before = len(counting_upstream.requests)
    r = _chat(cgw, secret, {"messages": [{"role": "user", "content": "lorem ipsum dolor " * 2000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT_LENGTH} tokens" in r.json()["error"]["message"]
    assert len(counting_upstream.requests) == before
    assert budget_remaining(cgw, secret) == 1_000_000  # no token reserved or charged
    # It was a request all the same (as every refusal that is the caller's fault): one of the two rpm slots.
    assert _chat(cgw, secret, {"messages": hi()}).status_code == 200
    assert _chat(cgw, secret, {"messages": hi()}).status_code == 429


def test_no_length_is_added_when_the_context_bounds_the_completion(
        cgw: Gateway, owner: tuple[Console, str], tiny: TinyModel, counting_upstream: FakeUpstream) -> None:
    secret = _key(owner, token_limit=1_000_000, token_limit_period="day")
    assert _chat(cgw, secret, {"messages": hi()}).status_code == 200
    assert "max_tokens" not in counting_upstream.chat_requests()[-1]  # what is left of 2048 fits the budget
    # Nor when the budget is smaller than what is left of the context: the answer is reserved as it is
    # generated (forwarded as a stream) and cut off where the budget ends.
    exact = tiny.count(tiny.render(hi()))
    small = _key(owner, token_limit=exact + 100, token_limit_period="day")
    r = _chat(cgw, small, {"messages": hi(), "fake": {"tokens": 500}})
    assert r.status_code == 200, r.text
    assert "max_tokens" not in counting_upstream.chat_requests()[-1]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"] == {"prompt_tokens": exact, "completion_tokens": 100, "total_tokens": exact + 100}
    assert budget_remaining(cgw, small) == 0


def test_a_stream_without_usage_is_charged_its_exact_prompt(cgw: Gateway, owner: tuple[Console, str],
                                                            tiny: TinyModel) -> None:
    # A server that ignores stream_options: the prompt was charged at its bound (140 instead of 53).
    limit = 10_000
    secret = _key(owner, token_limit=limit, token_limit_period="day")
    stream = sdk(cgw, secret).chat.completions.create(
        model="counted", messages=CONVERSATION, max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 6, "no_usage": True}})
    usage = [c.usage for c in stream if c.usage][-1]
    assert usage.prompt_tokens == tiny.count(tiny.render(CONVERSATION))
    assert usage.completion_tokens >= 6
    assert budget_remaining(cgw, secret) == limit - usage.total_tokens


def test_a_slow_stream_without_usage_is_charged_the_tokens_of_its_text(cgw: Gateway, owner: tuple[Console, str],
                                                                       tiny: TinyModel) -> None:
    # Deltas of several tokens each, one by one: counted without a full parse (tests/gateway/
    # test_stream_relay.py), and still their text kept for the tokenizer, which counts more than one a delta.
    # More than the stream's first block (16): it was charged 16, the rest of the text for free, until the
    # relay reserved the text's tokens past its block as it does a report's.
    secret = _key(owner, token_limit=10_000, token_limit_period="day")
    texts = [" the weather in Paris", " is mild and", " café au lait", " for everyone \"here\""]
    raw = [FIRST, *(delta(t) for t in texts), FINISH, DONE]
    chunks = list(sdk(cgw, secret).chat.completions.create(
        model="counted", messages=hi(), max_tokens=100, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"raw": raw, "token_delay": 0.002}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(texts)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == tiny.count("".join(texts)) > len(texts)
    assert budget_remaining(cgw, secret) == 10_000 - usage.total_tokens


def test_under_reported_choices_are_charged_what_was_generated(cgw: Gateway, owner: tuple[Console, str],
                                                               tiny: TinyModel) -> None:
    # llama-server with n: 2 reported one choice's tokens for both.
    secret = _key(owner, token_limit=10_000, token_limit_period="day")
    lie = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    r = sdk(cgw, secret).chat.completions.create(model="counted", messages=hi(), n=2, max_tokens=20,
                                                 extra_body={"fake": {"tokens": 4, "usage": lie}})
    assert len(r.choices) == 2
    generated = sum(tiny.count(c.message.content or "") for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == generated > 4


def test_a_template_that_refuses_the_conversation_is_a_400(cgw: Gateway, owner: tuple[Console, str],
                                                           counting_upstream: FakeUpstream) -> None:
    secret = _key(owner, token_limit=10_000, token_limit_period="day")
    before = len(counting_upstream.requests)
    r = httpx.post(f"{cgw.llm_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                   json={"model": "strict", "messages": [{"role": "assistant", "content": "hi"}]}, timeout=30)
    assert r.status_code == 400 and "the first message must be the user's" in r.json()["error"]["message"]
    assert len(counting_upstream.requests) == before
    r = httpx.post(f"{cgw.llm_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                   json={"model": "strict", "messages": hi(), "max_tokens": 3}, timeout=30)
    assert r.status_code == 200, r.text


def test_embedding_inputs_are_counted(cgw: Gateway, owner: tuple[Console, str], tiny: TinyModel) -> None:
    limit = 10_000
    secret = _key(owner, token_limit=limit, token_limit_period="day")
    inputs = ["the weather in Paris", "café au lait, s'il vous plaît"]
    r = httpx.post(f"{cgw.llm_url}/embeddings", headers={"Authorization": f"Bearer {secret}"},
                   json={"model": "counted-embed", "input": inputs}, timeout=30)
    assert r.status_code == 200, r.text
    exact = sum(len(tiny.tokenizer().encode(i).ids) for i in inputs)
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == limit - exact
    assert r.json()["usage"]["prompt_tokens"] == exact


async def _streams(gw: Gateway, secret: str, count: int, **kwargs: Any) -> tuple[list[int], int]:
    """``count`` simultaneous streams; (tokens each admitted one was charged, how many were refused)."""
    client = async_sdk(gw, secret)

    async def one() -> int:
        stream = await client.chat.completions.create(model="counted", messages=hi(), stream=True,
                                                      stream_options={"include_usage": True}, **kwargs)
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None
        return int(usage.total_tokens)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    await client.close()
    refused = [r for r in results if isinstance(r, BaseException)]
    for r in refused:
        assert isinstance(r, openai.RateLimitError), repr(r)
        assert r.response.headers["x-should-retry"] == "true"  # held in flight: retry soon
    return [r for r in results if isinstance(r, int)], len(refused)


def _top_up(gw: Gateway, secret: str) -> int:
    """Requests one at a time until refused; the tokens they were charged."""
    charged = 0
    while True:
        try:
            stream = sdk(gw, secret).chat.completions.create(model="counted", messages=hi(), stream=True,
                                                            stream_options={"include_usage": True},
                                                            extra_body={"fake": {"tokens": 16}})
            charged += [c.usage for c in stream if c.usage][-1].total_tokens
        except openai.RateLimitError:
            return charged


@pytest.mark.parametrize("limits", [{"token_limit": 2_000, "token_limit_period": "day"}, {"tpm": 2_000}])
@pytest.mark.parametrize("max_tokens", [16, None])
def test_a_burst_of_streams_uses_the_limit_and_never_passes_it(cgw: Gateway, owner: tuple[Console, str],
                                                               tiny: TinyModel, limits: dict[str, Any],
                                                               max_tokens: int | None) -> None:
    # 120 streams at once, each really using its prompt and 16 tokens. Reserving worst cases admitted one
    # stream per wave without max_tokens (8 of 20 with it), and told the rest to come back tomorrow.
    secret = _key(owner, **limits)
    extra: dict[str, Any] = {"extra_body": {"fake": {"tokens": 16}}}
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    charged, refused = asyncio.run(_streams(cgw, secret, 120, **extra))
    one = tiny.count(tiny.render(hi())) + 16
    assert all(c == one for c in charged)
    # Every request real usage allows is admitted at once: its prompt and first block are what it uses.
    assert len(charged) == 2_000 // one and refused == 120 - len(charged)
    total = sum(charged) + _top_up(cgw, secret)
    assert 0.95 * 2_000 <= total <= 2_000


def test_counting_piece_by_piece_agrees_with_counting_whole(tiny: TinyModel) -> None:
    # The counter keeps the counts of a prompt's pieces between special tokens; it must give the count
    # of the whole text, whatever the text.
    counter = TokenCounter.from_files(tiny.tokenizer_path)
    rng = random.Random(4)
    alphabet = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|endoftext|>", " ", "\n", "  ",
                "a", "é", "日本", "tok", "user", "'s", "!", "12", "<|im", "_end|>"]
    whole = tiny.tokenizer()
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        body = {"messages": [{"role": "user", "content": text}]}
        rendered = counter.render(body)
        assert rendered is not None
        expected = len(whole.encode(rendered, add_special_tokens=False).ids)
        assert counter.prompt(body) == expected, rendered
        assert counter.prompt(body) == expected  # and again, from what it kept


def test_a_long_new_prompt_is_counted_off_the_event_loop_the_same(tiny: TinyModel) -> None:
    counter = TokenCounter.from_files(tiny.tokenizer_path)
    document = " ".join(f"word{i % 97} café" for i in range(20_000))  # ~200 KB: tokenized in a worker thread
    body = {"messages": [{"role": "system", "content": "Summarise."}, {"role": "user", "content": document}]}
    expected = tiny.count(tiny.render(body["messages"]))

    async def count_while_the_loop_runs() -> tuple[int | None, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.get_running_loop().create_task(tick())
        await asyncio.sleep(0)
        counted = await counter.prompt_async(body)
        ticker.cancel()
        return counted, ticks

    counted, ticks = asyncio.run(count_while_the_loop_runs())
    assert counted == expected
    assert ticks > 10  # the loop went on serving while the document was tokenized
    assert asyncio.run(counter.prompt_async(body)) == expected == counter.prompt(body)  # and from what it kept
