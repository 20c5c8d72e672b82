"""The LDAP schema of the published directory, defined once for every LDAP component.

Entries are standard `inetOrgPerson` / `organization` entries (RFC 2798, RFC 4519), which address books and
mail clients already understand (`cn`, `sn`, `givenName`, `mail`, `userCertificate;binary`,
`userSMIMECertificate`), plus three auxiliary classes of ours for what the national directory adds: national
identifiers, profession, specialties, mailbox type and holding structure.

Layout under the base DN (`Config.ldap_base`, e.g. `dc=caducee,dc=localhost`):

    ou=people,BASE          uid=<national id>      a practitioner, or a person holding a mailbox
    ou=organisations,BASE   uid=<structure id>     an organisation (site) of the national directory
    ou=mailboxes,BASE       mail=<address>         a published MSSanté mailbox (never a liste rouge one)

Object identifiers are under a UUID-derived arc (ITU-T X.667, `2.25.<128-bit integer>`), which needs no
registration and cannot collide with anyone else's: `.1.<n>` attribute types, `.2.<n>` object classes.

`schema_ldif()` writes the schema as an OpenLDAP `cn=config` entry (for `ldapadd -Y EXTERNAL` or slapd's
`-F` configuration); `deploy/openldap/caducee.ldif` is its output, checked by a test.
"""

from __future__ import annotations

from dataclasses import dataclass

ARC = "2.25.55559607515399906166185711089757587188"

PEOPLE_OU = "people"
ORGANISATIONS_OU = "organisations"
MAILBOXES_OU = "mailboxes"
OUS = (PEOPLE_OU, ORGANISATIONS_OU, MAILBOXES_OU)

# Syntaxes (RFC 4517) and matching rules used below.
_DIRECTORY_STRING = "1.3.6.1.4.1.1466.115.121.1.15"
_IA5_STRING = "1.3.6.1.4.1.1466.115.121.1.26"
_BOOLEAN = "1.3.6.1.4.1.1466.115.121.1.7"


@dataclass(frozen=True)
class AttributeType:
    number: int
    name: str
    description: str
    syntax: str = _DIRECTORY_STRING
    single_value: bool = False
    equality: str = "caseIgnoreMatch"
    substr: str | None = "caseIgnoreSubstringsMatch"

    @property
    def oid(self) -> str:
        return f"{ARC}.1.{self.number}"

    def definition(self) -> str:
        assert "'" not in self.description and "\\" not in self.description, "RFC 4512 qdstring"
        parts = [f"( {self.oid} NAME '{self.name}'", f"DESC '{self.description}'", f"EQUALITY {self.equality}"]
        if self.substr:
            parts.append(f"SUBSTR {self.substr}")
        parts.append(f"SYNTAX {self.syntax}")
        if self.single_value:
            parts.append("SINGLE-VALUE")
        return " ".join(parts) + " )"


@dataclass(frozen=True)
class ObjectClass:
    number: int
    name: str
    description: str
    may: tuple[str, ...]
    must: tuple[str, ...] = ()

    @property
    def oid(self) -> str:
        return f"{ARC}.2.{self.number}"

    def definition(self) -> str:
        parts = [f"( {self.oid} NAME '{self.name}'", f"DESC '{self.description}'", "SUP top AUXILIARY"]
        if self.must:
            parts.append(f"MUST ( {' $ '.join(self.must)} )")
        parts.append(f"MAY ( {' $ '.join(self.may)} )")
        return " ".join(parts) + " )"


ATTRIBUTE_TYPES = (
    AttributeType(1, "caduceeNationalId", "national id of a person (8+RPPS, 0+ADELI) or structure (1+FINESS, 3+SIRET)",
                  single_value=True),
    AttributeType(2, "caduceeRpps", "RPPS number (11 digits)", single_value=True, substr=None),
    AttributeType(3, "caduceeProfessionCode", "profession code (TRE_G15-ProfessionSante)", substr=None),
    AttributeType(4, "caduceeProfession", "profession label"),
    AttributeType(5, "caduceeSpecialtyCode", "savoir-faire code (TRE_R38 and related)", substr=None),
    AttributeType(6, "caduceeSpecialty", "savoir-faire label"),
    AttributeType(7, "caduceeMailboxType", "MSSante mailbox type: PER, ORG, APP or CAB", single_value=True,
                  substr=None),
    AttributeType(8, "caduceeStructureId", "national id of the structure holding a mailbox or where one works"),
    AttributeType(9, "caduceeFiness", "FINESS number of a site", substr=None),
    AttributeType(10, "caduceeSiret", "SIRET number of a site", substr=None),
    AttributeType(11, "caduceeDematerialisation", "the holder accepts dematerialised documents",
                  syntax=_BOOLEAN, single_value=True, equality="booleanMatch", substr=None),
    AttributeType(12, "caduceeService", "service a mailbox belongs to (ORG, APP)"),
    AttributeType(13, "caduceeResponsible", "person responsible for a mailbox (ORG, APP)"),
    AttributeType(14, "caduceeOwner", "national id of the holder of a mailbox", single_value=True, substr=None),
)

OBJECT_CLASSES = (
    ObjectClass(1, "caduceePractitioner", "a health professional of the national directory",
                must=("caduceeNationalId",),
                may=("caduceeRpps", "caduceeProfessionCode", "caduceeProfession", "caduceeSpecialtyCode",
                     "caduceeSpecialty", "caduceeStructureId")),
    ObjectClass(2, "caduceeOrganisation", "a structure (site) of the national directory",
                must=("caduceeNationalId",),
                may=("caduceeFiness", "caduceeSiret", "mail", "displayName")),
    ObjectClass(3, "caduceeMailbox", "an MSSante mailbox",
                must=("caduceeMailboxType", "caduceeOwner"),
                may=("caduceeStructureId", "caduceeDematerialisation", "caduceeService", "caduceeResponsible",
                     "caduceeProfessionCode", "caduceeProfession", "caduceeSpecialtyCode", "caduceeSpecialty")),
)

# Standard attributes a published entry may carry, besides ours (RFC 4519, RFC 2798).
STANDARD_ATTRIBUTES = (
    "objectClass", "uid", "cn", "sn", "givenName", "displayName", "title", "mail", "o", "ou", "description",
    "l", "postalCode", "street", "postalAddress", "telephoneNumber", "facsimileTelephoneNumber",
    "userCertificate;binary", "userSMIMECertificate", "seeAlso",
)

# Attributes whose values are DER bytes, never text.
BINARY_ATTRIBUTES = frozenset({"usercertificate;binary", "usercertificate", "usersmimecertificate"})


def schema_ldif(cn: str = "caducee") -> str:
    """The schema as an OpenLDAP cn=config entry (depends on core, cosine and inetorgperson)."""
    lines = [
        "# Caducée directory schema for OpenLDAP (cn=config). Generated by directory.ldap_schema.schema_ldif().",
        "# Load after core, cosine and inetorgperson:  ldapadd -Y EXTERNAL -H ldapi:/// -f caducee.ldif",
        f"dn: cn={cn},cn=schema,cn=config",
        "objectClass: olcSchemaConfig",
        f"cn: {cn}",
    ]
    lines += [f"olcAttributeTypes: {a.definition()}" for a in ATTRIBUTE_TYPES]
    lines += [f"olcObjectClasses: {c.definition()}" for c in OBJECT_CLASSES]
    return "\n".join(lines) + "\n"


def schema_text() -> str:
    """The schema in slapd.conf `include` form (attributetype / objectclass statements)."""
    lines = ["# Caducée directory schema (slapd.conf form). Generated by directory.ldap_schema.schema_text()."]
    lines += [f"attributetype {a.definition()}" for a in ATTRIBUTE_TYPES]
    lines += [f"objectclass {c.definition()}" for c in OBJECT_CLASSES]
    return "\n".join(lines) + "\n"


def escape_rdn_value(value: str) -> str:
    """An RDN attribute value escaped as RFC 4514 §2.4 requires."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def person_dn(national_id: str, base: str) -> str:
    return f"uid={escape_rdn_value(national_id)},ou={PEOPLE_OU},{base}"


def organisation_dn(structure_id: str, base: str) -> str:
    return f"uid={escape_rdn_value(structure_id)},ou={ORGANISATIONS_OU},{base}"


def mailbox_dn(address: str, base: str) -> str:
    return f"mail={escape_rdn_value(address)},ou={MAILBOXES_OU},{base}"
