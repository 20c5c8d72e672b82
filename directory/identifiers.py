"""National identifiers of health professionals, structures and patients (REFERENCE.md §3).

Every identifier has a frozen value type with a ``parse(text)`` class method that normalises the text
(whitespace removed, ``2a``/``2b`` upper-cased where Corsica codes are allowed), validates it and returns
the value, or raises :class:`IdentifierError` (a :class:`ValueError`) naming the kind of identifier, the
offending value and the precise reason. Irregularities that real peers are known to send are accepted
and reported in the value's ``warnings`` instead of being rejected. Direct construction (``Rpps("…")``)
validates the canonical form the same way, without normalising.

Rules and where they come from (docs/research/formats.md, "formats.md" below):

* **RPPS** — 11 digits. Every real RPPS seen passes a Luhn check over the 11 digits; ANS examples often
  do not, so a failing key is a *warning* (REFERENCE.md §3; formats.md §1.9).
* **ADELI** — 9 characters (REFERENCE.md §3). In the two real rows of formats.md §1.3 the number starts
  with a department code and its next two digits equal the row's profession code (``012600631``,
  audioprothésiste 26; ``759124159``, orthophoniste 91), but no authoritative description of the
  structure or of a check key was found (formats.md §1.9: "ADELI (9 chars) check not researched"): only
  the shape is validated — two digits or ``2A``/``2B``, then seven digits.
* **Person national id** (``Identification nationale PP``) — type digit + number: ``8`` + RPPS,
  ``0`` + ADELI (TRE_G08-TypeIdentifiantPersonne, formats.md §1.3 and §1.8). The other TRE_G08 types
  (identifiers registered by a structure) are not national ids of a health professional and are refused.
* **FINESS** — 9 characters, department first (``2A``/``2B`` for Corsica), Luhn key on the digit form.
  All real FINESS numbers checked pass the Luhn check on their 9 digits. How Corsican numbers are turned
  into digits for the key was not confirmed: the form used here (``2A`` → ``10``, ``2B`` → ``11``) is kept
  from the first version of this module, and a Corsican key that fails it is a warning, not an error.
* **SIREN** — 9 digits, Luhn. **SIRET** — 14 digits = SIREN + NIC, Luhn over the 14 digits, except La
  Poste (SIREN 356 000 000): its establishments' SIRET have a digit sum divisible by 5 instead, only its
  head office ``35600000000048`` follows Luhn (python-stdnum ``stdnum/fr/siret.py``; Wikipedia, "Système
  d'identification du répertoire des établissements", La Poste exception). The SIREN part of a SIRET
  must itself pass its Luhn check.
* **Structure national id** (``idNat_Struct``) — ``1`` + FINESS, ``3`` + SIRET, ``0`` + ADELI practice
  id, ``4`` + RPPS practice id (TRE_G07-TypeIdentifiantStructure; REFERENCE.md §3; formats.md §1.8). The
  practice ids are validated on the shape of the samples in formats.md §1.3 (``075912415900``: ADELI +
  2 digits; ``410005929293016``, ``410100375103005``: 14 digits).
* **INS matricule** — the patient's NIR, or a NIA while no NIR is attributed: 15 characters = 13 + a
  2-digit key, key = 97 − (first 13 characters mod 97) after replacing the department ``2A`` → ``19``,
  ``2B`` → ``18`` at positions 6–7 (REFERENCE.md §3; formats.md §2; python-stdnum ``stdnum/fr/nir.py``).
  The first character is the sex: 1 male, 2 female for a NIR (ministries' note "Les règles
  d'identification et d'immatriculation des assurés par les organismes sociaux"); 7 male, 8 female for
  a temporary number, the NIA, which "is built like a NIR" (circulaire DSS/SD4C n° 2012-213), per
  formats.md §2 and django-localflavor's NIR pattern ``[1278]``. Other first characters (3, 4 …) have no
  documented meaning in the sources consulted and are refused. An INS is patient data: it never appears
  in an exception message, a ``repr`` or ``str``; use :attr:`Ins.value` deliberately.
* **INS OIDs** (FR Core ``FRCorePatientINSProfile``; formats.md §2): INS-NIR ``1.2.250.1.213.1.4.8``,
  INS-NIA ``1.2.250.1.213.1.4.9``, INS-NIR-TEST ``1.2.250.1.213.1.4.10``, INS-NIR-DEMO
  ``1.2.250.1.213.1.4.11``.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Final, Self, TypeAlias

# Person national id = type digit + id (RPPS: "8" + 11 digits; ADELI: "0" + 9 characters).
PERSON_RPPS_PREFIX = "8"
PERSON_ADELI_PREFIX = "0"
# Structure national id = prefix + id.
STRUCTURE_FINESS_PREFIX = "1"
STRUCTURE_SIRET_PREFIX = "3"
STRUCTURE_ADELI_CABINET_PREFIX = "0"
STRUCTURE_RPPS_CABINET_PREFIX = "4"

OID_PERSON_ID = "1.2.250.1.71.4.2.1"
OID_STRUCTURE_ID = "1.2.250.1.71.4.2.2"

# INS assigning authorities (FR Core FRCorePatientINSProfile; formats.md §2).
OID_INS_NIR = "1.2.250.1.213.1.4.8"
OID_INS_NIA = "1.2.250.1.213.1.4.9"
OID_INS_NIR_TEST = "1.2.250.1.213.1.4.10"
OID_INS_NIR_DEMO = "1.2.250.1.213.1.4.11"

# La Poste: one SIREN for every establishment, whose SIRET follow a digit-sum rule (module docstring).
LA_POSTE_SIREN: Final = "356000000"
LA_POSTE_HEAD_OFFICE_SIRET: Final = "35600000000048"

_EXCERPT_MAX: Final = 40
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_DEPARTMENT_THEN_DIGITS = r"(?:[0-9]{2}|2A|2B)[0-9]{%d}"
_ADELI_RE: Final = re.compile(_DEPARTMENT_THEN_DIGITS % 7)
_FINESS_RE: Final = re.compile(_DEPARTMENT_THEN_DIGITS % 7)
_ADELI_CABINET_RE: Final = re.compile(_DEPARTMENT_THEN_DIGITS % 9)
_INS_RE: Final = re.compile(r"[0-9]{5}(?:[0-9]{2}|2A|2B)[0-9]{8}")
# Digit form of a Corsican FINESS for its Luhn key (kept from the first version; unconfirmed).
_FINESS_CORSICA_DIGITS: Final = {"2A": "10", "2B": "11"}
# Digit form of a Corsican NIR department for its key (python-stdnum calc_check_digits).
_NIR_CORSICA_DIGITS: Final = {"2A": "19", "2B": "18"}


class PrincipalKind(enum.Enum):
    """Who a directory principal is: a person (practitioner) or an organisation (REFERENCE.md §1)."""

    PERSON = "person"
    ORGANISATION = "organisation"


class IdentifierKind(enum.Enum):
    """The identifier a parse was about, as named in :class:`IdentifierError` messages."""

    RPPS = "RPPS"
    ADELI = "ADELI"
    PERSON_ID = "person national id"
    FINESS = "FINESS"
    SIREN = "SIREN"
    SIRET = "SIRET"
    STRUCTURE_ID = "structure national id"
    INS = "INS matricule"


def mask_ins(text: str) -> str:
    """Mask an INS matricule (patient data) for messages and logs: first character and last 2 only.

    Shorter texts (under 6 characters) are masked entirely, since their edges would reveal most of them.
    """
    if len(text) < 6:
        return "*" * len(text)
    return text[0] + "*" * (len(text) - 3) + text[-2:]


def _excerpt(value: str) -> str:
    """A quoted, bounded rendering of a value for an error message (no raw control characters)."""
    if len(value) > _EXCERPT_MAX:
        value = value[: _EXCERPT_MAX - 1] + "…"
    return repr(value)


class IdentifierError(ValueError):
    """A text is not a valid identifier of `kind`; `reason` says precisely why.

    `value` is the text as examined (after normalisation), masked with :func:`mask_ins` when the kind is
    an INS, so that the exception never carries patient data.
    """

    def __init__(self, kind: IdentifierKind, value: str, reason: str) -> None:
        shown = mask_ins(value) if kind is IdentifierKind.INS else value
        super().__init__(f"invalid {kind.value} {_excerpt(shown)}: {reason}")
        self.kind = kind
        self.value = shown
        self.reason = reason

    def __reduce__(self) -> tuple[type[IdentifierError], tuple[IdentifierKind, str, str]]:
        return (type(self), (self.kind, self.value, self.reason))


def _is_ascii_digits(text: str) -> bool:
    return _DIGITS_RE.fullmatch(text) is not None


def _luhn_sum(digits: str) -> int:
    """Luhn sum (ISO/IEC 7812-1) of `digits`, the rightmost being the check digit."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total


def luhn_valid(digits: str) -> bool:
    """True when `digits` (ASCII decimal digits only) passes the Luhn check (ISO/IEC 7812-1)."""
    return _is_ascii_digits(digits) and _luhn_sum(digits) % 10 == 0


def luhn_complete(partial: str) -> str:
    """Append the Luhn check digit to `partial` (ASCII decimal digits, possibly empty)."""
    if partial and not _is_ascii_digits(partial):
        raise ValueError("not a decimal string")
    return partial + str((10 - _luhn_sum(partial + "0") % 10) % 10)


def _compact(text: str) -> str:
    """Remove every whitespace character (spaces, tabs, no-break spaces) from `text`."""
    return "".join(text.split())


def _upper_ascii(text: str) -> str:
    """Upper-case ASCII letters only (``str.upper`` would also expand characters such as ``ß``)."""
    return "".join(chr(ord(ch) - 32) if "a" <= ch <= "z" else ch for ch in text)


def _describe_shape(kind: IdentifierKind, value: str, length: int, what: str) -> IdentifierError:
    """The error for a value of the wrong length or character set."""
    if len(value) != length:
        return IdentifierError(kind, value, f"expected {length} characters ({what}), got {len(value)}")
    return IdentifierError(kind, value, f"expected {what}")


_RPPS_KEY_WARNING: Final = (
    "RPPS key fails the Luhn check: every real RPPS passes it, ANS examples often do not "
    "(accepted as test or demonstration data)"
)
_FINESS_CORSICA_WARNING: Final = (
    "Corsican FINESS key fails the Luhn check on the digit form 2A=10/2B=11; that form is "
    "unconfirmed, so the number is accepted"
)


@dataclass(frozen=True, slots=True)
class Rpps:
    """An RPPS number: 11 digits; a key failing the Luhn check is a warning (REFERENCE.md §3)."""

    value: str
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.value) != 11 or not _is_ascii_digits(self.value):
            raise _describe_shape(IdentifierKind.RPPS, self.value, 11, "11 digits")
        if not luhn_valid(self.value):
            object.__setattr__(self, "warnings", (_RPPS_KEY_WARNING,))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse an RPPS number, ignoring whitespace."""
        return cls(_compact(text))

    @property
    def national_id(self) -> str:
        """The person national id: ``8`` + RPPS."""
        return PERSON_RPPS_PREFIX + self.value

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Adeli:
    """An ADELI number: 9 characters, two digits or ``2A``/``2B`` then seven digits (shape only).

    No check key is verified: none is documented in the sources consulted (module docstring).
    """

    value: str
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if _ADELI_RE.fullmatch(self.value) is None:
            raise _describe_shape(
                IdentifierKind.ADELI, self.value, 9, "two digits or 2A/2B, then seven digits"
            )

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse an ADELI number, ignoring whitespace and the case of ``2A``/``2B``."""
        return cls(_upper_ascii(_compact(text)))

    @property
    def national_id(self) -> str:
        """The person national id: ``0`` + ADELI."""
        return PERSON_ADELI_PREFIX + self.value

    def __str__(self) -> str:
        return self.value


class PersonIdKind(enum.Enum):
    """Which register a person national id comes from (TRE_G08-TypeIdentifiantPersonne)."""

    RPPS = PERSON_RPPS_PREFIX
    ADELI = PERSON_ADELI_PREFIX


@dataclass(frozen=True, slots=True)
class PersonId:
    """A person national id (``Identification nationale PP``): ``8`` + RPPS or ``0`` + ADELI.

    Its OID is :data:`OID_PERSON_ID` (REFERENCE.md §3). `kind` tells which register it comes from and
    `identifier` is the parsed RPPS or ADELI number, whose warnings are carried over.
    """

    value: str
    kind: PersonIdKind = field(init=False, compare=False)
    identifier: Rpps | Adeli = field(init=False, compare=False, repr=False)
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.value:
            raise IdentifierError(IdentifierKind.PERSON_ID, self.value, "empty")
        prefix, number = self.value[0], self.value[1:]
        identifier: Rpps | Adeli
        try:
            if prefix == PERSON_RPPS_PREFIX:
                identifier = Rpps(number)
            elif prefix == PERSON_ADELI_PREFIX:
                identifier = Adeli(number)
            else:
                raise IdentifierError(
                    IdentifierKind.PERSON_ID,
                    self.value,
                    f"unknown type digit {prefix!r}: expected 8 (RPPS) or 0 (ADELI); the other types of "
                    "TRE_G08 are registration numbers given by a structure, not national ids",
                )
        except IdentifierError as exc:
            if exc.kind is IdentifierKind.PERSON_ID:
                raise
            raise IdentifierError(
                IdentifierKind.PERSON_ID,
                self.value,
                f"{exc.kind.value} after type digit {prefix}: {exc.reason}",
            ) from exc
        object.__setattr__(self, "kind", PersonIdKind(prefix))
        object.__setattr__(self, "identifier", identifier)
        object.__setattr__(self, "warnings", identifier.warnings)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a person national id, ignoring whitespace and the case of ``2A``/``2B``."""
        return cls(_upper_ascii(_compact(text)))

    @classmethod
    def of(cls, identifier: Rpps | Adeli) -> Self:
        """The person national id of an RPPS or ADELI number."""
        return cls(identifier.national_id)

    @property
    def rpps(self) -> Rpps | None:
        """The RPPS number, when this id is of kind RPPS."""
        return self.identifier if isinstance(self.identifier, Rpps) else None

    @property
    def adeli(self) -> Adeli | None:
        """The ADELI number, when this id is of kind ADELI."""
        return self.identifier if isinstance(self.identifier, Adeli) else None

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Finess:
    """A FINESS number: 9 characters, department first (``2A``/``2B`` for Corsica), Luhn key.

    A non-Corsican number whose key fails is refused; a Corsican one is accepted with a warning, because
    the digit form of its key is unconfirmed (module docstring).
    """

    value: str
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if _FINESS_RE.fullmatch(self.value) is None:
            raise _describe_shape(
                IdentifierKind.FINESS, self.value, 9, "two digits or 2A/2B, then seven digits"
            )
        corsica = _FINESS_CORSICA_DIGITS.get(self.value[:2])
        digits = self.value if corsica is None else corsica + self.value[2:]
        if luhn_valid(digits):
            return
        if corsica is not None:
            object.__setattr__(self, "warnings", (_FINESS_CORSICA_WARNING,))
            return
        expected = luhn_complete(self.value[:8])[-1]
        raise IdentifierError(
            IdentifierKind.FINESS,
            self.value,
            f"key {self.value[-1]} fails the Luhn check (expected {expected})",
        )

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a FINESS number, ignoring whitespace and the case of ``2A``/``2B``."""
        return cls(_upper_ascii(_compact(text)))

    @property
    def department(self) -> str:
        """The department code the number starts with (``2A``/``2B`` for Corsica)."""
        return self.value[:2]

    @property
    def national_id(self) -> str:
        """The structure national id: ``1`` + FINESS."""
        return STRUCTURE_FINESS_PREFIX + self.value

    def __str__(self) -> str:
        return self.value


def _luhn_error(kind: IdentifierKind, value: str) -> IdentifierError:
    expected = luhn_complete(value[:-1])[-1]
    return IdentifierError(kind, value, f"key {value[-1]} fails the Luhn check (expected {expected})")


@dataclass(frozen=True, slots=True)
class Siren:
    """A SIREN number: 9 digits with a Luhn key (INSEE)."""

    value: str
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.value) != 9 or not _is_ascii_digits(self.value):
            raise _describe_shape(IdentifierKind.SIREN, self.value, 9, "9 digits")
        if not luhn_valid(self.value):
            raise _luhn_error(IdentifierKind.SIREN, self.value)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a SIREN number, ignoring whitespace."""
        return cls(_compact(text))

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Siret:
    """A SIRET number: SIREN + 5-digit NIC, Luhn over the 14 digits, La Poste's digit-sum exception.

    La Poste's establishments (SIREN 356 000 000) are valid when their digit sum is divisible by 5; its
    head office :data:`LA_POSTE_HEAD_OFFICE_SIRET` follows Luhn (module docstring).
    """

    value: str
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.value) != 14 or not _is_ascii_digits(self.value):
            raise _describe_shape(IdentifierKind.SIRET, self.value, 14, "14 digits")
        if self.value.startswith(LA_POSTE_SIREN) and self.value != LA_POSTE_HEAD_OFFICE_SIRET:
            total = sum(ord(ch) - 48 for ch in self.value)
            if total % 5 != 0:
                raise IdentifierError(
                    IdentifierKind.SIRET,
                    self.value,
                    f"La Poste SIRET: digit sum {total} is not divisible by 5",
                )
        elif not luhn_valid(self.value):
            raise _luhn_error(IdentifierKind.SIRET, self.value)
        if not luhn_valid(self.value[:9]):
            raise IdentifierError(
                IdentifierKind.SIRET,
                self.value,
                f"its SIREN {self.value[:9]} fails the Luhn check",
            )

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a SIRET number, ignoring whitespace."""
        return cls(_compact(text))

    @property
    def siren(self) -> Siren:
        """The SIREN of the legal unit: the first 9 digits."""
        return Siren(self.value[:9])

    @property
    def nic(self) -> str:
        """The NIC (establishment number and key): the last 5 digits."""
        return self.value[9:]

    @property
    def national_id(self) -> str:
        """The structure national id: ``3`` + SIRET."""
        return STRUCTURE_SIRET_PREFIX + self.value

    def __str__(self) -> str:
        return self.value


class StructureIdKind(enum.Enum):
    """Which register a structure national id comes from (TRE_G07-TypeIdentifiantStructure)."""

    ADELI_CABINET = STRUCTURE_ADELI_CABINET_PREFIX
    FINESS = STRUCTURE_FINESS_PREFIX
    SIRET = STRUCTURE_SIRET_PREFIX
    RPPS_CABINET = STRUCTURE_RPPS_CABINET_PREFIX


def _check_cabinet(prefix: str, number: str, whole: str) -> None:
    """Validate the shape of an ADELI or RPPS practice id (samples of formats.md §1.3)."""
    if prefix == STRUCTURE_ADELI_CABINET_PREFIX:
        if _ADELI_CABINET_RE.fullmatch(number) is None:
            raise IdentifierError(
                IdentifierKind.STRUCTURE_ID,
                whole,
                "an ADELI practice id after type digit 0 must be 11 characters: two digits or 2A/2B, "
                "then nine digits",
            )
    elif len(number) != 14 or not _is_ascii_digits(number):
        raise IdentifierError(
            IdentifierKind.STRUCTURE_ID,
            whole,
            "an RPPS practice id after type digit 4 must be 14 digits",
        )


@dataclass(frozen=True, slots=True)
class StructureId:
    """A structure national id (``idNat_Struct``): type digit + FINESS, SIRET or practice id.

    ``1`` + FINESS, ``3`` + SIRET, ``0`` + ADELI practice id, ``4`` + RPPS practice id; its OID is
    :data:`OID_STRUCTURE_ID` (REFERENCE.md §3). `identifier` is the parsed :class:`Finess` or
    :class:`Siret`, or the practice id as text.
    """

    value: str
    kind: StructureIdKind = field(init=False, compare=False)
    identifier: Finess | Siret | str = field(init=False, compare=False, repr=False)
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.value:
            raise IdentifierError(IdentifierKind.STRUCTURE_ID, self.value, "empty")
        prefix, number = self.value[0], self.value[1:]
        identifier: Finess | Siret | str
        try:
            if prefix == STRUCTURE_FINESS_PREFIX:
                identifier = Finess(number)
            elif prefix == STRUCTURE_SIRET_PREFIX:
                identifier = Siret(number)
            elif prefix in (STRUCTURE_ADELI_CABINET_PREFIX, STRUCTURE_RPPS_CABINET_PREFIX):
                _check_cabinet(prefix, number, self.value)
                identifier = number
            else:
                raise IdentifierError(
                    IdentifierKind.STRUCTURE_ID,
                    self.value,
                    f"unknown type digit {prefix!r}: expected 1 (FINESS), 3 (SIRET), 0 (ADELI practice) "
                    "or 4 (RPPS practice)",
                )
        except IdentifierError as exc:
            if exc.kind is IdentifierKind.STRUCTURE_ID:
                raise
            raise IdentifierError(
                IdentifierKind.STRUCTURE_ID,
                self.value,
                f"{exc.kind.value} after type digit {prefix}: {exc.reason}",
            ) from exc
        object.__setattr__(self, "kind", StructureIdKind(prefix))
        object.__setattr__(self, "identifier", identifier)
        if not isinstance(identifier, str):
            object.__setattr__(self, "warnings", identifier.warnings)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a structure national id, ignoring whitespace and the case of ``2A``/``2B``."""
        return cls(_upper_ascii(_compact(text)))

    @classmethod
    def of(cls, identifier: Finess | Siret) -> Self:
        """The structure national id of a FINESS or SIRET number."""
        return cls(identifier.national_id)

    @property
    def finess(self) -> Finess | None:
        """The FINESS number, when this id is of kind FINESS."""
        return self.identifier if isinstance(self.identifier, Finess) else None

    @property
    def siret(self) -> Siret | None:
        """The SIRET number, when this id is of kind SIRET."""
        return self.identifier if isinstance(self.identifier, Siret) else None

    def __str__(self) -> str:
        return self.value


class InsKind(enum.Enum):
    """What an INS matricule is: the person's NIR, or a temporary NIA (formats.md §2)."""

    NIR = "NIR"
    NIA = "NIA"


class InsUsage(enum.Enum):
    """Whether an INS designates a real patient or a fictitious one (FR Core INS OIDs)."""

    PRODUCTION = "production"
    TEST = "test"
    DEMO = "demo"


def nir_key(body: str) -> str:
    """The 2-digit key of the first 13 characters of a NIR or NIA (REFERENCE.md §3).

    key = 97 − (body mod 97), the department ``2A``/``2B`` at positions 6–7 counting as 19/18 (python-stdnum
    ``calc_check_digits``). Raises :class:`IdentifierError` (kind INS, value masked) on a malformed body.
    """
    if len(body) != 13 or _INS_RE.fullmatch(body + "00") is None:
        raise IdentifierError(
            IdentifierKind.INS,
            body,
            "a key is computed on 13 characters: digits, with 2A/2B allowed at positions 6-7",
        )
    digits = body[:5] + _NIR_CORSICA_DIGITS.get(body[5:7], body[5:7]) + body[7:]
    return f"{97 - int(digits) % 97:02d}"


# First character of a matricule: sex and kind (module docstring).
_INS_SEX: Final = {
    "1": ("M", InsKind.NIR),
    "2": ("F", InsKind.NIR),
    "7": ("M", InsKind.NIA),
    "8": ("F", InsKind.NIA),
}


@dataclass(frozen=True, slots=True, repr=False)
class Ins:
    """An INS matricule (NIR or NIA): 15 characters = 13 + a 2-digit key (REFERENCE.md §3; formats.md §2).

    Patient data: ``str()`` and ``repr()`` show only :attr:`masked`; read :attr:`value` deliberately, e.g.
    to build the patient's MSSanté address.
    """

    value: str
    warnings: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        value = self.value
        if len(value) != 15:
            raise IdentifierError(
                IdentifierKind.INS, value, f"expected 15 characters (13 + 2-digit key), got {len(value)}"
            )
        if _INS_RE.fullmatch(value) is None:
            raise IdentifierError(
                IdentifierKind.INS,
                value,
                "expected digits only, except 2A/2B (Corsica) at positions 6-7",
            )
        if value[0] not in _INS_SEX:
            raise IdentifierError(
                IdentifierKind.INS,
                value,
                f"first character (sex) {value[0]} is not 1 or 2 (NIR) nor 7 or 8 (NIA, temporary number)",
            )
        key = int(value[13:])
        if not 1 <= key <= 97:
            raise IdentifierError(IdentifierKind.INS, value, "key out of range 01-97")
        if nir_key(value[:13]) != value[13:]:
            raise IdentifierError(IdentifierKind.INS, value, "key does not match the first 13 characters")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse an INS matricule, ignoring whitespace and the case of ``2A``/``2B``."""
        return cls(_upper_ascii(_compact(text)))

    @property
    def kind(self) -> InsKind:
        """NIR (first character 1 or 2) or NIA (7 or 8, a temporary number)."""
        return _INS_SEX[self.value[0]][1]

    @property
    def sex(self) -> str:
        """``M`` or ``F``, from the first character."""
        return _INS_SEX[self.value[0]][0]

    @property
    def masked(self) -> str:
        """The matricule with all but its first character and its key hidden (:func:`mask_ins`)."""
        return mask_ins(self.value)

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"Ins({self.masked!r}, kind={self.kind.value})"


def ins_oid(ins: Ins, usage: InsUsage = InsUsage.PRODUCTION) -> str:
    """The OID of the authority that assigned `ins`, for a real or a fictitious patient.

    A real patient's matricule is under INS-NIR or INS-NIA according to its kind; fictitious patients are
    under INS-NIR-TEST or INS-NIR-DEMO, which have no NIA counterpart (FR Core; formats.md §2). Only the
    caller knows whether a patient is real: the number alone cannot tell.
    """
    if usage is InsUsage.TEST:
        return OID_INS_NIR_TEST
    if usage is InsUsage.DEMO:
        return OID_INS_NIR_DEMO
    return OID_INS_NIR if ins.kind is InsKind.NIR else OID_INS_NIA


_INS_OIDS: Final = {
    OID_INS_NIR: (InsKind.NIR, InsUsage.PRODUCTION),
    OID_INS_NIA: (InsKind.NIA, InsUsage.PRODUCTION),
    OID_INS_NIR_TEST: (InsKind.NIR, InsUsage.TEST),
    OID_INS_NIR_DEMO: (InsKind.NIR, InsUsage.DEMO),
}


def describe_ins_oid(oid: str) -> tuple[InsKind, InsUsage] | None:
    """What an INS assigning-authority OID means (with or without ``urn:oid:``), or None if not an INS OID."""
    oid = oid.strip()
    if oid[:8].lower() == "urn:oid:":
        oid = oid[8:]
    return _INS_OIDS.get(oid)


_IdentifierType: TypeAlias = type[Rpps | Adeli | PersonId | Finess | Siren | Siret | StructureId | Ins]


def _is_valid(identifier_type: _IdentifierType, value: str) -> bool:
    """True when `value` is the canonical form of a valid identifier of `identifier_type`."""
    try:
        identifier_type(value)
    except IdentifierError:
        return False
    return True


def is_rpps(value: str) -> bool:
    """An RPPS number: 11 digits passing Luhn (every real one does; ANS examples often do not).

    Stricter than :class:`Rpps`, which accepts a failing key with a warning.
    """
    return len(value) == 11 and luhn_valid(value)


def is_adeli(value: str) -> bool:
    """A canonical ADELI number (shape only, see :class:`Adeli`)."""
    return _is_valid(Adeli, value)


def is_person_id(value: str) -> bool:
    """A canonical person national id (``8`` + RPPS or ``0`` + ADELI), warnings allowed."""
    return _is_valid(PersonId, value)


def is_finess(value: str) -> bool:
    """A FINESS number: 9 characters (2A/2B for Corsica) whose Luhn check holds on the digits form."""
    if len(value) != 9:
        return False
    digits = value.replace("2A", "10").replace("2B", "11") if value[:2] in ("2A", "2B") else value
    return luhn_valid(digits)


def is_siren(value: str) -> bool:
    """A canonical SIREN number (9 digits, Luhn)."""
    return _is_valid(Siren, value)


def is_siret(value: str) -> bool:
    """A canonical SIRET number (14 digits, Luhn or La Poste's digit-sum rule)."""
    return _is_valid(Siret, value)


def is_structure_id(value: str) -> bool:
    """A canonical structure national id (``1``/``3``/``0``/``4`` + id), warnings allowed."""
    return _is_valid(StructureId, value)


def is_ins(value: str) -> bool:
    """A canonical INS matricule (NIR or NIA) with a matching key."""
    return _is_valid(Ins, value)


def person_national_id_from_rpps(rpps: str) -> str:
    """The person national id of an RPPS number: ``8`` + RPPS (no validation)."""
    return PERSON_RPPS_PREFIX + rpps


def structure_national_id_from_finess(finess: str) -> str:
    """The structure national id of a FINESS number: ``1`` + FINESS (no validation)."""
    return STRUCTURE_FINESS_PREFIX + finess


# Name search (directory): characters folded to a plain form, and the separators that all count as one space.
_LIGATURES: Final = str.maketrans({"œ": "oe", "æ": "ae"})
_SEPARATORS: Final = frozenset(
    "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"  # hyphens, dashes, minus signs
    "'`\u00b4\u2018\u2019\u201a\u201b\u02bb\u02bc\u02bd\u2032\uff07"  # apostrophes and look-alikes
)
_STRIPPED_CATEGORIES: Final = frozenset({"Mn", "Me"})


def normalise_name(text: str) -> str:
    """A search key for a name: accent-, case- and separator-insensitive (directory search).

    NFKD decomposition, case folding, removal of non-spacing and enclosing marks (accents), ``œ``/``æ``
    spelt out, then every run of whitespace, hyphens and apostrophes (including typographic ones and the
    apostrophes separating first names in the RPPS files, formats.md §1.6) becomes one space, trimmed.
    ``normalise_name("Hélène") == normalise_name("HELENE") == "helene"``. Idempotent.
    """
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())
    kept = "".join(
        " " if ch in _SEPARATORS else ch
        for ch in folded
        if unicodedata.category(ch) not in _STRIPPED_CATEGORIES
    )
    return " ".join(kept.translate(_LIGATURES).split())
