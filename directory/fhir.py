"""FHIR R4 views of the directory: Practitioner, PractitionerRole and Organization with their MSSanté
mailboxes, shaped after the Annuaire Santé profiles of the ANS.

Pure mapping (`practitioner_resource`, `practitioner_role_resource`, `organization_resource`, `bundle`,
`operation_outcome`) plus the search that feeds it (`run_search`, `read`), so that the HTTP shell
(`caducee.http_api`) only parses parameters and the mapping is testable without a socket.

What the shapes follow:

* identifiers: `urn:oid:1.2.250.1.71.4.2.1` (identification nationale PP, type IDNPS) and
  `https://rpps.esante.gouv.fr` (RPPS) for persons; `urn:oid:1.2.250.1.71.4.2.2` (identification
  nationale de structure, IDNST), FINESS (`http://finess.sante.gouv.fr`, FINEG/FINEJ) and SIRENE
  (`http://sirene.fr`, SIRET/SIREN) for organisations — the systems the ANS OpenAPI of the MSSanté
  mailboxes names (openapi-balmss.yaml), with the type codes of FR Core (`fr-core-cs-v2-0203`);
* a mailbox is a `telecom` ContactPoint (profile as-mailbox-mss): `system` email, `value` the address,
  `rank` its preference (1 first), the FR Core extension `fr-core-contact-point-email-type` = MSSANTE
  (TRE_R256-TypeMessagerie), and the extension `as-ext-mailbox-mss-metadata` with `type`
  (TRE_R257-TypeBAL: PER/ORG/APP/CAB, as in the ANS example AsExamplePractitionerBalMssPer) and
  `listeRouge`, plus `description`, `service`, `responsible` and `digitization` when known. The OpenAPI
  draft codes `type` in TRE_R256-TypeMessagerie; its own example and the extension's binding
  (JDV-J139-TypeBAL-RASS) use TRE_R257, which is what is written here (both are accepted in searches);
* where a mailbox goes (OpenAPI table): PER without structure and CAB on the `Practitioner`; PER held at
  one of the practitioner's sites (its `structure_id`) on that `PractitionerRole`; ORG and APP on the
  `Organization`. Mailboxes on the liste rouge are never written (AsBalMss*LogicalModel: "la BAL ne doit
  pas être publiée");
* profession (TRE_G15-ProfessionSante, TRE_R09-CategorieProfessionnelle) and savoir-faire
  (TRE_R04-TypeSavoirFaire with the code in TRE_R38-SpecialiteOrdinale, TRE_R39-Competence …) as
  `Practitioner.qualification`, as in the AS Practitioner profile; the same savoir-faire as
  `PractitionerRole.specialty`, and the activity (genre, mode d'exercice, fonction) in
  `PractitionerRole.code`.

Logical ids come from national ids, never from database rows: a Practitioner is its identification
nationale PP (`810001234567`), an Organization its structure national id (`1750000125`), a
PractitionerRole `<practitioner id>-<organization id>` (a second activity at the same site adds `-2`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa

from directory.identifiers import (
    OID_PERSON_ID,
    OID_STRUCTURE_ID,
    PERSON_RPPS_PREFIX,
    PrincipalKind,
)
from directory.importers.text import normalise
from directory.model import Mailbox, MailboxType, Organisation, Skill, SkillKind
from directory.schema import activities, organisations, practitioners, principals
from directory.search import (
    MAX_LIMIT,
    DirectoryEntry,
    SearchError,
    SearchQuery,
    Site,
    _entries,
    matching_principals,
)

FHIR_JSON: Final = "application/fhir+json"

# -- systems (ANS OpenAPI openapi-balmss.yaml, Annuaire Santé IG, FR Core, NOS) --
PERSON_ID_SYSTEM: Final = f"urn:oid:{OID_PERSON_ID}"
STRUCTURE_ID_SYSTEM: Final = f"urn:oid:{OID_STRUCTURE_ID}"
RPPS_SYSTEM: Final = "https://rpps.esante.gouv.fr"
FINESS_SYSTEM: Final = "http://finess.sante.gouv.fr"
SIRENE_SYSTEM: Final = "http://sirene.fr"
IDENTIFIER_TYPE_SYSTEM: Final = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"

EMAIL_TYPE_EXTENSION: Final = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
MAILBOX_METADATA_EXTENSION: Final = (
    "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata")
INSEE_CODE_EXTENSION: Final = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code"

_NOS = "https://mos.esante.gouv.fr/NOS"


def nos(table: str) -> str:
    """The FHIR system of a NOS terminology table: "TRE_R257-TypeBAL" → https://mos.esante.gouv.fr/NOS/…"""
    return f"{_NOS}/{table}/FHIR/{table.replace('_', '-')}"


TYPE_MESSAGERIE: Final = nos("TRE_R256-TypeMessagerie")
TYPE_BAL: Final = nos("TRE_R257-TypeBAL")
PROFESSION: Final = nos("TRE_G15-ProfessionSante")
PROFESSION_CATEGORY: Final = nos("TRE_R09-CategorieProfessionnelle")
TYPE_SAVOIR_FAIRE: Final = nos("TRE_R04-TypeSavoirFaire")
DIPLOMA_TYPE: Final = nos("TRE_R14-TypeDiplome")
STATE_DIPLOMA: Final = nos("TRE_R48-DiplomeEtatFrancais")
ACTIVITY_GENRE: Final = nos("TRE_R22-GenreActivite")
EXERCISE_MODE: Final = nos("TRE_R23-ModeExercice")
FUNCTION: Final = nos("TRE_R21-Fonction")
COMMUNE: Final = nos("TRE_R13-Commune")
SUBSETTED_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"

# Savoir-faire type (TRE_R04) → the table of its codes (Annuaire Santé / ROR PractitionerRole slices).
SAVOIR_FAIRE_SYSTEMS: Final = {
    "S": nos("TRE_R38-SpecialiteOrdinale"),
    "C": nos("TRE_R39-Competence"),
    "CEX": nos("TRE_R40-CompetenceExclusive"),
    "OP": nos("TRE_G13-OrientationParticuliere"),
    "CAPA": nos("TRE_R43-CapaciteSavoirFaire"),
    "PAC": nos("TRE_R44-QualificationPAC"),
}

PRACTITIONER: Final = "Practitioner"
PRACTITIONER_ROLE: Final = "PractitionerRole"
ORGANIZATION: Final = "Organization"
RESOURCE_TYPES: Final = (PRACTITIONER, PRACTITIONER_ROLE, ORGANIZATION)

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def fhir_id(national_id: str) -> str:
    """A logical id from a national id (FHIR ids: 1–64 of A–Z a–z 0–9 - .)."""
    if _FHIR_ID.fullmatch(national_id):
        return national_id
    return (re.sub(r"[^A-Za-z0-9\-.]", ".", national_id) or ".")[:64]


# -- building blocks ------------------------------------------------------------------------------------

def _coding(system: str | None, code: str | None, display: str | None = None) -> dict[str, Any] | None:
    if not code:
        return None
    coding: dict[str, Any] = {}
    if system:
        coding["system"] = system
    coding["code"] = code
    if display:
        coding["display"] = display
    return coding


def _concept(*codings: dict[str, Any] | None, text: str | None = None) -> dict[str, Any] | None:
    present = [c for c in codings if c]
    if not present:
        return None
    concept: dict[str, Any] = {"coding": present}
    if text:
        concept["text"] = text
    return concept


def _identifier(system: str, value: str, type_code: str) -> dict[str, Any]:
    return {"use": "official", "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": type_code}]},
            "system": system, "value": value}


def published(mailboxes: Iterable[Mailbox]) -> list[Mailbox]:
    """Mailboxes that may be shown: never one on the liste rouge (the search already leaves them out)."""
    return [m for m in mailboxes if not m.liste_rouge]


def mailbox_metadata(mailbox: Mailbox) -> dict[str, Any]:
    """The as-ext-mailbox-mss-metadata extension of a mailbox (type, listeRouge, and what is known)."""
    parts: list[dict[str, Any]] = [
        {"url": "type", "valueCodeableConcept": {"coding": [{"system": TYPE_BAL,
                                                              "code": mailbox.mailbox_type.value}]}},
        {"url": "listeRouge", "valueBoolean": mailbox.liste_rouge},
    ]
    for url, value in (("description", mailbox.description), ("service", mailbox.service),
                       ("responsible", mailbox.responsible)):
        if value:
            parts.append({"url": url, "valueString": value})
    if mailbox.dematerialisation is not None:
        parts.append({"url": "digitization", "valueBoolean": mailbox.dematerialisation})
    return {"url": MAILBOX_METADATA_EXTENSION, "extension": parts}


def mailbox_telecom(mailbox: Mailbox, rank: int) -> dict[str, Any]:
    """A mailbox as a ContactPoint of profile as-mailbox-mss (rank 1 = the preferred mailbox)."""
    return {
        "extension": [
            {"url": EMAIL_TYPE_EXTENSION,
             "valueCoding": {"system": TYPE_MESSAGERIE, "code": "MSSANTE", "display": "MSSANTE"}},
            mailbox_metadata(mailbox),
        ],
        "system": "email",
        "value": mailbox.address,
        "use": "work",
        "rank": rank,
    }


def _contact_telecoms(phone: str | None, phone2: str | None, fax: str | None,
                      email: str | None) -> list[dict[str, Any]]:
    """Telephone, fax and (non-MSSanté) e-mail of a site, as the national files give them."""
    return [{"system": system, "value": value, "use": "work"}
            for system, value in (("phone", phone), ("phone", phone2), ("fax", fax), ("email", email)) if value]


def _telecoms(mailboxes: Sequence[Mailbox], *others: dict[str, Any]) -> list[dict[str, Any]]:
    return [mailbox_telecom(m, rank) for rank, m in enumerate(published(mailboxes), start=1)] + list(others)


def skill_concept(skill: Skill) -> dict[str, Any] | None:
    """A savoir-faire (type + code) or a diploma (type + code) as a CodeableConcept."""
    if skill.kind is SkillKind.SAVOIR_FAIRE:
        system = SAVOIR_FAIRE_SYSTEMS.get((skill.type_code or "").strip())
        return _concept(_coding(TYPE_SAVOIR_FAIRE, skill.type_code, skill.type_label),
                        _coding(system, skill.code, skill.label), text=skill.label)
    if skill.kind is SkillKind.DIPLOMA:
        system = STATE_DIPLOMA if (skill.type_code or "").strip() == "DE" else None
        return _concept(_coding(system, skill.code, skill.label),
                        _coding(DIPLOMA_TYPE, skill.type_code, skill.type_label), text=skill.label)
    return None  # exercise authorisations: not published here


def _address(org: Organisation) -> dict[str, Any] | None:
    lines = [line for line in (org.address or "").splitlines() if line.strip()]
    address: dict[str, Any] = {}
    if org.commune_code:
        address["extension"] = [{"url": INSEE_CODE_EXTENSION,
                                 "valueCoding": {"system": COMMUNE, "code": org.commune_code}}]
    address["use"] = "work"
    if lines:
        address["line"] = lines
    for key, value in (("city", org.city), ("postalCode", org.postcode), ("country", org.country_label)):
        if value:
            address[key] = value
    return address if len(address) > 1 else None


# -- where each mailbox is shown ------------------------------------------------------------------------

@dataclass(frozen=True)
class Role:
    """One PractitionerRole: a practitioner's activity at a site, with the PER mailboxes held there."""

    id: str
    entry: DirectoryEntry
    site: Site
    mailboxes: tuple[Mailbox, ...] = ()

    @property
    def organisation(self) -> Organisation:
        assert self.site.organisation is not None
        return self.site.organisation


def _site_ids(entry: DirectoryEntry) -> set[str]:
    return {s.organisation.structure_id for s in entry.sites if s.organisation is not None}


def _held_at_site(mailbox: Mailbox, sites: set[str]) -> bool:
    return mailbox.mailbox_type is MailboxType.PER and bool(mailbox.structure_id) and mailbox.structure_id in sites


def person_mailboxes(entry: DirectoryEntry) -> list[Mailbox]:
    """The mailboxes shown on the Practitioner: PER without a site of the practitioner, CAB, and any
    other mailbox a person holds."""
    sites = _site_ids(entry)
    return [m for m in published(entry.mailboxes) if not _held_at_site(m, sites)]


def roles_of(entry: DirectoryEntry) -> list[Role]:
    """The PractitionerRoles of a person: one per activity at a known site, in activity order."""
    if entry.kind is not PrincipalKind.PERSON:
        return []
    sites = _site_ids(entry)
    roles: list[Role] = []
    seen: dict[str, int] = {}
    for site in entry.sites:
        if site.organisation is None:
            continue  # an activity without a structure: no organisation to point to
        sid = site.organisation.structure_id
        seen[sid] = seen.get(sid, 0) + 1
        role_id = fhir_id(f"{entry.national_id}-{sid}" + (f"-{seen[sid]}" if seen[sid] > 1 else ""))
        held = tuple(m for m in published(entry.mailboxes) if _held_at_site(m, sites) and m.structure_id == sid)
        roles.append(Role(role_id, entry, site, held if seen[sid] == 1 else ()))
    return roles


# -- resources -------------------------------------------------------------------------------------------

def _person_identifiers(national_id: str) -> list[dict[str, Any]]:
    identifiers = [_identifier(PERSON_ID_SYSTEM, national_id, "IDNPS")]
    if national_id.startswith(PERSON_RPPS_PREFIX) and len(national_id) == 12:
        identifiers.append(_identifier(RPPS_SYSTEM, national_id[1:], "RPPS"))
    return identifiers


def _profession_codings(entry: DirectoryEntry) -> list[dict[str, Any]]:
    p = entry.practitioner
    if p is None:
        return []
    return [c for c in (_coding(PROFESSION, p.profession_code, p.profession_label),
                        _coding(PROFESSION_CATEGORY, p.category_code, p.category_label)) if c]


def practitioner_resource(entry: DirectoryEntry) -> dict[str, Any]:
    """A person of the directory as a Practitioner (AS Practitioner shape, mailboxes as telecom)."""
    p = entry.practitioner
    resource: dict[str, Any] = {"resourceType": PRACTITIONER, "id": fhir_id(entry.national_id),
                                "identifier": _person_identifiers(entry.national_id), "active": True}
    if p is not None:
        name: dict[str, Any] = {"use": "official", "family": p.last_name}
        if p.first_names:
            name["given"] = [p.first_names]
        if p.civility_code:
            name["prefix"] = [p.civility_code]
        if p.exercise_civility_code:
            name["suffix"] = [p.exercise_civility_code]
        resource["name"] = [name]
    else:
        resource["name"] = [{"use": "official", "text": entry.display_name}]
    telecom = _telecoms(person_mailboxes(entry))
    if telecom:
        resource["telecom"] = telecom
    qualifications: list[dict[str, Any]] = []
    profession = _profession_codings(entry)
    if profession:
        qualifications.append({"code": {"coding": profession}})
    for skill in entry.skills:
        concept = skill_concept(skill)
        if concept:
            qualifications.append({"code": concept})
    if qualifications:
        resource["qualification"] = qualifications
    return resource


def practitioner_role_resource(role: Role) -> dict[str, Any]:
    """One activity of a practitioner at a site as a PractitionerRole."""
    entry, activity, org = role.entry, role.site.activity, role.organisation
    resource: dict[str, Any] = {
        "resourceType": PRACTITIONER_ROLE, "id": role.id, "active": True,
        "practitioner": {"reference": f"{PRACTITIONER}/{fhir_id(entry.national_id)}",
                         "identifier": {"system": PERSON_ID_SYSTEM, "value": entry.national_id},
                         "display": entry.display_name},
        "organization": {"reference": f"{ORGANIZATION}/{fhir_id(org.structure_id)}",
                         "identifier": {"system": STRUCTURE_ID_SYSTEM, "value": org.structure_id},
                         "display": org.name or org.trade_name or org.structure_id},
    }
    codings = _profession_codings(entry) + [c for c in (
        _coding(ACTIVITY_GENRE, activity.genre_code, activity.genre_label),
        _coding(EXERCISE_MODE, activity.mode_code, activity.mode_label),
        _coding(FUNCTION, activity.role_code, activity.role_label),
    ) if c]
    if codings:
        resource["code"] = [{"coding": codings}]
    specialties = [c for c in (skill_concept(s) for s in entry.skills if s.kind is SkillKind.SAVOIR_FAIRE) if c]
    if specialties:
        resource["specialty"] = specialties
    telecom = _telecoms(role.mailboxes, *_contact_telecoms(activity.phone, activity.phone2, activity.fax,
                                                           activity.email))
    if telecom:
        resource["telecom"] = telecom
    return resource


def organization_resource(entry: DirectoryEntry) -> dict[str, Any]:
    """A structure of the directory as an Organization, with its ORG/APP mailboxes as telecom."""
    o = entry.organisation
    resource: dict[str, Any] = {"resourceType": ORGANIZATION, "id": fhir_id(entry.national_id)}
    identifiers = [_identifier(STRUCTURE_ID_SYSTEM, entry.national_id, "IDNST")]
    if o is not None:
        for system, value, type_code in ((FINESS_SYSTEM, o.finess, "FINEG"), (FINESS_SYSTEM, o.finess_legal, "FINEJ"),
                                         (SIRENE_SYSTEM, o.siret, "SIRET"), (SIRENE_SYSTEM, o.siren, "SIREN")):
            if value:
                identifiers.append(_identifier(system, value, type_code))
    resource["identifier"] = identifiers
    resource["active"] = True
    resource["name"] = (o.name if o is not None and o.name else None) or entry.display_name
    if o is not None and o.trade_name and o.trade_name != resource["name"]:
        resource["alias"] = [o.trade_name]
    contacts = _contact_telecoms(o.phone, o.phone2, o.fax, o.email) if o is not None else []
    telecom = _telecoms(entry.mailboxes, *contacts)
    if telecom:
        resource["telecom"] = telecom
    address = _address(o) if o is not None else None
    if address:
        resource["address"] = [address]
    return resource


def resource_of(entry: DirectoryEntry) -> dict[str, Any]:
    """The Practitioner or Organization of a directory entry."""
    return practitioner_resource(entry) if entry.kind is PrincipalKind.PERSON else organization_resource(entry)


def subset(resource: dict[str, Any], elements: Sequence[str]) -> dict[str, Any]:
    """`_elements`: only the named top-level elements (with resourceType, id, meta), tagged SUBSETTED."""
    keep = {"resourceType", "id", "meta", *elements}
    out = {k: v for k, v in resource.items() if k in keep}
    meta = dict(out.get("meta", {}))
    meta["tag"] = [*meta.get("tag", []), {"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]
    out["meta"] = meta
    return out


def operation_outcome(code: str, text: str, severity: str = "error") -> dict[str, Any]:
    """An OperationOutcome with one issue (`code` from the FHIR issue-type value set)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "details": {"text": text}}]}


def bundle(base: str, matches: Sequence[dict[str, Any]], *, total: int | None, self_url: str,
           includes: Sequence[dict[str, Any]] = (), outcome: dict[str, Any] | None = None) -> dict[str, Any]:
    """A searchset Bundle: matches, then included resources, then an OperationOutcome when there is one."""
    result: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        result["total"] = total
    result["link"] = [{"relation": "self", "url": self_url}]
    entries = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
               for r in matches]
    entries += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "include"}}
                for r in includes]
    if outcome is not None:
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    result["entry"] = entries
    return result


# -- search --------------------------------------------------------------------------------------------

def with_national_ids(national_ids: Iterable[str]) -> sa.Select[Any]:
    """Principal ids whose national id is one of `national_ids`."""
    return sa.select(principals.c.id).where(principals.c.national_id.in_(sorted(set(national_ids))))


def working_at(structure_ids: Iterable[str]) -> sa.Select[Any]:
    """Practitioners (principal ids) with an activity at one of these sites (structure national ids)."""
    return (sa.select(activities.c.practitioner_id)
            .join(organisations, organisations.c.id == activities.c.organisation_id)
            .where(organisations.c.structure_id.in_(sorted(set(structure_ids)))))


def find(bind: sa.Engine | sa.Connection, query: SearchQuery, kind: PrincipalKind,
         extra: Sequence[sa.Select[Any]] = ()) -> list[DirectoryEntry]:
    """Active principals of `kind` matching every criterion of `query` and every set of `extra`,
    ordered like `directory.search.search`, at most `query.limit`."""
    sets = [*matching_principals(query), *extra]
    if not sets:
        raise SearchError("give at least one criterion")
    if not 1 <= query.limit <= MAX_LIMIT:
        raise SearchError(f"the limit must be between 1 and {MAX_LIMIT}")
    p, o = practitioners, organisations
    statement: sa.Select[Any] = (
        sa.select(principals.c.id, principals.c.kind, principals.c.national_id, principals.c.display_name)
        .select_from(principals.outerjoin(p, p.c.principal_id == principals.c.id)
                     .outerjoin(o, o.c.principal_id == principals.c.id))
        .where(principals.c.active.is_(True), principals.c.kind == kind.value)
    )
    for ids in sets:
        statement = statement.where(principals.c.id.in_(ids))
    order = sa.func.coalesce(p.c.name_norm, o.c.name_norm, principals.c.name_norm,
                             sa.func.lower(principals.c.display_name))
    statement = statement.order_by(order, principals.c.id).limit(query.limit)
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return _entries(conn, conn.execute(statement).all())
    return _entries(bind, bind.execute(statement).all())


def _starts_a_word(text: str | None, prefix: str) -> bool:
    """Whether one of the words of `text` (normalised), or a run of them, starts with `prefix`."""
    return f" {normalise(text or '')}".find(f" {prefix}") >= 0


@dataclass(frozen=True)
class FhirSearch:
    """A FHIR search, parsed: directory criteria plus what only the resource itself can tell.

    `query` holds the criteria the directory search answers (its `limit` is ignored: `run_search`
    fetches up to `cap` candidates). `family`/`given` are normalised name prefixes; `mailbox` and
    `mailbox_type` must be carried by the resource's own telecom; `sites`, `site_postcode` and
    `site_city` restrict PractitionerRoles to those organisations; `role_ids` to those ids.
    """

    resource: str
    query: SearchQuery = field(default_factory=SearchQuery)
    extra: tuple[sa.Select[Any], ...] = ()
    family: str | None = None
    given: str | None = None
    mailbox: str | None = None
    mailbox_type: MailboxType | None = None
    sites: frozenset[str] | None = None
    site_postcode: str | None = None
    site_city: str | None = None
    role_ids: frozenset[str] | None = None
    count: int = 50
    elements: tuple[str, ...] = ()
    include_practitioner: bool = False
    include_organization: bool = False
    revinclude_roles: bool = False


@dataclass(frozen=True)
class SearchResult:
    matches: list[dict[str, Any]]
    includes: list[dict[str, Any]]
    total: int | None  # None when more candidates than the cap matched: the total is unknown
    complete: bool


def _carries(mailboxes: Sequence[Mailbox], spec: FhirSearch) -> bool:
    if spec.mailbox is None and spec.mailbox_type is None:
        return True
    return any((spec.mailbox is None or m.address == spec.mailbox.strip().lower())
               and (spec.mailbox_type is None or m.mailbox_type is spec.mailbox_type) for m in published(mailboxes))


def _person_matches(entry: DirectoryEntry, spec: FhirSearch) -> bool:
    p = entry.practitioner
    family = p.last_name if p else entry.display_name
    given = (p.first_names if p else entry.display_name) or ""
    return ((spec.family is None or _starts_a_word(family, spec.family))
            and (spec.given is None or _starts_a_word(given, spec.given))
            and _carries(person_mailboxes(entry), spec))


def _role_matches(role: Role, spec: FhirSearch) -> bool:
    org = role.organisation
    return ((spec.sites is None or org.structure_id in spec.sites)
            and (spec.role_ids is None or role.id in spec.role_ids)
            and (spec.site_postcode is None or (org.postcode or "").upper().startswith(spec.site_postcode))
            and (spec.site_city is None or normalise(org.city or "").startswith(spec.site_city))
            and _carries(role.mailboxes, spec))


def run_search(bind: sa.Engine | sa.Connection, spec: FhirSearch, cap: int) -> SearchResult:
    """Run a FHIR search: up to `cap` candidates from the directory, the resource-level conditions,
    then the first `spec.count` resources and what `_include`/`_revinclude` asked for."""
    kind = PrincipalKind.ORGANISATION if spec.resource == ORGANIZATION else PrincipalKind.PERSON
    candidates = find(bind, dataclasses.replace(spec.query, limit=cap), kind, spec.extra)
    complete = len(candidates) < cap
    includes: list[dict[str, Any]] = []
    if spec.resource == ORGANIZATION:
        page_entries = [e for e in candidates if _carries(e.mailboxes, spec)]
        total = len(page_entries)
        matches = [organization_resource(e) for e in page_entries[:spec.count]]
    elif spec.resource == PRACTITIONER:
        kept = [e for e in candidates if _person_matches(e, spec)]
        total = len(kept)
        matches = [practitioner_resource(e) for e in kept[:spec.count]]
        if spec.revinclude_roles:
            includes = [practitioner_role_resource(r) for e in kept[:spec.count] for r in roles_of(e)]
    else:
        roles = [r for e in candidates for r in roles_of(e) if _role_matches(r, spec)]
        total = len(roles)
        page = roles[:spec.count]
        matches = [practitioner_role_resource(r) for r in page]
        if spec.include_practitioner:
            seen: dict[str, DirectoryEntry] = {}
            for r in page:
                seen.setdefault(r.entry.national_id, r.entry)
            includes += [practitioner_resource(e) for e in seen.values()]
        if spec.include_organization and page:
            sids = {r.organisation.structure_id for r in page}
            orgs = find(bind, SearchQuery(limit=min(MAX_LIMIT, len(sids))), PrincipalKind.ORGANISATION,
                        [with_national_ids(sids)])
            includes += [organization_resource(e) for e in orgs]
    if spec.elements:
        matches = [subset(r, spec.elements) for r in matches]
        includes = [subset(r, spec.elements) for r in includes]
    return SearchResult(matches, includes, total if complete else None, complete)


def read(bind: sa.Engine | sa.Connection, resource: str, logical_id: str) -> dict[str, Any] | None:
    """The resource with this logical id, or None."""
    if resource not in RESOURCE_TYPES or not _FHIR_ID.fullmatch(logical_id):
        return None
    national_id = logical_id.split("-", 1)[0] if resource == PRACTITIONER_ROLE else logical_id
    kind = PrincipalKind.ORGANISATION if resource == ORGANIZATION else PrincipalKind.PERSON
    found = find(bind, SearchQuery(national_id=national_id, limit=1), kind)
    if not found:
        return None
    if resource == PRACTITIONER_ROLE:
        role = next((r for r in roles_of(found[0]) if r.id == logical_id), None)
        return practitioner_role_resource(role) if role else None
    return resource_of(found[0])


# -- what the server can do (GET [base]/metadata) ----------------------------------------------------------

SEARCH_PARAMETERS: Final[dict[str, tuple[tuple[str, str, str], ...]]] = {
    PRACTITIONER: (
        ("_id", "token", "logical id (identification nationale PP)"),
        ("name", "string", "family or given name, prefix, accents and case ignored"),
        ("family", "string", "family name (nom d'exercice), prefix"),
        ("given", "string", "given name (prénom d'exercice), prefix"),
        ("identifier", "token", f"{PERSON_ID_SYSTEM}|<IdNatPS> or {RPPS_SYSTEM}|<RPPS>"),
        ("qualification-code", "token", "profession (TRE_G15) or savoir-faire code or label prefix"),
        ("address-postalcode", "string", "postcode prefix of a site where the practitioner works"),
        ("address-city", "string", "city of a site where the practitioner works, prefix"),
        ("mailbox-mss", "string", "MSSanté address, exact (:exact accepted)"),
        ("mailbox-mss-type", "token", "PER | CAB | ORG | APP"),
    ),
    PRACTITIONER_ROLE: (
        ("_id", "token", "logical id (<practitioner id>-<organization id>)"),
        ("practitioner", "reference", "Practitioner/<id>"),
        ("organization", "reference", "Organization/<id>"),
        ("practitioner.identifier", "token", "identifier of the practitioner"),
        ("practitioner.name", "string", "name of the practitioner, prefix"),
        ("organization.identifier", "token", "identifier of the organization"),
        ("organization.address-postalcode", "string", "postcode prefix of the organization"),
        ("organization.address-city", "string", "city of the organization, prefix"),
        ("role", "token", "profession code (TRE_G15) or label prefix"),
        ("specialty", "token", "savoir-faire code or label prefix"),
        ("mailbox-mss", "string", "MSSanté address, exact"),
        ("mailbox-mss-type", "token", "PER"),
    ),
    ORGANIZATION: (
        ("_id", "token", "logical id (structure national id)"),
        ("name", "string", "name, prefix, accents and case ignored"),
        ("identifier", "token", (f"{STRUCTURE_ID_SYSTEM}|<IdNatStruct>, {FINESS_SYSTEM}|<FINESS>, "
                                 f"{SIRENE_SYSTEM}|<SIRET>")),
        ("address-postalcode", "string", "postcode prefix"),
        ("address-city", "string", "city, prefix"),
        ("mailbox-mss", "string", "MSSanté address, exact"),
        ("mailbox-mss-type", "token", "ORG | APP"),
    ),
}
COMMON_PARAMETERS: Final = ("_count", "_elements", "_format")


def capability_statement(base: str, software: str = "Caducée") -> dict[str, Any]:
    """The CapabilityStatement of this read-only directory server."""
    resources = []
    for name in RESOURCE_TYPES:
        parameters = [{"name": n, "type": t, "documentation": d} for n, t, d in SEARCH_PARAMETERS[name]]
        parameters += [{"name": "_count", "type": "number", "documentation": "page size (capped)"}]
        item: dict[str, Any] = {"type": name, "interaction": [{"code": "read"}, {"code": "search-type"}],
                                "searchParam": parameters}
        if name == PRACTITIONER:
            item["searchRevInclude"] = ["PractitionerRole:practitioner"]
        if name == PRACTITIONER_ROLE:
            item["searchInclude"] = ["PractitionerRole:practitioner", "PractitionerRole:organization"]
        resources.append(item)
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": dt.date.today().isoformat(), "kind": "instance",
        "software": {"name": software}, "implementation": {"description": "MSSanté directory", "url": base},
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "security": {"description": "TLS client certificate (IGC-Santé)"},
                  "resource": resources}],
    }

