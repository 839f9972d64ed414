"""CSV exports of usage and activity (the console API's ``format=csv``).

Spreadsheets run a cell that starts with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return) as a
formula; a user agent or model name is the caller's text, so such cells are written with a leading ``'``
(OWASP's advice for CSV injection). Numbers are written as they are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.responses import Response

USAGE_COLUMNS = ("start", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "errors",
                 "rate_limited", "avg_latency_ms")
ACTIVITY_COLUMNS = ("request_id", "created_at", "key_id", "model", "endpoint", "status_code", "error_code",
                    "stream", "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms", "ttft_ms",
                    "client_ip", "user_agent")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def csv_response(rows: Iterable[dict[str, Any]], columns: tuple[str, ...], filename: str) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def csv_lines(pages: Iterable[list[dict[str, Any]]], columns: tuple[str, ...]) -> Iterator[str]:
    """The same CSV as ``csv_response``, a page of rows at a time (for a download streamed as it is read)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    yield out.getvalue()
    for rows in pages:
        out.seek(0)
        out.truncate()
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        yield out.getvalue()
