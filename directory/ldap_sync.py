"""Publication of the directory to an OpenLDAP server: `caducee directory publish` (DESIGN.md §6).

What is published is `directory.ldap_view.iter_published`, the same entries the LDAPS listener serves
(layout and schema in `directory.ldap_schema`). Several nodes or replicas then read one OpenLDAP provider,
whose syncrepl consumers copy it (docs/operations.md).

**Incremental.** For each target (server `host:port` and base DN, table `ldap_targets`) the table
`ldap_published` holds every entry the server acknowledged: its DN and the SHA-256 of its normalised
attributes (names lower-cased, `;binary` dropped, values as UTF-8 or DER bytes, sorted, duplicates
removed). A run streams the view in batches and, for each entry:

- never published: **add** (if the server already has it, `entryAlreadyExists`, it is modified instead);
- published with another digest: the server's entry is read and **modify** replaces only the attributes
  whose values differ, and removes those the entry no longer has (if the server lost it, it is added);
- published with the same digest: nothing is sent.

Then every DN published before and absent from the view now (a liste rouge or deactivated mailbox, a
removed practitioner) is **deleted**, deepest first (children before parents). A second run with no
change sends nothing. The table is written per batch, after the server answered, so an interrupted run
leaves it true: the next run carries on from there.

**Full** (`--full`) compares with the server instead of the table: the base entry and the three subtrees
are read with paged searches (RFC 2696) into a temporary table, the run then goes as above against it,
and the table is rebuilt from the result. It repairs drift (entries changed or removed on the server by
hand, a restored backup, a lost table).

**What it owns.** `ou=people`, `ou=organisations`, `ou=mailboxes` and everything below them, and the
attributes it sets on the base entry; other entries under the base (a replication account, say) and other
attributes of the base entry are never touched.

**Errors.** An entry the server refuses (schema violation, invalid syntax…) is reported with its DN and
the server's answer, counted, and the run goes on; `MAX_CONSECUTIVE_FAILURES` refusals in a row, a
refusal of the base or of an `ou`, or an answer that concerns the whole connection (referral from a
read-only replica, insufficient access, busy, unavailable, lost connection) stop the run with
`PublishError`.

**Memory.** Constant: the view is read in batches by database id; which DNs were seen goes to a
temporary table, and the deletions are read back from the database in pages.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import sqlalchemy as sa

from directory import ldap_schema as ls
from directory.ldap_client import LdapEndpoint, ldap3, ldap3_exceptions
from directory.ldap_view import PUBLISHED_MAILBOX, LdapEntry, iter_published
from directory.schema import (
    ldap_published,
    ldap_targets,
    mailboxes,
    organisations,
    principals,
)

log = logging.getLogger(__name__)

__all__ = [
    "PublishError",
    "PublishFailure",
    "PublishProgress",
    "PublishSummary",
    "Publisher",
    "Target",
    "attributes_digest",
    "dn_key",
    "normalise_attributes",
    "normalise_dn",
]

BATCH = 500
PAGE_SIZE = 500
MAX_FAILURES_KEPT = 20
MAX_CONSECUTIVE_FAILURES = 100
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"

# RFC 4511 §4.1.9 result codes.
SUCCESS = 0
NO_SUCH_OBJECT = 32
ENTRY_ALREADY_EXISTS = 68
REFERRAL = 10
# Answers about the connection or the bind DN, not about one entry: going on would fail every entry.
FATAL_RESULTS = {
    1: "operationsError", 2: "protocolError", 3: "timeLimitExceeded", 7: "authMethodNotSupported",
    8: "strongerAuthRequired", 10: "referral", 11: "adminLimitExceeded", 13: "confidentialityRequired",
    48: "inappropriateAuthentication", 49: "invalidCredentials", 50: "insufficientAccessRights", 51: "busy",
    52: "unavailable", 53: "unwillingToPerform", 80: "other",
}
_HINTS = {
    10: "the server is a read-only replica (syncrepl consumer): publish to its provider",
    50: "the bind DN may not write there: publish as the database's rootdn or give it write access",
    53: "is the base DN a suffix (olcSuffix) of that server, and is it the provider?",
}


class PublishError(Exception):
    """The publication stopped: the message says where and why. What was done before is recorded."""


# -------------------- normalisation


def attribute_key(name: str) -> str:
    """An attribute description compared case-insensitively, the `;binary` transfer option dropped."""
    key = name.strip().lower()
    return key.removesuffix(";binary")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


Normalised = dict[str, tuple[str, tuple[bytes, ...]]]
_LENGTH = struct.Struct(">I")


def normalise_attributes(attributes: Mapping[str, Iterable[Any]]) -> Normalised:
    """{attribute key: (name as given, sorted distinct values as bytes)}; attributes without values dropped."""
    merged: dict[str, tuple[str, list[bytes]]] = {}
    for name, values in attributes.items():
        key = attribute_key(name)
        encoded = [v if type(v) is bytes else _as_bytes(v) for v in values]
        if key in merged:
            merged[key][1].extend(encoded)
        else:
            merged[key] = (name, encoded)
    return {key: (name, tuple(sorted(set(values)))) for key, (name, values) in merged.items() if values}


def attributes_digest(normalised: Normalised) -> str:
    """SHA-256 of normalised attributes (length-prefixed, so that no two different entries collide by layout)."""
    parts: list[bytes] = []
    for key in sorted(normalised):
        values = normalised[key][1]
        encoded = key.encode("utf-8")
        parts += (_LENGTH.pack(len(encoded)), encoded, _LENGTH.pack(len(values)))
        for value in values:
            parts += (_LENGTH.pack(len(value)), value)
    return hashlib.sha256(b"".join(parts)).hexdigest()


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    """An RFC 4514 attribute value with its escapes (`\\,` and `\\2C` forms) resolved."""
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 2 < len(value) + 1 and i + 1 < len(value):
            pair = value[i + 1: i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out += value[i + 1].encode("utf-8")
            i += 2
            continue
        out += ch.encode("utf-8")
        i += 1
    return out.decode("utf-8", "replace")


def _strip_value(value: str) -> str:
    """Leading and trailing spaces of a DN value, except escaped ones."""
    value = value.lstrip(" ")
    while value.endswith(" ") and not value.endswith("\\ "):
        value = value[:-1]
    return value


_SPECIAL_IN_VALUE = re.compile(r'[\\+"<>;#=]')


def normalise_dn(dn: str) -> tuple[str, int]:
    """(canonical form, number of RDNs) of an RFC 4514 DN: types and values lower-cased, escapes resolved
    then re-applied one way, spaces around separators removed, multi-valued RDNs sorted."""
    if "\\" not in dn and "+" not in dn:  # the common case, without escapes: the same result, faster
        plain = []
        for rdn in dn.strip().split(","):
            attr, sep, value = rdn.partition("=")
            value = value.strip(" ")
            if not sep or not attr.strip() or _SPECIAL_IN_VALUE.search(value):
                break
            plain.append(f"{attr.strip().lower()}={value.lower()}")
        else:
            return ",".join(plain), len(plain)
    rdns = []
    for rdn in _split_unescaped(dn.strip(), ","):
        avas = []
        for ava in _split_unescaped(rdn, "+"):
            attr, sep, value = ava.partition("=")
            if not sep or not attr.strip():
                raise ValueError(f"not a DN: {dn!r}")
            avas.append(f"{attr.strip().lower()}={ls.escape_rdn_value(_unescape(_strip_value(value)).lower())}")
        rdns.append("+".join(sorted(avas)))
    return ",".join(rdns), len(rdns)


def dn_key(dn: str) -> str:
    """SHA-256 (hex) of the canonical DN: how a DN is found in `ldap_published`."""
    return _key_of(normalise_dn(dn)[0])


def _key_of(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# -------------------- values


@dataclass(frozen=True)
class Target:
    """A server and the base DN published under it."""

    endpoint: LdapEndpoint
    base: str

    @property
    def key(self) -> str:
        return f"{self.endpoint.host.lower()}:{self.endpoint.port}/{normalise_dn(self.base)[0]}"

    def __str__(self) -> str:
        return f"{self.base} on {self.endpoint}"


@dataclass(frozen=True)
class PublishFailure:
    """An entry the server refused."""

    dn: str
    operation: str  # add | modify | delete
    code: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.operation} {self.dn}: {self.reason}"


@dataclass(frozen=True)
class PublishProgress:
    """Where a run stands (the shape `caducee directory import`'s progress bar reads)."""

    phase: str  # "reading" (the server, --full), "publishing", "deleting", "done"
    done: int
    total: int
    elapsed: float

    @property
    def lines(self) -> int:
        return self.done

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0


@dataclass
class PublishSummary:
    target: str
    full: bool
    dry_run: bool
    entries: int = 0  # entries of the view
    added: int = 0
    modified: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0
    failures: list[PublishFailure] = field(default_factory=list)  # the first MAX_FAILURES_KEPT
    remote_entries: int = 0  # entries read from the server (--full)
    reads: int = 0  # LDAP searches sent
    writes: int = 0  # LDAP add, modify and delete requests sent
    elapsed: float = 0.0
    samples: dict[str, list[str]] = field(default_factory=dict)  # dry run: the first DNs of each change

    @property
    def rate(self) -> float:
        """Entries of the view handled per second."""
        return self.entries / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0


# -------------------- the run

_tmp = sa.MetaData()
_seen = sa.Table(
    "caducee_publish_seen", _tmp,
    sa.Column("dn_key", sa.String(64), nullable=False),
    sa.Index("ix_caducee_publish_seen", "dn_key"),
    prefixes=["TEMPORARY"],
)
_remote = sa.Table(
    "caducee_publish_remote", _tmp,
    sa.Column("dn_key", sa.String(64), nullable=False),
    sa.Column("dn", sa.String(1000), nullable=False),
    sa.Column("depth", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Index("ix_caducee_publish_remote", "dn_key"),
    prefixes=["TEMPORARY"],
)


@dataclass
class _Done:
    """What the server holds for one DN after an operation: `digest` None = nothing."""

    key: str
    dn: str
    depth: int
    stored: str | None  # digest in ldap_published before the run (None: no row)
    digest: str | None


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class Publisher:
    """One publication run of the directory in `engine` to `target` over the ldap3 connection `conn`
    (bound, with a DN that may write under the base). Build one per run; `run()` returns the summary or
    raises `PublishError`."""

    def __init__(self, engine: sa.Engine, conn: Any, target: Target, *, organisation: str | None = None,
                 full: bool = False, dry_run: bool = False, batch: int = BATCH,
                 progress: Callable[[PublishProgress], None] | None = None,
                 on_failure: Callable[[PublishFailure], None] | None = None) -> None:
        self.engine = engine
        self.conn = conn
        self.target = target
        self.organisation = organisation
        self.full = full
        self.dry_run = dry_run
        self.batch = max(1, batch)
        self.progress = progress
        self.on_failure = on_failure
        self.summary = PublishSummary(str(target), full, dry_run)
        self._base_key = dn_key(target.base)
        self._base_depth = normalise_dn(target.base)[1]
        self._consecutive_failures = 0
        self._started = 0.0
        self._done = 0
        self._total = 0

    # ---- orchestration

    def run(self) -> PublishSummary:
        self._started = time.monotonic()
        target_id = self._target_id(create=not self.dry_run)
        try:
            with self.engine.connect() as read:
                try:
                    self._run(read, target_id)
                finally:
                    read.rollback()  # read-only, but for the temporary tables (dropped with the transaction)
        finally:
            self.summary.elapsed = time.monotonic() - self._started
        if not self.dry_run and target_id is not None:
            now = dt.datetime.now(dt.UTC)
            values: dict[str, Any] = {"published_at": now, "url": self.target.endpoint.url, "base": self.target.base}
            if self.full:
                values["full_at"] = now
            with self.engine.begin() as conn:
                conn.execute(sa.update(ldap_targets).where(ldap_targets.c.id == target_id).values(**values))
        self._tell("done")
        return self.summary

    def _run(self, read: sa.Connection, target_id: int | None) -> None:
        _seen.create(read)
        stored_table_is_prev = not self.full
        if self.full:
            _remote.create(read)
            self._load_remote(read)
            prev: sa.Table = _remote
            prev_where: list[Any] = []
            if not self.dry_run and target_id is not None:
                with self.engine.begin() as conn:  # rebuilt from what the server holds after this run
                    conn.execute(sa.delete(ldap_published).where(ldap_published.c.target_id == target_id))
        else:
            prev = ldap_published
            prev_where = [ldap_published.c.target_id == (target_id if target_id is not None else -1)]
        self._total = self._count(read)
        self._done = 0
        self._tell("publishing")
        for chunk in _batches(iter_published(read, self.target.base, organisation=self.organisation), self.batch):
            names = [normalise_dn(entry.dn) for entry in chunk]
            keys = [_key_of(canonical) for canonical, _depth in names]
            read.execute(sa.insert(_seen), [{"dn_key": k} for k in keys])
            previous = {row.dn_key: row.digest for row in read.execute(
                sa.select(prev.c.dn_key, prev.c.digest).where(prev.c.dn_key.in_(keys), *prev_where))}
            done: list[_Done] = []
            try:
                for key, (_canonical, depth), entry in zip(keys, names, chunk):
                    self.summary.entries += 1
                    old = previous.get(key)
                    done.append(self._publish_entry(entry, key, depth, old, old if stored_table_is_prev else None))
            finally:
                self._record(target_id, done)
            self._done += len(chunk)
            self._tell("publishing")
        self._delete_missing(read, prev, prev_where, target_id, stored_table_is_prev)

    def _count(self, read: sa.Connection) -> int:
        def count(table: sa.Table, *where: Any) -> int:
            return int(read.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())

        return (1 + len(ls.OUS)
                + count(principals, principals.c.kind == "person", principals.c.active.is_(True))
                + count(organisations) + count(mailboxes, PUBLISHED_MAILBOX))

    def _tell(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(PublishProgress(phase, self._done, self._total, time.monotonic() - self._started))

    def _target_id(self, *, create: bool) -> int | None:
        key = self.target.key
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(ldap_targets.c.id).where(ldap_targets.c.target == key)).scalar()
            if found is not None or not create:
                return found
            inserted = conn.execute(sa.insert(ldap_targets).values(
                target=key, url=self.target.endpoint.url, base=self.target.base)).inserted_primary_key
            assert inserted is not None
            return int(inserted[0])

    def _record(self, target_id: int | None, done: list[_Done]) -> None:
        """Write what the server now holds for these DNs (one transaction)."""
        if self.dry_run or target_id is None or not done:
            return
        inserts = [{"target_id": target_id, "dn_key": d.key, "dn": d.dn, "depth": d.depth, "digest": d.digest}
                   for d in done if d.stored is None and d.digest is not None]
        updates = [{"k": d.key, "d": d.digest} for d in done
                   if d.stored is not None and d.digest is not None and d.digest != d.stored]
        deletes = [d.key for d in done if d.stored is not None and d.digest is None]
        if not (inserts or updates or deletes):
            return
        with self.engine.begin() as conn:
            if inserts:
                conn.execute(sa.insert(ldap_published), inserts)
            if updates:
                conn.execute(sa.update(ldap_published)
                             .where(ldap_published.c.target_id == target_id,
                                    ldap_published.c.dn_key == sa.bindparam("k"))
                             .values(digest=sa.bindparam("d")), updates)
            if deletes:
                conn.execute(sa.delete(ldap_published).where(ldap_published.c.target_id == target_id,
                                                             ldap_published.c.dn_key.in_(deletes)))

    # ---- one entry

    def _publish_entry(self, entry: LdapEntry, key: str, depth: int, previous: str | None,
                       stored: str | None) -> _Done:
        local = normalise_attributes(entry.attributes)
        digest = attributes_digest(local)
        critical = depth <= self._base_depth + 1  # the base and the ous
        if previous == digest:
            self.summary.unchanged += 1
            return _Done(key, entry.dn, depth, stored, digest)
        owned = key != self._base_key
        if previous is None:
            result = self._add(entry, local, critical, owned)
        else:
            result = self._modify(entry, local, critical, owned)
        # Refused: the server still holds what it held before (nothing, for a refused add).
        return _Done(key, entry.dn, depth, stored, previous if result == "failed" else digest)

    def _add(self, entry: LdapEntry, local: Normalised, critical: bool, owned: bool, *,
             may_modify: bool = True) -> str:
        if self.dry_run:
            return self._count_change("added", entry.dn)
        ok = self._send("add", entry.dn, lambda: self.conn.add(entry.dn, attributes=entry.attributes))
        if ok:
            return self._count_change("added", entry.dn)
        if self._code() == ENTRY_ALREADY_EXISTS and may_modify:
            return self._modify(entry, local, critical, owned, may_add=False)
        return self._refused("add", entry.dn, critical)

    def _modify(self, entry: LdapEntry, local: Normalised, critical: bool, owned: bool, *,
                may_add: bool = True) -> str:
        remote = self._read(entry.dn)
        if remote is None:
            if may_add:
                return self._add(entry, local, critical, owned, may_modify=False)
            return self._refused("modify", entry.dn, critical)
        changes: dict[str, list[tuple[Any, list[Any]]]] = {}
        for key, (name, values) in local.items():
            if remote.get(key, ("", ()))[1] != values:
                changes[name] = [(ldap3.MODIFY_REPLACE, entry.get(name))]
        if owned:
            for key, (name, _values) in remote.items():
                if key not in local:
                    changes[name] = [(ldap3.MODIFY_REPLACE, [])]
        if not changes:
            self.summary.unchanged += 1
            return "unchanged"
        if self.dry_run:
            return self._count_change("modified", entry.dn)
        if self._send("modify", entry.dn, lambda: self.conn.modify(entry.dn, changes)):
            return self._count_change("modified", entry.dn)
        if self._code() == NO_SUCH_OBJECT and may_add:
            return self._add(entry, local, critical, owned, may_modify=False)
        return self._refused("modify", entry.dn, critical)

    def _read(self, dn: str) -> Normalised | None:
        """The server's entry at `dn` (user attributes), or None when it has none."""
        self.summary.reads += 1
        ok = self._call("search", dn, lambda: self.conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["*"]))
        if not ok and self._code() != SUCCESS:  # ldap3 answers False for "no entry" too
            if self._code() == NO_SUCH_OBJECT:
                return None
            self._fatal("search", dn)
            raise PublishError(f"reading {dn}: {self._describe()}")
        found = [r for r in self.conn.response if r.get("type") == "searchResEntry"]
        return normalise_attributes(found[0]["raw_attributes"]) if found else None

    def _count_change(self, kind: str, dn: str) -> str:
        setattr(self.summary, kind, getattr(self.summary, kind) + 1)
        self._consecutive_failures = 0
        if self.dry_run:
            samples = self.summary.samples.setdefault(kind, [])
            if len(samples) < MAX_FAILURES_KEPT:
                samples.append(dn)
        return kind

    # ---- deletions

    def _delete_missing(self, read: sa.Connection, prev: sa.Table, prev_where: list[Any], target_id: int | None,
                        stored_table_is_prev: bool) -> None:
        missing = sa.select(prev.c.dn_key, prev.c.dn, prev.c.depth, prev.c.digest).where(
            *prev_where, ~sa.exists().where(_seen.c.dn_key == prev.c.dn_key))
        last: tuple[int, str] | None = None
        self._tell("deleting")
        while True:
            query = missing
            if last is not None:
                query = query.where(sa.or_(prev.c.depth < last[0],
                                           sa.and_(prev.c.depth == last[0], prev.c.dn_key > last[1])))
            rows = read.execute(query.order_by(prev.c.depth.desc(), prev.c.dn_key).limit(self.batch)).all()
            if not rows:
                return
            last = (rows[-1].depth, rows[-1].dn_key)
            done: list[_Done] = []
            try:
                for row in rows:
                    stored = row.digest if stored_table_is_prev else None
                    gone = self._delete(row.dn, critical=row.depth <= self._base_depth + 1)
                    done.append(_Done(row.dn_key, row.dn, row.depth, stored, None if gone else row.digest))
            finally:
                self._record(target_id, done)
            self._tell("deleting")

    def _delete(self, dn: str, *, critical: bool) -> bool:
        if self.dry_run:
            self._count_change("deleted", dn)
            return True
        if self._send("delete", dn, lambda: self.conn.delete(dn)) or self._code() == NO_SUCH_OBJECT:
            self._count_change("deleted", dn)
            return True
        self._refused("delete", dn, critical)
        return False

    # ---- the server

    def _load_remote(self, read: sa.Connection) -> None:
        """The base entry and the three subtrees as the server holds them, into the temporary table."""
        self._tell("reading")
        rows: list[dict[str, Any]] = []
        subtrees = [(self.target.base, ldap3.BASE)] + [(f"ou={ou},{self.target.base}", ldap3.SUBTREE)
                                                         for ou in ls.OUS]
        for search_base, scope in subtrees:
            for dn, attributes in self._paged(search_base, scope):
                self.summary.remote_entries += 1
                self._done = self.summary.remote_entries
                canonical, depth = normalise_dn(dn)
                rows.append({"dn_key": _key_of(canonical), "dn": dn, "depth": depth,
                             "digest": attributes_digest(normalise_attributes(attributes))})
                if len(rows) >= self.batch:
                    read.execute(sa.insert(_remote), rows)
                    rows = []
                    self._tell("reading")
        if rows:
            read.execute(sa.insert(_remote), rows)

    def _paged(self, search_base: str, scope: str) -> Iterator[tuple[str, dict[str, list[bytes]]]]:
        cookie: Any = None
        while True:
            self.summary.reads += 1
            def search(page: Any = cookie) -> bool:
                return bool(self.conn.search(search_base, "(objectClass=*)", scope, attributes=["*"],
                                             paged_size=PAGE_SIZE, paged_cookie=page))

            ok = self._call("search", search_base, search)
            if not ok and self._code() == NO_SUCH_OBJECT:
                return
            if not ok and self._code() != SUCCESS:  # ldap3 answers False for "no entry" too
                self._fatal("search", search_base)
                raise PublishError(f"reading {search_base}: {self._describe()}")
            page = [(r["dn"], dict(r["raw_attributes"])) for r in self.conn.response
                    if r.get("type") == "searchResEntry"]
            yield from page
            controls = self.conn.result.get("controls") or {}
            cookie = controls.get(PAGED_RESULTS_OID, {}).get("value", {}).get("cookie")
            if not cookie:
                return

    def _call(self, operation: str, dn: str, call: Callable[[], bool]) -> bool:
        try:
            return bool(call())
        except ldap3_exceptions.LDAPException as exc:
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
            raise PublishError(f"{operation} {dn}: connection to {self.target.endpoint} lost ({reason})") from None

    def _send(self, operation: str, dn: str, call: Callable[[], bool]) -> bool:
        self.summary.writes += 1
        ok = self._call(operation, dn, call)
        if not ok:
            self._fatal(operation, dn)
        return ok

    def _code(self) -> int | None:
        result = self.conn.result or {}
        code = result.get("result")
        return int(code) if isinstance(code, int) else None

    def _describe(self) -> str:
        result = self.conn.result or {}
        code, description = result.get("result"), result.get("description") or "error"
        message = (result.get("message") or "").strip()
        text = f"{description} ({code})"
        if message:
            text += f": {message}"
        if code == REFERRAL and result.get("referrals"):
            text += f" (referral to {', '.join(result['referrals'])})"
        return text

    def _fatal(self, operation: str, dn: str) -> None:
        code = self._code()
        if code in FATAL_RESULTS:
            hint = _HINTS.get(code)
            raise PublishError(f"{operation} {dn}: {self._describe()}" + (f"; {hint}" if hint else ""))

    def _refused(self, operation: str, dn: str, critical: bool) -> str:
        failure = PublishFailure(dn, operation, self._code(), self._describe())
        if critical:
            raise PublishError(f"{failure}; the base and its ous must exist before anything else "
                               f"(is {self.target.base} a suffix of that server?)")
        self.summary.failed += 1
        if len(self.summary.failures) < MAX_FAILURES_KEPT:
            self.summary.failures.append(failure)
        log.warning("ldap publish refused dn=%r operation=%s code=%s", dn, operation, failure.code)
        if self.on_failure is not None:
            self.on_failure(failure)
        self._consecutive_failures += 1
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise PublishError(f"{MAX_CONSECUTIVE_FAILURES} entries in a row refused, the last: {failure}; "
                               "stopping (is the caducee schema loaded on the server?)")
        return "failed"
