"""`caducee bench memory`: memory with idle TLS connections and under TLS connection churn, Caducée and Postfix.

Both servers run on 127.0.0.1 in the same run, with the same certificates (Caducée's development PKI);
Postfix is the reference of REFERENCE.md §7 (mandatory STARTTLS, a required client certificate), with
its process limit raised (`default_process_limit`) so that it can hold every idle connection.

Memory is read from /proc/PID/smaps_rollup (research/anchors2.md): for Caducée its one process (RSS and
PSS); for Postfix the sum over its master and every smtpd process (PSS is the fair figure: the RSS sum
counts the shared libraries once per process).

1. Idle: a baseline, then `--idle` connections (default 1,000), each doing EHLO, STARTTLS with the client
   certificate, EHLO, and staying idle, all held by one asyncio client process; memory is read again
   after `--settle` seconds. Per idle connection = (held − baseline) / connections.
2. Churn: each server is restarted (a fresh process, as in anchors2 §4.1), then `--clients` concurrent
   clients (default 50) each connect, STARTTLS, EHLO, QUIT over and over for `--seconds` (default 20);
   the server's memory is sampled every second; start / peak / end are reported, and the end again
   `--linger` seconds after the load stopped.

`--gc-every S` (a diagnosis aid, not a product option) makes the Caducée process run gc.collect() every S
seconds (a sitecustomize module on PYTHONPATH): the gap with a normal run is the memory held by closed
connections that only the cyclic garbage collector can free.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import fmt, machine, publish, reference_postfix, rotated

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


# -------------------------------------------------------------------- memory

def smaps(pid: int) -> dict[str, int] | None:
    """RSS, PSS and private (USS) of one process in KB, None if it is gone."""
    d: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                p = line.split()
                if p[0] in ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"):
                    d[p[0][:-1]] = int(p[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {"rss": d["Rss"], "pss": d["Pss"], "uss": d["Private_Clean"] + d["Private_Dirty"]}


def _comm_ppid(pid: int) -> tuple[str, int] | None:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return st[st.index("(") + 1:st.rindex(")")], int(st[st.rindex(")") + 2:].split()[1])


def postfix_pids(master: int) -> list[int]:
    """The master and every smtpd it started."""
    out = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cp = _comm_ppid(int(entry))
            if cp and cp[0] == "smtpd" and cp[1] == master:
                out.append(int(entry))
    return out


def snapshot(pids: list[int]) -> dict[str, int]:
    tot = {"procs": 0, "rss": 0, "pss": 0, "uss": 0}
    for pid in pids:
        m = smaps(pid)
        if m:
            tot["procs"] += 1
            for k in ("rss", "pss", "uss"):
                tot[k] += m[k]
    return tot


# -------------------------------------------------------------------- client

async def _reply(reader: Reader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def _cmd(reader: Reader, writer: Writer, command: bytes, expect: int) -> None:
    writer.write(command + b"\r\n")
    code, text = await _reply(reader)
    if code != expect:
        raise ConnectionError(f"{command!r}: {text!r}")


async def open_tls(host: str, port: int, ctx: ssl.SSLContext) -> tuple[Reader, Writer]:
    """Connect, EHLO, STARTTLS with the client certificate, EHLO: an idle TLS session."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        code, text = await _reply(reader)
        if code != 220:
            raise ConnectionError(f"banner {text!r}")
        await _cmd(reader, writer, b"EHLO loadgen.bench", 250)
        await _cmd(reader, writer, b"STARTTLS", 220)
        await writer.start_tls(ctx, server_hostname=host)
        await _cmd(reader, writer, b"EHLO loadgen.bench", 250)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def quit_and_close(reader: Reader, writer: Writer) -> None:
    try:
        await asyncio.wait_for(_cmd(reader, writer, b"QUIT", 221), 30)
    except (OSError, ConnectionError, TimeoutError):
        pass
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 10)
    except (OSError, ConnectionError, TimeoutError, ssl.SSLError):
        pass


async def idle_phase(host: str, port: int, ctx: ssl.SSLContext, count: int, parallel: int, settle: float,
                     pids: Callable[[], list[int]]) -> dict[str, Any]:
    before = snapshot(pids())
    sem = asyncio.Semaphore(parallel)
    conns: list[tuple[Reader, Writer]] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                conns.append(await asyncio.wait_for(open_tls(host, port, ctx), 60))
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    open_s = time.perf_counter() - t0
    await asyncio.sleep(settle)
    held = snapshot(pids())
    # Every connection still answers after the measurement (none was dropped as idle).
    await asyncio.gather(*(quit_and_close(r, w) for r, w in conns))
    n = len(conns)
    out: dict[str, Any] = {"connections": n, "errors": len(errors), "first_error": errors[0] if errors else None,
                           "open_s": open_s, "before": before, "held": held}
    for k in ("rss", "pss", "uss"):
        out[f"per_conn_{k}_kb"] = (held[k] - before[k]) / n if n else None
    return out


async def churn_phase(host: str, port: int, ctx: ssl.SSLContext, clients: int, seconds: float, linger: float,
                      pids: Callable[[], list[int]]) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    done = [0]
    errors: list[str] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at:
            try:
                r, w = await asyncio.wait_for(open_tls(host, port, ctx), 60)
                await quit_and_close(r, w)
                done[0] += 1
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)

    async def sampler() -> None:
        while True:
            s = snapshot(pids())
            samples.append({"t": round(time.perf_counter() - t0, 2), "connections": done[0], **s})
            await asyncio.sleep(1)

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(linger)
    sampling.cancel()
    after = snapshot(pids())
    load = [s for s in samples if s["t"] <= elapsed + 0.5]
    return {"connections": done[0], "per_s": done[0] / elapsed, "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": elapsed,
            "start": samples[0], "peak_rss": max(load, key=lambda s: s["rss"]),
            "peak_pss": max(load, key=lambda s: s["pss"]), "end": load[-1], "after_linger": after,
            "samples": samples}


# -------------------------------------------------------------------- targets

_GC_SITE = """\
import gc, threading, time
def _collect(every={every}):
    while True:
        time.sleep(every)
        gc.collect()
threading.Thread(target=_collect, daemon=True, name="bench-gc").start()
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caducee bench memory", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--idle", type=int, default=1000, help="idle TLS connections held (default 1000)")
    p.add_argument("--parallel", type=int, default=50, help="handshakes in flight while opening them (default 50)")
    p.add_argument("--settle", type=float, default=3, help="seconds between the last handshake and the reading")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients of the churn (default 50)")
    p.add_argument("--seconds", type=float, default=20, help="duration of the churn per server (default 20)")
    p.add_argument("--linger", type=float, default=3, help="seconds after the churn before the last reading")
    p.add_argument("--phases", default="idle,churn", help="idle and/or churn (default both)")
    p.add_argument("--only", choices=("caducee", "postfix"), help="one target alone")
    p.add_argument("--gc-every", type=float, default=None, metavar="S",
                   help="diagnosis: the Caducée process runs gc.collect() every S seconds")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    if any(x not in ("idle", "churn") for x in phases) or not phases:
        p.error("--phases takes idle,churn")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + args.clients + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < want:
        p.error(f"RLIMIT_NOFILE is {nofile} (hard limit {hard}); {want} descriptors are needed")

    from mailserver.testing import ServerProcess
    from mailserver.testing_postfix import postfix_workdir

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    desc = machine()
    results: dict[str, dict[str, Any]] = {}
    process_limit = args.idle + args.clients + 100
    with tempfile.TemporaryDirectory(prefix="caducee-bench-") as tmp, postfix_workdir() as pf_dir:
        if args.gc_every:
            site = Path(tmp) / "gcsite"
            site.mkdir()
            (site / "sitecustomize.py").write_text(_GC_SITE.format(every=args.gc_every))
            os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(site), os.environ.get("PYTHONPATH")) if x)
        server = ServerProcess.create(Path(tmp) / "state")
        ident = server.identity("PER", 0)
        client = ssl.create_default_context(cafile=server.ca_bundle)
        client.load_cert_chain(ident["cert"], ident["key"])
        postfix = reference_postfix(server, Path(tmp), pf_dir)
        # One smtpd process per connection: the default limit (100) would queue the rest in the backlog.
        main_cf = postfix.config_dir / "main.cf"
        main_cf.write_text(main_cf.read_text() + f"\n# caducee bench memory\ndefault_process_limit = "
                           f"{process_limit}\nsmtpd_client_connection_count_limit = 0\n")
        settled = time.time() - 10  # see testing_postfix._write
        os.utime(main_cf, (settled, settled))

        def caducee_pids() -> list[int]:
            return [server.proc.pid] if server.proc else []

        def pf_pids() -> list[int]:
            master = postfix.master_pid()
            return postfix_pids(master) if master else []

        def restart_caducee() -> None:
            server.stop()
            server.start()

        def restart_postfix() -> None:
            postfix.stop()
            postfix.start()

        targets: dict[str, tuple[int, Callable[[], list[int]], Callable[[], None]]] = {}
        if args.only != "postfix":
            targets["caducee"] = (server.port("submission"), caducee_pids, restart_caducee)
        if args.only != "caducee":
            targets["postfix"] = (postfix.listen_port, pf_pids, restart_postfix)
        names = list(targets)
        with server, postfix:
            time.sleep(2)
            for phase in phases:
                for name in rotated(names, phases.index(phase)):
                    port, pids, restart = targets[name]
                    if results.get(name):
                        restart()  # a fresh server for each phase
                        time.sleep(2)
                    if phase == "idle":
                        r = asyncio.run(idle_phase("127.0.0.1", port, client, args.idle, args.parallel,
                                                   args.settle, pids))
                        print(f"idle  {name:8} {r['connections']} connections in {r['open_s']:.1f} s "
                              f"({r['errors']} errors): held {r['held']['rss'] / 1024:.1f} MB RSS, "
                              f"{r['held']['pss'] / 1024:.1f} MB PSS in {r['held']['procs']} processes; per "
                              f"connection {r['per_conn_rss_kb']:.1f} KB RSS, {r['per_conn_pss_kb']:.1f} KB PSS",
                              file=sys.stderr, flush=True)
                    else:
                        r = asyncio.run(churn_phase("127.0.0.1", port, client, args.clients, args.seconds,
                                                    args.linger, pids))
                        print(f"churn {name:8} {r['connections']} connections ({r['per_s']:.0f}/s, {r['errors']} "
                              f"errors): RSS start {r['start']['rss'] / 1024:.1f} MB, peak "
                              f"{r['peak_rss']['rss'] / 1024:.1f} MB, end {r['end']['rss'] / 1024:.1f} MB, "
                              f"{args.linger:g} s later {r['after_linger']['rss'] / 1024:.1f} MB; PSS start "
                              f"{r['start']['pss'] / 1024:.1f}, peak {r['peak_pss']['pss'] / 1024:.1f}, end "
                              f"{r['end']['pss'] / 1024:.1f} MB", file=sys.stderr, flush=True)
                    results.setdefault(name, {})[phase] = r

    def mb(kb: float | None) -> str:
        return fmt(kb / 1024 if kb is not None else None, 1, " MB")

    table = []
    label = {"caducee": "Caducée (1 process)", "postfix": "Postfix (master + smtpd)"}
    if "idle" in phases:
        table += [f"## {args.idle:,} idle TLS connections (EHLO, STARTTLS with client certificate, EHLO)", "",
                  ("| server | connections | baseline RSS / PSS | held RSS / PSS | processes | "
                   "**per connection** RSS / PSS / private |"), "|---|---:|---:|---:|---:|---:|"]
        for name in names:
            r = results[name]["idle"]
            failed = f" ({r['errors']} failed)" if r["errors"] else ""
            table.append(f"| {label[name]} | {r['connections']:,}{failed} | "
                         f"{mb(r['before']['rss'])} / {mb(r['before']['pss'])} | {mb(r['held']['rss'])} / "
                         f"{mb(r['held']['pss'])} | {r['held']['procs']} | {fmt(r['per_conn_rss_kb'], 1)} / "
                         f"**{fmt(r['per_conn_pss_kb'], 1)}** / {fmt(r['per_conn_uss_kb'], 1)} KB |")
        if len(names) == 2:
            a, b = results["caducee"]["idle"]["per_conn_pss_kb"], results["postfix"]["idle"]["per_conn_pss_kb"]
            if a and b and a > 0:
                table += ["", f"Postfix ÷ Caducée per idle connection (PSS): {b / a:.1f}×."]
        table.append("")
    if "churn" in phases:
        table += [(f"## Churn: {args.clients} clients, connect + STARTTLS + EHLO + QUIT for {args.seconds:g} s "
                   "(fresh servers)"), "",
                  ("| server | connections (/s) | RSS start | RSS peak | RSS end | "
                   f"RSS {args.linger:g} s later | PSS start / peak / end |"), "|---|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            r = results[name]["churn"]
            table.append(f"| {label[name]} | {r['connections']:,} ({r['per_s']:.0f}/s) | {mb(r['start']['rss'])} | "
                         f"{mb(r['peak_rss']['rss'])} | {mb(r['end']['rss'])} | {mb(r['after_linger']['rss'])} | "
                         f"{mb(r['start']['pss'])} / {mb(r['peak_pss']['pss'])} / {mb(r['end']['pss'])} |")
        table.append("")
    table.append("Memory from /proc/PID/smaps_rollup; Postfix figures are sums over the master and its smtpd "
                 f"processes (default_process_limit = {process_limit}); the RSS sum counts shared libraries once "
                 "per process, PSS is the fair figure. One run, no rounds: memory figures barely vary "
                 "(anchors2.md)." + (f" Caducée ran with gc.collect() every {args.gc_every:g} s (diagnosis)."
                                     if args.gc_every else ""))
    result = {"title": "Memory: idle TLS connections and TLS connection churn, Caducée and Postfix",
              "started": started, "machine": desc, "load_average_at_end": os.getloadavg(),
              "parameters": vars(args) | {"out": str(args.out) if args.out else None,
                                          "postfix_default_process_limit": process_limit},
              "results": results}
    return publish("memory", result, table, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
