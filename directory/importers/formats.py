"""The national open-data files: their kinds, their columns and how a file is recognised by its header.

Sources (research/formats.md §1, REFERENCE.md §4): every file is UTF-8 text, `|`-separated, with a header
line of French column names and a trailing `|` on every data line; no quoting. Headers drift between
releases (52 or 56 columns for PS_LibreAcces_Personne_activite, "Code fonction" or "Code rôle", "Libellé
civilité exercice" or "Libellé civilité d'exercice"…), so a column is found by its normalised name
(`text.header_key`), never by its position.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from directory.importers.text import header_key


class FileKind(enum.Enum):
    """The national files the directory imports, in the order they must be applied."""

    ACTIVITY = "PS_LibreAcces_Personne_activite"
    SAVOIR_FAIRE = "PS_LibreAcces_SavoirFaire"
    DIPLOMA = "PS_LibreAcces_Dipl_AutExerc"
    MSSANTE = "Extraction_Correspondance_MSSante"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def order(self) -> int:
        """Practitioners first (the other files refer to them), mailboxes last."""
        return list(FileKind).index(self)


_DESCRIPTIONS = {
    FileKind.ACTIVITY: "practitioners, organisations and activities",
    FileKind.SAVOIR_FAIRE: "savoir-faire of practitioners",
    FileKind.DIPLOMA: "diplomas and exercise authorisations of practitioners",
    FileKind.MSSANTE: "MSSanté mailboxes",
}


class FormatError(ValueError):
    """The file cannot be read as one of the national files (its header, its encoding…)."""


def _cols(*pairs: tuple[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(dict(pairs))


# field name → accepted header keys (first match wins). Header keys are `header_key(column name)`.
_PERSON = (
    ("id_type", ("type identifiant pp",)),
    ("identifier", ("identifiant pp",)),
    ("national_id", ("identification nationale pp",)),
    ("last_name", ("nom exercice",)),
    ("first_names", ("prenom exercice",)),
)
_PROFESSION = (
    ("profession_code", ("code profession",)),
    ("profession_label", ("libelle profession",)),
    ("category_code", ("code categorie professionnelle",)),
    ("category_label", ("libelle categorie professionnelle",)),
)
_SAVOIR_FAIRE = (
    ("sf_type_code", ("code type savoir faire",)),
    ("sf_type_label", ("libelle type savoir faire",)),
    ("sf_code", ("code savoir faire",)),
    ("sf_label", ("libelle savoir faire",)),
)

ACTIVITY_COLUMNS = _cols(
    *_PERSON,
    ("exercise_civility_code", ("code civilite exercice",)),
    ("exercise_civility_label", ("libelle civilite exercice",)),
    ("civility_code", ("code civilite",)),
    ("civility_label", ("libelle civilite",)),
    *_PROFESSION,
    *_SAVOIR_FAIRE,
    ("mode_code", ("code mode exercice",)),
    ("mode_label", ("libelle mode exercice",)),
    ("siret", ("numero siret site",)),
    ("siren", ("numero siren site",)),
    ("finess", ("numero finess site",)),
    ("finess_legal", ("numero finess etablissement juridique",)),
    ("technical_id", ("identifiant technique structure",)),
    ("name", ("raison sociale site",)),
    ("trade_name", ("enseigne commerciale site",)),
    ("addr_recipient", ("complement destinataire structure",)),
    ("addr_place", ("complement point geographique structure",)),
    ("street_number", ("numero voie structure",)),
    ("street_repeat", ("indice repetition voie structure",)),
    ("street_type_code", ("code type voie structure",)),
    ("street_type_label", ("libelle type voie structure",)),
    ("street_name", ("libelle voie structure",)),
    ("distribution", ("mention distribution structure",)),
    ("cedex", ("bureau cedex structure",)),
    ("postcode", ("code postal structure",)),
    ("commune_code", ("code commune structure",)),
    ("city", ("libelle commune structure",)),
    ("country_code", ("code pays structure",)),
    ("country_label", ("libelle pays structure",)),
    ("phone", ("telephone structure",)),
    ("phone2", ("telephone 2 structure",)),
    ("fax", ("telecopie structure",)),
    ("email", ("adresse e mail structure",)),
    ("department_code", ("code departement structure",)),
    ("department_label", ("libelle departement structure",)),
    ("structure_id", ("ancien identifiant structure",)),
    ("registration_authority", ("autorite enregistrement",)),
    ("sector_code", ("code secteur activite",)),
    ("sector_label", ("libelle secteur activite",)),
    ("section_code", ("code section tableau pharmaciens",)),
    ("section_label", ("libelle section tableau pharmaciens",)),
    ("role_code", ("code role", "code fonction")),
    ("role_label", ("libelle role", "libelle fonction")),
    ("genre_code", ("code genre activite",)),
    ("genre_label", ("libelle genre activite",)),
)

SAVOIR_FAIRE_COLUMNS = _cols(*_PERSON, *_PROFESSION, *_SAVOIR_FAIRE)

DIPLOMA_COLUMNS = _cols(
    *_PERSON,
    ("diploma_type_code", ("code type diplome obtenu",)),
    ("diploma_type_label", ("libelle type diplome obtenu",)),
    ("diploma_code", ("code diplome obtenu",)),
    ("diploma_label", ("libelle diplome obtenu",)),
    ("auth_type_code", ("code type autorisation",)),
    ("auth_type_label", ("libelle type autorisation",)),
    ("auth_code", ("code discipline autorisation",)),
    ("auth_label", ("libelle discipline autorisation",)),
)

MSSANTE_COLUMNS = _cols(
    ("mailbox_type", ("type bal",)),
    ("address", ("adresse bal",)),
    ("id_type", ("type identifiant pp",)),
    ("identifier", ("identifiant pp",)),
    ("national_id", ("identification nationale pp",)),
    ("structure_id_type", ("type identifiant structure",)),
    ("structure_id", ("identification structure",)),
    ("service", ("service rattachement",)),
    ("civility", ("civilite exercice",)),
    ("last_name", ("nom exercice",)),
    ("first_names", ("prenom exercice",)),
    ("dematerialisation", ("dematerialisation",)),
    ("org_name", ("raison sociale structure bal",)),
    ("org_trade_name", ("enseigne commerciale structure bal",)),
)

COLUMNS: Mapping[FileKind, Mapping[str, tuple[str, ...]]] = MappingProxyType({
    FileKind.ACTIVITY: ACTIVITY_COLUMNS,
    FileKind.SAVOIR_FAIRE: SAVOIR_FAIRE_COLUMNS,
    FileKind.DIPLOMA: DIPLOMA_COLUMNS,
    FileKind.MSSANTE: MSSANTE_COLUMNS,
})

# Columns without which a line means nothing; any other column may be missing (its values are empty).
REQUIRED: Mapping[FileKind, tuple[tuple[str, ...], ...]] = MappingProxyType({
    FileKind.ACTIVITY: (("id_type",), ("identifier",), ("national_id",), ("last_name",),
                        ("profession_code",), ("structure_id", "finess", "siret", "technical_id")),
    FileKind.SAVOIR_FAIRE: (("id_type",), ("identifier",), ("national_id",), ("sf_code",)),
    FileKind.DIPLOMA: (("id_type",), ("identifier",), ("national_id",), ("diploma_code", "auth_type_code")),
    FileKind.MSSANTE: (("mailbox_type",), ("address",)),
})


@dataclass(frozen=True)
class Header:
    """A parsed header line: the column count and where each known field is."""

    kind: FileKind
    columns: tuple[str, ...]  # as written in the file
    index: Mapping[str, int]  # field name → column position
    ignored: tuple[str, ...]  # columns this importer does not use

    @property
    def width(self) -> int:
        return len(self.columns)

    def has(self, field: str) -> bool:
        return field in self.index


def split_header(line: str) -> tuple[str, ...]:
    """The column names of a header line (a trailing `|` is optional on header lines)."""
    names = line.rstrip("\r\n").lstrip("\ufeff").split("|")
    if names and names[-1].strip() == "":
        names.pop()
    return tuple(n.strip() for n in names)


def guess_kind(keys: set[str]) -> FileKind | None:
    """Which national file a set of header keys belongs to, from the columns only that file has."""
    if "type bal" in keys and "adresse bal" in keys:
        return FileKind.MSSANTE
    if "code diplome obtenu" in keys or "code type autorisation" in keys:
        return FileKind.DIPLOMA
    if keys & {"code mode exercice", "raison sociale site", "identifiant technique structure",
               "ancien identifiant structure"}:
        return FileKind.ACTIVITY
    if "code savoir faire" in keys:
        return FileKind.SAVOIR_FAIRE
    return None


def parse_header(line: str, kind: FileKind | None = None) -> Header:
    """Recognise a header line; raises `FormatError` naming what is wrong.

    With `kind`, the header must be a valid header of that kind; without, the kind is guessed.
    """
    columns = split_header(line)
    if len(columns) < 2:
        raise FormatError("the first line is not a `|`-separated header of column names")
    keys = [header_key(c) for c in columns]
    guessed = guess_kind(set(keys))
    if kind is None:
        if guessed is None:
            raise FormatError(
                "unrecognised header: not one of " + ", ".join(k.value for k in FileKind)
                + f" (first columns: {' | '.join(columns[:4])})"
            )
        kind = guessed
    elif guessed is not kind:
        raise FormatError(f"the header is not a {kind.value} header"
                          + (f" (it looks like {guessed.value})" if guessed else ""))
    position: dict[str, int] = {}
    for i, key in enumerate(keys):
        position.setdefault(key, i)
    index: dict[str, int] = {}
    for field, accepted in COLUMNS[kind].items():
        for key in accepted:
            if key in position:
                index[field] = position[key]
                break
    columns_of = COLUMNS[kind]
    missing = [" or ".join(repr(columns_of[f][0]) for f in alternatives) for alternatives in REQUIRED[kind]
               if not any(f in index for f in alternatives)]
    if missing:
        raise FormatError(f"{kind.value} header without the column(s) needed (normalised names): "
                          f"{', '.join(missing)}")
    used = set(index.values())
    ignored = tuple(c for i, c in enumerate(columns) if i not in used)
    return Header(kind, columns, MappingProxyType(index), ignored)
