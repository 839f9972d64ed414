"""The demo catalog counts exactly: its simulated models have a real tokenizer (shipped in the package),
the gateway reserves their prompts' exact counts, and the simulator reports the same counts."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import httpx
from openai import OpenAI
from tokenizers import Tokenizer

from tests.realserver.model import render_chat_template
from tests.support import free_port, start_gateway

PACKAGE = Path(str(resources.files("quotagate")))


def test_demo_catalog_counts_prompts_exactly(tmp_path: Path, database_url: str) -> None:
    port = free_port()
    demo = (PACKAGE / "demo.toml").read_text()
    assert 'tokenizer = "simulator/tokenizer/tokenizer.json"' in demo
    config = tmp_path / "demo.toml"
    config.write_text(demo.replace("8402", str(port)).replace(
        '"simulator/tokenizer/', f'"{PACKAGE}/simulator/tokenizer/'))
    gw = start_gateway(tmp_path / "data", database_url, config)
    try:
        owner = gw.user("demo@example.com", admin=True)
        limit = 50_000
        secret = owner.mint(owner.project("demo")["id"], token_limit=limit, token_limit_period="day")["secret"]
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, what is a token?"}]
        r = httpx.post(f"{gw.llm_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                       json={"model": "qwen3.6-27b", "messages": messages, "max_tokens": 20}, timeout=30)
        assert r.status_code == 200, r.text
        # An independent count: the shipped tokenizer files, rendered as transformers renders a template.
        files = PACKAGE / "simulator" / "tokenizer"
        config_json = json.loads((files / "tokenizer_config.json").read_text())
        prompt = render_chat_template(config_json["chat_template"], messages, tools=None, add_generation_prompt=True,
                                      bos_token=config_json["bos_token"], eos_token=config_json["eos_token"])
        exact = len(Tokenizer.from_file(str(files / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids)
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == exact
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == limit - exact - 20
        # Each made-up word is one token: the text the client got is as many tokens as it was charged.
        text = r.json()["choices"][0]["message"]["content"]
        tokenizer = Tokenizer.from_file(str(files / "tokenizer.json"))
        assert len(tokenizer.encode(text, add_special_tokens=False).ids) == usage["completion_tokens"] == 20
        # The legacy completions API too, streamed: the same exact prompt count (special tokens added).
        prompt_text = "Once upon a time"
        counted = len(tokenizer.encode(prompt_text).ids)
        before = int(r.headers["x-ratelimit-remaining-tokens"]) + 20 - usage["completion_tokens"]
        with httpx.stream("POST", f"{gw.llm_url}/completions", headers={"Authorization": f"Bearer {secret}"},
                          json={"model": "qwen3.6-27b", "prompt": prompt_text, "max_tokens": 5, "stream": True,
                                "stream_options": {"include_usage": True}}, timeout=30) as streamed:
            assert streamed.status_code == 200
            assert int(streamed.headers["x-ratelimit-remaining-tokens"]) == before - counted - 5
            events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in events if c["choices"]).count(" ") == 5
        assert events[-1]["usage"] == {"prompt_tokens": counted, "completion_tokens": 5, "total_tokens": counted + 5}
        # The Responses API, with the official SDK: instructions and input are the same conversation as the
        # chat request above, counted the same; streamed with the SDK's helper too.
        client = OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0, timeout=30)
        answer = client.responses.create(model="qwen3.6-27b", instructions="Be brief.", input="Hi, what is a token?",
                                         max_output_tokens=7)
        assert answer.usage is not None and (answer.usage.input_tokens, answer.usage.output_tokens) == (exact, 7)
        assert len(tokenizer.encode(answer.output_text, add_special_tokens=False).ids) == 7
        with client.responses.stream(model="qwen3.6-27b", instructions="Be brief.", input="Hi, what is a token?",
                                     max_output_tokens=4) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        assert len(deltas) == 4
    finally:
        gw.stop()
