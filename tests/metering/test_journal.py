"""The journal on its own: framing, torn tails, segments, and a real kill -9 of a writing process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from sqlalchemy import Engine, func, select

from quotagate.metering.journal import Journal, frame, list_segments, read_segment
from quotagate.metering.meter import JournalMeter
from quotagate.metering.shipper import Shipper
from quotagate.metering.store import encode
from quotagate.store.tables import usage_buckets, usage_events
from tests.metering.conftest import Key, event


def test_records_read_back_in_order(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.open()
    for i in range(100):
        j.append(b"record %d" % i)
    [(_seq, path)] = list_segments(tmp_path / "j")[j.writer]
    chunk = read_segment(path, 0, 1000)
    assert chunk.records == [b"record %d" % i for i in range(100)]
    assert not chunk.damaged
    assert chunk.end == path.stat().st_size
    # Reading on from an offset gives the rest, batch by batch.
    first = read_segment(path, 0, 40)
    rest = read_segment(path, first.end, 1000)
    assert first.records + rest.records == chunk.records


def test_a_torn_tail_is_left_out(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.open()
    for i in range(3):
        j.append(b"ok %d" % i)
    [(_seq, path)] = list_segments(tmp_path / "j")[j.writer]
    whole = frame(b"the record a crash interrupted")
    with path.open("ab") as f:
        f.write(whole[:-5])
    chunk = read_segment(path, 0, 100)
    assert chunk.records == [b"ok 0", b"ok 1", b"ok 2"] and chunk.damaged
    # A corrupted frame (bad checksum) stops reading the same way.
    data = bytearray(path.read_bytes())
    data[9] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read_segment(path, 0, 100).records == []


def test_the_writer_seals_by_size_and_age_and_the_shipper_deletes_what_it_shipped(tmp_path: Path, engine: Engine,
                                                                                  key: Key) -> None:
    j = Journal(tmp_path / "j", segment_bytes=1000, seal_after=0.05)
    j.open()
    for _ in range(20):
        j.append(encode(event(key)))
    segs = list_segments(tmp_path / "j")[j.writer]
    assert len(segs) > 2 and j.position()[0] == segs[-1][0]
    assert not j.seal_if_old() or j.position()[1] == 0  # nothing to seal in a segment just opened...
    j.append(encode(event(key)))
    time.sleep(0.06)
    assert j.seal_if_old()                               # ...but an old one with records is sealed
    assert not j.seal_if_old()                           # and an empty one is not
    # The writer deletes nothing; the shipper deletes the sealed segments once stored, keeps the active one.
    shipper = Shipper(tmp_path / "j", engine)
    shipper.ship_once()
    assert [seq for seq, _ in list_segments(tmp_path / "j")[j.writer]] == [j.position()[0]]
    assert shipper.stats.shipped == shipper.stats.stored == 21
    assert shipper.progress_of(j.writer) == (j.position()[0], 0, 0)
    # Once the writer is gone (its lock free), everything of it goes, lock file included.
    j.append(encode(event(key)))
    j.close()
    shipper.ship_once()
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["shipped.json"]
    assert shipper.stats.stored == 22 and shipper.stats.adopted == 1


CHILD = textwrap.dedent("""
    import asyncio, sys, time, uuid
    from pathlib import Path
    from quotagate.metering.interfaces import UsageEvent
    from quotagate.metering.meter import JournalMeter
    from quotagate.store.engine import make_engine

    async def main() -> None:
        key_id, project_id, url, directory = sys.argv[1:5]
        meter = JournalMeter(make_engine(url), Path(directory))
        await meter.start()
        i = 0
        while True:
            rid = f"req_{uuid.uuid4().hex}"
            meter.record(UsageEvent(rid, time.time(), key_id, project_id, "qwen3.6-27b", "chat.completions",
                                    200, None, False, 3, i % 7, 1.0, None, "127.0.0.1", "child"))
            # Only once record() returned does the "client" hear of it.
            sys.stdout.write(f"{rid} {i % 7}\\n")
            sys.stdout.flush()
            i += 1
            if i % 50 == 0:
                await asyncio.sleep(0.005)  # let the shipper run, as a loop serving requests would

    asyncio.run(main())
""")


def test_kill_9_while_recording_loses_nothing_and_doubles_nothing(tmp_path: Path, engine: Engine, key: Key,
                                                                   database_url: str) -> None:
    directory = tmp_path / "journal"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, key.id, key.project_id, database_url, str(directory)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged: dict[str, int] = {}
    for line in proc.stdout:
        rid, completion = line.split()
        acknowledged[rid] = int(completion)
        if len(acknowledged) == 3000:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with engine.connect() as conn:
        shipped_before_kill = conn.execute(select(func.count()).select_from(usage_events)).scalar_one()

    # A new process starts: it ships what the dead one left, before anything else.
    async def restart() -> None:
        meter = JournalMeter(engine, directory)
        await meter.start()
        await meter.close()

    asyncio.run(restart())
    with engine.connect() as conn:
        stored = dict(conn.execute(select(usage_events.c.request_id, usage_events.c.completion_tokens)).all())
        requests, completion = conn.execute(select(func.sum(usage_buckets.c.requests),
                                                   func.sum(usage_buckets.c.completion_tokens))
                                            .where(usage_buckets.c.width == 60)).one()
    print(f"\nkill -9 after {len(acknowledged)} acknowledged records ({shipped_before_kill} already shipped); "
          f"{len(stored)} stored after restart")
    missing = set(acknowledged) - set(stored)
    assert not missing, f"{len(missing)} acknowledged records lost"
    assert all(stored[rid] == c for rid, c in acknowledged.items())
    # Records written after the last acknowledgement may be there too; nothing is counted twice.
    assert requests == len(stored)
    assert completion == sum(stored.values())
    assert not any(directory.glob("*.log")), "the journal is trimmed once shipped"
