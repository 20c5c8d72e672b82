"""National identifiers of health professionals and structures (REFERENCE.md §3)."""

from __future__ import annotations

import enum

# Person national id = type digit + id (RPPS: "8" + 11 digits; ADELI: "0" + 9 characters).
PERSON_RPPS_PREFIX = "8"
PERSON_ADELI_PREFIX = "0"
# Structure national id = prefix + id.
STRUCTURE_FINESS_PREFIX = "1"
STRUCTURE_SIRET_PREFIX = "3"

OID_PERSON_ID = "1.2.250.1.71.4.2.1"
OID_STRUCTURE_ID = "1.2.250.1.71.4.2.2"


class PrincipalKind(enum.Enum):
    PERSON = "person"
    ORGANISATION = "organisation"


def luhn_valid(digits: str) -> bool:
    """True when `digits` (all decimal) passes the Luhn check (ISO/IEC 7812-1)."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_complete(partial: str) -> str:
    """Append the Luhn check digit to `partial`."""
    for check in "0123456789":
        if luhn_valid(partial + check):
            return partial + check
    raise ValueError("not a decimal string")  # unreachable for digit strings


def is_rpps(value: str) -> bool:
    """An RPPS number: 11 digits passing Luhn (every real one does; ANS examples often do not)."""
    return len(value) == 11 and luhn_valid(value)


def is_finess(value: str) -> bool:
    """A FINESS number: 9 characters (2A/2B for Corsica) whose Luhn check holds on the digits form."""
    if len(value) != 9:
        return False
    digits = value.replace("2A", "10").replace("2B", "11") if value[:2] in ("2A", "2B") else value
    return luhn_valid(digits)


def person_national_id_from_rpps(rpps: str) -> str:
    return PERSON_RPPS_PREFIX + rpps


def structure_national_id_from_finess(finess: str) -> str:
    return STRUCTURE_FINESS_PREFIX + finess
