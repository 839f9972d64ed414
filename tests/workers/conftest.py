"""Fixtures for ``serve --workers N``: one fake model server, and a gateway of two workers on the store
under test, with the embedded limiter or with Redis (scale-out's database number; this run's keys are
deleted afterwards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_database
from tests.fakes.upstream import FakeUpstream
from tests.limits.conftest import REDIS_URL
from tests.scaleout.cluster import CONFIG, Cluster
from tests.scaleout.conftest import scaleout_redis_url
from tests.support import start_gateway
from tests.workers.procs import worker_pids

LIMITERS = ["embedded",
            pytest.param("redis", marks=pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''"))]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


def start_workers(directory: Path, database_url: str, upstream: FakeUpstream, workers: int,
                  redis_url: str = "") -> Cluster:
    """A gateway of ``workers`` LLM API processes, as a one-instance ``Cluster`` (its console mints)."""
    config = directory / "gateway.toml"
    config.write_text(CONFIG.format(upstream=upstream.base_url))
    env = {"QUOTAGATE_WORKERS": str(workers), **({"QUOTAGATE_REDIS_URL": redis_url} if redis_url else {})}
    gw = start_gateway(directory / "data", database_url, config, extra_env=env)
    try:
        assert len(worker_pids(gw)) == (workers if workers > 1 else 0)
        return Cluster([gw], redis_url)
    except BaseException:
        gw.stop()
        raise


@pytest.fixture(params=LIMITERS)
def two_workers(request: pytest.FixtureRequest, tmp_path: Path, _pg_template: str | None,
                upstream: FakeUpstream) -> Iterator[Cluster]:
    """``serve --workers 2`` with the embedded limiter or Redis."""
    redis_url = scaleout_redis_url() if request.param == "redis" else ""
    with fresh_database(tmp_path, _pg_template, "w") as url:
        cluster = start_workers(tmp_path, url, upstream, 2, redis_url)
        try:
            yield cluster
        finally:
            cluster.stop()
            if redis_url:
                cluster.forget_keys()
