"""The local usage journal: append-only segment files of CRC-framed records, one writer per process.

Why files and not SQLite: ``append`` runs on the event loop of the hot path, once per request. One
``os.write`` of a framed record costs about 2 µs; a committed SQLite insert in WAL mode measured 10-36 µs
on the same machine. Both survive a ``kill -9`` the same way: the kernel holds the written bytes whatever
becomes of the process (neither survives a power cut without an fsync; the shipper fsyncs off the hot
path, which narrows that window to its interval).

Layout of the journal directory::

    <writer>.lock              held (flock) by the live process that writes <writer>-*.log
    <writer>-<seq>.log         segments, each a run of frames: u32 length, u32 crc32, payload
    shipper.lock               held by the shipper process that ships this directory
    shipped.json               the shipper's progress, per live writer (see shipper.py)

The writer only ever appends: it seals a segment (closes it and opens the next) when the segment grows
past ``segment_bytes`` or has been open ``seal_after`` seconds, and never deletes anything. A segment
with a successor is sealed for good (the writer closed it before creating the next), so the shipper
(``metering/shipper.py``, in a process of its own) deletes it once it has stored all of it. A segment
whose writer's lock can be taken belongs to a process that is gone: the shipper ships all of it and
deletes it with the lock file. A frame cut short or failing its CRC can only be the tail of a write that
a crash interrupted (before its response completed), so readers stop there.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
_SEGMENT = re.compile(r"^([0-9a-f]{12})-(\d{10})\.log$")
WRITER_LOCK = re.compile(r"^([0-9a-f]{12})\.lock$")
MAX_RECORD = 1 << 20


class JournalError(RuntimeError):
    """The journal directory cannot be used (not writable, or its writer is not open)."""


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class Chunk:
    """Records read from one segment: ``end`` is the offset after the last whole frame read;
    ``damaged`` says that what follows ``end`` is not a whole valid frame (it may still be being written)."""

    records: list[bytes]
    end: int
    damaged: bool


def read_segment(path: Path, offset: int, max_records: int, max_bytes: int = 8 << 20) -> Chunk:
    """Up to ``max_records`` whole records of the segment at ``path`` from ``offset``."""
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(max_bytes)
    records: list[bytes] = []
    pos = 0
    while len(records) < max_records:
        if len(data) - pos < _FRAME.size:
            return Chunk(records, offset + pos, damaged=pos < len(data))
        length, crc = _FRAME.unpack_from(data, pos)
        if length > MAX_RECORD:
            return Chunk(records, offset + pos, damaged=True)
        start, stop = pos + _FRAME.size, pos + _FRAME.size + length
        if stop > len(data):
            # Either a torn tail, or a frame longer than what this read fetched.
            return Chunk(records, offset + pos, damaged=len(data) < max_bytes)
        payload = data[start:stop]
        if zlib.crc32(payload) != crc:
            return Chunk(records, offset + pos, damaged=True)
        records.append(payload)
        pos = stop
    return Chunk(records, offset + pos, damaged=False)


def segment_name(writer: str, seq: int) -> str:
    return f"{writer}-{seq:010d}.log"


def list_segments(directory: Path) -> dict[str, list[tuple[int, Path]]]:
    """Every segment in ``directory``, by writer, in sequence order."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in directory.iterdir():
        m = _SEGMENT.match(path.name)
        if m:
            found.setdefault(m.group(1), []).append((int(m.group(2)), path))
    for segments in found.values():
        segments.sort()
    return found


def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if missing), or None if another holds it.

    The lock files of a dead writer are unlinked by whoever ships its journal, while holding the lock; a
    lock taken on a file that was unlinked meanwhile would lock nothing, so the path is checked to still
    be the locked file (and the lock retried on the new file if it is not)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class Journal:
    """This process's writer: ``append`` writes one framed record with one system call.

    Everything here runs on the event loop (the lock only guards against a caller on another thread).
    Reading, shipping and deleting are the shipper process's: the writer never learns what was shipped.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = 4 << 20, seal_after: float = 10.0) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.seal_after = seal_after
        self.writer = ""
        self._lock = threading.Lock()
        self._fd = -1
        self._lock_fd = -1
        self._seq = 0
        self._size = 0
        self._opened_at = 0.0
        self._first: dict[int, int] = {}   # records appended before each segment still open or recent
        self.appended = 0          # records written by this process
        self.write_errors = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for _ in range(8):
            writer = secrets.token_hex(6)
            fd = try_lock(self.directory / f"{writer}.lock")
            # A lock file that exists already is someone else's, live or dead: take a new id.
            if fd is not None and not any(self.directory.glob(f"{writer}-*.log")):
                break
            if fd is not None:  # pragma: no cover - 48 random bits
                os.close(fd)
        else:  # pragma: no cover
            raise JournalError("no free journal writer id")
        self.writer = writer
        self._lock_fd = fd
        with self._lock:
            self._open_next()

    def close(self) -> None:
        """Close the active segment and release the writer lock: the shipper then ships what is left
        and deletes this writer's files."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def _path(self, seq: int) -> Path:
        return self.directory / segment_name(self.writer, seq)

    def _open_next(self) -> None:
        # The old segment is closed before the next exists: a segment with a successor is never written
        # again, which is what lets the shipper delete it without asking the writer.
        if self._fd >= 0:
            os.close(self._fd)
        self._seq += 1
        self._fd = os.open(self._path(self._seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        self._size = 0
        self._opened_at = time.monotonic()
        self._first[self._seq] = self.appended
        if len(self._first) > 64:
            del self._first[min(self._first)]

    # -- the hot path ----------------------------------------------------------------------------
    def append(self, payload: bytes) -> None:
        """Write one record. When this returns, the record survives the process being killed."""
        data = frame(payload)
        with self._lock:
            if self._fd < 0:
                raise JournalError("the journal is not open")
            try:
                written = os.write(self._fd, data)
            except OSError:
                written = -1
            if written != len(data):
                self._recover_short_write(written)
                return
            self._size += written
            self.appended += 1
            if self._size >= self.segment_bytes:
                self._open_next()

    def _recover_short_write(self, written: int) -> None:
        # A partial frame would hide every record after it: cut it off and move to a new segment.
        self.write_errors += 1
        log.error("usage journal: a write failed (disk full?); this request's usage record is lost")
        with contextlib.suppress(OSError):
            if written > 0:
                os.ftruncate(self._fd, self._size)
            self._open_next()

    # -- off the hot path ------------------------------------------------------------------------
    def seal_if_old(self) -> bool:
        """Start a new segment if the active one holds records and is ``seal_after`` seconds old, so that
        the shipper can delete it once shipped (called every second or so). Returns whether it did."""
        with self._lock:
            if self._fd < 0 or self._size == 0 or time.monotonic() - self._opened_at < self.seal_after:
                return False
            self._open_next()
            return True

    def position(self) -> tuple[int, int]:
        """(segment, offset) just after the last record written so far."""
        with self._lock:
            return self._seq, self._size

    def records_before(self, seq: int) -> int | None:
        """How many records this writer had appended when segment ``seq`` began (None: too old to say)."""
        return self._first.get(seq)
