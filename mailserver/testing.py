"""Test helpers shipped with the package: a real `caducee serve` process on free 127.0.0.1 ports, with a
fresh state folder (configuration, development PKI, demo identities).

    with ServerProcess.create(tmp_path) as server:
        server.port("submissions"); server.identity("PER", 0)["cert"]
"""

from __future__ import annotations

import abc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import imaplib
    import smtplib
    import ssl

LISTENERS = ("relay", "submission", "submissions", "imap", "imaps", "ldaps", "admin")
DEFAULT_PORTS = {"relay": 2525, "submission": 5587, "submissions": 5465, "imap": 1143, "imaps": 1993,
                 "ldaps": 6636, "admin": 8025}


_TAKEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free 127.0.0.1 port for a listener started later, outside the kernel's ephemeral range.

    A port the kernel chose (bind to port 0) is in the ephemeral range: between this call and the server's
    bind, any outgoing connection of the machine may take it as its source port ("Address already in use"
    at start, seen under load). Ports below that range are never given to outgoing connections; they are
    drawn at random and not handed out twice by this process.
    """
    import random

    low, _ = _ephemeral_range()
    first = 10000 if low > 12000 else 1024
    candidates = list(range(first, low))
    random.shuffle(candidates)
    for port in candidates:
        if port in _TAKEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the range is exhausted: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def caducee_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "caducee", *args]


def init_state(state: Path, *, domain: str = "caducee.localhost", ports: dict[str, int] | None = None,
               hostname: str = "localhost", organisation: str | None = None, structure_id: str | None = None,
               pki_from: Path | None = None, relay: dict[str, object] | None = None,
               next_hops: dict[str, int] | None = None) -> dict[str, int]:
    """Write a configuration on free ports and run `caducee init --demo`. Returns the ports.

    `pki_from` copies another state folder's PKI first, so that several nodes (operators) share one
    trust anchor; `relay` sets keys of [relay]; `next_hops` routes domains to local relay ports.
    """
    import shutil

    from caducee.config import sample

    ports = {name: free_port() for name in LISTENERS} | (ports or {})
    state.mkdir(parents=True, exist_ok=True)
    if pki_from is not None and not (state / "pki").exists():
        shutil.copytree(pki_from / "pki", state / "pki", ignore=shutil.ignore_patterns("server"))
    text = sample(domain, hostname)
    for name, port in ports.items():
        default = DEFAULT_PORTS[name]
        text = text.replace(f'{name} = "127.0.0.1:{default}"', f'{name} = "127.0.0.1:{port}"')
    if organisation is not None:
        text = re.sub(r'(?m)^organisation = .*$', f'organisation = "{organisation}"', text)
    if structure_id is not None:
        text = re.sub(r'(?m)^structure_id = .*$', f'structure_id = "{structure_id}"', text)
    if next_hops:
        hops = ", ".join(f'"{d}" = "127.0.0.1:{p}"' for d, p in next_hops.items())
        text = re.sub(r"(?m)^next_hops = .*$", f"next_hops = {{ {hops} }}", text)
    for key, value in (relay or {}).items():
        text = re.sub(rf"(?m)^{key} = [^#\n]*", f"{key} = {value} ", text)
    (state / "caducee.toml").write_text(text, encoding="utf-8")
    subprocess.run(caducee_command("init", "--state", str(state), "--demo"), check=True,
                   stdout=subprocess.DEVNULL)
    return ports


@dataclass
class ServerProcess:
    state: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes] | None = None
    log: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @classmethod
    def create(cls, state: Path, **kwargs: Any) -> "ServerProcess":
        ports = init_state(state, **kwargs)
        return cls(state, ports)

    @property
    def demo(self) -> dict[str, Any]:
        return json.loads((self.state / "demo" / "demo.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def path(self, relative: str) -> str:
        p = Path(relative)
        return str(p if p.is_absolute() else self.state / p)

    @property
    def ca_bundle(self) -> str:
        return self.path(self.demo["ca_bundle"])

    def identity(self, mailbox_type: str, index: int = 0) -> dict[str, Any]:
        found = [i for i in self.demo["identities"] if i["mailbox_type"] == mailbox_type]
        ident = dict(found[index])
        for key in ("cert", "key", "p12", "sign_cert", "sign_key", "enc_cert", "enc_key"):
            if ident.get(key):
                ident[key] = self.path(ident[key])
        return ident

    def port(self, name: str) -> int:
        return self.ports[name]

    def caducee(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `caducee` command on this node's state folder."""
        return subprocess.run(caducee_command(*args, "--state", str(self.state)), capture_output=True,
                              text=True, check=check)

    def tls_context(self, ident: dict[str, Any] | None) -> "ssl.SSLContext":
        """A client context trusting this node's CA bundle, with `ident`'s certificate when given."""
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_bundle)
        if ident:
            ctx.load_cert_chain(ident["cert"], ident["key"])
        return ctx

    def smtp(self, ident: dict[str, Any], *, helo: str = "client.test") -> "smtplib.SMTP_SSL":
        """smtplib over implicit TLS, logged in with `ident`'s certificate (AUTH EXTERNAL)."""
        import smtplib

        s = smtplib.SMTP_SSL("localhost", self.port("submissions"), context=self.tls_context(ident), timeout=15)
        try:
            s.ehlo(helo)
            s.auth("EXTERNAL", lambda challenge=None: "")
        except BaseException:
            s.close()
            raise
        return s

    def imap(self, ident: dict[str, Any], *, authzid: str = "") -> "imaplib.IMAP4_SSL":
        """imaplib over implicit TLS, logged in with `ident`'s certificate (AUTHENTICATE EXTERNAL)."""
        import imaplib

        m = imaplib.IMAP4_SSL("localhost", self.port("imaps"), ssl_context=self.tls_context(ident), timeout=15)
        try:
            m.authenticate("EXTERNAL", lambda _challenge: authzid.encode())
        except BaseException:
            m.shutdown()
            raise
        return m

    @property
    def operator_dn(self) -> str:
        """The subject DN of this node's operator (server) certificate, as the whitelist writes it."""
        from cryptography import x509

        pem = (self.state / "pki" / "server" / "server.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()

    def start(self, timeout: float = 30) -> "ServerProcess":
        self._ready.clear()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(caducee_command("serve", "--state", str(self.state)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.log[-30:]))
        return self

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for raw in proc.stderr:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                self.log.append(line)
                if "event=ready" in line:
                    self._ready.set()

    def _reap(self) -> None:
        if self._reader is not None:
            self._reader.join(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reap()

    def kill(self) -> None:
        """SIGKILL: the crash the queue must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._reap()

    def __enter__(self) -> "ServerProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


class DaemonLog(abc.ABC):
    """The log of a private reference daemon (Postfix, slapd) run by the tests and benchmarks: reading it
    from an offset, waiting for a line, and describing a failure with its last lines. Subclasses give
    `log_file`, `daemon` (the name in messages) and `error` (the exception raised)."""

    daemon = "daemon"
    error: type[Exception] = RuntimeError
    output_limit: int | None = None  # characters of a failed command's output kept in a description

    @property
    @abc.abstractmethod
    def log_file(self) -> Path:
        """Where the daemon logs."""

    def log_size(self) -> int:
        """The current size of the log, an ``offset`` for :meth:`log_text` and :meth:`wait_for_log`."""
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, offset: int = 0) -> str:
        """The log from byte ``offset``."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, *, timeout: float = 10, offset: int = 0) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in the log after ``offset``, waiting
        for it up to ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_text(offset))
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise self.error(self._describe(f"no log line matching {pattern!r} within {timeout} s"))
            time.sleep(0.05)

    def _describe(self, what: str, done: subprocess.CompletedProcess[bytes] | None = None) -> str:
        parts = [what]
        if done is not None:
            output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()
            if output:
                parts.append(output if self.output_limit is None else output[-self.output_limit:])
        tail = self.log_text().splitlines()[-30:]
        if tail:
            parts.append(f"{self.daemon} log (last lines):\n" + "\n".join(tail))
        return "\n".join(parts)


class ThreadedTlsServer(abc.ABC):
    """A TCP server on 127.0.0.1 run by its own asyncio loop in a thread, holding a server TLS context
    (for STARTTLS) made of `chain` and `key`: the scaffolding of the fake peer operators of the tests.

    Subclasses implement `_session(reader, writer)` and put each writer in `_writers` while it is open,
    so that `stop()` can abort the connections still open."""

    thread_name = "tls-server"

    def __init__(self, chain: Path, key: Path) -> None:
        import asyncio
        import ssl

        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(chain, key)
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._writers: set[Any] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.thread_name, daemon=True)

    @abc.abstractmethod
    async def _session(self, reader: Any, writer: Any) -> None:
        """One client connection, until it ends."""

    def start(self, port: int = 0) -> Any:
        import asyncio

        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", port, reuse_address=True))
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread.start()
        return self

    def stop(self) -> None:
        import asyncio

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Any:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
