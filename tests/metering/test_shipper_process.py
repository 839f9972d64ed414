"""The shipper as a process of its own: read-your-writes through its status file, an exact backlog, and
real kill -9s — of the gateway with the shipper alive, of the shipper, of both — with nothing lost and
nothing counted twice."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import Engine, func, select

from quotagate.metering.journal import Journal
from quotagate.metering.meter import JournalMeter
from quotagate.metering.shipper import ShipperOptions
from quotagate.metering.store import encode
from quotagate.store.tables import usage_buckets, usage_events
from tests.metering.conftest import Key, event
from tests.metering.test_journal import CHILD


def stored(engine: Engine) -> tuple[dict[str, int], int, int]:
    """(request id -> completion tokens of every activity row, minute buckets' requests, completion)."""
    with engine.connect() as conn:
        rows = dict(conn.execute(select(usage_events.c.request_id, usage_events.c.completion_tokens)).all())
        requests, completion = conn.execute(select(func.coalesce(func.sum(usage_buckets.c.requests), 0),
                                                   func.coalesce(func.sum(usage_buckets.c.completion_tokens), 0))
                                            .where(usage_buckets.c.width == 60)).one()
    return rows, int(requests), int(completion)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Reparented and not reaped yet: a zombie is gone too.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_flush_is_read_your_writes_and_the_backlog_is_exact(tmp_path: Path, engine: Engine, key: Key) -> None:
    async def run() -> None:
        meter = JournalMeter(engine, tmp_path / "j")
        await meter.start()
        try:
            assert meter.shipper.alive and meter.shipper.proc is not None
            for round_ in range(3):
                for i in range(50):
                    meter.record(event(key, completion_tokens=i))
                assert await meter.flush()
                rows, requests, _ = stored(engine)
                assert len(rows) == requests == 50 * (round_ + 1)  # the store has it when flush returns
                assert meter.backlog_records() == 0 and meter.shipped_records() == 50 * (round_ + 1)
            # With the shipper paused, what is recorded is backlog, and flush says it is not shipped.
            pid = meter.shipper.proc.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                for _ in range(7):
                    meter.record(event(key))
                assert meter.backlog_records() == 7
                assert not await meter.flush(within=0.3)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await meter.flush()
            assert meter.backlog_records() == 0 and len(stored(engine)[0]) == 157
        finally:
            await meter.close()
        assert not meter.shipper.alive

    asyncio.run(run())


def test_kill_9_of_the_shipper_process_restarts_it_and_counts_once(tmp_path: Path, engine: Engine,
                                                                     key: Key) -> None:
    async def run() -> None:
        meter = JournalMeter(engine, tmp_path / "j", segment_bytes=4000)
        await meter.start()
        try:
            assert meter.shipper.proc is not None
            first = meter.shipper.proc.pid
            for i in range(600):
                meter.record(event(key, completion_tokens=i % 7))
                if i % 20 == 0:
                    await asyncio.sleep(0.002)
                if i == 300:  # in the middle of shipping, very likely in a transaction
                    os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while meter.shipper.restarts == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert meter.shipper.restarts == 1 and meter.shipper.proc.pid != first
            assert await meter.flush(within=30)
            rows, requests, completion = stored(engine)
            assert len(rows) == requests == 600
            assert completion == sum(i % 7 for i in range(600))
        finally:
            await meter.close()
        assert not list((tmp_path / "j").glob("*.log"))

    asyncio.run(run())


def start_child(key: Key, database_url: str, directory: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, key.id, key.project_id, database_url, str(directory)],
                            stdout=subprocess.PIPE, text=True)


def run_until(proc: subprocess.Popen[str], count: int) -> dict[str, int]:
    """Read what the recording process acknowledged until ``count`` records."""
    assert proc.stdout is not None
    acknowledged: dict[str, int] = {}
    for line in proc.stdout:
        rid, completion = line.split()
        acknowledged[rid] = int(completion)
        if len(acknowledged) == count:
            break
    return acknowledged


def test_kill_9_of_the_gateway_the_shipper_ships_everything_and_exits(tmp_path: Path, engine: Engine, key: Key,
                                                                       database_url: str) -> None:
    directory = tmp_path / "journal"
    proc = start_child(key, database_url, directory)
    acknowledged = run_until(proc, 2000)
    [shipper] = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Nobody restarts anything: the shipper sees its gateway gone, ships the journal it left, and exits.
    wait_gone(shipper)
    rows, requests, completion = stored(engine)
    assert not set(acknowledged) - set(rows), "acknowledged records lost"
    assert all(rows[rid] == c for rid, c in acknowledged.items())
    assert requests == len(rows) and completion == sum(rows.values())
    assert not list(directory.glob("*.log")) and not list(directory.glob("????????????.lock"))


def test_kill_9_of_both_a_restart_ships_what_they_left_before_serving(tmp_path: Path, engine: Engine, key: Key,
                                                                       database_url: str) -> None:
    directory = tmp_path / "journal"
    proc = start_child(key, database_url, directory)
    run_until(proc, 200)
    [shipper] = children(proc.pid)
    os.kill(shipper, signal.SIGKILL)  # the shipper first: what follows stays in the journal
    wait_gone(shipper)
    acknowledged = run_until(proc, 1500)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(directory.glob("*.log"))
    shipped_before = len(stored(engine)[0])

    async def restart() -> None:
        meter = JournalMeter(engine, directory, options=ShipperOptions(interval=5.0))
        await meter.start()
        try:
            # start() returns once the new shipper has shipped the dead process's journal.
            rows, requests, completion = stored(engine)
            assert not set(acknowledged) - set(rows)
            assert requests == len(rows) and completion == sum(rows.values())
            assert len(rows) > shipped_before
        finally:
            await meter.close()

    asyncio.run(restart())
    assert not list(directory.glob("*.log"))


def test_a_restart_ends_the_shipper_a_killed_gateway_left_and_ships_in_its_place(
        tmp_path: Path, engine: Engine, key: Key, database_url: str) -> None:
    """The gateway is killed while its shipper cannot run (stopped here; a nice-19 shipper on a busy
    machine once waited minutes for the CPU): the restarted gateway's shipper ends that orphan and ships in
    its place, instead of standing by behind it while the gateway waits to serve."""
    libc = ctypes.CDLL(None, use_errno=True)
    # The orphan is reparented to this process, so its process group stays attached to the session: the
    # kernel sends SIGHUP to a stopped member of a group that becomes orphaned, which would end it for us.
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    directory = tmp_path / "journal"
    shipper = 0
    try:
        proc = start_child(key, database_url, directory)
        run_until(proc, 200)
        [shipper] = children(proc.pid)
        os.kill(shipper, signal.SIGSTOP)
        acknowledged = run_until(proc, 1500)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not gone(shipper) and list(directory.glob("*.log"))

        async def restart() -> None:
            meter = JournalMeter(engine, directory, options=ShipperOptions(interval=5.0))
            await meter.start()
            try:
                # start() returned after the new shipper's first pass (not after its 30 s timeout with the
                # journal still held by the stopped orphan): everything acknowledged is stored, once.
                rows, requests, completion = stored(engine)
                assert not set(acknowledged) - set(rows)
                assert requests == len(rows) and completion == sum(rows.values())
            finally:
                await meter.close()

        asyncio.run(restart())
        _, status = os.waitpid(shipper, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        shipper = 0
        assert not list(directory.glob("*.log"))
    finally:
        libc.prctl(36, 0, 0, 0, 0)
        if shipper:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(shipper, signal.SIGKILL)
                os.waitpid(shipper, 0)


def test_a_second_shipper_on_the_same_journal_stands_by(tmp_path: Path, engine: Engine, key: Key) -> None:
    """Two gateways on one data dir: one shipper ships for both; the other takes over when it stops."""

    async def run() -> None:
        a = JournalMeter(engine, tmp_path / "j")
        b = JournalMeter(engine, tmp_path / "j")
        await a.start()
        await b.start()
        try:
            for i in range(100):
                (a if i % 2 else b).record(event(key))
            assert await a.flush() and await b.flush()
            await a.close()  # b's shipper takes over, and ships what a left if a's could not
            for _ in range(10):
                b.record(event(key))
            assert await b.flush(within=20)
            assert len(stored(engine)[0]) == 110
        finally:
            with contextlib.suppress(Exception):
                await b.close()
        assert not list((tmp_path / "j").glob("*.log"))

    asyncio.run(run())


def test_a_store_the_shipper_cannot_use_does_not_hold_up_the_start(tmp_path: Path, engine: Engine, key: Key) -> None:
    """With the store unusable, the gateway starts serving after the shipper's first failed pass (not
    after a timeout); the dead process's journal stays, to be shipped once the store is back."""
    left = Journal(tmp_path / "j")
    left.open()
    left.append(encode(event(key)))
    left.close()

    async def run() -> None:
        broken = f"sqlite:///{tmp_path / 'no-tables.db'}"
        meter = JournalMeter(engine, tmp_path / "j", database_url=broken,
                             options=ShipperOptions(stop_within=0.5))
        await meter.start()
        try:
            assert meter.shipper.failures >= 1
            assert len(list((tmp_path / "j").glob(f"{left.writer}-*.log"))) == 1
        finally:
            await meter.close()

    asyncio.run(run())
    assert len(list((tmp_path / "j").glob(f"{left.writer}-*.log"))) == 1

    # The next start, with a store that works, ships it.
    async def again() -> None:
        meter = JournalMeter(engine, tmp_path / "j")
        await meter.start()
        await meter.close()

    asyncio.run(again())
    assert len(stored(engine)[0]) == 1 and not list((tmp_path / "j").glob("*.log"))


def test_the_shipper_yields_to_the_gateway_and_misses_its_ctrl_c(tmp_path: Path, engine: Engine) -> None:
    """The shipper runs at nice 19 in the gateway's session (so that the niceness counts against the
    gateway under autogroup scheduling) but in a process group of its own (a terminal's Ctrl-C reaches the
    gateway only, which stops the shipper in order)."""

    async def run() -> None:
        meter = JournalMeter(engine, tmp_path / "j")
        await meter.start()
        try:
            assert meter.shipper.proc is not None
            pid = meter.shipper.proc.pid
            deadline = time.monotonic() + 10
            while os.getpriority(os.PRIO_PROCESS, pid) != 19:
                assert time.monotonic() < deadline, f"shipper niceness {os.getpriority(os.PRIO_PROCESS, pid)}"
                await asyncio.sleep(0.02)
            assert os.getsid(pid) == os.getsid(0)
            assert os.getpgid(pid) == pid != os.getpgid(0)
        finally:
            await meter.close()

    asyncio.run(run())
