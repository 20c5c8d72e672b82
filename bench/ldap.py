"""`caducee bench ldap`: searches by mail and by name, Caducée's LDAPS listener side by side with OpenLDAP slapd.

Both servers hold the same published directory and run on 127.0.0.1 in the same run, over LDAPS with the same
certificate (from a development PKI), and are driven by the same load generator.

Setup: N practitioners are generated (bench/directory_import.py's activity file, about 1.8 lines each) and
imported into a fresh SQLite database, each given one PER mailbox (as bench/ldap_search.py does). The published
view of that database (`directory.ldap_view.iter_published`, what `caducee directory publish` pushes) is
written as LDIF and loaded offline with `slapadd -q` into a private slapd (`directory.testing_slapd`: the
schema of deploy/openldap, back_mdb, equality indexes on objectClass, mail, uid, cn and sn — `--slapd-sub`
adds substring indexes on cn and sn — no statistics log), which is then started; Caducée's listener runs in
a child process (its own interpreter: the clients must not share its GIL) on the SQLite database, with the
same limits as slapd's frontend (500 entries), and its entry cache (`--no-cache`: without it, every search
built from SQL).

Before measuring, a sample of searches of each kind is sent to both and their DN sets compared: the run
stops if any differs.

Searches (ldap3, T threads, one LDAPS connection each, opened before the clock starts, for a fixed time):
  mail  `(mail=ADDRESS)`, random existing addresses;
  sn    `(sn=ABC*)`, the first 3 letters of random surnames, client size limit 10;
  cn    `(cn=GIVEN S*)`, a random first name and the initial of a surname, client size limit 10.
For each round and each kind, both targets run one after the other (the first rotating); recorded per run:
searches/s, p50 and p99 latency seen by the client, and the server's CPU time per search. The client
(Python, ldap3) shares the machine with the server: REFERENCE.md §7 found it to be the limit against slapd.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import (
    Cell,
    cpu_seconds,
    fmt,
    machine,
    publish,
    ratio_median,
    rotated,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.utils.conv import escape_filter_chars

BASE = "dc=bench,dc=test"
ATTRIBUTES = ["cn", "mail"]
KINDS = ("mail", "sn", "cn")
LABELS = {"mail": "exact (mail=…)", "sn": "(sn=abc*), size limit 10", "cn": "(cn=Given S*), size limit 10"}
LIMITS = {"mail": 0, "sn": 10, "cn": 10}
LINES_PER_PERSON = 1.8  # bench/directory_import.generate: 1, 1, 2, 2 or 3 activities per practitioner


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Target:
    name: str
    port: int
    pid: Callable[[], int | None]


def connect(port: int, ca: Path) -> Any:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca))
    server = ldap3.Server("localhost", port, use_ssl=True, tls=tls, get_info=ldap3.NONE, connect_timeout=10)
    return ldap3.Connection(server, auto_bind=ldap3.AUTO_BIND_NO_TLS, raise_exceptions=False, receive_timeout=30)


def run_once(target: Target, ca: Path, filters: list[str], size_limit: int, threads: int, seconds: float,
             seed: int) -> dict[str, float]:
    """One run: `threads` connected clients search for `seconds`; searches/s, p50/p99 ms, server CPU µs/search."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    clock: dict[str, float] = {}

    def start_clock() -> None:
        clock["start"] = time.perf_counter()
        clock["stop"] = clock["start"] + seconds

    barrier = threading.Barrier(threads + 1, action=start_clock, timeout=60)

    def client(i: int) -> None:
        try:
            conn = connect(target.port, ca)
        except Exception as exc:  # noqa: BLE001 - reported after the run
            errors.append(f"connect: {type(exc).__name__}: {exc}")
            barrier.abort()
            return
        rng, mine = random.Random(seed * 1000 + i), latencies[i]
        try:
            barrier.wait()
            stop = clock["stop"]
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    break
                conn.search(BASE, rng.choice(filters), attributes=ATTRIBUTES, size_limit=size_limit)
                mine.append(time.perf_counter() - t0)
                if conn.result["result"] not in (0, 4):  # success, sizeLimitExceeded
                    errors.append(str(conn.result))
                    return
        except threading.BrokenBarrierError:
            return
        finally:
            conn.unbind()

    pid = target.pid()
    cpu0 = cpu_seconds(pid) if pid else None
    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - clock.get("start", time.perf_counter())
    if errors:
        raise RuntimeError(f"{target.name}: {len(errors)} errors, first: {errors[0]}")
    every = sorted(x for per in latencies for x in per)
    if not every:
        raise RuntimeError(f"{target.name}: no search completed")
    out = {"searches_per_s": len(every) / elapsed, "p50_ms": statistics.median(every) * 1000,
           "p99_ms": every[min(len(every) - 1, int(len(every) * 0.99))] * 1000}
    if cpu0 is not None and pid:
        out["cpu_us_per_search"] = (cpu_seconds(pid) - cpu0) / len(every) * 1e6
    return out


# -------------------- setup


def workload(url: str, seed: int) -> dict[str, list[str]]:
    """The filters of each kind, from random existing addresses and names of the directory."""
    from directory.schema import mailboxes, practitioners
    from mailserver.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            addresses = [r[0] for r in conn.execute(sa.select(mailboxes.c.address))]
            names = conn.execute(sa.select(practitioners.c.last_name, practitioners.c.first_names)).all()
    finally:
        engine.dispose()
    rng = random.Random(seed)
    addresses = rng.sample(addresses, min(5000, len(addresses)))
    people = rng.sample(names, min(2000, len(names)))
    esc = escape_filter_chars
    return {
        "mail": [f"(mail={esc(a)})" for a in addresses],
        "sn": [f"(sn={esc(last[:3])}*)" for last, _ in people],
        # a person's first name and the initial of their surname, as ldap_search.py does
        "cn": [f"(cn={esc(first.split()[0])} {esc(last[:1])}*)" for last, first in people],
    }


def export_ldif(url: str, path: Path) -> dict[str, int]:
    """The published view as LDIF, in iter_published's order (parents first); entry counts by container."""
    from directory import ldap_schema as ls
    from directory.ldap_view import iter_published
    from directory.testing_slapd import ldif_entry
    from mailserver.db import make_engine

    counts = dict.fromkeys(("structural", *ls.OUS), 0)
    engine = make_engine(url)
    try:
        with engine.connect() as conn, path.open("w", encoding="utf-8", newline="\n") as out:
            for entry in iter_published(conn, BASE):
                out.write(ldif_entry(entry.dn, entry.attributes))
                container = next((ou for ou in ls.OUS if entry.dn.endswith(f",ou={ou},{BASE}")), "structural")
                counts[container] += 1
    finally:
        engine.dispose()
    return counts


def dn_set(conn: Any, flt: str, size_limit: int) -> set[Any]:
    from directory.ldap_server import normalise_dn

    conn.search(BASE, flt, attributes=["1.1"], size_limit=size_limit)
    if conn.result["result"] not in (0, 4):
        raise RuntimeError(f"{flt}: {conn.result}")
    return {normalise_dn(e["dn"]) for e in conn.response if e.get("type") == "searchResEntry"}


def check_same(targets: dict[str, Target], ca: Path, filters: dict[str, list[str]], sample: int,
               seed: int) -> dict[str, Any]:
    """Send `sample` searches of each kind to both; raise when a DN set differs. Returns what was compared."""
    conns = {name: connect(t.port, ca) for name, t in targets.items()}
    rng = random.Random(seed)
    report: dict[str, Any] = {}
    try:
        for kind in KINDS:
            searches = entries = 0
            for flt in rng.sample(filters[kind], min(sample, len(filters[kind]))):
                found = {name: dn_set(conn, flt, LIMITS[kind]) for name, conn in conns.items()}
                a, b = found.values()
                if a != b:
                    raise RuntimeError(f"{flt}: caducee and slapd differ: {len(a)} and {len(b)} entries, "
                                       f"only caducee {sorted(a - b)[:3]}, only slapd {sorted(b - a)[:3]}")
                if not a:
                    raise RuntimeError(f"{flt}: no entry found")
                searches, entries = searches + 1, entries + len(a)
            report[kind] = {"searches": searches, "entries": entries}
    finally:
        for conn in conns.values():
            conn.unbind()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caducee bench ldap", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--people", type=int, default=100_000, help="practitioners, one PER mailbox each (default 100000)")
    p.add_argument("--threads", type=int, default=10, help="client threads, one connection each (default 10)")
    p.add_argument("--seconds", type=float, default=8, help="duration of one run (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--kinds", default=",".join(KINDS), help="mail,sn,cn (default all three)")
    p.add_argument("--check", type=int, default=100, help="searches of each kind compared before measuring (100)")
    p.add_argument("--warmup", type=float, default=1, help="unrecorded seconds per target and kind first (1)")
    p.add_argument("--slapd-sub", action="store_true", help="also index cn and sn for substrings in slapd")
    p.add_argument("--only", choices=("caducee", "slapd"), help="run one target alone (no check, no ratio)")
    p.add_argument("--no-cache", action="store_true",
                   help="run Caducée's listener without its entry cache (every search built from SQL)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in KINDS for k in kinds) or not kinds or args.people < 10 or args.threads < 1:
        p.error("--kinds takes mail,sn,cn; --people at least 10; --threads at least 1")

    from bench.ldap_search import build
    from crypto.pki import DevPKI
    from directory.testing_slapd import Slapd, SlapdTls

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    desc = machine()
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="caducee-bench-ldap-") as tmp:
        folder = Path(tmp)
        t0 = setup_start = time.perf_counter()
        say(f"generating and importing {args.people:,} practitioners …")
        with contextlib.redirect_stdout(sys.stderr):
            url = build(folder, max(1, round(args.people * LINES_PER_PERSON)))
        setup["generate_import_s"] = time.perf_counter() - t0
        filters = workload(url, seed=11)

        t0 = time.perf_counter()
        ldif = folder / "published.ldif"
        counts = export_ldif(url, ldif)
        setup["ldif_s"] = time.perf_counter() - t0
        say(f"published view: {sum(counts.values()):,} entries ({', '.join(f'{v:,} {k}' for k, v in counts.items())}),"
            f" LDIF {ldif.stat().st_size / 1e6:.0f} MB in {setup['ldif_s']:.0f} s")

        pki = DevPKI.create_or_load(folder / "pki")
        tls = SlapdTls.issue(pki, folder / "tls")
        index = (("olcDbIndex", "cn,sn eq,sub" if args.slapd_sub else "cn,sn eq"),)
        slapd = Slapd.create(folder / "slapd", base=BASE, tls=tls, loglevel="0", mdb_options=index)
        t0 = time.perf_counter()
        if args.only != "caducee":
            slapd.load(ldif)
            setup["slapadd_s"] = time.perf_counter() - t0
            say(f"slapadd -q: {setup['slapadd_s']:.0f} s")
        ldif.unlink()

        # Caducée's listener: bench/ldap_search.py's child, on the same certificate as slapd
        (folder / "server.pem").write_bytes(tls.cert_file.read_bytes())
        (folder / "server.key").write_bytes(tls.key_file.read_bytes())
        child = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ldap_search.py")), "--serve", url,
                                  str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=Path(__file__).resolve().parents[1],
                                 env=os.environ | ({"CADUCEE_BENCH_LDAP_CACHE_TTL": "0"} if args.no_cache else {}))
        cells: dict[tuple[str, str], Cell] = {}
        checked: dict[str, Any] = {}
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.strip():
                raise RuntimeError(f"Caducée's listener did not start (exit code {child.wait(10)})")
            targets: dict[str, Target] = {}
            with contextlib.ExitStack() as stack:
                if args.only != "slapd":
                    targets["caducee"] = Target("caducee", int(line), lambda: child.pid)
                if args.only != "caducee":
                    stack.enter_context(slapd)
                    targets["slapd"] = Target("slapd", slapd.ldaps_port or 0,
                                              lambda: slapd.proc.pid if slapd.proc else None)
                ca = tls.ca_file
                if len(targets) == 2 and args.check:
                    t0 = time.perf_counter()
                    checked = check_same(targets, ca, filters, args.check, seed=5)
                    compared = ", ".join(f"{v['searches']} {k}" for k, v in checked.items())
                    setup["check_s"] = time.perf_counter() - t0
                    say(f"same DNs on both for {compared} searches ({setup['check_s']:.0f} s)")
                setup["total_before_measuring_s"] = time.perf_counter() - setup_start
                names = list(targets)
                for kind in kinds:
                    for name in names:
                        if args.warmup > 0:
                            run_once(targets[name], ca, filters[kind], LIMITS[kind], args.threads, args.warmup, 0)
                total, done = args.rounds * len(kinds) * len(names), 0
                for r in range(args.rounds):
                    for kind in kinds:
                        for name in rotated(names, r):
                            figures = run_once(targets[name], ca, filters[kind], LIMITS[kind], args.threads,
                                               args.seconds, r + 1)
                            cells.setdefault((name, kind), Cell(name, {"kind": kind})).add(**figures)
                            done += 1
                            say(f"[{done}/{total}] round {r + 1} {kind:4} {name:7} "
                                f"{figures['searches_per_s']:7,.0f} searches/s, p50 {figures['p50_ms']:.2f} ms, "
                                f"p99 {figures['p99_ms']:.2f} ms"
                                + (f", {figures['cpu_us_per_search']:.0f} µs CPU/search"
                                   if "cpu_us_per_search" in figures else ""))
        finally:
            assert child.stdin is not None
            child.stdin.close()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            shutil.rmtree(folder / "slapd", ignore_errors=True)

    rows: list[dict[str, Any]] = []
    table = [("| search | Caducée searches/s | slapd searches/s | ratio | Caducée p50 / p99 ms | slapd p50 / p99 ms | "
              "Caducée CPU µs/search | slapd CPU µs/search |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in kinds:
        ours, ref = cells.get(("caducee", kind)), cells.get(("slapd", kind))
        ratio = ratio_median(ours, ref, "searches_per_s") if ours and ref else None
        rows.append({"kind": kind, "filter": LABELS[kind], "caducee": ours.values if ours else None,
                     "slapd": ref.values if ref else None, "rate_ratio": ratio})

        def med(cell: Cell | None, key: str) -> float | None:
            return cell.median(key) if cell else None

        table.append(
            f"| {LABELS[kind]} | {fmt(med(ours, 'searches_per_s'))} | {fmt(med(ref, 'searches_per_s'))} | "
            f"{fmt(ratio, 2, '×')} | {fmt(med(ours, 'p50_ms'), 2)} / {fmt(med(ours, 'p99_ms'), 2)} | "
            f"{fmt(med(ref, 'p50_ms'), 2)} / {fmt(med(ref, 'p99_ms'), 2)} | "
            f"{fmt(med(ours, 'cpu_us_per_search'))} | {fmt(med(ref, 'cpu_us_per_search'))} |")
    entries = sum(counts.values())
    table.append("")
    table.append(
        f"{entries:,} published entries ({counts.get('people', 0):,} practitioners, "
        f"{counts.get('organisations', 0):,} organisations, {counts.get('mailboxes', 0):,} mailboxes, one per "
        f"practitioner; --people {args.people:,}), the same in both (slapd loaded by slapadd, equality indexes "
        f"on mail, uid, cn, sn{', substring indexes on cn, sn' if args.slapd_sub else ''}); Caducée "
        f"{'without' if args.no_cache else 'with'} its entry cache. {args.threads} ldap3 "
        f"threads over LDAPS, {args.seconds:g} s per run, medians of {args.rounds} interleaved rounds; ratios are "
        "Caducée/slapd per round (above 1: Caducée faster), then their median. Latency as seen by the client; "
        "CPU time of the server process.")
    table.append("")
    table.append("Setup: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in setup.items())
                 + ".")
    result = {"title": "LDAP searches over LDAPS: Caducée's listener and OpenLDAP slapd", "started": started,
              "machine": desc | {"slapd": _slapd_version()}, "load_average_at_end": os.getloadavg(),
              "parameters": vars(args) | {"out": str(args.out) if args.out else None},
              "directory": counts | {"entries": entries}, "setup_seconds": setup, "checked": checked, "rows": rows}
    return publish("ldap", result, table, args.out)


def _slapd_version() -> str | None:
    from directory.testing_slapd import SLAPD

    try:
        done = subprocess.run([SLAPD, "-VV"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else None


if __name__ == "__main__":
    raise SystemExit(main())
