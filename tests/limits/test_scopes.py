"""Project limits and per-model key limits (the limiter's scopes), one suite over every backend.

A request is counted against every scope that applies to it (the key's own limits, the key's limits for
the request's model, the project's, shared by all of its keys), checked and reserved at once: the tightest
wins, the refusal names the scope that bound it, and settle and extend reach every scope.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from quotagate.keys.models import Limits
from quotagate.limits.interfaces import Admission
from tests.limits.conftest import T0, Backend, make_key, new_project_id

pytestmark = pytest.mark.anyio

approx = pytest.approx


# --- project limits -----------------------------------------------------------------------------


async def test_project_rpm_is_shared_by_every_key_of_the_project(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    pid = new_project_id()
    keys = [make_key(project_id=pid, project=Limits(rpm=5)) for _ in range(3)]
    outsider = make_key(project_id=new_project_id(), project=Limits(rpm=5))
    admitted = [await lim.admit(keys[i % 3], 1, 1) for i in range(5)]
    assert all(a.admitted for a in admitted)
    assert [a.remaining_requests for a in admitted] == [4, 3, 2, 1, 0]
    for key in keys:
        refused = await lim.admit(key, 1, 1)
        assert not refused.admitted and refused.refusal == "rate_limit_exceeded" and refused.scope == "project"
        assert refused.retry_after == approx(60) and refused.limit_requests == 5
    assert (await lim.admit(outsider, 1, 1)).admitted  # another project's limits are its own
    clock.set(T0 + 60)
    assert (await lim.admit(keys[2], 1, 1)).admitted
    state = await lim.state(keys[0])
    assert state.rpm is None and state.project is not None
    assert (state.project.rpm, state.project.requests_in_window) == (5, 1)


async def test_the_tighter_of_key_and_project_binds(backend: Backend) -> None:
    lim = backend.limiter
    pid = new_project_id()
    tight = make_key(rpm=2, project_id=pid, project=Limits(rpm=4))
    other = make_key(rpm=10, project_id=pid, project=Limits(rpm=4))
    first = await lim.admit(tight, 1, 1)
    assert (first.limit_requests, first.remaining_requests) == (2, 1)  # the key's is the binding one
    assert (await lim.admit(tight, 1, 1)).admitted
    refused = await lim.admit(tight, 1, 1)
    assert not refused.admitted and refused.scope == "key"
    a = await lim.admit(other, 1, 1)
    assert a.admitted and (a.limit_requests, a.remaining_requests) == (4, 1)  # now the project's binds
    assert (await lim.admit(other, 1, 1)).admitted
    refused = await lim.admit(other, 1, 1)
    assert not refused.admitted and refused.scope == "project"
    # The key's own refusal counted nothing in the project: it holds exactly 4.
    assert (await lim.state(other)).project.requests_in_window == 4  # type: ignore[union-attr]


async def test_project_budget_grants_what_is_left_and_settles(backend: Backend) -> None:
    lim = backend.limiter
    pid = new_project_id()
    project = Limits(token_limit=1_000, token_limit_period="day")
    k1 = make_key(token_limit=10_000, project_id=pid, project=project)
    k2 = make_key(project_id=pid, project=project)
    a = await lim.admit(k1, 100, 500)
    assert a.admitted and a.granted == 500 and a.budget is not None and a.budget.limit == 1_000
    b = await lim.admit(k2, 100, 500)
    assert b.admitted and b.granted == 300  # lowered to what the project's budget has left
    refused = await lim.admit(k1, 1, 1)
    assert not refused.admitted and refused.refusal == "token_limit_exceeded" and refused.scope == "project"
    assert refused.budget is not None and refused.budget.limit == 1_000 and refused.budget.reserved == 1_000
    await lim.settle(k1, a, 150)
    await lim.settle(k2, b, 120)
    s1, s2 = await lim.state(k1), await lim.state(k2)
    assert s1.budget is not None and (s1.budget.used, s1.budget.reserved) == (150, 0)  # the key's own
    for s in (s1, s2):
        assert s.project is not None and s.project.budget is not None
        assert (s.project.budget.used, s.project.budget.reserved) == (270, 0)
    await lim.settle(k1, a, 999)  # idempotent
    assert (await lim.state(k2)).project.budget.used == 270  # type: ignore[union-attr]
    c = await lim.admit(k2, 30, 10_000)
    assert c.admitted and c.granted == 1_000 - 270 - 30


async def test_project_tpm_refusal_and_retry(backend: Backend) -> None:
    lim, clock = backend.limiter, backend.clock
    pid = new_project_id()
    k1 = make_key(project_id=pid, project=Limits(tpm=1_000))
    k2 = make_key(project_id=pid, project=Limits(tpm=1_000))
    assert (await lim.admit(k1, 400, 200)).admitted
    clock.advance(20)
    a = await lim.admit(k2, 300, 100)
    assert a.admitted and (a.limit_tokens, a.remaining_tokens) == (1_000, 0)
    clock.advance(10)
    refused = await lim.admit(k1, 100, 1)
    assert not refused.admitted and refused.scope == "project" and refused.refusal == "rate_limit_exceeded"
    assert refused.retry_after == approx(30)  # when the first request's 600 tokens leave the window


async def test_a_project_without_limits_keeps_no_state(backend: Backend) -> None:
    pid = new_project_id()
    key = make_key(rpm=5, project_id=pid, project=None)
    assert (await backend.limiter.admit(key, 1, 1)).admitted
    assert not await backend.has_state(pid)
    assert (await backend.limiter.state(key)).project is None


async def _project_storm(backend: Backend, project: Limits, n: int = 400, keys: int = 8, seed: int = 7
                         ) -> tuple[list[Admission], int]:
    rng = random.Random(seed)
    pid = new_project_id()
    ring = [make_key(project_id=pid, project=project) for _ in range(keys)]
    sizes = [(rng.randint(1, 200), rng.randint(1, 400)) for _ in range(n)]
    results = await asyncio.gather(*(backend.limiter.admit(ring[i % keys], p, m) for i, (p, m) in enumerate(sizes)))
    return list(results), max(p + 1 for p, _ in sizes)


async def test_project_rpm_exact_under_concurrent_admissions(backend: Backend) -> None:
    results, _ = await _project_storm(backend, Limits(rpm=137))
    assert sum(a.admitted for a in results) == 137
    assert all(a.scope == "project" for a in results if not a.admitted)


async def test_project_tpm_never_exceeded_under_concurrent_admissions(backend: Backend) -> None:
    limit = 30_000
    results, biggest = await _project_storm(backend, Limits(tpm=limit), seed=11)
    reserved = sum(a.reserved_tokens for a in results if a.admitted)
    assert limit - biggest < reserved <= limit
    assert all(a.scope == "project" for a in results if not a.admitted)


async def test_project_budget_never_exceeded_under_concurrent_admissions(backend: Backend) -> None:
    limit = 40_000
    results, biggest = await _project_storm(backend, Limits(token_limit=limit, token_limit_period="month"), seed=13)
    reserved = sum(a.reserved_tokens for a in results if a.admitted)
    assert limit - biggest < reserved <= limit
    assert any(not a.admitted for a in results)
    assert all(a.refusal == "token_limit_exceeded" and a.scope == "project" for a in results if not a.admitted)


async def test_project_budget_exact_with_concurrent_streams_of_many_keys(backend: Backend) -> None:
    """Admissions, extensions (a stream's completion, block by block) and settlements of 300 requests over
    six keys at once, each key with its own budget as well: neither the project's nor any key's is exceeded,
    and what is settled is exactly what was charged."""
    lim = backend.limiter
    limit = 20_000
    pid = new_project_id()
    project = Limits(token_limit=limit, token_limit_period="day")
    ring = [make_key(project_id=pid, project=project, token_limit=6_000, tpm=1_000_000) for _ in range(6)]
    rng = random.Random(5)

    async def stream(i: int) -> tuple[int, int]:
        key = ring[i % 6]
        a = await lim.admit(key, rng.randint(5, 50), 16)
        if not a.admitted:
            return i % 6, 0
        held = a.reserved_tokens
        for _ in range(rng.randint(0, 20)):
            await asyncio.sleep(0)
            got = await lim.extend(key, a, 32)
            held += got
            if not got:
                break
        used = rng.randint(held // 2, held)
        await lim.settle(key, a, used)
        return i % 6, used

    charged = await asyncio.gather(*(stream(i) for i in range(300)))
    total = sum(used for _, used in charged)
    for k, key in enumerate(ring):
        state = await lim.state(key)
        assert state.budget is not None and state.budget.reserved == 0
        assert state.budget.used == sum(used for j, used in charged if j == k) <= 6_000
        assert state.project is not None and state.project.budget is not None
        assert (state.project.budget.used, state.project.budget.reserved) == (total, 0)
    assert total <= limit


# --- per-model limits on a key -----------------------------------------------------------------


async def test_model_limits_apply_to_their_model_only(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(models={"chat": Limits(rpm=2), "embed": Limits(rpm=50)})
    assert (await lim.admit(key, 1, 1, model="chat")).admitted
    second = await lim.admit(key, 1, 1, model="chat")
    assert second.admitted and (second.limit_requests, second.remaining_requests) == (2, 0)
    refused = await lim.admit(key, 1, 1, model="chat")
    assert not refused.admitted and refused.scope == "model" and refused.refusal == "rate_limit_exceeded"
    for _ in range(10):
        assert (await lim.admit(key, 1, 1, model="embed")).admitted
    for _ in range(10):  # a model without limits of its own: the key has none either
        assert (await lim.admit(key, 1, 1, model="other")).admitted
    state = await lim.state(key)
    assert state.models is not None
    assert (state.models["chat"].rpm, state.models["chat"].requests_in_window) == (2, 2)
    assert (state.models["embed"].rpm, state.models["embed"].requests_in_window) == (50, 10)


async def test_model_limits_and_the_key_s_own_both_count(backend: Backend) -> None:
    lim = backend.limiter
    key = make_key(rpm=5, models={"chat": Limits(rpm=3)})
    for _ in range(3):
        assert (await lim.admit(key, 1, 1, model="chat")).admitted
    assert (await lim.admit(key, 1, 1, model="chat")).scope == "model"
    assert (await lim.admit(key, 1, 1, model="embed")).admitted
    assert (await lim.admit(key, 1, 1, model="embed")).admitted
    refused = await lim.admit(key, 1, 1, model="embed")
    assert not refused.admitted and refused.scope == "key"  # the key's 5 are used: 3 chat, 2 embed
    assert (await lim.state(key)).requests_in_window == 5


async def test_model_budget_with_extend_and_settle(backend: Backend) -> None:
    lim = backend.limiter
    pid = new_project_id()
    key = make_key(token_limit=10_000, project_id=pid, project=Limits(token_limit=5_000, token_limit_period="day"),
                   models={"chat": Limits(token_limit=1_000, token_limit_period="hour")})
    a = await lim.admit(key, 100, 50, model="chat")
    assert a.admitted and a.reserved_tokens == 150
    assert await lim.extend(key, a, 2_000) == 850  # the model's budget is the tightest
    assert await lim.extend(key, a, 1) == 0
    refused = await lim.admit(key, 1, 1, model="chat")
    assert not refused.admitted and refused.scope == "model" and refused.refusal == "token_limit_exceeded"
    assert refused.budget is not None and (refused.budget.limit, refused.budget.period) == (1_000, "hour")
    b = await lim.admit(key, 100, 10_000, model="embed")
    assert b.admitted and b.granted == 5_000 - 1_000 - 100  # the project's budget binds the other model
    await lim.settle(key, a, 400)
    state = await lim.state(key)
    assert state.budget is not None and (state.budget.used, state.budget.reserved) == (400, b.reserved_tokens)
    chat = state.models["chat"]  # type: ignore[index]
    assert chat.budget is not None and (chat.budget.used, chat.budget.reserved) == (400, 0)
    assert state.project is not None and state.project.budget is not None
    assert (state.project.budget.used, state.project.budget.reserved) == (400, b.reserved_tokens)
    await lim.settle(key, b, 0)
    c = await lim.admit(key, 100, 10_000, model="chat")
    assert c.admitted and c.granted == 1_000 - 400 - 100


async def test_model_rpm_exact_under_concurrent_admissions(backend: Backend) -> None:
    key = make_key(rpm=1_000, models={"chat": Limits(rpm=61), "embed": Limits(rpm=89)})
    results = await asyncio.gather(*(backend.limiter.admit(key, 1, 1, model=("chat", "embed")[i % 2])
                                     for i in range(400)))
    assert sum(a.admitted for a in results[0::2]) == 61
    assert sum(a.admitted for a in results[1::2]) == 89
    assert all(a.scope == "model" for a in results if not a.admitted)


async def test_model_tpm_and_budget_never_exceeded_under_concurrent_admissions(backend: Backend) -> None:
    rng = random.Random(17)
    key = make_key(models={"chat": Limits(tpm=30_000), "embed": Limits(token_limit=20_000, token_limit_period="week")})
    sizes = [(rng.randint(1, 200), rng.randint(1, 400)) for _ in range(400)]
    results = await asyncio.gather(*(backend.limiter.admit(key, p, m, model=("chat", "embed")[i % 2])
                                     for i, (p, m) in enumerate(sizes)))
    biggest = max(p + 1 for p, _ in sizes)
    chat = sum(a.reserved_tokens for a in results[0::2] if a.admitted)
    embed = sum(a.reserved_tokens for a in results[1::2] if a.admitted)
    assert 30_000 - biggest < chat <= 30_000
    assert 20_000 - biggest < embed <= 20_000
    assert all(a.scope == "model" for a in results if not a.admitted)
