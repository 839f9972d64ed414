"""What counting a prompt with the model's tokenizer costs per request (issue 12's target: <= 50 us for a
1k-token prompt), beside the byte bound it replaces.

    .venv/bin/python bench/tokens.py [--tokenizer path/to/tokenizer.json] [--cpu 0]

Without --tokenizer it uses the tiny test model's (tests/realserver/model.py: a byte-level BPE of 1,002
tokens, so about 3 bytes a token: a real model's vocabulary of 150k has fewer, longer tokens per byte of
English). Prints, per prompt size, microseconds per request for the parse and bound (``parse_chat``), the
template's rendering, the tokenizing, and the whole count the gateway makes (``TokenCounter.prompt``: render,
then the pieces it has not seen tokenized), best of 5 runs.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.realserver.model import make_model  # noqa: E402

from quotagate.config import ModelSpec  # noqa: E402
from quotagate.gateway.parsing import ChatRequest, parse_chat  # noqa: E402
from quotagate.tokens.counter import TokenCounter  # noqa: E402

WORDS = ["the", "gateway", "counts", "every", "prompt", "with", "model's", "own", "tokenizer", "so", "that",
         "budgets", "are", "exact", "and", "nobody", "is", "refused", "for", "tokens", "will", "never", "be",
         "spent", "while", "streams", "flow", "to", "their", "clients"]


def conversation(tokens: int, counter: TokenCounter, rng: random.Random) -> dict[str, object]:
    """A system prompt and a user turn whose rendered prompt is about ``tokens`` tokens."""
    words: list[str] = []
    body: dict[str, object] = {}
    while True:
        words += [rng.choice(WORDS) for _ in range(16)]
        body = {"model": "m", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                           {"role": "user", "content": " ".join(words)}]}
        if (counter.prompt(body) or 0) >= tokens:
            return body


def per_call(calls: list[Callable[[], object]], rounds: int = 5) -> float:
    """Microseconds per call, running each of ``calls`` once a round (the best of ``rounds``)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - t0) / len(calls))
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--cpu", type=int, help="pin to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokenizer or make_model(Path(tmp)).tokenizer_path
        spec = ModelSpec(id="m", type="chat", upstreams=("http://127.0.0.1/v1",), context_length=1_000_000)
        rng = random.Random(1)
        print(f"tokenizer: {path if args.tokenizer else 'the tiny test model'}\n")
        print("| prompt tokens | parse + byte bound µs | render µs | tokenize whole µs | counted, all new µs "
              "| counted, new last turn µs | counted, seen before µs |")
        print("|---|---|---|---|---|---|---|")
        for size in (100, 1_000, 4_000):
            print(row(path, spec, size, rng))


def row(path: Path, spec: ModelSpec, size: int, rng: random.Random) -> str:
    counter = TokenCounter.from_files(path)  # an empty cache for each size
    body = conversation(size, counter, rng)
    messages: list[dict[str, str]] = body["messages"]  # type: ignore[assignment]
    raw = orjson.dumps(body)
    req = parse_chat(raw)
    rendered = counter.render(req.body) or ""
    n = max(10, 4_000 // size)
    parse = per_call([lambda: parse_chat(raw)] * n)
    render = per_call([lambda: counter.render(req.body)] * n)
    whole = per_call([lambda: counter.text(rendered)] * n)

    def once(bodies: list[ChatRequest]) -> float:
        """Best of 5 sets of requests, each counted once: what is new in them is new to the counter."""
        return min(per_call([partial(counter.prompt, r.body) for r in bodies[k::5]], rounds=1)
                   for k in range(5))

    # All new: a conversation never seen. A chat: the conversation so far, and a new last turn (~50 tokens).
    fresh = [parse_chat(orjson.dumps({"model": "m", "messages": [
        messages[0], {"role": "user", "content": f"{i} {messages[1]['content']}"}]})) for i in range(n * 5)]
    turns = [parse_chat(orjson.dumps({"model": "m", "messages": [
        *messages, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(25)) + f" {i}"}]})) for i in range(n * 5)]
    cold, chat = once(fresh), once(turns)
    warm = per_call([lambda: counter.prompt(req.body)] * n)
    return (f"| {counter.text(rendered):,} | {parse:.1f} | {render:.1f} | {whole:.1f} | {cold:.1f} | {chat:.1f} "
            f"| {warm:.1f} |")


if __name__ == "__main__":
    main()
