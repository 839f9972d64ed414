"""Fixtures for metering tests: a migrated store with one user, project and key, and event factories."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine

from quotagate.ids import new_id
from quotagate.metering.interfaces import UsageEvent
from quotagate.store.engine import make_engine, migrate
from quotagate.store.tables import inference_keys, projects

_ids = itertools.count()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    migrate(database_url)
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@dataclass(frozen=True)
class Key:
    id: str
    project_id: str


def add_key(engine: Engine, project_id: str | None = None) -> Key:
    """A project (if not given) and a key in it, written straight to the store."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        if project_id is None:
            project_id = new_id("proj")
            conn.execute(projects.insert().values(id=project_id, name="p", models=None, created_at=now,
                                                  updated_at=now))
        key_id = new_id("key")
        conn.execute(inference_keys.insert().values(
            id=key_id, project_id=project_id, name="k", secret_hash=new_id("h", 40)[:64], prefix="qgk_x…",
            archived=False, created_at=now, updated_at=now, version=1))
    return Key(key_id, project_id)


@pytest.fixture
def key(engine: Engine) -> Key:
    return add_key(engine)


def event(key: Key | None, **fields: Any) -> UsageEvent:
    """A served chat completion of ``key`` unless fields say otherwise."""
    values: dict[str, Any] = {
        "request_id": f"req_{next(_ids)}_{new_id('t', 8)}", "created_at": time.time(),
        "key_id": key.id if key else None, "project_id": key.project_id if key else None,
        "model": "qwen3.6-27b", "endpoint": "chat.completions", "status_code": 200, "error_code": None,
        "stream": False, "prompt_tokens": 10, "completion_tokens": 20, "latency_ms": 12.5, "ttft_ms": None,
        "client_ip": "127.0.0.1", "user_agent": "test",
    }
    values.update(fields)
    return UsageEvent(**values)
