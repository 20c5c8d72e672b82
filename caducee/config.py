"""The configuration: one TOML file (`caducee.toml` in the state folder), typed and validated.

Every problem is reported at once, each with its key and the file; unknown keys are errors (a typo must
not silently fall back to a default). Relative paths are relative to the state folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailserver.blobs import INLINE_LIMIT, INLINE_MAX


class ConfigError(Exception):
    """All the problems found in one configuration file."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    domains: tuple[str, ...] = ("caducee.localhost",)
    organisation: str = "Caducée"
    structure_id: str = "3" + "99999999900009"
    # Processes accepting SMTP (submission, submissions, relay): this one and smtp_processes - 1 more
    # sharing its listening sockets; 0 = one per CPU.
    smtp_processes: int = 1


@dataclass(frozen=True)
class ListenConfig:
    relay: HostPort | None = HostPort("127.0.0.1", 2525)
    submission: HostPort | None = HostPort("127.0.0.1", 5587)
    submissions: HostPort | None = HostPort("127.0.0.1", 5465)
    imap: HostPort | None = HostPort("127.0.0.1", 1143)
    imaps: HostPort | None = HostPort("127.0.0.1", 1993)
    ldaps: HostPort | None = HostPort("127.0.0.1", 6636)
    admin: HostPort | None = HostPort("127.0.0.1", 8025)


@dataclass(frozen=True)
class TlsConfig:
    certificate: Path = Path("pki/server/server-fullchain.pem")
    key: Path = Path("pki/server/server.key")
    trust_anchors: Path = Path("pki/ca-bundle.pem")
    crls: tuple[Path, ...] = (
        Path("pki/crl/root.crl.pem"),
        Path("pki/crl/persons.crl.pem"),
        Path("pki/crl/organisations.crl.pem"),
    )


@dataclass(frozen=True)
class TrustConfig:
    # ListeBlancheMSSante XML: a file path or an https URL; "" = no automatic refresh.
    source: str = ""
    # Its SHA-256: a file path or URL of the published checksum, or the hex digest itself; "" = none.
    checksum: str = ""
    refresh_interval: int = 86400


@dataclass(frozen=True)
class RelayConfig:
    # Per-domain next hop "host:port" instead of the MX lookup (tests, private links).
    next_hops: dict[str, HostPort] = field(default_factory=dict)
    max_hops: int = 30
    connect_timeout: int = 30
    retry_initial: int = 60  # seconds before the first retry; doubles, with jitter
    retry_max: int = 3600
    delay_warning: int = 4 * 3600  # a delay DSN after this long
    max_lifetime: int = 5 * 86400  # then a failure DSN, and the message is dropped
    lease: int = 300  # seconds a worker holds a claimed recipient


@dataclass(frozen=True)
class DirectoryConfig:
    # Base DN of the published directory (LDAPS listener and `caducee directory publish`);
    # "" = dc=… from the first mail domain.
    ldap_base: str = ""
    ldap_size_limit: int = 500  # entries per LDAP search at most (sizeLimitExceeded beyond)
    ldap_time_limit: int = 10  # seconds per LDAP search at most (timeLimitExceeded beyond)
    http_max_results: int = 200  # results per page of the HTTP search API at most


@dataclass(frozen=True)
class DiscoveryConfig:
    # A remote directory where the encryption certificates of other operators' mailboxes are looked up
    # (ldap:// or ldaps://); "" = none.
    url: str = ""
    base: str = ""  # search base in that directory
    ca: str = ""  # PEM bundle that authenticates an ldaps:// server; "" = the node's trust anchors
    cache_ttl: int = 3600  # seconds a found (or absent) certificate is remembered
    timeout: int = 10


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///caducee.db"


@dataclass(frozen=True)
class StorageConfig:
    blobs: Path = Path("blobs")
    inline_max: int = INLINE_MAX


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    smtp_timeout: int = 300
    imap_max_append_size: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    state_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else self.state_dir / p

    @property
    def ldap_base(self) -> str:
        """The base DN of the published directory."""
        if self.directory.ldap_base:
            return self.directory.ldap_base
        return ",".join(f"dc={label}" for label in self.server.domains[0].split("."))

    @property
    def smtp_process_count(self) -> int:
        """How many processes accept SMTP: `server.smtp_processes`, 0 being the CPUs this process may use."""
        if self.server.smtp_processes:
            return self.server.smtp_processes
        return max(1, min(len(os.sched_getaffinity(0)), MAX_SMTP_PROCESSES))

    @property
    def database_url(self) -> str:
        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://":
            return prefix + str((self.state_dir / url[len(prefix):]).resolve())
        return url


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "listen": ListenConfig,
    "tls": TlsConfig,
    "trust": TrustConfig,
    "relay": RelayConfig,
    "directory": DirectoryConfig,
    "discovery": DiscoveryConfig,
    "database": DatabaseConfig,
    "storage": StorageConfig,
    "limits": LimitsConfig,
    "log": LogConfig,
}

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_SMTP_PROCESSES = 64


def _parse_hostport(value: Any) -> HostPort | None:
    if value == "" or value is False:
        return None  # listener disabled
    if not isinstance(value, str):
        raise ValueError('expected "host:port" or "" to disable')
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f'expected "host:port", got {value!r}')
    host = host.strip("[]")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range: {number}")
    return HostPort(host or "0.0.0.0", number)


def _convert(section: str, key: str, value: Any, default: Any) -> Any:
    if section == "listen":
        return _parse_hostport(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError('expected a table { "domain" = "host:port" }')
        hops = {}
        for domain, where in value.items():
            hop = _parse_hostport(where)
            if hop is None:
                raise ValueError(f"{domain}: expected host:port")
            hops[domain.lower()] = hop
        return hops
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("expected an integer")
        if section == "server" and key == "smtp_processes":
            if not 0 <= value <= MAX_SMTP_PROCESSES:
                raise ValueError(f"expected 0 (one per CPU) to {MAX_SMTP_PROCESSES}")
            return value
        if section == "storage" and key == "inline_max":
            if not 0 <= value <= INLINE_LIMIT:
                raise ValueError(f"expected 0 (every body a file) to {INLINE_LIMIT} bytes")
            return value
        if value <= 0:
            raise ValueError("must be positive")
        return value
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ValueError("expected a path")
        return Path(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        if default and isinstance(default[0], Path):
            return tuple(Path(v) for v in value)
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError("expected a string")
        if section == "log" and key == "level" and value.lower() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        if section == "server" and key == "hostname" and not value:
            raise ValueError("must not be empty")
        return value
    raise ValueError("unsupported value")


def parse(data: dict[str, Any], state_dir: Path, source: Path) -> Config:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            problems.append(f"unknown section [{name}] (known: {', '.join(SECTIONS)})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a table [{name}]")
            continue
        cls = SECTIONS[name]
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in value.items():
            if key not in known:
                problems.append(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
                continue
            try:
                values[key] = _convert(name, key, raw, getattr(defaults, key))
            except ValueError as exc:
                problems.append(f"{name}.{key}: {exc}")
        if name == "server" and "domains" in values and not values["domains"]:
            problems.append("server.domains: at least one local domain is required")
        try:
            sections[name] = cls(**values)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            problems.append(f"{name}: {exc}")
    if problems:
        raise ConfigError(source, problems)
    cfg = Config(state_dir=state_dir, **sections)
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, domains=tuple(d.lower() for d in cfg.server.domains))
    )
    return cfg


def config_path(state_dir: Path) -> Path:
    return state_dir / "caducee.toml"


def load(state_dir: Path) -> Config:
    path = config_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, ["no configuration file; run `caducee init` first"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    return parse(data, state_dir.resolve(), path)


def sample(domain: str, hostname: str = "localhost") -> str:
    """A commented configuration with every key at its default."""
    d = Config(state_dir=Path("."))
    lst = d.listen
    crls = ", ".join(f'"{p}"' for p in d.tls.crls)
    return f'''# Caducée configuration. Paths are relative to this folder (the state folder).
# Every key is shown with its default; unknown keys are refused.

[server]
# Name in the SMTP greeting, Received headers and the server certificate.
hostname = "{hostname}"
# Mail domains delivered locally (the operator's domains in the trust space).
domains = ["{domain}"]
# The operator: organisation name and structure national id (prefix 1 = FINESS, 3 = SIRET).
organisation = "{d.server.organisation}"
structure_id = "{d.server.structure_id}"
# Processes accepting SMTP connections: TLS handshakes and sessions spread over the CPUs; delivery,
# IMAP, LDAP and the admin API stay in the first. 0 = one per CPU.
smtp_processes = {d.server.smtp_processes}

[listen]
# "host:port"; "" disables a listener. Production ports: 587, 465, 143, 993.
relay = "{lst.relay}"               # SMTP between operators of the trust space, mutual TLS
submission = "{lst.submission}"     # SMTP submission, STARTTLS required before AUTH
submissions = "{lst.submissions}"   # SMTP submission, implicit TLS
imap = "{lst.imap}"                 # IMAP, STARTTLS required before AUTHENTICATE
imaps = "{lst.imaps}"               # IMAP, implicit TLS
ldaps = "{lst.ldaps}"               # the directory over LDAP, implicit TLS, read-only
admin = "{lst.admin}"               # HTTPS API (directory search, FHIR) and console, client certificate

[tls]
# The node's certificate with its chain, and its key (PEM). TLS 1.2 and 1.3 only, AEAD suites only.
certificate = "{d.tls.certificate}"
key = "{d.tls.key}"
# Certification authorities whose certificates may log in (roots and intermediates, PEM).
trust_anchors = "{d.tls.trust_anchors}"
# Revocation lists of those authorities; a certificate whose CA has no valid CRL is refused.
crls = [{crls}]

[trust]
# The national whitelist of operator domains (ListeBlancheMSSante XML): a path or an https URL.
# "" = none; administer it with `caducee trust import|add|remove`.
source = "{d.trust.source}"
# Its published SHA-256 (a path or URL of the checksum file, or the hex digest); "" = not checked.
checksum = "{d.trust.checksum}"
refresh_interval = {d.trust.refresh_interval}   # seconds; a list that fails to load keeps the last good one

[relay]
# Next hop per domain instead of the MX lookup, e.g. {{ "autre-operateur.test" = "127.0.0.1:2526" }}
next_hops = {{}}
max_hops = {d.relay.max_hops}                # Received fields beyond which a message is a loop
connect_timeout = {d.relay.connect_timeout}
retry_initial = {d.relay.retry_initial}           # seconds; doubles at each attempt, with jitter
retry_max = {d.relay.retry_max}
delay_warning = {d.relay.delay_warning}         # delay DSN after this many seconds
max_lifetime = {d.relay.max_lifetime}         # failure DSN and drop after this many seconds
lease = {d.relay.lease}

[directory]
# Base DN of the published directory; "" = dc=… from the first domain.
ldap_base = "{d.directory.ldap_base}"
ldap_size_limit = {d.directory.ldap_size_limit}   # entries per LDAP search at most
ldap_time_limit = {d.directory.ldap_time_limit}    # seconds per LDAP search at most
http_max_results = {d.directory.http_max_results}  # results per HTTP search page at most

[discovery]
# Another directory where other operators' encryption certificates are found: "ldaps://host:636"; "" = none.
url = "{d.discovery.url}"
base = "{d.discovery.base}"
ca = "{d.discovery.ca}"               # PEM bundle for its TLS certificate; "" = [tls] trust_anchors
cache_ttl = {d.discovery.cache_ttl}     # seconds a lookup's answer is kept
timeout = {d.discovery.timeout}

[database]
# SQLite (embedded default, relative to this folder) or PostgreSQL:
# url = "postgresql+psycopg://caducee@127.0.0.1:5432/caducee"
url = "{d.database.url}"

[storage]
# Message bodies, content-addressed: those of at most inline_max bytes are database rows, committed
# with the queue entry that names them (one log write per batch of messages); larger ones are files
# in this folder. 0 keeps every body in a file.
blobs = "{d.storage.blobs}"
inline_max = {d.storage.inline_max}

[limits]
max_message_size = {d.limits.max_message_size}   # bytes, announced with SIZE (RFC 1870)
max_recipients = {d.limits.max_recipients}       # per message
smtp_timeout = {d.limits.smtp_timeout}           # seconds of client silence before 421
imap_max_append_size = {d.limits.imap_max_append_size}

[log]
level = "{d.log.level}"   # debug, info, warning, error
'''
