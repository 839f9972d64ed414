"""The metering contract: the gateway hands every finished request to a ``Meter``.

``record`` appends the event to the local journal (segment files of framed records) before it returns,
so a ``kill -9`` right after a response loses nothing; a shipper process moves journal records to the
store in batches keyed by ``request_id`` (idempotent), and trims the journal once they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class UsageEvent:
    request_id: str              # the x-request-id the client saw
    created_at: float            # Unix time the request arrived
    key_id: str | None           # None when the key was unknown or malformed
    project_id: str | None
    model: str | None
    endpoint: str                # "chat.completions", "responses", "embeddings", "models"
    status_code: int
    error_code: str | None       # the OpenAI-shaped error code, if any
    stream: bool
    prompt_tokens: int           # exactly what the client was sent in `usage` (0 if refused)
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None        # time to first token, for streams
    client_ip: str | None
    user_agent: str | None


class Meter(Protocol):
    def record(self, event: UsageEvent) -> None:
        """Durably append one event to the journal (a local write, no network)."""

    async def start(self) -> None:
        """Start shipping (what an earlier process left in the journal first), off this process."""

    async def close(self) -> None:
        """Ship what is left and stop."""
