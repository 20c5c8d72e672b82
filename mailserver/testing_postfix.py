"""A real, private Postfix instance: a third operator of the trust space for the black-box tests, and the
reference server of `caducee bench smtp`.

One :class:`PostfixPeer` is a complete Postfix configuration (``main.cf`` + ``master.cf``) in its own
directory, run with ``postfix -c DIR``: its own queue, data directory, Maildir store and log file, one SMTP
listener on ``127.0.0.1:<port>``. The machine's default instance (``/etc/postfix``) is neither needed nor
touched. Postfix's ``master`` runs as root, so the harness needs root.

    with postfix_workdir() as workdir:
        peer = PostfixPeer.create(workdir, domain="postfix.test", hostname="mx.postfix.test", ...)
        with peer:
            peer.inject("alice@postfix.test", ["bob@other.test"], data)

Inbound (SMTP on the listener) Postfix accepts mail for its own domain only, over mandatory STARTTLS and,
by default, only from clients presenting a certificate issued by ``ca_file``; it delivers to Maildir files
through the ``virtual`` transport. Outbound it relays what is injected locally (``sendmail``) to the next
hops of ``transport`` over mandatory, verified TLS presenting its own certificate as client certificate.
Any other destination is refused by configuration (no DNS, no default route): an instance can reach
nothing but the next hops it was given, which must be loopback addresses.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from mailserver.testing import DaemonLog

__all__ = [
    "MAILBOX_GROUP",
    "MAILBOX_USER",
    "MAIL_OWNER",
    "SETGID_GROUP",
    "NextHop",
    "PostfixError",
    "PostfixPeer",
    "postfix_workdir",
]

MAIL_OWNER: Final = "postfix"
"""The unprivileged account of Postfix's daemons (Debian's ``mail_owner``)."""
SETGID_GROUP: Final = "postdrop"
"""The group of Postfix's set-gid submission programs (Debian's ``setgid_group``)."""
MAILBOX_USER: Final = "nobody"
MAILBOX_GROUP: Final = "nogroup"
"""The identity the ``virtual`` delivery agent writes Maildir files as (it refuses root)."""

POSTFIX: Final = "postfix"
SENDMAIL: Final = "sendmail"
POSTQUEUE: Final = "postqueue"
POSTSUPER: Final = "postsuper"
TOOLS: Final = (POSTFIX, SENDMAIL, POSTQUEUE, POSTSUPER)

_DOMAIN_RE: Final = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")
_HOST_RE: Final = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
# Local parts become Maildir directory names: a conservative subset of RFC 5322 dot-atoms.
_LOCAL_PART_RE: Final = re.compile(r"^[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*$")
_MESSAGE_ID_RE: Final = re.compile(rb"^Message-ID:[ \t]*(?:\r?\n[ \t]+)?(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
_COMMAND_TIMEOUT: Final = 60.0


class PostfixError(RuntimeError):
    """A Postfix command failed; the message carries its output and the tail of the instance's log."""


@dataclass(frozen=True)
class NextHop:
    """Where Postfix relays mail for ``domain``, and the DNS name the next hop's certificate must carry."""

    domain: str
    host: str
    port: int
    tls_match: str

    @property
    def nexthop(self) -> str:
        """The next hop as Postfix writes it: ``[address]:port`` (brackets: no MX lookup)."""
        return f"[{self.host}]:{self.port}"


def _check_domain(label: str, name: str) -> str:
    if not _DOMAIN_RE.match(name):
        raise ValueError(f"{label} must be a lower-case DNS name with at least one dot: {name!r}")
    return name


def _check_port(label: str, port: int) -> int:
    if not 1024 <= port <= 65535:
        raise ValueError(f"{label} must be an unprivileged TCP port (1024-65535): {port!r}")
    return port


def _parse_next_hop(domain: str, value: str, tls_match: str) -> NextHop:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"transport for {domain!r} must be 'host:port', got {value!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"transport for {domain!r}: the host must be an IP address, got {host!r}") from None
    # Tests talk to 127.0.0.1 only: a typo must not turn the instance into a relay to the outside.
    if address.version != 4 or not address.is_loopback:
        raise ValueError(f"transport for {domain!r}: only IPv4 loopback next hops are allowed, got {host!r}")
    if not _HOST_RE.match(tls_match):
        raise ValueError(f"tls_match for {domain!r} must be a lower-case DNS name: {tls_match!r}")
    return NextHop(domain, str(address), _check_port(f"transport port for {domain!r}", int(port_text)), tls_match)


def _traversable(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether ``uid`` (member of ``gids``) may search every directory from / down to ``path``."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def _account(user: str, group: str) -> tuple[int, int]:
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise PostfixError(f"account {user}:{group} missing: is the Debian package postfix installed?") from exc


@contextlib.contextmanager
def postfix_workdir(prefix: str = "caducee-postfix-") -> Iterator[Path]:
    """A fresh directory that Postfix's unprivileged processes can reach, removed afterwards.

    pytest's ``tmp_path`` lives below a ``0700`` directory of the user running the tests: the ``virtual``
    delivery agent, which writes Maildir files as :data:`MAILBOX_USER`, could not get through it. This
    directory sits in the system temporary directory with mode ``0755``. Stop the instance before the
    context ends.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Postfix trusts a configuration file (main.cf, master.cf, texthash: tables) only once its modification
# time is two seconds old: it reads a "hot" file again every 0.3 s until then (util/dict.c,
# util/load_file.c, util/dict_thash.c), against half-written files. That costs every process started in
# the first two seconds up to 2.4 s. Files written here are complete when closed: they are dated back.
_SETTLED_MTIME_AGE: Final = 10.0


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    settled = time.time() - _SETTLED_MTIME_AGE
    os.utime(path, (settled, settled))


@dataclass
class PostfixPeer(DaemonLog):
    """A private Postfix instance in ``workdir``; build it with :meth:`create`.

    Layout of ``workdir``: ``config/`` (main.cf, master.cf, texthash tables), ``queue/``, ``data/``,
    ``maildir/<domain>/<local-part>/`` (Maildir, owned by :data:`MAILBOX_USER`), ``log/postfix.log``.
    """

    daemon = "postfix"
    error = PostfixError

    workdir: Path
    domain: str
    hostname: str
    listen_port: int
    mailboxes: tuple[str, ...]
    next_hops: tuple[NextHop, ...] = ()
    require_client_cert: bool = True

    # -------------------- layout

    @property
    def config_dir(self) -> Path:
        return self.workdir / "config"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "queue"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def maildir_base(self) -> Path:
        return self.workdir / "maildir"

    @property
    def log_file(self) -> Path:
        return self.workdir / "log" / "postfix.log"

    @property
    def address(self) -> tuple[str, int]:
        """Where the SMTP listener is."""
        return ("127.0.0.1", self.listen_port)

    # -------------------- configuration

    @classmethod
    def create(
        cls,
        workdir: Path,
        *,
        domain: str,
        hostname: str,
        cert_file: Path,
        key_file: Path,
        ca_file: Path,
        listen_port: int,
        mailboxes: Sequence[str],
        require_client_cert: bool = True,
        transport: Mapping[str, str] | None = None,
        tls_match: Mapping[str, str] | None = None,
        queue_lifetime: int = 300,
    ) -> PostfixPeer:
        """Write the instance's configuration into ``workdir/config`` (nothing is started).

        ``cert_file`` (PEM certificate, followed by its chain) and ``key_file`` are the operator's
        certificate: the server certificate of the listener and the client certificate of outbound
        relaying. ``ca_file`` holds the trust anchors for both directions. ``mailboxes`` are the
        ``local-part@domain`` addresses delivered to Maildir (``postmaster@domain`` is always added,
        RFC 5321 §4.5.1). ``transport`` maps a recipient domain to its next hop ``"127.0.0.1:PORT"``;
        the next hop's certificate must carry the DNS name ``tls_match[domain]`` (default: the domain
        itself) and chain to ``ca_file``. ``queue_lifetime`` (seconds) bounds how long a deferred
        message is retried before it bounces.
        """
        workdir = Path(workdir).resolve()
        domain = _check_domain("domain", domain.lower())
        hostname = _check_domain("hostname", hostname.lower())
        _check_port("listen_port", listen_port)
        if queue_lifetime < 1:
            raise ValueError("queue_lifetime must be at least one second")
        boxes: list[str] = []
        for mailbox in [*mailboxes, f"postmaster@{domain}"]:
            local, at, box_domain = mailbox.rpartition("@")
            if not at or not _LOCAL_PART_RE.match(local) or box_domain.lower() != domain:
                raise ValueError(f"mailbox must be local-part@{domain}: {mailbox!r}")
            address = f"{local}@{domain}"
            if address.lower() not in (b.lower() for b in boxes):
                boxes.append(address)
        matches = {k.lower(): v.lower() for k, v in (tls_match or {}).items()}
        hops: list[NextHop] = []
        for hop_domain, value in (transport or {}).items():
            hop_domain = _check_domain("transport domain", hop_domain.lower())
            if hop_domain == domain:
                raise ValueError(f"{domain!r} is delivered locally, it cannot have a transport")
            hops.append(_parse_next_hop(hop_domain, value, matches.pop(hop_domain, hop_domain)))
        if matches:
            raise ValueError(f"tls_match names domains without a transport: {sorted(matches)}")
        names: dict[str, str] = {}
        for hop in hops:
            # The TLS policy is looked up by next hop, not by domain: one next hop, one expected name.
            if names.setdefault(hop.nexthop, hop.tls_match) != hop.tls_match:
                raise ValueError(f"next hop {hop.nexthop} is given two certificate names")
        for label, path in (("cert_file", cert_file), ("key_file", key_file), ("ca_file", ca_file)):
            if not Path(path).is_file():
                raise ValueError(f"{label} is not a file: {path}")

        peer = cls(workdir, domain, hostname, listen_port, tuple(boxes), tuple(hops), require_client_cert)
        mailbox_uid, mailbox_gid = _account(MAILBOX_USER, MAILBOX_GROUP)
        owner_uid, owner_gid = _account(MAIL_OWNER, MAIL_OWNER)
        workdir.mkdir(parents=True, exist_ok=True)
        for uid, gids, who in ((mailbox_uid, {mailbox_gid}, MAILBOX_USER), (owner_uid, {owner_gid}, MAIL_OWNER)):
            if not _traversable(workdir, uid, gids):
                raise ValueError(
                    f"{workdir} is out of reach of the account {who} (a parent directory lacks search "
                    "permission); use postfix_workdir()"
                )
        # The layout post-install(1) expects: the queue and configuration directories owned by root,
        # the data directory by the mail owner; postfix check creates the queue's subdirectories.
        for directory in (peer.config_dir, peer.queue_dir, peer.log_file.parent):
            directory.mkdir(mode=0o755, exist_ok=True)
        peer.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(peer.data_dir, owner_uid, owner_gid)
        peer.maildir_base.mkdir(mode=0o750, exist_ok=True)
        os.chown(peer.maildir_base, mailbox_uid, mailbox_gid)

        _write(peer.config_dir / "main.cf", peer._main_cf(
            cert_file=Path(cert_file).resolve(), key_file=Path(key_file).resolve(), ca_file=Path(ca_file).resolve(),
            mailbox_uid=mailbox_uid, mailbox_gid=mailbox_gid, queue_lifetime=queue_lifetime))
        _write(peer.config_dir / "master.cf", peer._master_cf())
        _write(peer.config_dir / "virtual_mailboxes",
               "".join(f"{box}\t{domain}/{box.rpartition('@')[0]}/\n" for box in boxes))
        _write(peer.config_dir / "transport", "".join(f"{h.domain}\tsmtp:{h.nexthop}\n" for h in hops))
        _write(peer.config_dir / "tls_policy",
               "".join(f"{nexthop}\tverify match={name}\n" for nexthop, name in names.items()))
        return peer

    def _main_cf(self, *, cert_file: Path, key_file: Path, ca_file: Path, mailbox_uid: int, mailbox_gid: int,
                 queue_lifetime: int) -> str:
        config = self.config_dir
        return f"""\
# Private Postfix instance of the Caducée black-box tests (mailserver/testing_postfix.py).
compatibility_level = 3.6
config_directory = {config}
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = {MAIL_OWNER}
setgid_group = {SETGID_GROUP}

# Identity; 127.0.0.1 only, IPv4 only, no DNS: nothing but the configured next hops is reachable.
myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = $mydomain
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
smtputf8_enable = no
biff = no
append_dot_mydomain = no

# Logging to a file, written by postlogd (master.cf "postlog").
maillog_file = {self.log_file}
maillog_file_prefixes = {self.log_file.parent}

# No local delivery: the instance's only domain is virtual, delivered to Maildir.
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
relay_domains =
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.maildir_base}
virtual_mailbox_maps = texthash:{config}/virtual_mailboxes
virtual_uid_maps = static:{mailbox_uid}
virtual_gid_maps = static:{mailbox_gid}
virtual_transport = virtual

# Outbound routes: the transport table, nothing else.
transport_maps = texthash:{config}/transport
default_transport = error:5.4.4 no route outside the test trust space
relay_transport = error:5.4.4 no route outside the test trust space

# Inbound SMTP: own domain only, never a relay (mail to relay is injected locally with sendmail).
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = reject_unlisted_recipient
smtpd_tls_cert_file = {cert_file}
smtpd_tls_key_file = {key_file}
smtpd_tls_CAfile = {ca_file}
smtpd_tls_security_level = encrypt
smtpd_tls_ask_ccert = yes
smtpd_tls_req_ccert = {"yes" if self.require_client_cert else "no"}
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_mandatory_ciphers = high
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1

# Outbound SMTP: mandatory verified TLS to every next hop, presenting the operator certificate.
smtp_tls_cert_file = {cert_file}
smtp_tls_key_file = {key_file}
smtp_tls_CAfile = {ca_file}
smtp_tls_security_level = verify
smtp_tls_policy_maps = texthash:{config}/tls_policy
smtp_tls_protocols = >=TLSv1.2
smtp_tls_mandatory_protocols = >=TLSv1.2
smtp_tls_mandatory_ciphers = high
smtp_tls_loglevel = 1
smtp_connection_cache_on_demand = no

# Fast retries, short lives. Not below 2s: a deferred file is dated now + backoff and the queue manager
# takes back files dated up to now + 1s; with 1s it may take the file back before the delivery agent
# has released its lock, and then parks it in "incoming" for 60 s.
queue_run_delay = 1s
minimal_backoff_time = 2s
maximal_backoff_time = 4s
maximal_queue_lifetime = {queue_lifetime}s
bounce_queue_lifetime = {queue_lifetime}s
"""

    def _master_cf(self) -> str:
        # Nothing chrooted (the queue directory would need copies of system files), everything the
        # configuration uses and nothing more: no local(8), no pipe(8), no postscreen(8).
        services = [
            (f"127.0.0.1:{self.listen_port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        lines = ["# service type private unpriv chroot wakeup maxproc command"]
        lines += ["  ".join(service) for service in services]
        return "\n".join(lines) + "\n"

    # -------------------- commands

    def _run(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        try:
            done = subprocess.run(list(args), input=input, capture_output=True, timeout=_COMMAND_TIMEOUT)
        except FileNotFoundError as exc:
            raise PostfixError(f"{args[0]} not found: install the Debian package postfix") from exc
        if check and done.returncode != 0:
            raise PostfixError(self._describe(f"{' '.join(args)} exited with {done.returncode}", done))
        return done

    def check(self) -> None:
        """``postfix check``: configuration and file permissions; any warning is an error."""
        done = self._run(POSTFIX, "-c", str(self.config_dir), "check", check=False)
        output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()
        if done.returncode != 0 or output:
            raise PostfixError(self._describe(f"postfix check failed for {self.config_dir}", done))

    def master_pid(self) -> int | None:
        """The pid of this instance's running ``master``, if any."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            return False
        return cwd == self.queue_dir or self.queue_dir in cwd.parents

    def running_pids(self) -> list[int]:
        """Every process of this instance: Postfix's daemons all work from the queue directory."""
        return sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit() and self._is_ours(int(entry)))

    def start(self, timeout: float = 30) -> None:
        """``postfix check``, ``postfix start``, then wait until the listener answers ``220``."""
        if os.geteuid() != 0:
            raise PostfixError("Postfix's master runs as root: run the Postfix tests as root")
        if self.master_pid() is not None:
            raise PostfixError(f"the instance in {self.workdir} is already running")
        self.check()
        try:
            self._run(POSTFIX, "-c", str(self.config_dir), "start")
        except PostfixError:
            with contextlib.suppress(PostfixError):
                self.stop()
            raise
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(self.address, timeout=5) as sock:
                    banner = sock.makefile("rb").readline()
                    sock.sendall(b"QUIT\r\n")
                if banner.startswith(b"220 "):
                    return
                last_error = PostfixError(f"unexpected banner {banner!r}")
            except OSError as exc:
                last_error = exc
            time.sleep(0.05)
        with contextlib.suppress(PostfixError):
            self.stop()
        raise PostfixError(self._describe(f"Postfix did not answer on {self.address}: {last_error}"))

    def stop(self, timeout: float = 30) -> None:
        """``postfix stop``, then wait until every process of the instance is gone.

        Processes still there at ``timeout`` are killed (``postfix abort``, then SIGKILL by pid) and
        :class:`PostfixError` is raised.
        """
        if self.master_pid() is not None:
            self._run(POSTFIX, "-c", str(self.config_dir), "stop")
        deadline = time.monotonic() + timeout
        while self.running_pids():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return
        self._run(POSTFIX, "-c", str(self.config_dir), "abort", check=False)
        for pid in self.running_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise PostfixError(self._describe(f"Postfix in {self.workdir} did not stop within {timeout} s"))

    def __enter__(self) -> PostfixPeer:
        if self.master_pid() is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -------------------- mail

    def inject(self, sender: str, recipients: Sequence[str], data: bytes, timeout: float = 10) -> str:
        """Submit a message locally (``sendmail``), as a user of this operator would; returns its queue id.

        Mail to a ``transport`` domain is then relayed outbound. ``data`` must carry a ``Message-ID``
        header: the queue id is read from the log line cleanup(8) writes for it.
        """
        if not recipients:
            raise ValueError("at least one recipient is needed")
        found = _MESSAGE_ID_RE.search(data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0])
        if found is None:
            raise ValueError("data must carry a Message-ID header (it identifies the message in the log)")
        message_id = found.group(1).decode("ascii", "replace")
        offset = self.log_size()
        self._run(SENDMAIL, "-C", str(self.config_dir), "-i", "-f", sender, "--", *recipients, input=data)
        match = self.wait_for_log(rf"\b([0-9A-F]{{6,}}): message-id={re.escape(message_id)}", timeout=timeout,
                                  offset=offset)
        return match.group(1)

    def flush(self) -> None:
        """``postqueue -f``: attempt to deliver every queued message now."""
        self._run(POSTQUEUE, "-c", str(self.config_dir), "-f")

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one JSON object per queued message (queue_id, queue_name, recipients with
        their delay_reason, ...)."""
        done = self._run(POSTQUEUE, "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in done.stdout.decode("utf-8").splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        """The ids of the messages in the queue (incoming, active, deferred, hold)."""
        return [entry["queue_id"] for entry in self.queue()]

    def purge_queue(self) -> None:
        """``postsuper -d ALL``: delete every queued message."""
        self._run(POSTSUPER, "-c", str(self.config_dir), "-d", "ALL")

    def maildir_messages(self, local_part: str) -> list[bytes]:
        """The messages delivered to ``local_part@domain``, oldest first (Maildir ``new`` and ``cur``)."""
        wanted = f"{local_part}@{self.domain}".lower()
        configured = [box for box in self.mailboxes if box.lower() == wanted]
        if not configured:
            raise ValueError(f"{local_part}@{self.domain} is not a mailbox of this instance")
        box = self.maildir_base / self.domain / configured[0].rpartition("@")[0]
        files = [p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir() if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]
