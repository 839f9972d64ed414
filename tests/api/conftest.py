"""One real gateway per module (its own database), in front of the fake model server, with a user, an
access token, a project and an inference key: what the API's documents are checked against."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import fresh_database
from tests.fakes.upstream import FakeUpstream
from tests.support import Console, Gateway, start_gateway

CONFIG = """
[[models]]
id = "chat"
type = "chat"
upstreams = ["{url}"]

[[models]]
id = "embed"
type = "embedding"
upstreams = ["{url}"]

[[models]]
id = "rerank"
type = "rerank"
upstreams = ["{url}"]
"""


@dataclass
class Served:
    gw: Gateway
    owner: Console
    project_id: str
    key_id: str
    secret: str          # an inference key of another project: the console run may revoke its own keys
    upstream: FakeUpstream


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("api")
    fake = FakeUpstream().start()
    try:
        with fresh_database(root, _pg_template, "api") as url:
            config = root / "quotagate.toml"
            config.write_text(CONFIG.format(url=fake.base_url))
            # Schemathesis sends the unauthenticated leak reports far faster than a scanner would.
            gw = start_gateway(root / "data", url, config, extra_env={"QUOTAGATE_LEAK_REPORTS_PER_MINUTE": "1000000"})
            try:
                owner = gw.user("owner@example.com", admin=False)
                project = owner.project("documented")
                key = owner.mint(project["id"], name="described")
                llm_project = owner.project("llm")
                llm_key = owner.mint(llm_project["id"], name="llm")
                yield Served(gw=gw, owner=owner, project_id=project["id"], key_id=key["id"],
                             secret=llm_key["secret"], upstream=fake)
            finally:
                gw.stop()
    finally:
        fake.stop()
