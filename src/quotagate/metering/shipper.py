"""The shipper: moves journal records to the store and trims the journal, in a process of its own.

``quotagate serve`` starts it next to the listeners (``ShipperProcess``, driven by the meter's start and
stop hooks) as ``python -c BOOT`` (which calls ``main``), so that the gateway's process only appends:
reading segments, decoding, the store transaction and the bucket upserts cost the serving core nothing
(measured: they were ~40 µs per request, plus GIL hand-offs, in a thread of the gateway's process).

One shipper ships a journal directory at a time (it holds ``shipper.lock``; another waits, as a
standby). Each pass, for every writer in the directory:

- a live writer (its ``<writer>.lock`` is held): ship each segment from where the last pass stopped; a
  segment with a successor is sealed (its writer closed it before creating the next), so once stored
  to its end it is deleted. The writer never learns what was shipped; it seals by size and age.
- a dead writer (its lock can be taken): ship all of its segments, delete them and the lock file.

Order of work, which is what makes it safe: read a batch, store it in one transaction (idempotent by
request id), only then advance past it and delete fully shipped segments. A crash anywhere in between
re-ships records that the store already holds, and the store counts them no second time.

After every pass the shipper rewrites ``shipped.json`` (atomically): per live writer, the position
before which everything is stored and how many records of that segment precede it, plus its counters.
That is how the gateway's ``flush`` (read-your-writes for the usage API) and its backlog gauge see the
shipper's progress; SIGUSR1 asks for a pass now. The shipper exits, after a last pass, on SIGTERM or
when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

from quotagate.metering.interfaces import UsageEvent
from quotagate.metering.journal import WRITER_LOCK, list_segments, read_segment, try_lock
from quotagate.metering.store import Retention, decode, maintain, store_batch

log = logging.getLogger(__name__)

STATUS = "shipped.json"
SHIPPER_LOCK = "shipper.lock"
DATABASE_URL_ENV = "QUOTAGATE_SHIPPER_DATABASE_URL"  # the URL travels in the environment, not in argv (ps)
SIGNALS = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
# The shipper process's first lines: block the signals it takes with sigtimedwait before anything else
# (SIGUSR1's default action would kill it), then tell the parent it may signal, then import and run.
BOOT = ("import os, signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT})\n"
        # A background process group in the terminal's session: a log line must not stop it (SIGTTOU).
        "signal.signal(signal.SIGTTOU, signal.SIG_IGN); signal.signal(signal.SIGTTIN, signal.SIG_IGN)\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush(); os.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
        "from quotagate.metering.shipper import main\n"
        "main(sys.argv[1:])\n")


@dataclass(frozen=True, slots=True)
class ShipperOptions:
    batch_size: int = 2000
    interval: float = 1.0            # between passes when none is asked for sooner (docs/metering.md: why)
    seal_after: float = 10.0         # the writer starts a new segment once the active one is this old
    sync_interval: float = 1.0       # fsync live writers' active segments this often (bounds a power cut's loss)
    maintain_interval: float = 300.0 # roll up buckets and purge old activity
    stop_within: float = 15.0        # on stop, keep trying to ship what is left for this long
    nice: int = 19                   # the shipper's niceness: serving comes first (ShipperProcess._spawn: why)
    retention: Retention = field(default_factory=Retention)

    def to_json(self) -> str:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "retention"}
        return orjson.dumps(values).decode()

    @classmethod
    def from_json(cls, text: str) -> ShipperOptions:
        return cls(**orjson.loads(text))


@dataclass
class ShipperStats:
    shipped: int = 0                 # records read from the journal and stored (new or not)
    stored: int = 0                  # events new to the store (not already there)
    adopted: int = 0                 # records shipped from dead writers' journals
    failures: int = 0
    skipped: int = 0                 # unreadable records


Store = Callable[[Engine, Sequence[UsageEvent]], int]


class Shipper:
    """Ships every writer's journal in ``directory`` to the store (the work of the shipper process)."""

    def __init__(self, directory: Path, engine: Engine, options: ShipperOptions | None = None,
                 store: Store = store_batch) -> None:
        self.directory = directory
        self.engine = engine
        self.options = options or ShipperOptions()
        self.stats = ShipperStats()
        self._store = store
        self._progress: dict[tuple[str, int], tuple[int, int]] = {}  # (writer, seq) -> (offset, records)
        self._positions: dict[str, tuple[int, int, int]] = {}         # live writer -> (seq, offset, records)
        self._pass_at = 0.0
        self._parent: int | None = None

    def _decode(self, records: list[bytes]) -> list[UsageEvent]:
        events = []
        for payload in records:
            try:
                events.append(decode(payload))
            except (ValueError, TypeError):
                self.stats.skipped += 1
                log.error("usage journal: skipping an unreadable record (%d bytes)", len(payload))
        return events

    def _ship_file(self, writer: str, seq: int, path: Path) -> tuple[int, int, bool]:
        """Ship segment ``path`` to its end from where the last pass stopped; returns (offset, records
        before it, damaged tail seen). Progress is kept batch by batch, so a failure re-ships little."""
        offset, count = self._progress.get((writer, seq), (0, 0))
        while True:
            chunk = read_segment(path, offset, self.options.batch_size)
            if chunk.records:
                self.stats.stored += self._store(self.engine, self._decode(chunk.records))
                offset = chunk.end
                count += len(chunk.records)
                self.stats.shipped += len(chunk.records)
                self._progress[(writer, seq)] = (offset, count)
            if chunk.damaged or len(chunk.records) < self.options.batch_size:
                return offset, count, chunk.damaged

    def _ship_live(self, writer: str, segments: list[tuple[int, Path]]) -> None:
        for i, (seq, path) in enumerate(segments):
            sealed = i < len(segments) - 1
            offset, count, damaged = self._ship_file(writer, seq, path)
            self._positions[writer] = (seq, offset, count)
            if sealed:
                if damaged:
                    log.error("usage journal: segment %s ends with a damaged record", path.name)
                path.unlink(missing_ok=True)
                self._progress.pop((writer, seq), None)

    def _ship_dead(self, writer: str, segments: list[tuple[int, Path]]) -> None:
        total = 0
        for seq, path in segments:
            before = self._progress.get((writer, seq), (0, 0))[1]
            _offset, count, damaged = self._ship_file(writer, seq, path)
            if damaged:
                log.warning("usage journal: %s ends with a record cut short by a crash; ignored", path.name)
            total += count - before
            path.unlink(missing_ok=True)
            self._progress.pop((writer, seq), None)
        (self.directory / f"{writer}.lock").unlink(missing_ok=True)
        self._positions.pop(writer, None)
        self.stats.adopted += total
        if total:
            log.info("usage journal: shipped %d records left by writer %s, which is gone", total, writer)

    def ship_once(self) -> None:
        """One pass over every writer's journal; then the status file says how far each live writer is
        shipped. Raises if the store fails (what was stored before the failure stays shipped)."""
        started = time.time()
        if not self.directory.exists():
            return
        segments = list_segments(self.directory)
        writers = set(segments)
        for path in self.directory.iterdir():
            m = WRITER_LOCK.match(path.name)
            if m:
                writers.add(m.group(1))
        for writer in sorted(writers):
            fd = try_lock(self.directory / f"{writer}.lock")
            if fd is None:
                self._ship_live(writer, segments.get(writer, []))
                continue
            try:
                self._ship_dead(writer, segments.get(writer, []))
            finally:
                os.close(fd)
        for gone in set(self._positions) - writers:
            del self._positions[gone]
        self._pass_at = started
        self.write_status(started)

    def progress_of(self, writer: str) -> tuple[int, int, int] | None:
        """(seq, offset, records of that segment before offset) of a live writer, after the last pass."""
        return self._positions.get(writer)

    def write_status(self, attempt_at: float) -> None:
        """``pass_at``: when the last complete pass began; ``attempt_at``: the last pass, failed or not."""
        status = {"pid": os.getpid(), "parent": self._parent, "pass_at": self._pass_at, "attempt_at": attempt_at,
                  "writers": self._positions, "stats": dataclasses.asdict(self.stats)}
        tmp = self.directory / f"{STATUS}.tmp"
        tmp.write_bytes(orjson.dumps(status))
        tmp.replace(self.directory / STATUS)

    def sync(self) -> None:
        """fsync the live writers' active segments (bounds what a power cut could lose)."""
        for writer, (seq, _offset, _count) in list(self._positions.items()):
            path = self.directory / f"{writer}-{seq:010d}.log"
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                log.warning("usage journal: fsync of %s failed", path.name, exc_info=True)
            finally:
                os.close(fd)

    def pending(self) -> bool:
        """Whether any segment is left in the directory (after a final pass: what could not be shipped)."""
        return self.directory.exists() and any(list_segments(self.directory).values())

    # -- the process's loop -----------------------------------------------------------------------
    def run(self, parent: int | None = None, nice_after_first_pass: int = 0) -> None:
        """Ship until SIGTERM/SIGINT or until process ``parent`` is gone, then ship what is left.

        ``nice_after_first_pass`` is the niceness taken once the first pass is done (see
        ``ShipperProcess.start``: the gateway waits for that pass before it serves). SIGUSR1 asks for a
        pass now. Signals are blocked and taken with ``sigtimedwait``, so one that arrives in the middle of
        a store transaction waits for the next look instead of interrupting it."""
        wanted = SIGNALS
        self._parent = parent
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

        def orphaned() -> bool:
            return parent is not None and os.getppid() != parent

        stopping = False
        give_up = float("inf")
        lock_fd = try_lock(self.directory / SHIPPER_LOCK)
        while lock_fd is None:
            # Another shipper ships this directory (one of a process that was killed, finishing its last
            # pass, or of another gateway on the same data dir): stand by. Asked to stop meanwhile, keep
            # trying for a while, to ship what our own process left.
            if orphaned() or time.monotonic() > give_up:
                return
            if signal.sigtimedwait(wanted - {signal.SIGUSR1}, 0.2) is not None and not stopping:
                stopping, give_up = True, time.monotonic() + self.options.stop_within
            self._end_orphan()
            lock_fd = try_lock(self.directory / SHIPPER_LOCK)
        opts = self.options
        now = time.monotonic()
        next_sync, next_maintain = now + opts.sync_interval, now + 5.0
        wait = 0.0
        try:
            while not stopping and not orphaned():
                info = signal.sigtimedwait(wanted, wait) if wait else None
                if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    break
                now, attempt_at = time.monotonic(), time.time()
                try:
                    self.ship_once()
                    if now >= next_sync:
                        next_sync = now + opts.sync_interval
                        self.sync()
                    if now >= next_maintain:
                        next_maintain = now + opts.maintain_interval
                        log.debug("usage upkeep: %s", maintain(self.engine, datetime.now(UTC), opts.retention))
                    wait = opts.interval
                except Exception:
                    self.stats.failures += 1
                    with contextlib.suppress(OSError):
                        self.write_status(attempt_at)  # the gateway waiting for a first pass need not wait on
                    if self.stats.failures == 1 or self.stats.failures % 100 == 0:
                        log.exception("usage shipping failed (%d failures so far); retrying", self.stats.failures)
                    wait = min(max(wait * 2, 0.5), 30.0)
                if nice_after_first_pass:  # the first pass was tried: to that niceness, not by that much
                    os.nice(max(0, nice_after_first_pass - os.nice(0)))
                    nice_after_first_pass = 0
            self._last_passes(time.monotonic() + opts.stop_within)
        finally:
            os.close(lock_fd)

    def _end_orphan(self) -> None:
        """Kill the shipper holding the lock if its gateway is gone (``kill -9``): it is finishing its last
        passes at nice 19, which on a busy machine took minutes, while the gateway that started this
        shipper waits for a pass before it serves. Nothing is lost: what it stored is stored, and this
        shipper re-ships the rest (the store counts nothing twice). A shipper whose gateway lives (two
        gateways on one data dir) is left alone."""
        try:
            status = orjson.loads((self.directory / STATUS).read_bytes())
            pid, parent = int(status["pid"]), int(status["parent"])
        except (OSError, KeyError, TypeError, ValueError, orjson.JSONDecodeError):
            return
        if pid == os.getpid() or _alive(parent):
            return
        try:  # the pid may have been reused since the status was written: it must be this directory's shipper
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if BOOT.encode() not in argv or str(self.directory).encode() not in argv:
            return
        log.warning("usage journal: the shipper of a gateway that is gone (pid %d) still holds the journal; "
                    "ending it and shipping in its place", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _last_passes(self, deadline: float) -> None:
        """Ship what is left (writers that stopped are dead by now), retrying store failures until the
        deadline; what is still not shipped stays in the journal for the next shipper."""
        wait = 0.1
        while True:
            try:
                self.ship_once()
                self.sync()
                if not self.pending():
                    (self.directory / STATUS).unlink(missing_ok=True)
                return
            except Exception:
                self.stats.failures += 1
                log.exception("usage shipping failed while stopping")
            if time.monotonic() + wait >= deadline:
                log.error("usage journal: records left unshipped at exit; the next shipper ships them")
                return
            time.sleep(wait)
            wait = min(wait * 2, 2.0)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed gateway its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# -- the gateway's side: starting, watching and asking the shipper process ----------------------------
@dataclass(frozen=True, slots=True)
class Progress:
    """What the status file says of one writer: everything before (seq, offset) is stored; ``records``
    of segment ``seq`` precede ``offset``."""

    seq: int
    offset: int
    records: int


class ShipperProcess:
    """Starts the shipper process for a journal directory, restarts it if it dies, reads its progress."""

    def __init__(self, directory: Path, database_url: str, options: ShipperOptions | None = None) -> None:
        self.directory = directory
        self.database_url = database_url
        self.options = options or ShipperOptions()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._failures_before = 0     # failures counted by shippers that are gone
        self._status: dict[str, Any] = {}
        self._status_mtime = -1
        self._stopping = False
        self._next_start = 0.0
        self._ready = False

    def _spawn(self) -> None:
        # Shipping can always wait a little; a request cannot. At nice 19 the shipper takes what a busy
        # core leaves over (~1.5% of it when the gateway needs all of it: the journal holds the rest
        # meanwhile), and any idle core in full. But only from the end of its first pass: the gateway
        # waits for that pass before it serves (and a restarted shipper owes a flush its first pass),
        # and at nice 19 on a machine busy with other work the imports alone took longer than the 30 s
        # start() waits. The price is one import burst (~0.5 s of CPU) at nice 0 when a shipper restarts.
        env = {**os.environ, DATABASE_URL_ENV: self.database_url}
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and code, no input in argv
            [sys.executable, "-c", BOOT, "--directory", str(self.directory), "--parent", str(os.getpid()),
             "--options", self.options.to_json(), "--nice-after-first-pass", str(self.options.nice)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            # A process group of its own: a Ctrl-C reaches only the gateway, which passes it on as a SIGTERM
            # after its last record. Not a session of its own: Linux's autogroup scheduling shares the CPU
            # between sessions first, which would make the shipper's niceness count for nothing against
            # the gateway's (measured on the gateway's core, p99 at concurrency 1: 3.1-3.4 ms in a session
            # of its own, at nice 0 or SCHED_IDLE; 0.96-1.66 ms in the gateway's session at nice 19).
            process_group=0)
        self._ready = False

    def _check_ready(self, timeout: float = 0.0) -> bool:
        """Whether the shipper has blocked the signals it takes (before that, a signal would kill it)."""
        out = self.proc.stdout if self.proc is not None else None
        if not self._ready and out is not None and not out.closed and select.select([out], [], [], timeout)[0]:
            self._ready = out.readline() == b"ready\n"
            out.close()
        return self._ready

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, within: float = 30.0) -> bool:
        """Start the shipper and wait (up to ``within`` seconds) for a pass begun after this call: the
        journals that processes now gone left behind are then in the store. Returns whether it came."""
        self._stopping = False
        begun = time.time()
        self._spawn()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            status = self.status()
            # A pass begun after this call, and no journal of a dead writer left: another shipper (the
            # one of a killed gateway, finishing its last pass) may have written the status meanwhile.
            if status.get("pass_at", 0.0) >= begun and not self.orphans_left():
                return True
            if status.get("attempt_at", 0.0) >= begun:
                log.error("usage journal: the shipper cannot reach the store yet; earlier processes' usage "
                          "will be shipped when it can")
                return False
            if not self.alive:
                break
            await asyncio.sleep(0.01)
        log.error("usage journal: the shipper process made no pass within %.0f s of starting", within)
        return False

    def orphans_left(self) -> bool:
        """Whether segments of a writer that is gone (its lock free) are still in the directory."""
        if not self.directory.exists():
            return False
        for writer, segments in list_segments(self.directory).items():
            if not segments:
                continue
            fd = try_lock(self.directory / f"{writer}.lock")
            if fd is not None:
                os.close(fd)
                return True
        return False

    def check(self) -> None:
        """Restart the shipper if it died (called every second or so by the meter)."""
        if self._stopping or self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if now < self._next_start:
            return
        log.error("usage journal: the shipper process exited (code %s); restarting it", self.proc.returncode)
        self._failures_before += int(self.status().get("stats", {}).get("failures", 0))
        self.restarts += 1
        self._next_start = now + min(2.0 ** min(self.restarts, 5), 30.0)
        self._spawn()

    def wake(self) -> None:
        """Ask for a pass now."""
        if self.alive and self._check_ready():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGUSR1)

    async def stop(self) -> None:
        """Ask the shipper to ship what is left and exit; wait for it (killed if it takes too long)."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        await asyncio.to_thread(self._check_ready, 10.0)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.options.stop_within + 5.0
        while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a child process
            await asyncio.sleep(0.01)
        if proc.poll() is None:
            log.error("usage journal: the shipper process did not stop; killing it")
            proc.kill()
            proc.wait()

    # -- progress -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The shipper's last status file (re-read when it changed); {} if there is none."""
        path = self.directory / STATUS
        try:
            mtime = path.stat().st_mtime_ns
            if mtime != self._status_mtime:
                self._status = orjson.loads(path.read_bytes())
                self._status_mtime = mtime
        except (FileNotFoundError, orjson.JSONDecodeError):
            self._status, self._status_mtime = {}, -1
        return self._status

    def progress(self, writer: str) -> Progress | None:
        seq_offset_count = self.status().get("writers", {}).get(writer)
        return Progress(*seq_offset_count) if seq_offset_count else None

    @property
    def failures(self) -> int:
        return self._failures_before + int(self.status().get("stats", {}).get("failures", 0))


def main(argv: list[str] | None = None) -> None:
    from quotagate.store.engine import make_engine

    parser = argparse.ArgumentParser(prog="python -m quotagate.metering.run_shipper")
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--parent", type=int, default=None, help="exit (after a last pass) when this process is gone")
    parser.add_argument("--options", default="{}")
    parser.add_argument("--nice-after-first-pass", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("QUOTAGATE_LOG_LEVEL", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s[shipper]: %(message)s")
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise SystemExit(f"{DATABASE_URL_ENV} is not set")
    options = ShipperOptions.from_json(args.options)
    engine = make_engine(url, pool_size=1, keep_sqlite_open=True)
    try:
        Shipper(args.directory, engine, options).run(args.parent, args.nice_after_first_pass)
    finally:
        engine.dispose()

