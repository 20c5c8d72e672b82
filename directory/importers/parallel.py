"""Parse a large national file on two cores: the second half of the lines in a worker process.

Parsing is Python (one core, the GIL), so the import of a big file reads its first half in the calling
process, straight into the staging tables, while a spawned worker reads the second half into the same
staging tables of a scratch SQLite file. The worker's rows are then merged into the import's staging
tables (`merge_into`): SQLite attaches the scratch file and copies in one statement per table;
PostgreSQL receives them through COPY. Line numbers stay those of the file: the worker starts at the
number of the first line of its half, found by counting the newlines before it.

Nothing here touches the directory: the set-based apply runs afterwards, on the merged staging tables.

The worker is started with the "spawn" method (a fresh interpreter, never a fork of a process that may
hold threads, locks and database connections). As always with spawn, a script that imports files must
keep its top-level code under `if __name__ == "__main__":`; `python -m caducee` and the `caducee`
command do.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from directory.importers import staging
from directory.importers.formats import FileKind, parse_header
from directory.importers.parsers import Report

# Below this size, a second process costs more (start-up, merge) than it saves.
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
_COUNT_BLOCK = 16 * 1024 * 1024
_SCRATCH_SCHEMA = "caducee_part"


@dataclass(frozen=True)
class Half:
    """The second half of a file's data lines: byte offsets and the number of its first line."""

    start: int
    end: int
    first_line: int


@dataclass
class PartResult:
    """What the worker read: data lines and its report of rejected lines and warnings."""

    lines: int
    report: Report


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def second_half(path: Path, body_start: int, size: int, *, force: bool = False) -> Half | None:
    """Where the second half of the data lines starts (at a line start), or None for a small file or a
    single core (unless `force`)."""
    if not force and (size - body_start < PARALLEL_MIN_BYTES or cores() < 2):
        return None
    with open(path, "rb") as fh:
        fh.seek(body_start + (size - body_start) // 2)
        fh.readline()  # to the start of the next line
        start = fh.tell()
        if start >= size:
            return None
        fh.seek(body_start)
        newlines, position = 0, body_start
        while position < start:
            block = fh.read(min(_COUNT_BLOCK, start - position))
            newlines += block.count(b"\n")
            position += len(block)
    return Half(start, size, 2 + newlines)  # the header is line 1


def start_worker(path: Path, half: Half, kind: FileKind, header_line: str, local_domains: frozenset[str],
                 scratch: Path, batch_size: int) -> tuple[multiprocessing.process.BaseProcess, Pipe, Any]:
    """Spawn the worker (a fresh interpreter: nothing of this process, its threads or connections, is
    inherited). Returns the process, the pipe its result comes through, and its progress in bytes."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    progress = context.Value("q", 0, lock=False)
    process = context.Process(
        target=_worker, name="directory-import-parser", daemon=True,
        args=(str(path), half, kind.value, header_line, sorted(local_domains), str(scratch), batch_size, sender,
              progress),
    )
    process.start()
    sender.close()
    return process, receiver, progress


def wait(process: multiprocessing.process.BaseProcess, receiver: Pipe,
         while_waiting: Callable[[], None]) -> PartResult:
    """The worker's result (calling `while_waiting` a few times a second until it comes); raises
    RuntimeError with its traceback if the worker failed."""
    try:
        while not receiver.poll(0.25):
            while_waiting()
        outcome = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the parsing worker stopped without a result (exit code {process.exitcode})") from None
    finally:
        receiver.close()
    process.join()
    if isinstance(outcome, PartResult):
        return outcome
    raise RuntimeError(f"the parsing worker failed:\n{outcome}")


def stop(process: multiprocessing.process.BaseProcess) -> None:
    """End a worker that is no longer wanted (the import failed)."""
    if process.is_alive():
        process.terminate()
    process.join()


def _scratch_ddl(table: sa.Table) -> str:
    ddl = str(sa.schema.CreateTable(table).compile(dialect=sqlite_dialect.dialect()))
    return ddl.replace("CREATE TEMPORARY TABLE", "CREATE TABLE", 1)


def _worker(path: str, half: Half, kind_value: str, header_line: str, local_domains: list[str], scratch: str,
            batch_size: int, sender: Pipe, progress: Any) -> None:
    """Worker process: parse `half` of the file into staging tables of the scratch SQLite file."""
    from directory.importers import runner  # in the worker: after spawn, nothing is imported yet

    try:
        header = parse_header(header_line, FileKind(kind_value))
        tables = runner.staging_tables(header.kind)
        db = sqlite3.connect(scratch, isolation_level=None)
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        for table in tables:
            db.execute(_scratch_ddl(table))
        engine = sa.create_engine("sqlite://", creator=lambda: db, poolclass=sa.pool.StaticPool)
        report = Report()
        with engine.connect() as conn, open(path, "rb") as fh:
            conn.exec_driver_sql("BEGIN")
            loaders = {t.name: staging.BulkLoader(conn, t, batch_size) for t in tables}
            parser = runner.make_parser(header, report, loaders, frozenset(local_domains))
            fh.seek(half.start)

            def tell(_phase: str, done: int, _lines: int) -> None:
                progress.value = done - half.start

            lines, _ = runner.read_lines(fh, header.width, parser, report, half.start, tell,
                                         first_line=half.first_line, end=half.end)
            parser.finish()
            conn.exec_driver_sql("COMMIT")
        db.close()
        sender.send(PartResult(lines, report))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        sender.send(traceback.format_exc())
    finally:
        sender.close()


def merge_into(conn: sa.Connection, scratch: Path, tables: Sequence[sa.Table], batch_size: int) -> None:
    """Append the worker's staging rows to the import's staging tables, outside any transaction of
    `conn` (SQLite attaches the scratch file, which it cannot do inside one)."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.execute(f"ATTACH DATABASE ? AS {_SCRATCH_SCHEMA}", (str(scratch),))
        try:
            with conn.begin():
                preparer = conn.dialect.identifier_preparer
                for table in tables:
                    name = preparer.quote(table.name)
                    columns = ", ".join(preparer.quote(c.name) for c in staging.loaded_columns(table))
                    conn.exec_driver_sql(f"INSERT INTO temp.{name} ({columns}) "
                                         f"SELECT {columns} FROM {_SCRATCH_SCHEMA}.{name}")
        finally:
            driver.execute(f"DETACH DATABASE {_SCRATCH_SCHEMA}")
        return
    source = sqlite3.connect(str(scratch))
    try:
        with conn.begin():
            for table in tables:
                loader = staging.BulkLoader(conn, table, batch_size)
                columns = ", ".join(f'"{c.name}"' for c in loader.columns)
                cursor = source.execute(f'SELECT {columns} FROM "{table.name}"')
                while rows := cursor.fetchmany(batch_size):
                    loader.rows.extend(rows)
                    loader.flush()
    finally:
        source.close()
