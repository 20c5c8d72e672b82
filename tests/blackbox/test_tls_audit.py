"""TLS audit of every listener with testssl.sh (Debian package `testssl.sh`, 3.0.x), the tool an auditor runs.

One `caducee serve` process; testssl runs against each of its TLS listeners, three at a time
($CADUCEE_TESTSSL_JOBS): STARTTLS for SMTP submission and relay, STARTTLS for IMAP, implicit TLS for the
others (submissions, imaps, ldaps, admin). Every listener of `mailserver.testing.LISTENERS` is a test; one
the server does not log as listening fails (a listener that is not there cannot be audited). The policy asserted is the one
`crypto/tls.py` sets (RFC 8446, RFC 5246, RFC 8996; ANSSI TLS guide): TLS 1.2 and 1.3 only, ECDHE with AEAD
suites only, key exchange groups X25519/P-256/P-384, the server's suite order, no known vulnerability.
The certificate chain of the development PKI is not publicly trusted, so chain trust, revocation pointers
and validity period are reported but not asserted; key size and signature algorithm are.

Each test prints a compact summary of its report (shown by pytest on failure), records it as a junit
property, and leaves the full JSON and text reports in the pytest temporary folder, or in the folder named
by $CADUCEE_TESTSSL_REPORTS (CI keeps it as an artefact).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from crypto.tls import TLS12_CIPHERS, TLS13_CIPHERSUITES, TLS_GROUPS
from mailserver.testing import LISTENERS, ServerProcess, wait_for

TESTSSL = "testssl"  # /usr/bin/testssl from the Debian package testssl.sh (deploy/install-debian-packages test)

# How testssl reaches TLS on each listener: a STARTTLS protocol, or None for implicit TLS (RFC 8314).
STARTTLS: dict[str, str | None] = {
    "relay": "smtp",  # RFC 3207, between operators
    "submission": "smtp",  # RFC 3207
    "submissions": None,
    "imap": "imap",  # RFC 3501 §6.2.1
    "imaps": None,
    "ldaps": None,
    "admin": None,  # HTTPS
}

# -p protocols, -s cipher categories, -f forward secrecy and groups, -P server order, -S certificate,
# -U every vulnerability check, -e every one of testssl's 370 suites by raw ClientHello (not only those the
# local OpenSSL knows: --fast would fall back to OpenSSL). No client simulation (-c), no HTTP headers (-h).
CHECKS = ("-p", "-s", "-f", "-P", "-S", "-U", "-e")
OPTIONS = ("--quiet", "--color", "0", "--warnings", "off", "--nodns", "none", "--sneaky",
           "--connect-timeout", "10", "--openssl-timeout", "20")
SCAN_TIMEOUT = 600  # seconds for one scan (about 30 s alone on an idle 2-core machine)
JOBS = int(os.environ.get("CADUCEE_TESTSSL_JOBS", "3"))  # scans at once
REPORT_DIR_VARIABLE = "CADUCEE_TESTSSL_REPORTS"  # a folder that keeps the reports (CI artefacts); default: tmp
LISTEN_WAIT = 10  # seconds a listener may take after `event=ready` to log `event=listening`

OFFERED_PROTOCOLS = ("TLS1_2", "TLS1_3")
REFUSED_PROTOCOLS = ("SSLv2", "SSLv3", "TLS1", "TLS1_1")
# testssl cipher categories: everything but AEAD must be absent (AVERAGE is "obsolete CBC").
REFUSED_CATEGORIES = ("NULL", "aNULL", "EXPORT", "LOW", "3DES_IDEA", "AVERAGE")
VULNERABILITIES = ("heartbleed", "CCS", "ROBOT", "secure_renego", "secure_client_renego", "CRIME_TLS",
                   "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN", "LOGJAM", "BEAST", "LUCKY13",
                   "RC4")
HTTP_ONLY_VULNERABILITIES = ("ticketbleed", "BREACH")  # run by testssl only when it detects HTTP
ALLOWED_SUITES = frozenset(TLS12_CIPHERS) | frozenset(TLS13_CIPHERSUITES)
GROUP_NAMES = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1", "X448": "X448",
               "P-521": "secp521r1"}  # crypto.tls names → testssl (OpenSSL) names
ALLOWED_CURVES = frozenset(GROUP_NAMES[g] for g in TLS_GROUPS.split(":"))
# Sections where a WARN means that a check did not complete: a check that did not run is not a pass.
STRICT_SECTIONS = ("protocols", "ciphers", "pfs", "serverPreferences", "vulnerabilities", "cipherTests")
FAILING_SEVERITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
LISTENING = re.compile(r"event=listening protocol=(\S+) address=(\S+)")


@dataclass(frozen=True)
class Finding:
    section: str
    id: str
    severity: str
    text: str

    @property
    def key(self) -> str:
        """The id without testssl's ` <cert#N>` suffix (several server certificates)."""
        return self.id.split(" ")[0]


@dataclass
class Audit:
    """One finished testssl scan."""

    listener: str
    address: str
    starttls: str | None
    json_path: Path
    log_path: Path
    seconds: float
    returncode: int | None  # None: killed after SCAN_TIMEOUT
    findings: list[Finding] = field(default_factory=list)
    stderr: str = ""

    def get(self, key: str) -> list[Finding]:
        return [f for f in self.findings if f.key == key]

    def section(self, name: str) -> list[Finding]:
        return [f for f in self.findings if f.section == name]


def _read_findings(path: Path) -> list[Finding]:
    """Flatten testssl's --jsonfile-pretty document: every list of {id, severity, finding} with its section."""
    doc = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    found: list[Finding] = []

    def walk(section: str, value: Any) -> None:
        if isinstance(value, dict):
            if "id" in value and "severity" in value:
                found.append(Finding(section, str(value["id"]), str(value["severity"]),
                                     str(value.get("finding", ""))))
            else:
                for key, item in value.items():
                    walk(key, item)
        elif isinstance(value, list):
            for item in value:
                walk(section, item)

    walk("", doc)
    return found


class Audits:
    """The scans of every listening TLS listener, JOBS at a time (wall time well under the sum of the scans;
    all at once would starve a 2-core runner and turn slow handshakes into failed checks)."""

    def __init__(self, addresses: dict[str, str], accepting: list[str], folder: Path, server_log: list[str]) -> None:
        self.addresses = addresses
        self.server_log = server_log
        self.folder = folder
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=JOBS, thread_name_prefix="testssl")
        self._futures: dict[str, Future[Audit]] = {
            name: self._pool.submit(self._scan, name, addresses[name]) for name in accepting}

    def __contains__(self, listener: str) -> bool:
        return listener in self._futures

    def result(self, listener: str) -> Audit:
        return self._futures[listener].result()

    def close(self) -> None:
        self._closing = True
        for future in self._futures.values():
            future.cancel()
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                proc.kill()
        self._pool.shutdown(wait=True)

    def _scan(self, listener: str, address: str) -> Audit:
        host, port = address.rsplit(":", 1)
        starttls = STARTTLS[listener]
        json_path, log_path = self.folder / f"{listener}.json", self.folder / f"{listener}.txt"
        for old in (json_path, log_path):
            old.unlink(missing_ok=True)  # testssl refuses to overwrite a report
        cmd = [TESTSSL, *OPTIONS, "--ip", host, *CHECKS]
        if starttls is not None:
            cmd += ["--starttls", starttls]
        cmd += ["--jsonfile-pretty", str(json_path), "--logfile", str(log_path), f"{host}:{port}"]
        # A clean environment: testssl reads tuning variables (FAST, SSL_NATIVE, …) from it.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.folder), "LANG": "C.UTF-8",
               "TMPDIR": str(self.folder), "TERM": "dumb"}
        started = time.monotonic()
        if self._closing:
            raise RuntimeError("the audit was stopped")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=self.folder)
        self._procs[listener] = proc
        try:
            _, err = proc.communicate(timeout=SCAN_TIMEOUT)
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            returncode = None
        findings = _read_findings(json_path) if json_path.exists() else []
        return Audit(listener, address, starttls, json_path, log_path, time.monotonic() - started, returncode,
                     findings, err.decode("utf-8", "replace"))


def _listening(server: ServerProcess) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in list(server.log) if (m := LISTENING.search(line))}


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def audited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess.create(tmp_path_factory.mktemp("tls-audit-state")) as server:
        yield server


@pytest.fixture(scope="module")
def audits(audited_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audits]:
    """Every listening TLS listener under testssl, JOBS scans at a time."""
    if shutil.which(TESTSSL) is None:
        pytest.fail("the TLS audit needs testssl (Debian package testssl.sh: sh deploy/install-debian-packages test)")
    kept = os.environ.get(REPORT_DIR_VARIABLE)
    folder = Path(kept) if kept else tmp_path_factory.mktemp("testssl")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        wait_for(lambda: set(STARTTLS) <= set(_listening(audited_server)), timeout=LISTEN_WAIT)
    except TimeoutError:
        pass  # the tests of the missing listeners fail with the server log
    addresses = _listening(audited_server)
    accepting = [name for name in addresses if name in STARTTLS and _accepts(addresses[name])]
    audits = Audits(addresses, accepting, folder, audited_server.log)
    try:
        yield audits
    finally:
        audits.close()


def _summary(audit: Audit) -> str:
    def value(key: str) -> str:
        return "; ".join(f.text for f in audit.get(key)) or "-"

    suites = [f.text.split()[1] for f in audit.section("cipherTests") if len(f.text.split()) > 1]
    vulns = [f for f in audit.section("vulnerabilities") if f.key in VULNERABILITIES + HTTP_ONLY_VULNERABILITIES]
    vulns_ok = sum(1 for f in vulns if f.severity in ("OK", "INFO"))
    mode = f"STARTTLS {audit.starttls}" if audit.starttls else "implicit TLS"
    lines = [
        (f"testssl {audit.listener} {audit.address} ({mode}): {audit.seconds:.0f} s, exit {audit.returncode}, "
         f"{len(audit.findings)} findings"),
        f"  report {audit.json_path} (text: {audit.log_path})",
        "  protocols: " + ", ".join(f"{p} {value(p)}" for p in REFUSED_PROTOCOLS + OFFERED_PROTOCOLS),
        "  categories: " + ", ".join(f"{c} {value('cipherlist_' + c)}" for c in REFUSED_CATEGORIES + ("STRONG",)),
        f"  suites offered: {' '.join(suites) or '-'}",
        f"  groups: {value('PFS_ECDHE_curves')}; order: {value('cipher_order')}",
        f"  certificate: {value('cert_keySize')}, {value('cert_signatureAlgorithm')}",
        f"  vulnerability checks: {vulns_ok}/{len(vulns)} OK",
    ]
    others = [f for f in audit.findings if f.severity not in ("OK", "INFO")]
    for f in others:
        lines.append(f"  {f.severity:8} {f.section}/{f.id}: {f.text[:120]}")
    return "\n".join(lines)


def _problems(audit: Audit) -> list[str]:
    problems: list[str] = []
    if audit.returncode is None:
        return [f"testssl did not finish in {SCAN_TIMEOUT} s"]
    if not audit.findings:
        return [f"no JSON report (exit {audit.returncode}): {audit.stderr[-2000:]}"]
    problems += [f"testssl could not scan: {f.id} {f.text}" for f in audit.findings if f.severity == "FATAL"]

    def one(key: str) -> Finding | None:
        got = audit.get(key)
        if not got:
            problems.append(f"{key}: not in the report")
            return None
        return got[0]

    for p in REFUSED_PROTOCOLS:
        if (f := one(p)) is not None and not f.text.startswith("not offered"):
            problems.append(f"protocol {p}: {f.text} (only TLS 1.2 and 1.3 allowed)")
    for p in OFFERED_PROTOCOLS:
        if (f := one(p)) is not None and not f.text.startswith("offered"):
            problems.append(f"protocol {p}: {f.text} (must be offered)")
    for c in REFUSED_CATEGORIES:
        if (f := one("cipherlist_" + c)) is not None and f.text != "not offered":
            problems.append(f"cipher category {c}: {f.text} (AEAD only)")
    if (f := one("cipherlist_STRONG")) is not None and f.text != "offered":
        problems.append(f"AEAD suites: {f.text}")

    suites = {f.text.split()[1] for f in audit.section("cipherTests") if len(f.text.split()) > 1}
    if not suites:
        problems.append("cipher enumeration (-e) found no suite")
    if suites - ALLOWED_SUITES:
        problems.append(f"suites outside crypto.tls's profile: {sorted(suites - ALLOWED_SUITES)}")
    if (f := one("PFS")) is not None and f.text != "offered":
        problems.append(f"forward secrecy: {f.text}")
    if (f := one("PFS_ECDHE_curves")) is not None and set(f.text.split()) - ALLOWED_CURVES:
        problems.append(f"key exchange groups outside {sorted(ALLOWED_CURVES)}: {f.text}")
    problems += [f"finite-field DH offered: {f.id} {f.text}" for f in audit.findings if f.key.startswith("DH_groups")]
    if (f := one("cipher_order")) is not None and f.text != "server":
        problems.append(f"cipher order: {f.text} (the server's order must win)")

    for v in VULNERABILITIES:
        one(v)
    for f in audit.section("vulnerabilities"):
        if f.severity in FAILING_SEVERITIES or re.search(r"(?<!not )vulnerable", f.text, re.IGNORECASE):
            problems.append(f"vulnerability {f.id}: {f.severity} {f.text}")
    for f in audit.findings:
        if f.section in STRICT_SECTIONS and f.severity == "WARN":
            problems.append(f"check did not complete: {f.section}/{f.id}: {f.text}")
        if f.section in ("protocols", "ciphers", "pfs", "cipherTests") and f.severity in FAILING_SEVERITIES:
            problems.append(f"{f.section}/{f.id}: {f.severity} {f.text}")

    # The certificate: not its (dev PKI) chain, but its key and signature.
    for f in audit.get("cert_keySize") or [Finding("serverDefaults", "cert_keySize", "", "missing")]:
        m = re.match(r"(RSA|EC|ECDSA)\s+(\d+)\s+bits", f.text)
        if m is None or int(m.group(2)) < (2048 if m.group(1) == "RSA" else 256):
            problems.append(f"certificate key: {f.text} (RSA ≥ 2048 or EC ≥ 256)")
    for f in audit.get("cert_signatureAlgorithm") or [Finding("serverDefaults", "cert_signatureAlgorithm", "", "")]:
        if not f.text or re.search(r"\b(SHA-?1|MD[245])\b", f.text, re.IGNORECASE):
            problems.append(f"certificate signature: {f.text or 'missing'} (no SHA-1, no MD5)")
    return problems


def test_every_listener_is_audited() -> None:
    assert set(STARTTLS) == set(LISTENERS), "a listener of mailserver.testing.LISTENERS has no testssl mode"


@pytest.mark.parametrize("listener", [name for name in LISTENERS if name in STARTTLS])
def test_testssl_finds_no_weakness(listener: str, audits: Audits, record_property: Any) -> None:
    address = audits.addresses.get(listener)
    assert address is not None, (
        f"{listener}: the server logged no `event=listening protocol={listener}` within {LISTEN_WAIT} s of "
        "starting; a listener that does not listen cannot be audited:\n" + "\n".join(audits.server_log[-20:]))
    assert listener in audits, f"{listener}: logged as listening on {address} but refuses TCP connections"
    audit = audits.result(listener)
    summary = _summary(audit)
    print(summary)
    record_property("testssl_report", str(audit.json_path))
    record_property("testssl_summary", summary)
    problems = _problems(audit)
    assert not problems, f"testssl on {listener}:\n  " + "\n  ".join(problems) + "\n\n" + summary
