"""What the web console's project usage page reads: the activity export pages through every request of
the range (past any page size), only the project's and only the tagged keys', and checks access first."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, update

from quotagate.errors import NotFound
from quotagate.metering.api import UsageAPI
from quotagate.metering.pages import ProjectUsagePages
from quotagate.metering.store import store_batch
from quotagate.store.tables import inference_keys
from tests.metering.conftest import Key, add_key, event


class Accounts:
    """The one project the reader may see."""

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id

    def get_project(self, _actor: Any, project_id: str) -> Any:
        if project_id != self.project_id:
            raise NotFound(f"no project {project_id!r}")
        return SimpleNamespace(id=project_id)


def pages_of(engine: Engine, key: Key, size: int) -> ProjectUsagePages:
    accounts: Any = Accounts(key.project_id)
    return ProjectUsagePages(accounts, lambda: UsageAPI(engine, accounts, None, lambda: None),
                             page_size=size)


def test_the_activity_export_pages_through_every_request(engine: Engine, key: Key) -> None:
    tagged = add_key(engine, key.project_id)
    with engine.begin() as conn:
        conn.execute(update(inference_keys).where(inference_keys.c.id == tagged.id)
                     .values(metadata={"team": "search"}))
    now = time.time()
    ours = [event(key if i % 3 else tagged, created_at=now - 100 + i) for i in range(23)]
    too_old = event(key, created_at=now - 4000)
    elsewhere = event(add_key(engine), created_at=now - 50)
    store_batch(engine, [*ours, too_old, elsewhere])
    start = datetime.fromtimestamp(now - 3600, UTC)
    end = datetime.fromtimestamp(now + 1, UTC)
    for size in (1, 5, 23, 100):
        pages = list(pages_of(engine, key, size).activity(None, key.project_id, start, end, {}))
        assert all(0 < len(p) <= size for p in pages)
        assert [r["request_id"] for p in pages for r in p] == [e.request_id for e in reversed(ours)], size
    only = [r for p in pages_of(engine, key, 4).activity(None, key.project_id, start, end,
                                                         {"team": "search"}) for r in p]
    assert [r["request_id"] for r in only] == [e.request_id for e in reversed(ours) if e.key_id == tagged.id]
    assert list(pages_of(engine, key, 4).activity(None, key.project_id, end, end + timedelta(hours=1),
                                                  {})) == []
    with pytest.raises(NotFound):
        next(pages_of(engine, key, 4).activity(None, "proj_other", start, end, {}))
