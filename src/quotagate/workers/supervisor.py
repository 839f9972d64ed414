"""``serve --workers N``: N processes serve the LLM API on its one port; this (the parent) keeps them running.

The parent binds N listening sockets to the LLM port with ``SO_REUSEPORT``, one per worker, so the
kernel spreads new connections evenly over the workers (one shared socket would let whichever worker
wakes first accept a burst of them). It keeps its copy of each: a worker that dies leaves connections
queued on its socket, and its replacement, started on the same socket, accepts them.

Each worker is ``python -m quotagate.workers.main``, started with its listening sockets and its end of a
control channel (channel.py) as inherited file descriptors, and the settings on its stdin (they may hold
passwords: not in argv, which ``ps`` shows). A worker that exits while the parent serves is started
again, at once the first time and then after a delay that doubles (up to 10 s) while it keeps dying
within 10 s of starting. Workers run in process groups of their own (a Ctrl-C reaches only the parent).
When the parent stops it sends SIGTERM to every worker, which finishes its answers in flight (up to
10 s) and exits; one still running 15 s later is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import orjson

from quotagate.app import Runtime
from quotagate.limits.memory import MemoryLimiter
from quotagate.metering import WORKER_METRICS
from quotagate.upstreams.client import UpstreamClient
from quotagate.workers.hub import Hub

log = logging.getLogger(__name__)

STOP_WITHIN = 15.0


def bind_reuseport(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """``count`` sets of listening sockets on ``host:port`` (every address it resolves to), sharing the
    port with ``SO_REUSEPORT``. Port 0 picks one free port for all of them."""
    infos = {info[4]: info for info in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)}.values()
    sets: list[list[socket.socket]] = [[] for _ in range(count)]
    try:
        for family, kind, proto, _name, address in infos:
            for socks in sets:
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                address = sock.getsockname()  # (the port chosen, if it was 0)
                sock.listen(2048)
                sock.setblocking(False)
    except OSError:
        for socks in sets:
            for sock in socks:
                sock.close()
        raise
    return sets


class Supervisor:
    """Runs the LLM API's workers; the shape ``serve_all`` drives (``serve``, ``should_exit``, ``started``)."""

    def __init__(self, rt: Runtime, count: int) -> None:
        self.rt = rt
        self.count = count
        # What a worker would find wrong only when it builds the LLM API (an upstream API key that cannot
        # be sent), found here so that serve refuses to start instead of workers failing over and over.
        UpstreamClient(rt.config.models, rt.config.gateway)
        limiter = rt.limiter if isinstance(rt.limiter, MemoryLimiter) else None
        self.hub = Hub(limiter, rt.events)
        rt.extras[WORKER_METRICS] = self.hub.scrape
        self.started = False
        self.restarts = 0
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._should_exit = False
        self._exit: asyncio.Event | None = None

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._exit is not None:
            self._exit.set()

    async def serve(self) -> None:
        self._exit = asyncio.Event()
        s = self.rt.settings
        try:
            sets = bind_reuseport(s.host, s.llm_port, self.count)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.llm_port, exc.strerror or exc)
            return
        keepers = [asyncio.create_task(self._keep(i, socks), name=f"worker-{i}") for i, socks in enumerate(sets)]
        self.started = True
        try:
            await self._exit.wait()
        finally:
            self._exit.set()
            for proc in self.procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            await asyncio.wait(keepers, timeout=STOP_WITHIN + 2)
            for socks in sets:
                for sock in socks:
                    sock.close()

    async def _keep(self, index: int, sockets: list[socket.socket]) -> None:
        """Run worker ``index`` until the parent stops, starting it again whenever it exits."""
        assert self._exit is not None
        quick_deaths = 0
        served = False
        while not self._exit.is_set():
            started = time.monotonic()
            code, ready = await self._run_once(index, sockets)
            if self._exit.is_set():
                return
            served = served or ready
            if not served:  # it cannot start at all (its log says why): no use trying again and again
                log.error("worker %d exited (code %s) before serving; stopping", index, code)
                self.started = False
                self._exit.set()
                return
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < 10.0 else 0
            delay = 0.0 if quick_deaths <= 1 else min(0.5 * 2 ** (quick_deaths - 2), 10.0)
            self.restarts += 1
            log.error("worker %d exited (%s); starting it again%s", index,
                      f"signal {-code}" if code < 0 else f"code {code}", f" in {delay:g}s" if delay else "")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), delay)

    async def _run_once(self, index: int, sockets: list[socket.socket]) -> tuple[int, bool]:
        """Start worker ``index`` and wait until it exits (killing it if it outstays a stop): its exit code,
        and whether it got as far as serving."""
        assert self._exit is not None
        parent_end, child_end = socket.socketpair()
        fds = [child_end.fileno(), *(sock.fileno() for sock in sockets)]
        payload = orjson.dumps({"index": index, "channel": fds[0], "listen": fds[1:],
                                "settings": self.rt.settings.model_dump(mode="json")})
        try:
            # Not uvloop's subprocesses: they pass the parent's other descriptors on (found with pass_fds),
            # and a worker holding another worker's channel end would hide that worker's death from us.
            proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waiting is done with a pidfd
                [sys.executable, "-m", "quotagate.workers.main"], stdin=subprocess.PIPE, pass_fds=fds,
                # A process group of its own, as the shipper's: a Ctrl-C in the terminal reaches only this
                # process, which stops the workers with SIGTERM (a worker still starting up would
                # otherwise die of the SIGINT, and this process could take that for a crash).
                process_group=0)
        finally:
            child_end.close()
        self.procs[index] = proc
        try:
            link = await self.hub.attach(parent_end, index, f"worker {index} (pid {proc.pid})")
            assert proc.stdin is not None
            proc.stdin.write(payload + b"\n")
            proc.stdin.close()
            log.info("worker %d started (pid %d)", index, proc.pid)
            return await self._wait(proc), link.ready
        finally:
            del self.procs[index]

    async def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        assert self._exit is not None
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(proc.pid)
        exited = asyncio.Event()
        loop.add_reader(pidfd, exited.set)
        stopping = asyncio.ensure_future(self._exit.wait())
        try:
            await asyncio.wait([asyncio.ensure_future(exited.wait()), stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.is_set():  # stopping: the worker was sent SIGTERM
                try:
                    await asyncio.wait_for(exited.wait(), STOP_WITHIN)
                except TimeoutError:
                    log.error("worker (pid %d) did not stop within %gs; killing it", proc.pid, STOP_WITHIN)
                    proc.kill()
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return proc.wait()
