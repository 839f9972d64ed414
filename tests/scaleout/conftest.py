"""Scale-out fixtures: one fake model server, and three instances on a PostgreSQL database of their own
and the machine's Redis (a database number of its own; nothing is flushed, this run's keys are deleted)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.limits.conftest import REDIS_URL
from tests.scaleout.cluster import Cluster, postgres_database, start_cluster

pytestmark = pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''")

# Scale-out tests keep to one Redis database number; key ids are random, so runs sharing it cannot collide.
SCALEOUT_REDIS_DB = 7


def scaleout_redis_url() -> str:
    return re.sub(r"(/\d+)?$", f"/{SCALEOUT_REDIS_DB}", REDIS_URL, count=1)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[Cluster]:
    directory: Path = tmp_path_factory.mktemp("scaleout")
    with postgres_database() as url:
        c = start_cluster(directory, url, scaleout_redis_url(), upstream.base_url)
        try:
            yield c
        finally:
            c.stop()
            c.forget_keys()
