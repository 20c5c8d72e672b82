"""Database engines and the single writer that commits concurrent work together (group commit).

Every write of the servers goes through one `Writer`: a thread that takes all jobs waiting, runs them in
one transaction, commits once, then resolves each job's future. A job that fails is alone in failing:
the batch is then run again with a savepoint per job, and the others commit. So a job may run twice:
it must act on the database only (its connection), or do work that is the same done twice (the queue's
job writes its content-addressed body blob). One fsync serves every message accepted in the same
batch, which is how a Python server out-runs one fsync per message (DESIGN.md §3).

A fire-and-forget job (`submit_nowait`: audit events) does not start a transaction of its own: it rides
with the next batch, in the order it was submitted, or is committed alone after `RIDE_ALONG` seconds. A
login's audit entry so shares the commit of the message that follows it instead of costing one.

Several processes may write one SQLite database (the SMTP acceptor processes, the CLI): each writer then
takes an exclusive `flock` on `<database>-writer.lock` around its transaction. SQLite would serialise them
anyway, but a writer that finds the database locked polls it with sleeps of 1, 2, 5, 10… ms; the lock
hands the turn over at once, in the order the kernel wakes waiters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[sa.Connection], T]

MAX_BATCH = 256
# A connection the writer has not used for this long goes back to the pool and the next batch takes one
# from it (checked there: PostgreSQL's pre-ping); under load every batch reuses the same connection.
IDLE_RECHECK = 5.0
# Seconds a fire-and-forget job waits for a batch to ride with before it is committed alone.
RIDE_ALONG = 0.05
_ORDER = itertools.count()  # submission order of jobs, kept within a batch
_WAKE = object()  # tells the writer a fire-and-forget job is waiting (it then waits with a deadline)


def make_engine(url: str, *, writer: bool = False) -> sa.Engine:
    """An engine for `url`. SQLite gets WAL, synchronous=FULL, foreign keys and explicit transactions."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            poolclass=sa.pool.QueuePool if not writer else sa.pool.SingletonThreadPool,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's events drive BEGIN (savepoints work)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # IMMEDIATE takes the write lock at once: no deadlock on lock upgrade between writers.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10 if not writer else 2)


def writer_lock_path(url: sa.URL | str) -> Path | None:
    """The file whose `flock` the writers of an SQLite database file take around their transactions;
    None for a database that is not an SQLite file (PostgreSQL serialises its writers itself)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database + "-writer.lock")


@dataclass
class _Pending:
    job: Callable[[sa.Connection], Any]
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | None
    done: threading.Event | None = None
    before_commit: Callable[[], None] | None = None
    result: Any = None
    error: BaseException | None = None
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    order: int = field(default_factory=lambda: next(_ORDER))
    since: float = 0.0  # when a fire-and-forget job was submitted (time.monotonic)


_DEFERRED = "caducee.deferred"


def defer_in(conn: sa.Connection, key: str, flush: Callable[[sa.Connection, list[Any]], None], item: Any) -> bool:
    """Leave `item` to be written by `flush(conn, items)` once, at the end of the writer's batch, with the
    items of every other job of the batch under the same `key`, in job order (one statement for the batch
    instead of one per job; what a failed job deferred is dropped with it). False when `conn` is not a
    writer batch: the caller writes at once."""
    pending: dict[str, tuple[Callable[[sa.Connection, list[Any]], None], list[Any]]] | None = conn.info.get(_DEFERRED)
    if pending is None:
        return False
    pending.setdefault(key, (flush, []))[1].append(item)
    return True


class _JobFailed(Exception):
    """A job failed on the fast path: run the batch again with savepoints."""


class Writer:
    """The one thread that writes. `await writer.run(job)` returns once the job's transaction is durable."""

    def __init__(self, engine: sa.Engine, name: str = "db-writer") -> None:
        self.engine = engine
        self._lock_path = writer_lock_path(engine.url)
        self._lock_fd: int | None = None
        self._queue: queue.SimpleQueue[_Pending | object | None] = queue.SimpleQueue()
        self._riders: collections.deque[_Pending] = collections.deque()  # fire-and-forget jobs waiting
        self._riders_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = False
        self._stopped = False
        self._conn: sa.Connection | None = None
        self._last_used = 0.0
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self) -> None:
        """Finish every job already submitted, then stop the thread."""
        if self._started and not self._stopped:
            self._stopped = True
            self._queue.put(None)
            self._thread.join()

    async def run(self, job: Job[T], *, before_commit: Callable[[], None] | None = None) -> T:
        """Run `job` in the next batch. `before_commit` runs once per batch however many jobs name it,
        after the jobs and before COMMIT (e.g. the fsync that makes their blobs durable)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._submit(_Pending(job, loop, fut, before_commit=before_commit))
        return await fut

    def run_sync(self, job: Job[T], *, before_commit: Callable[[], None] | None = None) -> T:
        """For callers outside the event loop (CLI, tests): block until the job is committed."""
        pending = _Pending(job, None, None, threading.Event(), before_commit=before_commit)
        self._submit(pending)
        assert pending.done is not None
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[no-any-return]

    def submit_nowait(self, job: Job[Any]) -> None:
        """Fire and forget (audit events): errors are logged, never raised to the caller. The job rides with
        the next batch, or is committed alone after RIDE_ALONG seconds."""
        if self._stopped:
            raise RuntimeError("database writer stopped")
        self.start()
        pending = _Pending(job, None, None, since=time.monotonic())
        with self._riders_lock:
            wake = not self._riders
            self._riders.append(pending)
        if wake:
            self._queue.put(_WAKE)

    def _submit(self, pending: _Pending) -> None:
        if self._stopped:
            raise RuntimeError("database writer stopped")
        self.start()
        self._queue.put(pending)

    def _loop(self) -> None:
        stop = False
        while not stop:
            with self._riders_lock:
                deadline = self._riders[0].since + RIDE_ALONG if self._riders else None
            try:
                first = self._queue.get(timeout=max(0.0, deadline - time.monotonic())
                                        if deadline is not None else None)
            except queue.Empty:
                first = _WAKE  # riders waited long enough: they go alone
            if first is None:
                break
            batch: list[_Pending] = [first] if isinstance(first, _Pending) else []
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if isinstance(nxt, _Pending):
                    batch.append(nxt)
            if batch or stop or (deadline is not None and time.monotonic() >= deadline):
                batch = self._with_riders(batch)
            if batch:
                self._run_batch(batch)
        leftover = self._with_riders([])
        if leftover:
            self._run_batch(leftover)
        self._release_connection()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn to write, among the processes writing the same SQLite file."""
        if self._lock_path is None:
            yield
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _with_riders(self, batch: list[_Pending]) -> list[_Pending]:
        """`batch` and every fire-and-forget job waiting, in submission order."""
        with self._riders_lock:
            if not self._riders:
                return batch
            riders = list(self._riders)
            self._riders.clear()
        return sorted(batch + riders, key=lambda p: p.order)

    def _connection(self) -> sa.Connection:
        """The writer's connection, kept from batch to batch: taking one from the pool and giving it back
        (with its reset) for every batch was a fifth of the writer's time. One idle for IDLE_RECHECK
        seconds is given back, and one whose batch failed is dropped (the database may have restarted)."""
        now = time.monotonic()
        if self._conn is not None and now - self._last_used > IDLE_RECHECK:
            self._release_connection()
        if self._conn is None:
            self._conn = self.engine.connect()
        self._last_used = now
        return self._conn

    def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection is discarded by the pool anyway
                log.warning("event=writer_connection_close_failed")

    def _run_batch(self, batch: list[_Pending]) -> None:
        # Optimistic: every job in one transaction without savepoints (two statements fewer per job). If
        # a job fails, that transaction is rolled back and the batch runs again with a savepoint per job,
        # so that only the failing job is lost. Jobs only touch the database, so running them twice is
        # safe: the first run left nothing behind.
        if not self._attempt(batch, savepoints=False):
            self._attempt(batch, savepoints=True)
        self.batches += 1
        self.jobs += len(batch)
        for pending in batch:
            self._resolve(pending)

    def _attempt(self, batch: list[_Pending], *, savepoints: bool) -> bool:
        """Run the batch in one transaction; False (rolled back, nothing settled) when a job failed on the
        fast path."""
        for pending in batch:
            pending.result, pending.error = None, None
        began = False
        try:
            conn = self._connection()
            with self._turn(), conn.begin():
                began = True
                hooks: dict[tuple[int, str], Callable[[], None]] = {}
                deferred: dict[str, tuple[Callable[[sa.Connection, list[Any]], None], list[Any]]] = {}
                conn.info[_DEFERRED] = deferred
                try:
                    self._jobs(conn, batch, hooks, deferred, savepoints)
                finally:
                    # The connection outlives the batch: nobody may defer into it after this.
                    conn.info.pop(_DEFERRED, None)
                for flush, items in deferred.values():
                    if items:
                        flush(conn, items)
                for hook in hooks.values():
                    hook()  # raising here rolls the whole batch back: nothing is acknowledged
        except _JobFailed as failed:
            cause = failed.__cause__
            if isinstance(cause, sa.exc.DBAPIError) and cause.connection_invalidated:
                # The kept connection had died (the database restarted): nothing was committed; run the
                # batch again on a new connection rather than fail its jobs.
                self._release_connection()
                return False
            if len(batch) == 1:  # alone in its batch: the rollback was all a savepoint would have done
                batch[0].error = cause
                return True
            return False
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: nothing in the batch is durable
            self._release_connection()
            if not began and isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated and not savepoints:
                return False  # the kept connection had died before BEGIN: run the batch on a new one
            log.error("event=commit_failed jobs=%d error=%s", len(batch), type(exc).__name__)
            for pending in batch:
                pending.error = pending.error or exc
                pending.result = None
        return True

    @staticmethod
    def _jobs(conn: sa.Connection, batch: list[_Pending], hooks: dict[tuple[int, str], Callable[[], None]],
              deferred: dict[str, tuple[Callable[[sa.Connection, list[Any]], None], list[Any]]],
              savepoints: bool) -> None:
        for pending in batch:
            marks = {key: len(items) for key, (_, items) in deferred.items()}
            try:
                if savepoints:
                    with conn.begin_nested():
                        pending.result = pending.job(conn)
                else:
                    pending.result = pending.job(conn)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not sink the batch
                if not savepoints:
                    raise _JobFailed from exc
                pending.error = exc
                for key in list(deferred):  # what the failed job deferred goes with it
                    if key in marks:
                        del deferred[key][1][marks[key]:]
                    else:
                        del deferred[key]
                continue
            hook = pending.before_commit
            if hook is not None:  # bound methods are new objects each time: key on owner + name
                hooks.setdefault((id(getattr(hook, "__self__", hook)), getattr(hook, "__name__", "")), hook)

    @staticmethod
    def _resolve(pending: _Pending) -> None:
        if pending.done is not None:
            pending.done.set()
            return
        if pending.future is None or pending.loop is None:
            if pending.error is not None:
                log.error("event=background_write_failed error=%r", pending.error)
            return
        fut = pending.future

        def settle() -> None:
            if fut.cancelled():
                return
            if pending.error is not None:
                fut.set_exception(pending.error)
            else:
                fut.set_result(pending.result)

        try:
            pending.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            log.warning("event=write_result_dropped reason=loop_closed")
