"""Project limits and per-model key limits across ``serve --workers 2`` (embedded limiter and Redis): the
scale-out scenarios (tests/scaleout/scopes.py) against one instance whose LLM API is two processes."""

from __future__ import annotations

from tests.scaleout.cluster import Cluster
from tests.scaleout.scopes import model_limits_hold, project_limits_hold


def test_project_limits_hold_across_workers(two_workers: Cluster) -> None:
    project_limits_hold(two_workers)


def test_per_model_limits_hold_across_workers(two_workers: Cluster) -> None:
    model_limits_hold(two_workers)
