"""Limits across three instances: hundreds of simultaneous requests spread round-robin over them never
get more than a key's rpm, tpm or budget admitted or charged, and reach it; a limit edited in the middle
of a flood holds on every instance; and the usage API equals what the clients were sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tests.scaleout.cluster import ONE_REQUEST, Cluster, Seen, assert_nothing_lost, served, spread


def test_rpm_tpm_and_budget_hold_across_instances_under_a_flood(cluster: Cluster) -> None:
    rpm_secret, rpm_key = cluster.mint(rpm=25)
    tpm_secret, tpm_key = cluster.mint(tpm=600)
    budget_secret, budget_key = cluster.mint(token_limit=900, token_limit_period="day")

    async def flood() -> tuple[list[Seen], list[Seen], list[Seen]]:
        async with spread(cluster) as s:
            async def burst() -> list[Seen]:
                return list(await asyncio.gather(*(s.chat(rpm_secret) for _ in range(300))))

            async def rounds(secret: str) -> list[Seen]:
                # Waves of simultaneous requests (half of them streamed) until one wave gets nothing
                # admitted: with every earlier request settled, less than one request's worth is left.
                seen: list[Seen] = []
                for _ in range(20):
                    wave = await asyncio.gather(*(s.chat(secret, stream=i % 2 == 0) for i in range(150)))
                    seen += wave
                    if not served(list(wave)):
                        break
                    await asyncio.sleep(0.1)  # let the other instances' settlements land
                return seen

            rpm, tpm, budget = await asyncio.gather(burst(), rounds(tpm_secret), rounds(budget_secret))
            return rpm, tpm, budget

    rpm, tpm, budget = asyncio.run(flood())

    assert len(served(rpm)) == 25, "rpm: admitted across the instances"
    assert {(s.status, s.code) for s in rpm if s.status != 200} == {(429, "rate_limit_exceeded")}
    tpm_charged = sum(s.tokens for s in served(tpm))
    budget_charged = sum(s.tokens for s in served(budget))
    print(f"\nrpm 25: {len(served(rpm))} of {len(rpm)} admitted; tpm 600: {tpm_charged} tokens charged in "
          f"{len(served(tpm))} of {len(tpm)}; budget 900: {budget_charged} tokens charged in "
          f"{len(served(budget))} of {len(budget)} (one request reserves at most {ONE_REQUEST})")
    assert 600 - ONE_REQUEST < tpm_charged <= 600
    assert {(s.status, s.code) for s in tpm if s.status != 200} == {(429, "rate_limit_exceeded")}
    assert 900 - ONE_REQUEST < budget_charged <= 900
    assert {(s.status, s.code) for s in budget if s.status != 200} == {(429, "token_limit_exceeded")}
    assert all(s.code is None for s in served(tpm + budget)), "a stream ended in an error"
    for name, seen in (("rpm", rpm), ("tpm", tpm), ("budget", budget)):
        assert {s.instance for s in seen} == {0, 1, 2}
        print(f"{name}: admitted per instance {[sum(s.instance == i for s in served(seen)) for i in range(3)]}")
    for key, seen in ((rpm_key, rpm), (tpm_key, tpm), (budget_key, budget)):
        assert_nothing_lost(cluster, key["id"], seen)


def test_a_limit_edit_mid_flood_holds_on_every_instance(cluster: Cluster) -> None:
    secret, key = cluster.mint(rpm=1000)

    async def flood() -> tuple[list[Seen], float]:
        seen: list[Seen] = []
        stop = asyncio.Event()
        async with spread(cluster) as s:
            async def worker() -> None:
                while not stop.is_set():
                    seen.append(await s.chat(secret))

            async def until(done: Callable[[], bool], pause: float) -> None:
                # A worker that failed (an instance gone) would leave this waiting forever: raise its error.
                while not done():
                    for w in workers:
                        if w.done():
                            w.result()
                    await asyncio.sleep(pause)

            async def edit() -> float:
                await until(lambda: len(served(seen)) >= 30, 0.002)
                await asyncio.to_thread(cluster.admin.ok, "PATCH", f"/v1/inference/keys/{key['id']}",
                                        json={"rpm": 300})
                edited = time.monotonic()
                await until(lambda: sum(x.started > edited for x in seen) >= 500, 0.01)
                stop.set()
                return edited

            workers = [asyncio.create_task(worker()) for _ in range(20)]
            try:
                edited = await edit()
            finally:
                stop.set()
            await asyncio.gather(*workers)
        return seen, edited

    seen, edited = asyncio.run(flood())
    before = [x for x in served(seen) if x.started < edited]
    print(f"\nrpm 1000 -> 300 mid-flood: {len(before)} admitted before the edit returned, "
          f"{len(served(seen))} in all of {len(seen)}")
    assert len(before) < 300, "the edit came after the new limit was already reached (test too slow?)"
    assert len(served(seen)) == 300, "the lowered rpm is the limit across every instance, and is reached"
    assert {(x.status, x.code) for x in seen if x.status != 200} == {(429, "rate_limit_exceeded")}
    after = [x for x in seen if x.started > edited + 0.1]
    assert {x.instance for x in after} == {0, 1, 2}
    assert {x.limit_requests for x in after} == {300}, "an instance still reports the old limit"
    assert_nothing_lost(cluster, key["id"], seen)
