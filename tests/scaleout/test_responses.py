"""``POST /v1/responses`` across three instances sharing Redis: waves of simultaneous requests (half of
them streamed, each block of a stream's output leased from whichever instance serves it) spread over the
instances never charge more than the key's budget, reach it, and the usage API equals what the clients
were sent."""

from __future__ import annotations

import asyncio
import time

import openai
import orjson
from openai import AsyncOpenAI

from quotagate.gateway.responses.parsing import parse_responses
from tests.scaleout.cluster import Cluster

MAX_OUTPUT = 20
BODY = {"model": "chat", "input": "hi", "max_output_tokens": MAX_OUTPUT, "fake": {"tokens": 8}}
# The most one request reserves: its prompt bound (the streamed body, one field longer) and its output.
ONE_REQUEST = parse_responses(orjson.dumps({**BODY, "stream": True})).prompt_bound + MAX_OUTPUT


def test_a_budget_holds_across_instances_for_responses(cluster: Cluster) -> None:
    limit = 900
    secret, key = cluster.mint(token_limit=limit, token_limit_period="day")

    async def waves() -> tuple[int, set[int]]:
        clients = [AsyncOpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0, timeout=60)
                   for gw in cluster.instances]

        async def one(i: int) -> tuple[int, int] | None:
            client = clients[i % len(clients)]
            try:
                if i % 2:
                    usage = None
                    async for event in await client.responses.create(
                            model="chat", input="hi", max_output_tokens=MAX_OUTPUT, stream=True,
                            extra_body={"fake": {"tokens": 8}}):
                        # Incomplete when the budget had less than the output left: cut off where it ends.
                        if event.type in ("response.completed", "response.incomplete"):
                            usage = event.response.usage
                else:
                    usage = (await client.responses.create(model="chat", input="hi", max_output_tokens=MAX_OUTPUT,
                                                           extra_body={"fake": {"tokens": 8}})).usage
            except openai.RateLimitError as exc:
                assert exc.code == "token_limit_exceeded", exc
                return None
            assert usage is not None
            return i % len(clients), usage.total_tokens

        charged = 0
        instances: set[int] = set()
        for _ in range(20):
            wave = [r for r in await asyncio.gather(*(one(i) for i in range(150))) if r is not None]
            charged += sum(tokens for _, tokens in wave)
            instances |= {i for i, _ in wave}
            if not wave:
                break
            await asyncio.sleep(0.1)  # let the other instances' settlements land
        for client in clients:
            await client.close()
        return charged, instances

    charged, instances = asyncio.run(waves())
    assert limit - ONE_REQUEST < charged <= limit
    assert instances == {0, 1, 2}
    deadline = time.monotonic() + 20
    while True:  # every instance's shipper catches up
        totals = cluster.admin.ok("GET", f"/v1/inference/keys/{key['id']}/usage")["totals"]
        if totals["total_tokens"] == charged or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert totals["total_tokens"] == charged
