"""What the kernel says of a gateway's worker processes: their pids, and the client connections each holds
(from /proc: which worker the kernel gave each connection to is not visible to a client)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import Gateway


def worker_pids(gw: Gateway) -> list[int]:
    """The pids of the gateway's running LLM API workers."""
    pids = []
    for child in Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"quotagate.workers.main" in cmdline:
            pids.append(int(child))
    return sorted(pids)


def _established_inodes(port: int) -> set[str]:
    """Inodes of the established TCP connections whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def connections_per_worker(gw: Gateway) -> dict[int, int]:
    """pid -> how many client connections of the LLM port that worker holds open."""
    established = _established_inodes(gw.llm_port)
    counts = {}
    for pid in worker_pids(gw):
        n = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:[") and target[8:-1] in established:
                n += 1
        counts[pid] = n
    return counts
