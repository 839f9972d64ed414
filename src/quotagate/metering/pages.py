"""What the web console's project usage page reads: the usage API's figures for a range and a metadata
filter, with the reader's access checked as the API checks it (a project that is not theirs is NotFound)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from quotagate.accounts.models import Actor
from quotagate.accounts.service import AccountService
from quotagate.metering.api import UsageAPI
from quotagate.metering.queries import Window
from quotagate.metering.store import WIDTHS

# Activity rows read at a time while a CSV download streams: memory stays flat however long the range.
EXPORT_PAGE = 5000


class ProjectUsagePages:
    def __init__(self, accounts: AccountService, api: Callable[[], UsageAPI], page_size: int = EXPORT_PAGE) -> None:
        self._accounts = accounts
        self._api = api
        self._page_size = page_size

    def usage(self, actor: Actor, project_id: str, start: datetime, end: datetime, granularity: str,
              metadata: dict[str, str]) -> dict[str, Any]:
        """As ``GET /v1/projects/{id}/usage`` answers: ``totals``, ``data`` (per bucket and model), ``keys``
        and ``models``, over [start, end) aligned to the granularity's buckets."""
        project = self._accounts.get_project(actor, project_id)
        width = WIDTHS[granularity]
        window = Window(start=int(start.timestamp()) // width * width, end=-(-int(end.timestamp()) // width) * width,
                        width=width, granularity=granularity)
        api = self._api()
        api.catch_up()
        return api.queries.project_usage(project.id, window, metadata)

    def limits(self, actor: Actor, project_id: str) -> dict[str, Any] | None:
        """The project's limits and their live state, as ``GET /v1/projects/{id}/usage`` has them under
        ``limits`` (None: the project has none)."""
        project = self._accounts.get_project(actor, project_id)
        return self._api().project_limits(project)

    def activity(self, actor: Actor, project_id: str, start: datetime, end: datetime,
                 metadata: dict[str, str]) -> Iterator[list[dict[str, Any]]]:
        """Every request in [start, end), newest first, in pages of ``page_size`` rows: all of them, for a
        download (where the API's CSV stops at 100,000 rows and asks to page)."""
        project = self._accounts.get_project(actor, project_id)
        api = self._api()
        api.catch_up()
        before = None
        while True:
            rows, more = api.queries.project_activity(project.id, start=start, end=end, limit=self._page_size,
                                                      before=before, metadata=metadata)
            if rows:
                yield rows
            if not more or not rows:
                return
            before = rows[-1]["request_id"]
