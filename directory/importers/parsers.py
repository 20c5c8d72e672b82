"""Turn the lines of each national file into staging rows (the hot loop of an import).

One parser per file kind. A parser validates what the directory relies on (identifiers, mailbox type
and address), rejects a bad line with its number and reason, warns about suspicious but usable values
(an RPPS failing the Luhn check, REFERENCE.md §3), and appends rows to the staging loaders. Column
positions come from the header (`formats.Header`), never from constants; a column the header lacks reads
as empty. Values are staged as read; trimming empty values to NULL and comparing with the directory is
done in SQL (`apply`).

The files list one line per activity, grouped by person: a person's columns are validated, normalised
and staged once per run of lines; a site's once while it stays among the `ORG_CACHE_SIZE` sites seen
most recently (an LRU: hospitals recur all along the file, a private practice on its holder's lines).
The staging tables keep the first line of each key anyway (`staging.dedupe`), so the cache only saves
work; memory stays bounded whatever the file size.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from directory.identifiers import PERSON_ADELI_PREFIX, PERSON_RPPS_PREFIX, luhn_valid
from directory.importers.formats import FileKind, Header
from directory.importers.staging import (
    ACTIVITY_FIELDS,
    ORGANISATION_FIELDS,
    BulkLoader,
    stg_activities,
    stg_mailboxes,
    stg_organisations,
    stg_practitioners,
    stg_skills,
)
from directory.importers.text import normalise
from directory.model import MailboxType, SkillKind

MAX_SAMPLES = 20
ORG_CACHE_SIZE = 200_000  # structures remembered (least recently seen forgotten first): ~30 MB
MAX_ID = 32  # principals.national_id, organisations.structure_id
MAX_KEY = 200  # activities.source_key, practitioner_skills.source_key

_ADDRESS = re.compile(
    r"^[^@\s|<>()\[\],;:\"]+@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+$")
_FRANCE = frozenset({"", "99100", "99000"})
_TRUE = frozenset({"true", "vrai", "1", "oui", "o", "y", "yes"})
_FALSE = frozenset({"false", "faux", "0", "non", "n", "no"})
# Structure identifier types (TRE_G07) → length of the bare identifier (research/formats.md §1.8).
_STRUCTURE_BARE_LENGTH = {"0": 11, "1": 9, "2": 9, "3": 14, "4": 14}


@dataclass(frozen=True)
class Issue:
    """A rejected line or a warning, with the line number in the file (the header is line 1)."""

    line: int
    message: str


@dataclass
class Report:
    """Counts of rejected lines and warnings, with the first few of each."""

    rejected: int = 0
    warnings: int = 0
    errors: list[Issue] = field(default_factory=list)
    warning_samples: list[Issue] = field(default_factory=list)

    def reject(self, line: int, message: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_SAMPLES:
            self.errors.append(Issue(line, message))

    def warn(self, line: int, message: str) -> None:
        self.warnings += 1
        if len(self.warning_samples) < MAX_SAMPLES:
            self.warning_samples.append(Issue(line, message))

    def merge(self, other: Report) -> None:
        """Add the counts and the first issues of a report about other lines of the same file."""
        self.rejected += other.rejected
        self.warnings += other.warnings
        self.errors = sorted(self.errors + other.errors, key=lambda i: i.line)[:MAX_SAMPLES]
        self.warning_samples = sorted(self.warning_samples + other.warning_samples, key=lambda i: i.line)[:MAX_SAMPLES]


def structure_national_id(type_code: str, value: str) -> str:
    """The structure national id (prefix + id, REFERENCE.md §3) from a type code and an identifier that
    may or may not carry the prefix already ("250000700" with type 1 → "1250000700")."""
    value = value.strip()
    bare = _STRUCTURE_BARE_LENGTH.get(type_code.strip())
    if value and bare is not None and len(value) == bare:
        return type_code.strip() + value
    return value


def person_national_id(id_type: str, identifier: str, national_id: str) -> tuple[str, str | None]:
    """`(national id, None)` or `("", reason)` for the three person columns of every file."""
    if id_type not in (PERSON_RPPS_PREFIX, PERSON_ADELI_PREFIX):
        return "", f"unsupported identifier type {id_type!r} (expected 8 RPPS or 0 ADELI)"
    if id_type == PERSON_RPPS_PREFIX:
        if len(identifier) != 11 or not identifier.isdigit():
            return "", f"RPPS {identifier!r} is not 11 digits"
    elif len(identifier) != 9 or not identifier.isalnum():
        return "", f"ADELI {identifier!r} is not 9 characters"
    expected = id_type + identifier
    if national_id and national_id != expected:
        return "", f"Identification nationale PP {national_id} does not match type {id_type} + {identifier}"
    return expected, None


class Parser:
    """Base of the per-kind parsers: `feed(line_no, fields)` for each data line, then `finish()`."""

    kind: FileKind
    loaders: tuple[BulkLoader, ...] = ()

    def __init__(self, header: Header, report: Report) -> None:
        self.header = header
        self.report = report

    def getter(self, *fields: str) -> Callable[[list[str]], tuple[str, ...]]:
        """An itemgetter over a line's fields; a column the header lacks reads the empty sentinel."""
        sentinel = self.header.width  # lines are split with one extra empty field at this position
        positions = [self.header.index.get(f, sentinel) for f in fields]
        if len(positions) == 1:
            position = positions[0]
            return lambda parts: (parts[position],)
        return itemgetter(*positions)

    def person(self, line_no: int, id_type: str, identifier: str, national_id: str) -> str | None:
        """The validated national id of a line's person, or None when the line was rejected."""
        nid, error = person_national_id(id_type.strip(), identifier.strip(), national_id.strip())
        if error is not None:
            self.report.reject(line_no, error)
            return None
        if nid[0] == PERSON_RPPS_PREFIX and not luhn_valid(nid[1:]):
            self.report.warn(line_no, f"RPPS {nid[1:]} fails the Luhn check (imported)")
        return nid

    def feed(self, line_no: int, parts: list[str]) -> None:
        raise NotImplementedError

    def flush_if_full(self) -> None:
        """Write the batches that reached their size (called every few thousand lines)."""
        for loader in self.loaders:
            loader.flush_if_full()

    def finish(self) -> None:
        for loader in self.loaders:
            loader.flush()


class ActivityParser(Parser):
    """PS_LibreAcces_Personne_activite: practitioners, organisations, activities, and the savoir-faire
    columns when the release carries them (research/formats.md §1.3)."""

    kind = FileKind.ACTIVITY

    def __init__(self, header: Header, report: Report, loaders: dict[str, BulkLoader]) -> None:
        super().__init__(header, report)
        self.loaders = tuple(loaders[t.name] for t in (stg_practitioners, stg_organisations, stg_activities,
                                                        stg_skills))
        self.add_practitioner, self.add_organisation, self.add_activity, self.add_skill = (
            loader.append for loader in self.loaders)
        self.with_skills = header.has("sf_code")
        self._keys = self.getter("id_type", "identifier", "national_id", "structure_id", "finess", "siret",
                                 "technical_id")
        self._prac = self.getter("civility_code", "civility_label", "exercise_civility_code",
                                 "exercise_civility_label", "last_name", "first_names", "profession_code",
                                 "profession_label", "category_code", "category_label")
        self._org = self.getter(*ORGANISATION_FIELDS)
        self._street = self.getter("addr_recipient", "addr_place", "street_number", "street_repeat",
                                   "street_type_code", "street_type_label", "street_name", "distribution",
                                   "cedex")
        self._act = self.getter(*ACTIVITY_FIELDS)
        self._sf = self.getter("sf_type_code", "sf_type_label", "sf_code", "sf_label")
        self._last_nid = ""
        self._last_skill = ""
        self._new_site = False

        @functools.lru_cache(maxsize=ORG_CACHE_SIZE)
        def remember(site: str) -> None:
            # Runs only when `site` is not among the sites seen most recently (the cache is in C).
            self._new_site = True

        self._remember_site = remember

    def feed(self, line_no: int, parts: list[str]) -> None:
        id_type, identifier, national_id, structure_id, finess, siret, technical_id = self._keys(parts)
        nid = id_type + identifier
        if nid != self._last_nid:
            # A new person: validate and stage the practitioner once for the run of lines.
            checked = self.person(line_no, id_type, identifier, national_id)
            if checked is None:
                return
            nid = checked
            prac = self._prac(parts)
            last_name, first_names = prac[4].strip(), prac[5].strip()
            if not last_name:
                self.report.reject(line_no, "no Nom d'exercice")
                return
            self._last_nid = nid
            last, first = normalise(last_name), normalise(first_names)  # each memoised: names recur
            self.add_practitioner((
                line_no, nid, f"{first_names} {last_name}".strip(), f"{last} {first}".strip(),
                f"{first} {last}".strip(), normalise(prac[7]) or None, nid[0], nid[1:], *prac,
            ))
        elif national_id and national_id != nid:
            self.report.reject(line_no, f"Identification nationale PP {national_id} does not match type "
                                        f"{id_type} + {identifier}")
            return
        sid = (structure_id.strip() or (finess.strip() and "1" + finess.strip())
               or (siret.strip() and "3" + siret.strip()) or technical_id.strip())
        act = self._act(parts)
        key = f"{nid}|{sid}|{act[0]}|{act[2]}|{act[4]}|{act[6]}"
        if len(sid) > MAX_ID or len(key) > MAX_KEY:
            self.report.reject(line_no, f"structure identifier or activity codes too long ({key[:60]}…)")
            return
        self._new_site = False
        if sid:
            self._remember_site(sid)
        if self._new_site:
            org = self._org(parts)
            self.add_organisation((
                line_no, sid, org[5].strip() or org[6].strip() or sid, normalise(org[5]) or None,
                normalise(org[9]) or None, _postal_address(self._street(parts), org), *org,
            ))
        self.add_activity((line_no, key, nid, sid, *act))
        if self.with_skills:
            type_code, type_label, code, label = self._sf(parts)
            if code:
                key = f"{nid}|activity|savoir_faire|{type_code}|{code}"
                if key != self._last_skill:
                    self._last_skill = key
                    if len(key) > MAX_KEY:
                        self.report.warn(line_no, f"savoir-faire code too long ({code[:40]}…): not imported")
                        return
                    self.add_skill((line_no, key, nid, SkillKind.SAVOIR_FAIRE.value, normalise(label) or None,
                                     type_code, type_label, code, label))


def _postal_address(street: tuple[str, ...], org: tuple[str, ...]) -> str | None:
    """Postal lines L2–L6 (AFNOR NF Z10-011) from the structure columns, plus the country abroad."""
    recipient, place, number, repeat, type_code, type_label, name, distribution, cedex = street
    l4 = " ".join(" ".join((number, repeat, type_label or type_code, name)).split())
    l6 = cedex.strip() or " ".join(" ".join((org[7], org[9])).split())
    lines = [recipient.strip(), place.strip(), l4, distribution.strip(), l6]
    country_code, country_label = org[10].strip(), org[11].strip()
    if country_code not in _FRANCE and country_label and normalise(country_label) != "france":
        lines.append(country_label)
    return "\n".join(p for p in lines if p) or None


class SkillParser(Parser):
    """PS_LibreAcces_SavoirFaire (one savoir-faire per line) and PS_LibreAcces_Dipl_AutExerc (a diploma,
    an exercise authorisation, or both per line; research/formats.md §1.4–1.5)."""

    def __init__(self, header: Header, report: Report, loaders: dict[str, BulkLoader]) -> None:
        super().__init__(header, report)
        self.kind = header.kind
        self.loaders = (loaders[stg_skills.name],)
        self.add_skill = self.loaders[0].append
        self._ids = self.getter("id_type", "identifier", "national_id")
        self._groups: tuple[tuple[SkillKind, Callable[[list[str]], tuple[str, ...]]], ...]
        if header.kind is FileKind.SAVOIR_FAIRE:
            self.source = "savoir_faire"
            self._groups = ((SkillKind.SAVOIR_FAIRE, self.getter("sf_type_code", "sf_type_label", "sf_code",
                                                                 "sf_label")),)
        else:
            self.source = "diploma"
            self._groups = (
                (SkillKind.DIPLOMA, self.getter("diploma_type_code", "diploma_type_label", "diploma_code",
                                                "diploma_label")),
                (SkillKind.AUTHORISATION, self.getter("auth_type_code", "auth_type_label", "auth_code",
                                                      "auth_label")),
            )
        self._last_nid = ""

    def feed(self, line_no: int, parts: list[str]) -> None:
        id_type, identifier, national_id = self._ids(parts)
        nid = id_type + identifier
        if nid != self._last_nid or (national_id and national_id != nid):
            checked = self.person(line_no, id_type, identifier, national_id)
            if checked is None:
                return
            nid = self._last_nid = checked
        for kind, getter in self._groups:
            type_code, type_label, code, label = getter(parts)
            # An authorisation may have a type and no discipline: the type is then its code.
            code = code.strip() or (type_code.strip() if kind is SkillKind.AUTHORISATION else "")
            if not code:
                continue
            key = f"{nid}|{self.source}|{kind.value}|{type_code}|{code}"
            if len(key) > MAX_KEY:
                self.report.reject(line_no, f"{kind.value} code too long ({code[:40]}…)")
                return
            self.add_skill((line_no, key, nid, kind.value, normalise(label) or None, type_code, type_label,
                             code, label))


class MailboxParser(Parser):
    """Extraction_Correspondance_MSSante: one mailbox per line (research/formats.md §1.7). PER and CAB
    mailboxes belong to a person (by RPPS/ADELI), ORG and APP ones to a structure (ANS MSSanté logical
    models); a CAB without a person identifier belongs to its structure."""

    kind = FileKind.MSSANTE

    def __init__(self, header: Header, report: Report, loaders: dict[str, BulkLoader],
                 local_domains: frozenset[str]) -> None:
        super().__init__(header, report)
        self.loaders = (loaders[stg_mailboxes.name],)
        self.add_mailbox = self.loaders[0].append
        self.local_domains = local_domains
        self._get = self.getter("mailbox_type", "address", "id_type", "identifier", "national_id",
                                "structure_id_type", "structure_id", "service", "last_name", "first_names",
                                "dematerialisation", "org_name", "org_trade_name")

    def feed(self, line_no: int, parts: list[str]) -> None:
        (mtype, address, id_type, identifier, national_id, st_type, st_value, service, last_name,
         first_names, demat, org_name, trade_name) = self._get(parts)
        mtype = mtype.strip().upper()
        if mtype not in MailboxType.__members__:
            self.report.reject(line_no, f"unknown Type de BAL {mtype!r} (expected PER, ORG, APP or CAB)")
            return
        address = address.strip().lower()
        if len(address) > 254 or not _ADDRESS.match(address):
            self.report.reject(line_no, f"invalid mailbox address {address!r}")
            return
        structure_id = structure_national_id(st_type, st_value)
        if len(structure_id) > MAX_ID:
            self.report.reject(line_no, f"Identification Structure {structure_id[:40]!r} is too long")
            return
        has_person = bool(identifier.strip() or national_id.strip())
        owner: str | None
        if mtype == "PER" or (mtype == "CAB" and has_person):
            if not has_person:
                self.report.reject(line_no, f"{mtype} mailbox {address} without Identification nationale PP")
                return
            owner = self.person(line_no, id_type, identifier, national_id)
            if owner is None:
                return
            owner_kind = "person"
            owner_name = f"{first_names.strip()} {last_name.strip()}".strip() or owner
            owner_norm = normalise(f"{last_name} {first_names}")
        else:
            if not structure_id:
                self.report.reject(line_no, f"{mtype} mailbox {address} without Identification Structure")
                return
            owner, owner_kind = structure_id, "organisation"
            owner_name = org_name.strip() or trade_name.strip() or structure_id
            owner_norm = normalise(org_name or trade_name)
        flag = demat.strip().lower()
        dematerialisation = 1 if flag in _TRUE else 0 if flag in _FALSE else None
        if flag and dematerialisation is None:
            self.report.warn(line_no, f"Dématérialisation {demat.strip()!r} is neither True nor False (left empty)")
        hosted = 1 if address.rpartition("@")[2] in self.local_domains else 0
        row: tuple[Any, ...] = (line_no, address, mtype, owner_kind, owner, owner_name, owner_norm or None, service,
                                structure_id, dematerialisation, hosted, None)
        self.add_mailbox(row)
