"""Project limits and per-model key limits across three instances on PostgreSQL + Redis (the scenarios
are in scopes.py; the same run across ``serve --workers 2`` in tests/workers/test_scopes.py)."""

from __future__ import annotations

from tests.scaleout.cluster import Cluster
from tests.scaleout.scopes import model_limits_hold, project_limits_hold


def test_project_limits_hold_across_instances_and_keys(cluster: Cluster) -> None:
    project_limits_hold(cluster)


def test_per_model_limits_hold_across_instances(cluster: Cluster) -> None:
    model_limits_hold(cluster)
