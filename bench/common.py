"""What every side-by-side benchmark shares: the machine's description, medians and ratios of interleaved
rounds, and the result files (JSON and a short Markdown table in bench/results/).

Rules of the house (docs/standards.md): both systems run on 127.0.0.1 in the same run, the targets are
interleaved round-robin with the starting target rotated from round to round, the figure of a cell is the
median of its rounds, and a ratio is computed per round on adjacent runs, then its median is given. The
machine is described with each result; absolute rates mean something on that machine only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _first_line(command: Sequence[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children, in seconds (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and all its descendants (live ones, plus what each has reaped)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            parents[int(entry)] = int(stat[1])
    total = 0.0
    for pid in parents:
        p = pid
        while p not in (0, 1, root) and p in parents:
            p = parents[p]
        if p == root:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
    return total


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = None
    try:
        match = re.search(r"(?m)^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text())
        model = match.group(1) if match else None
    except OSError:
        pass
    mem = None
    try:
        match = re.search(r"(?m)^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
        mem = f"{int(match.group(1)) / 1024 / 1024:.1f} GiB" if match else None
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "openssl": _openssl_version(),
        "postfix": _first_line(["postconf", "-d", "-h", "mail_version"]),  # -d: no main.cf needed
        "load_average_at_start": os.getloadavg(),
    }


def _openssl_version() -> str:
    import ssl

    return ssl.OPENSSL_VERSION


@dataclass
class Cell:
    """One measured configuration of one target: a value per round."""

    target: str
    params: dict[str, Any]
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.values.get(key)
        return statistics.median(values) if values else None


def ratio_median(ours: Cell, reference: Cell, key: str, *, higher_is_better: bool = True) -> float | None:
    """Median over rounds of ours/reference (rate) or reference/ours (time): above 1 means ours is better."""
    pairs = list(zip(ours.values.get(key, []), reference.values.get(key, []), strict=False))
    ratios = [(a / b if higher_is_better else b / a) for a, b in pairs if a > 0 and b > 0]
    return statistics.median(ratios) if ratios else None


def rotated(targets: Sequence[str], round_number: int) -> list[str]:
    """The targets in the order of one round: the starting target rotates from round to round."""
    k = round_number % len(targets)
    return [*targets[k:], *targets[:k]]


def write_results(name: str, result: dict[str, Any], table: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """bench/results/<name>-<UTC time>.json and .md; returns both paths."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path = out_dir / f"{name}-{stamp}.json"
    md_path = out_dir / f"{name}-{stamp}.md"
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    m = result["machine"]
    header = (f"# {result['title']}\n\n{result['started']} · {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']}, "
              f"Linux {m['kernel']}, Python {m['python']}, {m['openssl']}"
              + (f", Postfix {m['postfix']}" if m.get("postfix") else "")
              + f"; load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.\n\n")
    md_path.write_text(header + table + "\n", encoding="utf-8")
    return json_path, md_path


def publish(name: str, result: dict[str, Any], table: list[str], out_dir: Path | None = None) -> int:
    """`write_results`, then the table and where it went on stdout; the exit status of a bench command."""
    json_path, md_path = write_results(name, result, "\n".join(table), out_dir)
    print("\n".join(table))
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def reference_postfix(server: Any, work: Path, pf_dir: Path) -> Any:
    """The Postfix of the SMTP comparisons, not started: domain postfix.bench, mailbox bench@postfix.bench,
    delivering to Maildir, with a server certificate from `server`'s development PKI (written under `work`)
    and `server`'s CA as the only one it trusts for client certificates (REFERENCE.md §7)."""
    from crypto.pki import DevPKI
    from mailserver.testing import free_port
    from mailserver.testing_postfix import PostfixPeer

    pki = DevPKI.create_or_load(server.state / "pki")
    issued = pki.issue_server(["mx.postfix.bench", "localhost"], ["127.0.0.1"], work / "postfix-cert",
                              "postfix", structure_id="399999999900017", organisation="Postfix reference")
    return PostfixPeer.create(pf_dir, domain="postfix.bench", hostname="mx.postfix.bench",
                              cert_file=issued.chain_path, key_file=issued.key_path,
                              ca_file=Path(server.ca_bundle), listen_port=free_port(),
                              mailboxes=["bench@postfix.bench"])


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"
