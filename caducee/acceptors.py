"""SMTP acceptor processes: `[server] smtp_processes` processes accept SMTP on the node's listening sockets.

One asyncio loop gives a node one CPU; a TLS handshake with a client certificate costs more of it than
the message that follows. The node therefore starts `smtp_processes - 1` more processes (`caducee serve
--acceptor`, a new interpreter each: no fork of a process with threads) that inherit its SMTP listening
sockets, so the kernel hands each new connection to whichever process is waiting in `accept` — a busy one
is not. An acceptor does what the node does with a session up to the 250: certificate login, policy,
the queue rows and the body committed by its own database writer. Everything after the queue — local
delivery, relaying, reports — and IMAP, LDAP and the admin API stay in the node, which an acceptor wakes
through a pipe after each commit (one byte; the node's queue poll catches what a full pipe drops).

Lifecycle: an acceptor dies with the node (PR_SET_PDEATHSIG: a killed node leaves no process holding its
ports), stops when the node stops (SIGTERM: the sessions in DATA finish, as in the node), and is started
again, after a growing pause, when it exits on its own. Writers of one SQLite file take turns through a
file lock (mailserver.db); PostgreSQL needs nothing more.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from caducee.config import Config

log = logging.getLogger("caducee.acceptors")

READY, QUEUED = b"R", b"Q"
RESTART_MIN, RESTART_MAX = 1.0, 60.0  # seconds before starting again an acceptor that exited
STEADY = 30.0  # an acceptor that ran this long had started well: its next exit waits RESTART_MIN again
STOP_GRACE = 40.0  # seconds an acceptor has to stop after SIGTERM (its DATA sessions get 30) before SIGKILL
PR_SET_PDEATHSIG = 1


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    pipe: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0
    pause: float = RESTART_MIN
    restart: asyncio.TimerHandle | None = None


class AcceptorPool:
    """The node's side: starts `count` acceptors on `sockets` ({"submission": socket, …}), turns their
    wake-ups into `queue.notify()`, restarts those that exit, stops them with the node."""

    def __init__(self, cfg: Config, sockets: dict[str, Any], count: int, queue: Any) -> None:
        self.cfg = cfg
        self.sockets = sockets
        self.queue = queue
        self.slots = [_Slot(i) for i in range(1, count + 1)]
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Start every acceptor and wait until each listens. One that exits first, or is not listening
        after `timeout`, is logged and left to the monitor: the node serves without it meanwhile."""
        for slot in self.slots:
            self._spawn(slot)
        self._monitor = asyncio.create_task(self._watch(), name="acceptor-monitor")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            late = [s for s in self.slots if not s.ready.is_set()]
            if not late:
                return
            if loop.time() > deadline or any(s.proc is None or s.proc.poll() is not None for s in late):
                log.error("event=acceptor_not_ready acceptors=%s", ",".join(str(s.index) for s in late))
                return
            await asyncio.sleep(0.02)

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fds = {kind: sock.fileno() for kind, sock in self.sockets.items()}
        spec = {"index": slot.index, "parent": os.getpid(), "notify": write_end, "listeners": fds}
        try:
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "caducee", "serve", "--state", str(self.cfg.state_dir),
                 "--acceptor", json.dumps(spec)],
                pass_fds=(write_end, *fds.values()), stdin=subprocess.DEVNULL)
        except OSError as exc:
            os.close(read_end)
            log.error("event=acceptor_start_failed acceptor=%d error=%s", slot.index, type(exc).__name__)
            slot.proc = None
            self._schedule_restart(slot)
            return
        finally:
            os.close(write_end)
        slot.pipe, slot.started, slot.ready = read_end, time.monotonic(), asyncio.Event()
        asyncio.get_running_loop().add_reader(read_end, self._on_pipe, slot)
        log.info("event=acceptor_started acceptor=%d pid=%d", slot.index, slot.proc.pid)

    def _on_pipe(self, slot: _Slot) -> None:
        fd = slot.pipe
        if fd is None:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the acceptor is gone (the monitor reports and restarts it)
            self._close_pipe(slot)
            return
        if READY in data:
            slot.ready.set()
        if QUEUED in data:
            self.queue.notify()

    def _close_pipe(self, slot: _Slot) -> None:
        if slot.pipe is not None:
            asyncio.get_running_loop().remove_reader(slot.pipe)
            os.close(slot.pipe)
            slot.pipe = None

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for slot in self.slots:
                if self._stopping or slot.proc is None or slot.restart is not None:
                    continue
                status = slot.proc.poll()
                if status is None:
                    continue
                self._close_pipe(slot)
                log.error("event=acceptor_exited acceptor=%d pid=%d status=%s", slot.index, slot.proc.pid,
                          _status(status))
                if time.monotonic() - slot.started >= STEADY:
                    slot.pause = RESTART_MIN
                self._schedule_restart(slot)

    def _schedule_restart(self, slot: _Slot) -> None:
        if self._stopping:
            return
        delay, slot.pause = slot.pause, min(slot.pause * 2, RESTART_MAX)

        def again() -> None:
            if not self._stopping:
                log.info("event=acceptor_restarting acceptor=%d", slot.index)
                self._spawn(slot)

        slot.restart = asyncio.get_running_loop().call_later(delay, again)

    def terminate(self) -> None:
        """SIGTERM to every acceptor: they close their listeners and drain their sessions."""
        self._stopping = True
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)

    async def wait(self, grace: float = STOP_GRACE) -> None:
        """Wait for the acceptors to exit after `terminate`; SIGKILL those still there after `grace`."""
        if not self._stopping:
            self.terminate()
        if self._monitor is not None:
            self._monitor.cancel()
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            try:
                status = await asyncio.to_thread(proc.wait, grace)
            except subprocess.TimeoutExpired:
                log.error("event=acceptor_killed acceptor=%d pid=%d reason=stop_timeout", slot.index, proc.pid)
                proc.kill()
                status = await asyncio.to_thread(proc.wait)
            if status != 0:
                log.warning("event=acceptor_exited acceptor=%d pid=%d status=%s", slot.index, proc.pid,
                            _status(status))
            self._on_pipe(slot)  # its last wake-ups
            self._close_pipe(slot)


def _status(code: int) -> str:
    return f"signal:{signal.Signals(-code).name}" if code < 0 else str(code)


# --- the acceptor's side -----------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """SIGKILL this process when the node dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF is the only sign
        pass
    if os.getppid() != parent:
        os._exit(1)


def serve_acceptor(cfg: Config, spec_text: str) -> int:
    """`caducee serve --acceptor SPEC`: accept SMTP on the inherited sockets until SIGTERM."""
    from caducee.app import build_smtp_side, listen_smtp, setup_logging
    from mailserver.smtp_protocol import shutdown

    spec = json.loads(spec_text)
    _die_with(int(spec["parent"]))
    index, notify_fd = int(spec["index"]), int(spec["notify"])
    setup_logging(cfg.log.level, process=f"smtp-{index}")
    os.set_blocking(notify_fd, False)

    def wake(what: bytes = QUEUED) -> None:
        try:
            os.write(notify_fd, what)
        except BlockingIOError:  # the node has a wake-up waiting already
            pass
        except OSError:  # the node is gone: PDEATHSIG ends this process
            pass

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        side = build_smtp_side(cfg)
        side.queue.forward = wake
        smtp: list[asyncio.base_events.Server] = []
        relay: list[asyncio.base_events.Server] = []
        for kind, fd in spec["listeners"].items():
            sock = socket.socket(fileno=int(fd))
            (relay if kind == "relay" else smtp).append(await listen_smtp(side, kind, sock=sock))
        gc.collect()
        gc.freeze()
        wake(READY)
        log.info("event=acceptor_ready acceptor=%d pid=%d", index, os.getpid())
        await stop.wait()
        await asyncio.gather(shutdown(side.handler, smtp), shutdown(side.relay_handler, relay))
        await asyncio.to_thread(side.writer.stop)
        side.read_engine.dispose()
        log.info("event=acceptor_stopped acceptor=%d accepted=%d relayed_in=%d db_jobs=%d db_commits=%d", index,
                 side.handler.accepted, side.relay_handler.accepted, side.writer.jobs, side.writer.batches)
        return 0

    try:
        return asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - reported plainly; the node starts it again
        log.error("event=acceptor_failed acceptor=%d error=%s", index, type(exc).__name__)
        return 1
