"""A real, private OpenLDAP `slapd` for the tests and the benchmarks, configured the way `deploy/openldap` says
to (the tests start theirs from here; `caducee bench ldap` loads the published directory into
one with :meth:`Slapd.load`, offline, before starting it).

One :class:`Slapd` is a complete server in its own directory: a `cn=config` tree (`slapd.d/`, built with
`slapadd -n0` from the LDIF this module writes: back_mdb, the core, cosine and inetorgperson schemas and
`deploy/openldap/caducee.ldif`), one mdb database whose suffix is the test's base DN with a root DN and
password, and a log file. It listens on `ldap://127.0.0.1:PORT` and, given a certificate (the project's
dev PKI issues one), on `ldaps://127.0.0.1:PORT2`. The machine's own slapd (`/etc/ldap`) is neither needed
nor touched.

    pki = DevPKI.create_or_load(tmp / "pki")
    tls = SlapdTls.issue(pki, tmp / "tls")
    with Slapd.create(tmp / "slapd", base="dc=operateur,dc=test", tls=tls) as server:
        server.connection().search(server.base, "(objectClass=*)")
        server.ldapsearch("-b", server.base, "(mail=alice@operateur.test)")
        server.operations()          # Counter of ADD / MOD / DEL / SRCH … from the stats log

`provider=True` adds the syncprov overlay (what syncrepl consumers read from); `Slapd.create(...,
replica_of=provider)` is a read-only syncrepl consumer of that provider (refreshAndPersist), as
docs/operations.md describes.

slapd runs in the foreground (`-d stats`): its statistics log (one line per connection and operation) is
the log file, and :meth:`Slapd.operations` counts operations from it. It runs as the user running the
tests (root here: no `-u`/`-g` needed, every file is the user's). SIGTERM stops it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from crypto.pki import DevPKI
from mailserver.testing import DaemonLog, free_port

__all__ = [
    "DEPLOY_DIR",
    "LDAPSEARCH",
    "SCHEMA_DIR",
    "SLAPADD",
    "SLAPCAT",
    "SLAPD",
    "SLAPTEST",
    "SYSTEM_SCHEMAS",
    "Slapd",
    "SlapdError",
    "SlapdTls",
    "ldif_entry",
    "slaptest_conf",
    "ssha",
]

SLAPD: Final = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD: Final = shutil.which("slapadd") or "/usr/sbin/slapadd"
SLAPCAT: Final = shutil.which("slapcat") or "/usr/sbin/slapcat"
SLAPTEST: Final = shutil.which("slaptest") or "/usr/sbin/slaptest"
LDAPSEARCH: Final = shutil.which("ldapsearch") or "/usr/bin/ldapsearch"
MODULE_DIR: Final = Path("/usr/lib/ldap")
SCHEMA_DIR: Final = Path("/etc/ldap/schema")
SYSTEM_SCHEMAS: Final = ("core", "cosine", "inetorgperson")
DEPLOY_DIR: Final = Path(__file__).resolve().parents[1] / "deploy" / "openldap"
_COMMAND_TIMEOUT: Final = 60.0
_OPERATION_RE: Final = re.compile(r"\bconn=(\d+) op=(\d+) (ADD|MOD|MODRDN|DEL|SRCH|BIND|UNBIND|EXT|CMP|ABANDON)\b")


class SlapdError(RuntimeError):
    """A slapd command failed; the message carries its output and the tail of the instance's log."""


def ssha(password: str) -> str:
    """`{SSHA}` hash of a password (what `slappasswd` writes), so that no configuration holds it in clear."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()  # the scheme OpenLDAP reads
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


@dataclass(frozen=True)
class SlapdTls:
    """The server's certificate (PEM, followed by its chain), its key, and the CA bundle clients trust."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    @classmethod
    def issue(cls, pki: DevPKI, out_dir: Path, *, hostnames: tuple[str, ...] = ("localhost",),
              ips: tuple[str, ...] = ("127.0.0.1",), basename: str = "slapd") -> SlapdTls:
        """A server certificate for `hostnames` and `ips` from the dev PKI's organisations CA."""
        issued = pki.issue_server(list(hostnames), list(ips), out_dir, basename,
                                  structure_id="399999999900009", organisation=pki.organisation)
        return cls(issued.chain_path, issued.key_path, pki.ca_bundle_path)


def _ldif_value(name: str, value: str | bytes) -> str:
    """One LDIF line, base64 when the value is binary or not a SAFE-STRING (RFC 2849)."""
    if isinstance(value, bytes):
        return f"{name}:: {base64.b64encode(value).decode('ascii')}"
    if value and value.isascii() and value.isprintable() and value[0] not in " :<" and value[-1] != " ":
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"


def _entry(dn: str, *attributes: tuple[str, str]) -> str:
    return "\n".join([_ldif_value("dn", dn), *(_ldif_value(k, v) for k, v in attributes)]) + "\n"


def ldif_entry(dn: str, attributes: dict[str, list[Any]]) -> str:
    """One entry as an LDIF record (no line folding), values `str` (UTF-8) or `bytes` (written in base64),
    e.g. a `directory.ldap_view.LdapEntry`'s `dn` and `attributes`; ends with the blank separator line."""
    lines = [_ldif_value("dn", dn)]
    for name, values in attributes.items():
        lines += (_ldif_value(name, value) for value in values)
    return "\n".join(lines) + "\n\n"


@dataclass
class Slapd(DaemonLog):
    """A private slapd in `workdir`; build it with :meth:`create`.

    Layout: `config.ldif` (what `slapd.d/` was built from), `slapd.d/` (cn=config), `db/` (mdb),
    `slapd.log`, `password` (the root password, mode 0600, for `ldapsearch -y` and `--password-file`).
    """

    daemon = "slapd"
    error = SlapdError
    output_limit = 4000

    workdir: Path
    base: str
    root_dn: str
    root_password: str
    ldap_port: int
    ldaps_port: int | None
    tls: SlapdTls | None
    provider: bool = False
    replica_of: Slapd | None = None
    loglevel: str = "stats"
    mdb_options: tuple[tuple[str, str], ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # -------------------- layout

    @property
    def config_ldif(self) -> Path:
        return self.workdir / "config.ldif"

    @property
    def config_dir(self) -> Path:
        return self.workdir / "slapd.d"

    @property
    def db_dir(self) -> Path:
        return self.workdir / "db"

    @property
    def log_file(self) -> Path:
        return self.workdir / "slapd.log"

    @property
    def password_file(self) -> Path:
        return self.workdir / "password"

    @property
    def url(self) -> str:
        """The plain listener (loopback)."""
        return f"ldap://127.0.0.1:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        if self.ldaps_port is None:
            raise SlapdError("this instance has no ldaps:// listener (created without tls)")
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    # -------------------- configuration

    @classmethod
    def create(
        cls,
        workdir: Path,
        *,
        base: str,
        tls: SlapdTls | None = None,
        root_password: str | None = None,
        provider: bool = False,
        replica_of: Slapd | None = None,
        extra_schemas: tuple[Path, ...] = (),
        mdb_options: tuple[tuple[str, str], ...] = (),
        loglevel: str = "stats",
    ) -> Slapd:
        """Write the configuration and build `slapd.d/` with `slapadd -n0` (nothing is started).

        The root DN is `cn=admin,<base>`; its password is random unless given. `extra_schemas` are
        cn=config schema LDIF files loaded after caducee.ldif; `mdb_options` more attributes of the mdb
        database (e.g. `("olcDbNoSync", "TRUE")`).
        """
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(
            workdir=workdir, base=base, root_dn=f"cn=admin,{base}",
            root_password=root_password or secrets.token_urlsafe(18),
            ldap_port=free_port(), ldaps_port=free_port() if tls is not None else None, tls=tls,
            provider=provider, replica_of=replica_of, loglevel=loglevel, mdb_options=mdb_options,
        )
        for directory in (server.config_dir, server.db_dir):
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(mode=0o700)
        server.password_file.write_text(server.root_password, encoding="utf-8")
        server.password_file.chmod(0o600)
        schemas = [*(SCHEMA_DIR / f"{name}.ldif" for name in SYSTEM_SCHEMAS), DEPLOY_DIR / "caducee.ldif",
                   *extra_schemas]
        server.config_ldif.write_text(server._config(schemas), encoding="utf-8")
        server.config_ldif.chmod(0o600)
        server._run(SLAPADD, "-n0", "-F", str(server.config_dir), "-l", str(server.config_ldif))
        return server

    def _config(self, schemas: list[Path]) -> str:
        """The cn=config tree as LDIF: global settings, modules, schemas, frontend, config and mdb databases."""
        global_attrs: list[tuple[str, str]] = [("objectClass", "olcGlobal"), ("cn", "config"),
                                               ("olcPidFile", str(self.workdir / "slapd.pid"))]
        if self.tls is not None:
            global_attrs += [
                ("olcTLSCertificateFile", str(self.tls.cert_file)),
                ("olcTLSCertificateKeyFile", str(self.tls.key_file)),
                ("olcTLSCACertificateFile", str(self.tls.ca_file)),
                ("olcTLSProtocolMin", "3.3"),  # TLS 1.2 and later (REFERENCE.md §1)
            ]
        modules = [("objectClass", "olcModuleList"), ("cn", "module{0}"), ("olcModulePath", str(MODULE_DIR)),
                   ("olcModuleLoad", "back_mdb")]
        if self.provider:
            modules.append(("olcModuleLoad", "syncprov"))
        parts = [
            _entry("cn=config", *global_attrs),
            _entry("cn=module{0},cn=config", *modules),
            _entry("cn=schema,cn=config", ("objectClass", "olcSchemaConfig"), ("cn", "schema")),
            *(schema.read_text(encoding="utf-8") for schema in schemas),
            _entry("olcDatabase={-1}frontend,cn=config", ("objectClass", "olcDatabaseConfig"),
                   ("objectClass", "olcFrontendConfig"), ("olcDatabase", "{-1}frontend"),
                   ("olcSizeLimit", "500")),
            _entry("olcDatabase={0}config,cn=config", ("objectClass", "olcDatabaseConfig"),
                   ("olcDatabase", "{0}config"), ("olcAccess", "{0}to * by * none")),
        ]
        mdb: list[tuple[str, str]] = [
            ("objectClass", "olcDatabaseConfig"), ("objectClass", "olcMdbConfig"), ("olcDatabase", "{1}mdb"),
            ("olcSuffix", self.base), ("olcRootDN", self.root_dn), ("olcRootPW", ssha(self.root_password)),
            ("olcDbDirectory", str(self.db_dir)), ("olcDbMaxSize", str(8 * 1024 ** 3)),
            ("olcDbIndex", "objectClass eq"), ("olcDbIndex", "mail eq"), ("olcDbIndex", "uid eq"),
            ("olcDbIndex", "entryCSN,entryUUID eq"),
            # The published directory is public (DESIGN.md §2): anyone reads, only the root DN writes.
            ("olcAccess", "{0}to * by * read"),
            ("olcLimits", f'dn.exact="{self.root_dn}" size=unlimited time=unlimited'),
        ]
        mdb += list(self.mdb_options)
        if self.replica_of is not None:
            provider = self.replica_of
            mdb += [
                ("olcSyncrepl",
                 (f"rid=001 provider={provider.url} bindmethod=simple binddn=\"{provider.root_dn}\" "
                  f"credentials=\"{provider.root_password}\" searchbase=\"{provider.base}\" "
                  "type=refreshAndPersist retry=\"1 +\" timeout=5")),
                ("olcUpdateRef", provider.url),
            ]
        parts.append(_entry("olcDatabase={1}mdb,cn=config", *mdb))
        if self.provider:
            parts.append(_entry("olcOverlay={0}syncprov,olcDatabase={1}mdb,cn=config",
                                ("objectClass", "olcOverlayConfig"), ("objectClass", "olcSyncProvConfig"),
                                ("olcOverlay", "{0}syncprov"), ("olcSpCheckpoint", "100 10")))
        return "\n".join(part.rstrip("\n") + "\n" for part in parts)

    # -------------------- commands

    def _run(self, *args: str, check: bool = True, input: bytes | None = None,
             env: dict[str, str] | None = None, timeout: float = _COMMAND_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        try:
            done = subprocess.run(list(args), check=False, capture_output=True, timeout=timeout, input=input,
                                  env=env)
        except FileNotFoundError as exc:
            raise SlapdError(f"{args[0]} not found: install the Debian packages slapd and ldap-utils") from exc
        if check and done.returncode != 0:
            raise SlapdError(self._describe(f"{' '.join(args)} exited with {done.returncode}", done))
        return done

    def load(self, ldif: Path, *, timeout: float = 1800) -> None:
        """Load entries into the stopped server's database offline (`slapadd -q`, quick mode: no consistency
        checks, indexes built as it goes); parents must come before their children in the file."""
        if self.running:
            raise SlapdError("slapadd needs the server stopped")
        self._run(SLAPADD, "-q", "-F", str(self.config_dir), "-b", self.base, "-l", str(ldif), timeout=timeout)

    def start(self, timeout: float = 30) -> Self:
        """Start slapd in the foreground and wait until it answers a root DSE search."""
        if self.running:
            raise SlapdError(f"the instance in {self.workdir} is already running")
        urls = [self.url + "/"]
        if self.ldaps_port is not None:
            urls.append(self.ldaps_url + "/")
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-F", str(self.config_dir), "-h", " ".join(urls), "-d", self.loglevel],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SlapdError(self._describe(f"slapd exited with {self.proc.returncode} at start"))
            if self._answers():
                return self
            time.sleep(0.05)
        with contextlib.suppress(SlapdError):
            self.stop()
        raise SlapdError(self._describe(f"slapd did not answer on {self.url} within {timeout} s"))

    def _answers(self) -> bool:
        from directory.ldap_client import ldap3

        try:  # a TCP probe first: ldap3 leaves the socket of a refused connection to the garbage collector
            with socket.create_connection(("127.0.0.1", self.ldap_port), timeout=2):
                pass
        except OSError:
            return False
        try:
            conn = ldap3.Connection(ldap3.Server("127.0.0.1", self.ldap_port, get_info=ldap3.NONE,
                                                 connect_timeout=2), receive_timeout=2)
            try:
                conn.open()
                return bool(conn.search("", "(objectClass=*)", ldap3.BASE, attributes=["namingContexts"]))
            finally:
                conn.unbind()
        except ldap3.core.exceptions.LDAPException:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for slapd to exit (SIGKILL and :class:`SlapdError` after `timeout`)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise SlapdError(self._describe(f"slapd in {self.workdir} did not stop within {timeout} s")) \
                    from None
        return self.proc.returncode

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -------------------- clients

    def connection(self, *, bind: bool = True) -> Any:
        """An ldap3 connection to the plain listener, bound as the root DN (or anonymous)."""
        from directory.ldap_client import ldap3

        server = ldap3.Server("127.0.0.1", self.ldap_port, get_info=ldap3.NONE, connect_timeout=5)
        if bind:
            conn = ldap3.Connection(server, self.root_dn, self.root_password, receive_timeout=10)
        else:
            conn = ldap3.Connection(server, receive_timeout=10)
        if not conn.bind():
            raise SlapdError(f"bind to {self.url} failed: {conn.result}")
        return conn

    def ldapsearch(self, *args: str, tls: bool = True, bind: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the `ldapsearch` CLI against this server (over ldaps:// trusting the CA bundle by default)."""
        env = dict(os.environ)
        if tls:
            assert self.tls is not None
            env.update(LDAPTLS_CACERT=str(self.tls.ca_file), LDAPTLS_REQCERT="demand")
        command = [LDAPSEARCH, "-LLL", "-x", "-o", "ldif-wrap=no", "-H", self.ldaps_url if tls else self.url]
        if bind:
            command += ["-D", self.root_dn, "-y", str(self.password_file)]
        done = self._run(*command, *args, check=False, env=env)
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"),
                                           done.stderr.decode("utf-8", "replace"))

    def slapcat(self) -> str:
        """The whole database as LDIF (`slapcat`, safe while an mdb slapd runs)."""
        done = self._run(SLAPCAT, "-F", str(self.config_dir), "-b", self.base, "-o", "ldif-wrap=no")
        return done.stdout.decode("utf-8", "replace")

    # -------------------- log

    def operations(self, offset: int = 0) -> collections.Counter[str]:
        """Operations received since `offset` in the log, by kind (ADD, MOD, DEL, SRCH, BIND, …)."""
        seen = {(m.group(1), m.group(2)): m.group(3) for m in _OPERATION_RE.finditer(self.log_text(offset))}
        return collections.Counter(seen.values())


def slaptest_conf(workdir: Path, schema_files: list[Path], base: str = "dc=example,dc=test") -> str:
    """Check a slapd.conf that includes `schema_files` (slapd.conf form) with `slaptest -u`; its output."""
    workdir.mkdir(parents=True, exist_ok=True)
    includes = "\n".join(f"include {path}" for path in schema_files)
    conf = workdir / "slapd.conf"
    conf.write_text(f"{includes}\nmodulepath {MODULE_DIR}\nmoduleload back_mdb\n"
                    f"database mdb\nsuffix \"{base}\"\ndirectory {workdir}\n", encoding="utf-8")
    done = subprocess.run([SLAPTEST, "-u", "-f", str(conf)], check=False, capture_output=True, timeout=_COMMAND_TIMEOUT)
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    if done.returncode != 0:
        raise SlapdError(f"slaptest -u -f {conf} exited with {done.returncode}:\n{output}")
    return output
