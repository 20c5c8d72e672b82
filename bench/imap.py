"""`caducee bench imap`: one IMAP session over a large folder, Caducée side by side with Dovecot.

Both servers run on 127.0.0.1 in the same run and hold the same messages (default 10,000 of 5 KB with
varied headers, the same bytes, the same flags); both are driven by the same client code (imaplib, as in
the measurement of REFERENCE.md §7). One session is:

    connect, TLS (implicit, or STARTTLS), AUTHENTICATE EXTERNAL with a client certificate, SELECT INBOX,
    UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER]), 100 x UID FETCH n BODY.PEEK[] of messages
    picked at random (the same positions for both targets in a round), LOGOUT.

Recorded per session: the time of each step and of the whole session (from connect to the end of LOGOUT),
the client's CPU time and the server's (Caducée's process; Dovecot's master and every child). Both
targets are filled in a setup step that is not measured: Caducée through its store API (bodies + rows, as
local delivery writes them), Dovecot as Maildir files in cur/ that it indexes on first access; one
unrecorded warm-up session per target and TLS mode then builds Dovecot's index and checks that both
servers return the same headers and sizes.

Dovecot is a private instance (`dovecot -F -c CONF`, its own base_dir, state_dir, log and Maildir in a
temporary folder) with a server certificate from Caducée's development PKI. It authenticates like
Caducée: a client certificate is required and verified against the same CA bundle (`ssl_verify_client_cert`,
`auth_ssl_require_client_cert`), and the login name comes from the certificate (`auth_ssl_username_from_cert`,
field serialNumber, the national id) with the SASL EXTERNAL mechanism; a passwd-file holds that one user.
The system Dovecot is not used (deploy/install-debian-packages stops and disables it).

The figure the issue asks for is the ratio of session times Caducée/Dovecot (target: at most 2),
computed per round on adjacent runs, then its median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import hashlib
import imaplib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from bench.common import (
    Cell,
    cpu_seconds,
    fmt,
    machine,
    publish,
    ratio_median,
    rotated,
    tree_cpu_seconds,
)

SIZE = 5120
BODIES = 100
HOST = "127.0.0.1"
BASE_TIME = 1_767_225_600  # 2026-01-01T00:00:00Z: internal dates of the generated messages
PHASES = ("connect_auth", "select", "fetch_headers", "fetch_bodies", "logout", "total")


# -- the messages ---------------------------------------------------------------------------------------

_FIRST = ("Camille", "Dominique", "Claude", "Hélène", "Jérôme", "Anne", "Pierre", "Sophie", "Léa", "Marc",
          "Zoé", "François", "Inès", "Noël", "Agnès", "Yves")
_LAST = ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
         "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "Bérénger")
_DOMAINS = ("chu-exemple.mssante.fr", "clinique.test.mssante.fr", "labo-bio.mssante.fr",
            "cabinet.medecin.mssante.fr", "pharmacie.mssante.fr")
_SUBJECTS = ("Compte rendu de consultation", "Résultats d'analyses biologiques", "Lettre de liaison",
             "Demande d'avis", "Ordonnance", "Compte rendu opératoire", "Imagerie : compte rendu",
             "Sortie d'hospitalisation", "RDV de contrôle", "Re: dossier patient", "Fwd: résultats",
             "Avis spécialisé – cardiologie", "Convocation")
_WORDS = ("patient", "examen", "résultat", "traitement", "suivi", "bilan", "consultation", "tension",
          "glycémie", "contrôle", "posologie", "semaine", "prochain", "rendez-vous", "normal", "avis")


def _encoded_word(text: str) -> str:
    """RFC 2047 Q-encoding of non-ASCII text (as mail clients write accented subjects)."""
    if text.isascii():
        return text
    out = "".join(c if c.isalnum() and c.isascii() else "_" if c == " " else
                  "".join(f"={b:02X}" for b in c.encode()) for c in text)
    return f"=?UTF-8?Q?{out}?="


def _mailbox(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = f"{first}.{last}".lower().encode("ascii", "ignore").decode() or "x"
    return f"{first} {last}", f"{local}@{rng.choice(_DOMAINS)}"


def _fill(rng: random.Random, size: int) -> str:
    """Body text of about `size` octets, CRLF lines of at most 76 characters."""
    lines: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9)))[:76]
        lines.append(line)
        total += len(line.encode()) + 2
    return "\r\n".join(lines) + "\r\n"


def make_message(n: int, rcpt: str, size: int, rng: random.Random) -> bytes:
    """Message `n`: 1 or 2 Received, From, To, sometimes Cc / In-Reply-To / References, a French
    subject (RFC 2047 encoded when accented), text/plain 8bit or multipart/mixed; padded to `size`."""
    name, sender = _mailbox(rng)
    when = email.utils.formatdate(BASE_TIME + 60 * n, localtime=False)
    relay = f"mx.{sender.split('@')[1]}"
    received = (f"Received: from {relay} ({relay} [192.0.2.{n % 250 + 1}])\r\n"
                f"\tby caducee.localhost with ESMTPS id {n:08X}; {when}")
    head = [f"Return-Path: <{sender}>", received]
    if n % 3 == 0:
        head.append(f"Received: from poste-{n % 17}.local by {relay}; {when}")
    head += [f"From: {_encoded_word(name)} <{sender}>", f"To: <{rcpt}>"]
    if n % 4 == 0:
        head.append("Cc: " + ", ".join(f"{_encoded_word(a)} <{b}>" for a, b in
                                       (_mailbox(rng) for _ in range(rng.randint(1, 3)))))
    subject = f"{rng.choice(_SUBJECTS)} n°{n}"
    head += [f"Subject: {_encoded_word(subject)}", f"Date: {when}", f"Message-ID: <{n}.{BASE_TIME}@bench.caducee>"]
    if n % 5 == 0 and n > 0:
        head += [f"In-Reply-To: <{n - 1}.{BASE_TIME}@bench.caducee>",
                 f"References: <{n - 2}.{BASE_TIME}@bench.caducee> <{n - 1}.{BASE_TIME}@bench.caducee>"]
    head.append("MIME-Version: 1.0")
    if n % 7 == 0:
        boundary = f"=_bench_{n:06d}"
        head.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        header = "\r\n".join(head) + "\r\n\r\n"
        pre = (f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
        mid = (f"\r\n--{boundary}\r\nContent-Type: text/plain; charset=us-ascii; name=\"note.txt\"\r\n"
               f"Content-Disposition: attachment; filename=\"note.txt\"\r\n\r\n")
        end = f"\r\n--{boundary}--\r\n"
        room = size - len((header + pre + mid + end).encode())
        text = _fill(rng, max(0, room // 2))
        note = ("x" * 70 + "\r\n") * max(0, (room - len(text.encode())) // 72)
        raw = (header + pre + text.rstrip("\r\n") + mid + note.rstrip("\r\n") + end).encode()
    else:
        head += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
        header = "\r\n".join(head) + "\r\n\r\n"
        raw = (header + _fill(rng, max(0, size - len(header.encode())))).encode()
    if len(raw) < size:  # pad with one last line so that sizes stay close to `size`
        raw += b"-" * max(0, size - len(raw) - 2) + b"\r\n"
    return raw


def message_flags(n: int) -> frozenset[str]:
    """Every third message read, every tenth flagged: FLAGS are not all empty."""
    flags = set()
    if n % 3 == 1:
        flags.add("\\Seen")
    if n % 10 == 2:
        flags.add("\\Flagged")
    return frozenset(flags)


def generate(count: int, rcpt: str, size: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)  # deterministic content, not a secret
    return [make_message(n, rcpt, size, rng) for n in range(count)]


# -- Caducée: filled through its store ---------------------------------------------------------------


def fill_caducee(state: Path, address: str, raws: list[bytes]) -> None:
    """Deliver `raws` into the INBOX of `address` as local delivery does (body, then row), before start."""
    import sqlalchemy as sa

    from caducee.config import load
    from directory.schema import mailboxes
    from mailserver.blobs import BlobStore
    from mailserver.db import make_engine
    from mailserver.policy import header_message_id
    from mailserver.schema import messages
    from mailserver.store import deliver_in

    cfg = load(state)
    engine = make_engine(cfg.database_url, writer=True)
    blobs = BlobStore(cfg.path(cfg.storage.blobs), engine=engine, inline_max=cfg.storage.inline_max)
    try:
        with engine.connect() as conn:
            mailbox_id = conn.execute(sa.select(mailboxes.c.id).where(mailboxes.c.address == address)).scalar_one()
        with engine.begin() as conn:
            for n, raw in enumerate(raws):
                blob = blobs.put_in(conn, raw)
                when = dt.datetime.fromtimestamp(BASE_TIME + 60 * n, dt.UTC)
                fid, uid = deliver_in(conn, mailbox_id, blob, len(raw), header_message_id=header_message_id(raw),
                                      queue_recipient_id=None, internaldate=when)
                flags = message_flags(n)
                if flags:
                    conn.execute(sa.update(messages).where(messages.c.folder_id == fid, messages.c.uid == uid)
                                 .values(flags=" ".join(sorted(flags))))
            blobs.flush()  # bodies too large for a row are files: durable before the rows naming them
    finally:
        engine.dispose()


# -- Dovecot: a private instance over a Maildir -------------------------------------------------------


def _maildir_info(flags: frozenset[str]) -> str:
    letters = {"\\Flagged": "F", "\\Seen": "S", "\\Answered": "R", "\\Deleted": "T", "\\Draft": "D"}
    return ":2," + "".join(sorted(letters[f] for f in flags))


def fill_maildir(maildir: Path, raws: list[bytes], owner: tuple[int, int] | None) -> None:
    """Maildir files in cur/ (RFC-less but standard: time.M<n>P<pid>.host,S=<size>,W=<size>:2,<flags>)."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for n, raw in enumerate(raws):
        t = BASE_TIME + 60 * n
        path = maildir / "cur" / f"{t}.M{n:06d}P1.bench,S={len(raw)},W={len(raw)}{_maildir_info(message_flags(n))}"
        path.write_bytes(raw)
        os.utime(path, (t, t))
    if owner is not None:
        for dirpath, _dirs, files in os.walk(maildir):
            os.chown(dirpath, *owner)
            for f in files:
                os.chown(os.path.join(dirpath, f), *owner)


@dataclass
class Dovecot:
    """A private Dovecot: `dovecot -F -c <dir>/dovecot.conf`, everything under `dir`."""

    dir: Path
    imap_port: int
    imaps_port: int
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, directory: Path, *, user: str, cert: Path, key: Path, ca: Path) -> Dovecot:
        directory.mkdir(parents=True, exist_ok=True)
        run_as_root = os.geteuid() == 0
        mail_user = pwd.getpwnam("nobody") if run_as_root else pwd.getpwuid(os.geteuid())
        me = pwd.getpwuid(os.geteuid()).pw_name
        for sub in ("run", "state", "home"):
            (directory / sub).mkdir(exist_ok=True)
        if run_as_root:
            # The mail processes run as nobody: they must reach the Maildir through the temporary folders.
            p = directory
            while p != p.parent and p.stat().st_uid == 0 and str(p).startswith(tempfile.gettempdir() + "/"):
                os.chmod(p, p.stat().st_mode | 0o711)
                p = p.parent
            os.chown(directory / "home", mail_user.pw_uid, mail_user.pw_gid)
        (directory / "users").write_text(
            f"{user}::{mail_user.pw_uid}:{mail_user.pw_gid}::{directory / 'home'}::nopassword=y\n")
        self = cls(directory, _free_port(), _free_port())
        unprivileged = "" if run_as_root else (
            f"default_internal_user = {me}\ndefault_login_user = {me}\ndefault_internal_group = "
            f"{pwd.getpwuid(os.geteuid()).pw_gid}\nservice imap-login {{\n  chroot =\n}}\n"
            "service anvil {\n  chroot =\n}\n")
        (directory / "dovecot.conf").write_text(f"""# Private Dovecot of `caducee bench imap` (bench/imap.py); not the system instance.
base_dir = {directory / 'run'}
state_dir = {directory / 'state'}
instance_name = caducee-bench-{os.getpid()}
protocols = imap
listen = 127.0.0.1
log_path = {directory / 'dovecot.log'}
mail_location = maildir:{directory / 'Maildir'}
first_valid_uid = {min(mail_user.pw_uid, 500)}
first_valid_gid = {min(mail_user.pw_gid, 1)}
namespace inbox {{
  inbox = yes
}}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_ca = <{ca}
ssl_min_protocol = TLSv1.2
ssl_verify_client_cert = yes
ssl_cert_username_field = serialNumber
auth_ssl_require_client_cert = yes
auth_ssl_username_from_cert = yes
auth_mechanisms = external
disable_plaintext_auth = yes
passdb {{
  driver = passwd-file
  args = username_format=%u {directory / 'users'}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {directory / 'users'}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
{unprivileged}""", encoding="utf-8")
        return self

    @property
    def conf(self) -> Path:
        return self.dir / "dovecot.conf"

    def maildir_owner(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid

    def start(self, timeout: float = 20) -> None:
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"dovecot exited: {err.strip()}\n{self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.imaps_port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("dovecot did not start listening\n" + self.log_tail()) from None
                time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "dovecot.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- the client ---------------------------------------------------------------------------------------

_FETCH_UID_RE = re.compile(rb"UID (\d+)")
_FETCH_SIZE_RE = re.compile(rb"RFC822\.SIZE (\d+)")
_FETCH_FLAGS_RE = re.compile(rb"FLAGS \(([^)]*)\)")


@dataclass
class Target:
    name: str
    ports: dict[str, int]  # "implicit" -> IMAPS port, "starttls" -> IMAP port
    context: ssl.SSLContext
    cpu: Callable[[], float]


def session(target: Target, tls: str, picks: list[int], check: dict[str, Any] | None = None) -> dict[str, float]:
    """One measured session; `picks` are positions (0-based) of the messages whose bodies are fetched.

    With `check`, also returns the digest of every header and size (to compare both servers)."""
    figures: dict[str, float] = {}
    server0 = target.cpu()  # first: reading /proc is not the client's work
    cpu0 = time.process_time()
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        figures[name] = now - t
        t = now

    if tls == "implicit":
        client: imaplib.IMAP4 = imaplib.IMAP4_SSL(HOST, target.ports["implicit"], ssl_context=target.context,
                                                  timeout=120)
    else:
        client = imaplib.IMAP4(HOST, target.ports["starttls"], timeout=120)
        client.starttls(ssl_context=target.context)
    typ, _ = client.authenticate("EXTERNAL", lambda _challenge: b"")
    assert typ == "OK", typ
    lap("connect_auth")
    if check is not None:
        tls_socket = client.sock
        assert isinstance(tls_socket, ssl.SSLSocket)
        check["tls"] = f"{tls_socket.version()} {(tls_socket.cipher() or ('?',))[0]}"
    typ, data = client.select("INBOX")
    assert typ == "OK", data
    exists = int(data[0] or 0)
    lap("select")
    typ, data = client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER])")
    assert typ == "OK", typ
    uids: list[int] = []
    digest = hashlib.sha256() if check is not None else None
    for item in data:
        if isinstance(item, tuple):
            m = _FETCH_UID_RE.search(item[0])
            assert m is not None, item[0][:200]
            uids.append(int(m.group(1)))
            if digest is not None:
                size = _FETCH_SIZE_RE.search(item[0])
                flags = _FETCH_FLAGS_RE.search(item[0])
                kept = sorted(f for f in (flags.group(1).split() if flags else [b"?"]) if f != b"\\Recent")
                digest.update(item[1] + b"%d " % int(size.group(1) if size else -1) + b" ".join(kept) + b"\n")
    assert len(uids) == exists, (len(uids), exists)
    lap("fetch_headers")
    body_bytes = 0
    for pos in picks:
        typ, data = client.uid("FETCH", str(uids[pos]), "(BODY.PEEK[])")
        assert typ == "OK" and isinstance(data[0], tuple), data
        body_bytes += len(data[0][1])
        if check is not None:
            check.setdefault("bodies", []).append(hashlib.sha256(data[0][1]).hexdigest())
    lap("fetch_bodies")
    client.logout()
    lap("logout")
    figures["total"] = time.perf_counter() - t0
    figures["client_cpu"] = time.process_time() - cpu0
    figures["server_cpu"] = target.cpu() - server0
    figures["messages"] = exists
    figures["body_bytes"] = body_bytes
    if check is not None and digest is not None:
        check["headers"] = digest.hexdigest()
    return figures


# -- the run ------------------------------------------------------------------------------------------


@contextmanager
def _targets(tmp: Path, count: int, size: int, only: str | None) -> Iterator[dict[str, Target]]:
    from crypto.pki import DevPKI
    from mailserver.testing import ServerProcess

    server = ServerProcess.create(tmp / "state")
    ident = server.identity("PER", 0)
    context = ssl.create_default_context(cafile=server.ca_bundle)
    context.load_cert_chain(ident["cert"], ident["key"])
    print(f"generating {count} messages of {size} bytes", file=sys.stderr, flush=True)
    raws = generate(count, ident["address"], size)
    dovecot: Dovecot | None = None
    if only != "dovecot":
        t = time.perf_counter()
        fill_caducee(server.state, ident["address"], raws)
        print(f"caducee: {count} messages stored in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    if only != "caducee":
        pki = DevPKI.create_or_load(server.state / "pki")
        issued = pki.issue_server(["localhost"], [HOST], tmp / "dovecot-cert", "dovecot",
                                  structure_id="399999999900025", organisation="Dovecot reference")
        # Dovecot checks client certificates against CAs and CRLs in one file (ssl_require_crl): the same
        # trust anchors and CRLs as Caducée's configuration.
        from caducee.config import load

        cfg = load(server.state)
        ca_crl = tmp / "dovecot-ca-crl.pem"
        ca_crl.write_bytes(b"".join(cfg.path(p).read_bytes() for p in [cfg.tls.trust_anchors, *cfg.tls.crls]))
        dovecot = Dovecot.create(tmp / "dovecot", user=ident["national_id"], cert=issued.chain_path,
                                 key=issued.key_path, ca=ca_crl)
        t = time.perf_counter()
        fill_maildir(dovecot.dir / "Maildir", raws, dovecot.maildir_owner())
        print(f"dovecot: {count} Maildir files written in {time.perf_counter() - t:.1f} s", file=sys.stderr,
              flush=True)
    del raws
    targets: dict[str, Target] = {}
    with server:
        if only != "dovecot":
            pid = server.proc.pid if server.proc else 0
            targets["caducee"] = Target("caducee", {"implicit": server.port("imaps"), "starttls": server.port("imap")},
                                        context, lambda: cpu_seconds(pid))
        if dovecot is None:
            yield targets
            return
        with dovecot:
            master = dovecot.proc.pid if dovecot.proc else 0
            targets["dovecot"] = Target("dovecot", {"implicit": dovecot.imaps_port, "starttls": dovecot.imap_port},
                                        context, lambda: tree_cpu_seconds(master))
            yield targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caducee bench imap", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--messages", type=int, default=10_000, help="messages in the folder (default 10000)")
    p.add_argument("--size", type=int, default=SIZE, help="message size in bytes (default 5120)")
    p.add_argument("--bodies", type=int, default=BODIES, help="bodies fetched one by one per session (default 100)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--tls", default="implicit,starttls", help="implicit and/or starttls (default both)")
    p.add_argument("--only", choices=("caducee", "dovecot"), help="run one target alone (no ratio)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random body picks (default 1)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    modes = [m for m in args.tls.split(",") if m]
    if not modes or any(m not in ("implicit", "starttls") for m in modes) or args.messages < 1 or args.bodies < 0:
        p.error("--tls takes implicit,starttls; --messages positive; --bodies not negative")
    if args.only != "caducee" and shutil.which("dovecot") is None:
        p.error("dovecot is not installed (deploy/install-debian-packages test), or use --only caducee")

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    desc = machine() | {"dovecot": _dovecot_version()}
    desc.pop("postfix", None)  # not a party to this benchmark
    rng = random.Random(args.seed)  # which messages are read, not a secret
    cells: dict[tuple[str, str], Cell] = {}
    checks: dict[str, dict[str, Any]] = {}
    tls_used: dict[str, str] = {}
    warmup: dict[str, float] = {}  # the first session of each: Dovecot builds its index then
    with tempfile.TemporaryDirectory(prefix="caducee-bench-imap-") as tmp_name, \
            _targets(Path(tmp_name), args.messages, args.size, args.only) as targets:
        names = list(targets)
        warm_picks = [round(i * (args.messages - 1) / max(1, args.bodies - 1)) for i in range(args.bodies)]
        for mode in modes:
            for name in names:
                check: dict[str, Any] = {}
                figures = session(targets[name], mode, warm_picks, check)
                tls_used[f"{name} {mode}"] = check.pop("tls")
                warmup[f"{name} {mode}"] = figures["total"]
                checks.setdefault(name, check)
                print(f"warm-up {mode:8} {name:8} {figures['total']:.3f} s ({tls_used[f'{name} {mode}']})",
                      file=sys.stderr, flush=True)
        if len(checks) == 2 and checks["caducee"] != checks["dovecot"]:
            raise RuntimeError("Caducée and Dovecot returned different headers, sizes, flags or bodies")
        total = args.rounds * len(modes) * len(names)
        done = 0
        for r in range(args.rounds):
            picks = [rng.randrange(args.messages) for _ in range(args.bodies)]
            for mode in modes:
                for name in rotated(names, r):
                    figures = session(targets[name], mode, picks)
                    cells.setdefault((name, mode), Cell(name, {"tls": mode})).add(
                        **{k: v for k, v in figures.items() if k not in ("messages", "body_bytes")})
                    done += 1
                    print(f"[{done}/{total}] round {r + 1} {mode:8} {name:8} total {figures['total']:.3f} s "
                          f"(auth {figures['connect_auth']:.3f}, select {figures['select']:.3f}, headers "
                          f"{figures['fetch_headers']:.3f}, bodies {figures['fetch_bodies']:.3f}); CPU server "
                          f"{figures['server_cpu']:.2f} s, client {figures['client_cpu']:.2f} s",
                          file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    table = ["| TLS | step | Caducée s | Dovecot s | Caducée/Dovecot |", "|---|---|---:|---:|---:|"]
    for mode in modes:
        ours, ref = cells.get(("caducee", mode)), cells.get(("dovecot", mode))
        row: dict[str, Any] = {"tls": mode, "caducee": ours.values if ours else None,
                               "dovecot": ref.values if ref else None, "ratio": {}}
        for key in (*PHASES, "server_cpu", "client_cpu"):
            ratio = ratio_median(ours, ref, key) if ours and ref else None  # ours/ref of times: below 1 is faster
            row["ratio"][key] = ratio
            label = {"server_cpu": "server CPU", "client_cpu": "client CPU"}.get(key, key.replace("_", " "))
            bold = "**" if key == "total" else ""
            table.append(f"| {mode} | {bold}{label}{bold} | {fmt(ours.median(key) if ours else None, 3)} | "
                         f"{fmt(ref.median(key) if ref else None, 3)} | {bold}{fmt(ratio, 2, '×')}{bold} |")
        rows.append(row)
    table.append("")
    table.append(f"One session: TLS, AUTHENTICATE EXTERNAL (client certificate), SELECT INBOX of {args.messages:,} "
                 f"messages of ~{args.size} bytes, UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER]), "
                 f"{args.bodies} × UID FETCH n BODY.PEEK[], LOGOUT; imaplib client; Dovecot "
                 f"{desc['dovecot'] or '?'} (Maildir). Medians of {args.rounds} "
                 "interleaved rounds; the ratio is Caducée's time / Dovecot's per round, then its median "
                 "(target for `total`: at most 2×).")
    result = {"title": "IMAP: a session over a 10,000-message folder, Caducée and Dovecot", "started": started,
              "machine": desc, "load_average_at_end": os.getloadavg(),
              "parameters": vars(args) | {"out": str(args.out) if args.out else None},
              "same_content_checked": len(checks) == 2, "tls": tls_used, "warmup_session_s": warmup, "rows": rows}
    return publish("imap", result, table, args.out)


def _dovecot_version() -> str | None:
    try:
        done = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


if __name__ == "__main__":
    raise SystemExit(main())
