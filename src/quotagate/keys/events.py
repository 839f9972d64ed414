"""Telling caches that a key changed (revoked, edited, archived, rotated, its project narrowed).

In one process the bus calls its listeners directly; with Redis configured, a broadcaster also
subscribes here and relays each change to every other instance (see ``limits/redis``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeyChanged:
    key_id: str
    secret_hash: str
    project_id: str


Listener = Callable[[KeyChanged], None]


class KeyEvents:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, change: KeyChanged) -> None:
        """Call every listener; one failing listener does not stop the others."""
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("key change listener failed for %s", change.key_id)
