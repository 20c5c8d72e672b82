"""What the fault tests share: a real `caducee serve` with a fault-injection shim preloaded, state folders
with chosen settings, an SMTP peer that misbehaves on request, and counters over a mailbox.

The shim (shim/fault.c, compiled by the tests) fails fsync/close/write or SIGKILLs the server on files of
its state folder only; the fault in force is a small control file the test rewrites while the server runs.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from mailserver.testing import ServerProcess, ThreadedTlsServer, caducee_command, free_port

SHIM_SOURCE = Path(__file__).parent / "shim" / "fault.c"
DOMAIN = "caducee.localhost"


def build_shim(out_dir: Path) -> Path:
    """Compile the fault shim; fails (never skips) when no C compiler is there."""
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "the fault tests need gcc (Debian package gcc) to build tests/faults/shim/fault.c"
    out = out_dir / "fault.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SHIM_SOURCE), "-ldl"],
                   check=True, capture_output=True)
    return out


class FaultControl:
    """The control file the shim reads on each call: one directive a line (see shim/fault.c)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, *directives: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{d}\n" for d in directives), encoding="ascii")
        os.replace(tmp, self.path)  # the shim never reads half a directive

    def clear(self) -> None:
        self.set()


def make_state(state: Path, settings: dict[str, dict[str, str]] | None = None) -> dict[str, int]:
    """A state folder like `caducee init --demo`, every listener on a free port, with `settings`
    ({section: {key: TOML value}}) written over the defaults before init. Returns the ports."""
    from caducee.config import sample

    text = sample(DOMAIN, "localhost")
    ports: dict[str, int] = {}

    def listener(m: re.Match[str]) -> str:
        ports[m.group(1)] = free_port()
        return f'{m.group(1)} = "127.0.0.1:{ports[m.group(1)]}"'

    text = re.sub(r'(?m)^(\w+) = "127\.0\.0\.1:\d+"', listener, text)
    section = ""
    lines = []
    for line in text.splitlines():
        head = re.match(r"^\[(\w+)\]", line)
        if head:
            section = head.group(1)
        key = re.match(r"^(\w+) = ", line)
        if key and key.group(1) in (settings or {}).get(section, {}):
            line = f"{key.group(1)} = {settings[section][key.group(1)]}"  # type: ignore[index]
        lines.append(line)
    state.mkdir(parents=True, exist_ok=True)
    (state / "caducee.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run(caducee_command("init", "--state", str(state), "--demo"), check=True,
                   stdout=subprocess.DEVNULL)
    return ports


def set_setting(state: Path, section: str, key: str, value: str) -> None:
    """Change one key of a state folder's configuration (between two runs of the server)."""
    path = state / "caducee.toml"
    out, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        head = re.match(r"^\[(\w+)\]", line)
        if head:
            current = head.group(1)
        if current == section and re.match(rf"^{key} = ", line):
            line = f"{key} = {value}"
        out.append(line)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


@dataclass
class FaultServer(ServerProcess):
    """`ServerProcess` with extra environment (the shim) and a start that notices a death before ready."""

    env: dict[str, str] = field(default_factory=dict)
    started: ClassVar[list[FaultServer]] = []  # every process started, for the fixture that reaps them

    @classmethod
    def make(cls, state: Path, settings: dict[str, dict[str, str]] | None = None) -> FaultServer:
        return cls(state, make_state(state, settings))

    def preload(self, shim: Path, control: FaultControl, *, write: bool = False) -> None:
        self.env = {"LD_PRELOAD": str(shim), "FAULT_PREFIX": str(self.state.resolve()) + "/",
                    "FAULT_CONTROL": str(control.path), "FAULT_WRITE": "1" if write else "0"}

    def start(self, timeout: float = 30, *, wait_ready: bool = True) -> FaultServer:
        self._ready.clear()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(caducee_command("serve", "--state", str(self.state)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        FaultServer.started.append(self)
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        if not wait_ready:
            return self
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not start:\n" + "\n".join(self.log[-30:]))
        return self

    def wait_exit(self, timeout: float) -> int:
        """The exit status once the process ended by itself (negative: the signal that killed it)."""
        assert self.proc is not None
        try:
            status = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reap()
        return status

    def terminate(self) -> None:
        """SIGTERM without waiting."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def count_log(self, event: str) -> int:
        return sum(1 for line in self.log if event in line)


# -- messages and counts --

def message(sender: str, rcpt: str, mid: str, lines: int = 40) -> bytes:
    """A message whose last line names it: a partial copy cannot pass for a whole one."""
    filler = b"".join(b"line %d of the report, which must arrive whole\r\n" % i for i in range(lines))
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: fault {mid}\r\nMessage-ID: <{mid}@fault.test>\r\n\r\n"
            ).encode() + filler + f"END-OF-MESSAGE {mid}\r\n".encode()


_MID = re.compile(rb"Message-ID: <([^@>]+)@fault\.test>")


def message_id(data: bytes) -> str | None:
    """The test message id of a message built by `message`."""
    found = _MID.search(data)
    return found.group(1).decode() if found else None


def mailbox_counts(server: ServerProcess, ident: dict[str, Any]) -> collections.Counter[str]:
    """Test message id → copies in `ident`'s INBOX, over IMAP; every copy must be whole."""
    m = server.imap(ident)
    try:
        m.select("INBOX", readonly=True)
        typ, data = m.fetch("1:*", "(BODY.PEEK[])")
        seen: collections.Counter[str] = collections.Counter()
        if typ != "OK" or data == [None]:
            return seen
        for item in data:
            if not isinstance(item, tuple):
                continue
            raw = item[1]
            found = _MID.search(raw)
            if found is None:
                continue  # not a test message (a report)
            name = found.group(1).decode()
            assert raw.endswith(f"END-OF-MESSAGE {name}\r\n".encode()), f"partial message {name}"
            seen[name] += 1
        return seen
    finally:
        m.logout()


def reports_in(server: ServerProcess, ident: dict[str, Any]) -> int:
    """Delivery status notifications in `ident`'s INBOX."""
    m = server.imap(ident)
    try:
        m.select("INBOX", readonly=True)
        typ, data = m.search(None, "HEADER", "Content-Type", "delivery-status")
        return len(data[0].split()) if typ == "OK" and data[0] else 0
    finally:
        m.logout()


def database_url(state: Path) -> str:
    from caducee import config

    return config.load(state).database_url


def queue_rows(state: Path) -> list[dict[str, Any]]:
    """Every recipient row of the node's queue (read while the server may run)."""
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import queue_recipients

    engine = make_engine(database_url(state))
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(queue_recipients))]
    finally:
        engine.dispose()


def queue_blobs(state: Path) -> dict[str, str]:
    """Queue id → the address of its body blob."""
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import queue_messages

    engine = make_engine(database_url(state))
    try:
        with engine.connect() as conn:
            return dict(conn.execute(sa.select(queue_messages.c.id, queue_messages.c.blob)).all())
    finally:
        engine.dispose()


def inline_bodies(state: Path) -> dict[str, bytes]:
    """Address → bytes of every body held as a database row (mailserver.blobs)."""
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import inline_blobs

    engine = make_engine(database_url(state))
    try:
        with engine.connect() as conn:
            return {a: bytes(d) for a, d in conn.execute(sa.select(inline_blobs.c.address, inline_blobs.c.data))}
    finally:
        engine.dispose()


def delivery_counts(state: Path) -> tuple[int, int]:
    """(mailbox entries that came through the queue, recipients marked delivered): equal whenever the
    queue and the mailboxes agree, which is what exactly-once delivery needs after any crash."""
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import messages, queue_recipients

    engine = make_engine(database_url(state))
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).where(messages.c.queue_recipient_id.is_not(None)))
            marked = conn.execute(sa.select(sa.func.count()).where(
                queue_recipients.c.state.in_(("delivered", "dsn_delivered"))))
            return int(stored.scalar_one()), int(marked.scalar_one())
    finally:
        engine.dispose()


def referenced_blobs(state: Path) -> set[str]:
    """Every blob a queue entry or a mailbox entry points at."""
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import messages

    engine = make_engine(database_url(state))
    try:
        with engine.connect() as conn:
            in_mailboxes = set(conn.execute(sa.select(messages.c.blob)).scalars())
    finally:
        engine.dispose()
    return in_mailboxes | set(queue_blobs(state).values())


def queue_states(state: Path) -> collections.Counter[str]:
    """Recipient rows of the node's queue by state."""
    return collections.Counter(r["state"] for r in queue_rows(state))


def enqueue_offline(state: Path, items: list[tuple[str, list[str], bytes]], principal: str) -> list[str]:
    """Queue (sender, recipients, data) on a stopped node through `Queue.enqueue`, the call the SMTP
    server awaits before its 250: a backlog exactly as acknowledged mail leaves it. Returns queue ids."""
    from caducee import config
    from mailserver.blobs import BlobStore
    from mailserver.db import Writer, make_engine
    from mailserver.queue import Envelope, Queue, Recipient

    cfg = config.load(state)
    writer = Writer(make_engine(cfg.database_url, writer=True))
    queue = Queue(writer, BlobStore(cfg.path(cfg.storage.blobs), engine=writer.engine,
                                    inline_max=cfg.storage.inline_max))

    async def main() -> list[str]:
        return list(await asyncio.gather(*(
            queue.enqueue(Envelope(sender, tuple(Recipient(r) for r in rcpts), principal=principal,
                                   header_message_id=f"<{i}@fault.test>"), data)
            for i, (sender, rcpts, data) in enumerate(items))))

    try:
        return asyncio.run(main())
    finally:
        writer.stop()
        writer.engine.dispose()


def reply_of(exc: BaseException) -> tuple[int, str] | None:
    """The SMTP reply an smtplib exception carries, if any."""
    code = getattr(exc, "smtp_code", None)
    if isinstance(code, int) and code > 0:
        text = getattr(exc, "smtp_error", b"")
        return code, text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return None


def send_one(s: smtplib.SMTP, sender: str, rcpt: str, data: bytes) -> tuple[int, str]:
    """MAIL, RCPT, DATA on an open session; the first reply that is not a success, or the final one."""
    code, text = s.mail(sender)
    if code != 250:
        s.rset()
        return code, text.decode(errors="replace")
    code, text = s.rcpt(rcpt)
    if code != 250:
        s.rset()
        return code, text.decode(errors="replace")
    code, text = s.data(data)
    return code, text.decode(errors="replace")


# -- another operator's MX, on request misbehaving --

class SmtpPeer(ThreadedTlsServer):
    """An SMTP server with STARTTLS and an operator certificate of the dev PKI, in a thread.

    It counts every message whose final dot it read (`received`) and every one it answered 250
    (`accepted`). The first `drop_after_dot` messages are not answered: the connection is closed right
    after the final dot, the fault of RFC 5321 §6.1 where the client cannot know whether it was taken.
    """

    thread_name = "smtp-peer"

    def __init__(self, chain: Path, key: Path, *, hostname: str = "mx.peer.test", drop_after_dot: int = 0) -> None:
        super().__init__(chain, key)
        self.hostname = hostname
        self.drop_after_dot = drop_after_dot
        self.received: list[tuple[float, list[str], bytes]] = []
        self.accepted: list[tuple[float, list[str], bytes]] = []
        self.errors: list[str] = []

    def start(self, port: int = 0) -> SmtpPeer:
        super().start(port)
        return self

    def __enter__(self) -> Self:
        super().__enter__()
        return self

    def accepted_ids(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(m.group(1).decode() for _, _, d in self.accepted
                                       if (m := _MID.search(d)) is not None)

    def accepted_pairs(self) -> collections.Counter[tuple[str, str]]:
        """(message id, recipient) → times answered 250."""
        with self._lock:
            return collections.Counter((m.group(1).decode(), r) for _, rcpts, d in self.accepted
                                       if (m := _MID.search(d)) is not None for r in rcpts)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            self.errors.append(repr(exc))
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        tls = False
        rcpts: list[str] = []
        await reply(f"220 {self.hostname} ESMTP test peer")
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                starttls = "" if tls else "250-STARTTLS\r\n"
                await reply(f"250-{self.hostname}\r\n250-PIPELINING\r\n250-8BITMIME\r\n{starttls}"
                            "250 ENHANCEDSTATUSCODES")
            elif verb == b"STAR":
                await reply("220 2.0.0 Ready to start TLS")
                await writer.start_tls(self.tls)
                tls = True
            elif verb == b"MAIL":
                rcpts = []
                await reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                rcpts.append(line.decode(errors="replace").split(":", 1)[1].strip().split()[0].strip("<>"))
                await reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                await reply("354 End data with <CR><LF>.<CR><LF>")
                chunks = []
                while (chunk := await reader.readline()) != b".\r\n":
                    if not chunk:
                        return
                    chunks.append(chunk[1:] if chunk.startswith(b".") else chunk)
                data = b"".join(chunks)
                with self._lock:
                    self.received.append((time.time(), rcpts, data))
                    drop = self.drop_after_dot > 0
                    if drop:
                        self.drop_after_dot -= 1
                    else:
                        self.accepted.append((time.time(), rcpts, data))
                if drop:
                    writer.transport.abort()  # the final dot was read; no reply, ever
                    return
                await reply("250 2.0.0 Ok: queued")
            elif verb == b"QUIT":
                await reply("221 2.0.0 Bye")
                return
            else:  # RSET, NOOP
                await reply("250 2.0.0 Ok")


PEER_DOMAIN = "peer.test"


def make_relaying_node(base: Path, hop_port: int, **relay: str) -> tuple[FaultServer, Path, Path]:
    """A node (not started) that relays mail for peer.test to 127.0.0.1:`hop_port`, retrying after 1 then
    2 s, with peer.test whitelisted for the DN of a peer certificate issued here. `relay` sets more
    [relay] keys. Returns (node, the peer's certificate chain, its key)."""
    settings = {"relay": {"next_hops": f'{{ "{PEER_DOMAIN}" = "127.0.0.1:{hop_port}" }}', "retry_initial": "1",
                          "retry_max": "2", **relay}}
    server = FaultServer.make(base / "state", settings)
    chain, key, dn = issue_peer_certificate(server.state, base / "peer")
    server.caducee("trust", "add", PEER_DOMAIN, "--dn", dn)
    return server, chain, key


def issue_peer_certificate(state: Path, out_dir: Path, hostname: str = "mx.peer.test",
                           organisation: str = "Operateur Pair") -> tuple[Path, Path, str]:
    """A server certificate of another operator from the node's dev PKI: (chain, key, subject DN)."""
    from crypto.pki import DevPKI

    out_dir.mkdir(parents=True, exist_ok=True)
    pki = DevPKI.create_or_load(state / "pki")
    issued = pki.issue_server([hostname], ["127.0.0.1"], out_dir, "peer", structure_id="355555555500055",
                              organisation=organisation)
    return issued.chain_path, issued.key_path, issued.subject_dn


class Blackhole:
    """A TCP port that takes connections and never says a word (a next hop that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def wait_for_ids(server: ServerProcess, ident: dict[str, Any], expected: set[str],
                 timeout: float = 30) -> collections.Counter[str]:
    """The mailbox counts once every id of `expected` is there."""
    if not expected:
        return mailbox_counts(server, ident)

    def complete() -> collections.Counter[str] | None:
        counts = mailbox_counts(server, ident)
        return counts if expected <= set(counts) else None

    return wait_until(complete, timeout, f"{len(expected)} messages in {ident['address']}")  # type: ignore[no-any-return]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `predicate` until truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own: initdb in a temporary folder, a free port on 127.0.0.1,
    trust authentication, stopped and removed at the end. The machine's shared cluster is never used.
    As root, the server runs as the `postgres` account (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        import glob
        import pwd
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        assert bins, "the PostgreSQL fault test needs the Debian package postgresql (initdb, pg_ctl)"
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="caducee-pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.running = False
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "30", "-o",
                  f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}",
                  "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash (recovery at the next start); `fast` ends every session, rolling back
        what they had in progress."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def close(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
