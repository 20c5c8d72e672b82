"""The trust space whitelist: ListeBlancheMSSante parsing, DN matching, the store and the refresher."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import http.server
import ipaddress
import json
import logging
import re
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from caducee.config import TrustConfig
from mailserver import audit, trust
from mailserver.db import Writer
from mailserver.schema import trust_domains, trust_imports
from mailserver.trust import TrustListError, TrustSource, TrustStore

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trust"
SAMPLE = (FIXTURES / "listeblanchemssante.xml").read_bytes()
BROKEN = (FIXTURES / "listeblanche-invalide.xml").read_bytes()
SAMPLE_SHA256 = hashlib.sha256(SAMPLE).hexdigest()

MIPIH_DN = "CN=medimail-asip.mipih.fr,OU=318310021300028,O=GIP MIPIH,ST=Haute-Garonne (31),C=FR"
GCS_DN = ("CN=mss.esante-exemple.fr,OU=0002 130009186000015,O=GCS e-Santé Exemple\\, Auvergne-Rhône-Alpes,"
          "L=Lyon,ST=Rhône (69),C=FR")
LOCAL_DN = "CN=relais.chu-exemple.fr,O=CHU Exemple,C=FR"


def name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """A certificate subject with one attribute per RDN, in the given (certificate, root-first) order."""
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)]) for oid, value in pairs])


MIPIH_SUBJECT = name(
    (NameOID.COUNTRY_NAME, "FR"),
    (NameOID.STATE_OR_PROVINCE_NAME, "Haute-Garonne (31)"),
    (NameOID.ORGANIZATION_NAME, "GIP MIPIH"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "318310021300028"),
    (NameOID.COMMON_NAME, "medimail-asip.mipih.fr"),
)
GCS_SUBJECT = name(
    (NameOID.COUNTRY_NAME, "FR"),
    (NameOID.STATE_OR_PROVINCE_NAME, "Rhône (69)"),
    (NameOID.LOCALITY_NAME, "Lyon"),
    (NameOID.ORGANIZATION_NAME, "GCS e-Santé Exemple, Auvergne-Rhône-Alpes"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "0002 130009186000015"),
    (NameOID.COMMON_NAME, "mss.esante-exemple.fr"),
)


def with_domains(data: bytes, keep: set[str], generated: str = "2025-04-01T08:00:00Z") -> bytes:
    """The sample list reduced to the `<Domaine>` blocks whose <Nom> is in `keep`, with a new date."""
    text = data.decode()
    head, _, rest = text.partition("<ListeDomaines>")
    body, _, tail = rest.partition("</ListeDomaines>")
    blocks = body.split("<Domaine>")[1:]
    kept = [b for b in blocks if any(f"<Nom>{d}</Nom>" in b for d in keep)]
    head = head.replace("2025-03-13T14:54:10Z", generated)
    return (head + "<ListeDomaines>" + "".join("<Domaine>" + b for b in kept).rstrip()
            + "\n  </ListeDomaines>" + tail).encode()


# -- the XML reader --------------------------------------------------------------------------------


def test_parses_the_sample_list() -> None:
    wl = trust.parse_whitelist(SAMPLE)
    assert wl.generated_at == dt.datetime(2025, 3, 13, 14, 54, 10, tzinfo=dt.timezone.utc)
    assert len(wl.entries) == 8
    assert wl.operators == 2
    first = wl.entries[0]
    assert first == trust.TrustEntry(
        domain="adsea29.mssante.fr",
        operator_dn=MIPIH_DN,
        description="BREST LA SAUVEGARDE",
        responsible_contact="direction@adsea29.exemple.fr",
        support_contact="support-mssante@mipih.exemple.fr",
        updated_at=dt.datetime(2025, 3, 13, 14, 54, 10, tzinfo=dt.timezone.utc),
    )
    domains = [e.domain for e in wl.entries]
    assert "chu-exemple.mssante.fr" in domains  # <Nom>CHU-Exemple…</Nom> is lower-cased
    labo = next(e for e in wl.entries if e.domain == "labo-biologie-rhone.mssante.fr")
    assert labo.operator_dn == GCS_DN  # kept as written, escapes included
    assert labo.description == "Laboratoire de biologie médicale du Rhône"


def test_document_without_namespace_is_read_the_same() -> None:
    bare = SAMPLE.replace(b' xmlns="https://listeblanche.mssante.fr/schema"', b"")
    assert b"xmlns" not in bare
    assert trust.parse_whitelist(bare) == trust.parse_whitelist(SAMPLE)


def test_namespace_prefix_is_accepted() -> None:
    prefixed = (SAMPLE.replace(b' xmlns="', b' xmlns:lb="')
                .replace(b"<", b"<lb:").replace(b"<lb:/", b"</lb:").replace(b"<lb:?xml", b"<?xml"))
    assert b"<lb:Domaine>" in prefixed
    assert trust.parse_whitelist(prefixed) == trust.parse_whitelist(SAMPLE)


@pytest.mark.parametrize("document, expected", [
    (b"<ListeBlanche xmlns='https://listeblanche.mssante.fr/schema'/>", "root element is <{https://"),
    (b"<ListeBlancheMSSante xmlns='urn:autre'/>", "root element is <{urn:autre}ListeBlancheMSSante>"),
    (b"ceci n'est pas du XML", "not well-formed XML"),
    (b"<ListeBlancheMSSante><ListeDomaines>", "not well-formed XML: no element found at line 1"),
    (b"   \n", "the list is empty"),
])
def test_unreadable_documents_are_refused(document: bytes, expected: str) -> None:
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(document)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(expected)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(BROKEN)
    assert caught.value.problems == [
        "<DateDeGeneration> '13/03/2025' is not an ISO 8601 date",
        "line 5: <Domaine> #1: <Nom> missing or empty",
        "line 10: <Domaine> 'sans-certificat.mssante.fr': <DNCertificatOperateur> missing or empty",
        "line 15: <Domaine> 'pas un domaine': 'pas un domaine' is not a fully qualified domain name",
        "line 20: <Domaine> 'dn-tronque.mssante.fr': <DNCertificatOperateur> does not parse: "
        "attribute 'OU' has no '=value'",
        "line 30: <Domaine> 'doublon.mssante.fr': domain listed again (first at line 25) with another operator DN",
        "line 35: <Domaine> 'date-invalide.mssante.fr': <DateMAJ> 'le 13 mars' is not an ISO 8601 date",
    ]
    assert str(caught.value).count("\n") == 6


def test_structure_problems_are_reported_together() -> None:
    document = (b"<ListeBlancheMSSante><ListeDomaines/><ListeDomaines/>"
                b"<DateDeGeneration>2025-01-01T00:00:00Z</DateDeGeneration>"
                b"<DateDeGeneration>2025-01-02T00:00:00Z</DateDeGeneration></ListeBlancheMSSante>")
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(document)
    assert caught.value.problems == [
        "<ListeBlancheMSSante>: <DateDeGeneration> appears 2 times",
        "<ListeBlancheMSSante> must hold exactly one <ListeDomaines>, found 2",
        "<ListeDomaines> holds no <Domaine>",
    ]


def test_a_list_without_domains_is_refused() -> None:
    empty = with_domains(SAMPLE, set())
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(empty)
    assert caught.value.problems == ["<ListeDomaines> holds no <Domaine>"]


def test_domain_listed_twice_with_the_same_dn_is_kept_once() -> None:
    text = SAMPLE.decode()
    block = text[text.index("<Domaine>"):text.index("</Domaine>") + len("</Domaine>")]
    doubled = text.replace(block, block + block.replace(MIPIH_DN, MIPIH_DN.replace(",", ", ").lower()), 1)
    wl = trust.parse_whitelist(doubled.encode())
    assert [e.domain for e in wl.entries].count("adsea29.mssante.fr") == 1
    assert len(wl.entries) == 8


def test_long_description_is_shortened_to_the_column() -> None:
    long = SAMPLE.replace(b"BREST LA SAUVEGARDE", b"x" * 900)
    entry = trust.parse_whitelist(long).entries[0]
    assert entry.description is not None
    assert len(entry.description) == 500
    assert entry.description.endswith("…")


def test_oversized_input_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust, "MAX_LIST_SIZE", 1000)
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(SAMPLE)
    assert caught.value.problems == [f"the list is {len(SAMPLE)} bytes; at most 1000 are accepted"]


def test_billion_laughs_is_refused() -> None:
    bomb = b"""<?xml version="1.0"?>
<!DOCTYPE ListeBlancheMSSante [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<ListeBlancheMSSante><DateDeGeneration>&lol4;</DateDeGeneration></ListeBlancheMSSante>"""
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(bomb)
    assert caught.value.problems == ["a DOCTYPE is not allowed in the whitelist"]


def test_xxe_external_entity_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("donnée-secrète")
    xxe = f"""<?xml version="1.0"?>
<!DOCTYPE ListeBlancheMSSante [<!ENTITY xxe SYSTEM "file://{secret}">]>
<ListeBlancheMSSante><ListeDomaines><Domaine><Nom>&xxe;</Nom></Domaine></ListeDomaines></ListeBlancheMSSante>
""".encode()
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(xxe)
    assert caught.value.problems == ["a DOCTYPE is not allowed in the whitelist"]
    assert "secrète" not in str(caught.value)


def test_external_dtd_is_refused() -> None:
    document = (b'<?xml version="1.0"?><!DOCTYPE ListeBlancheMSSante SYSTEM "http://127.0.0.1:9/x.dtd">'
                b"<ListeBlancheMSSante/>")
    with pytest.raises(TrustListError, match="DOCTYPE is not allowed"):
        trust.parse_whitelist(document)


def test_undeclared_entity_is_not_well_formed() -> None:
    with pytest.raises(TrustListError) as caught:
        trust.parse_whitelist(b"<ListeBlancheMSSante>&xxe;</ListeBlancheMSSante>")
    assert caught.value.problems[0].startswith("not well-formed XML: undefined entity")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_trust_list_error(data: bytes) -> None:
    try:
        wl = trust.parse_whitelist(data)
    except TrustListError as exc:
        assert exc.problems
    else:
        assert wl.entries


# -- checksum --------------------------------------------------------------------------------------


@pytest.mark.parametrize("published", [
    SAMPLE_SHA256,
    SAMPLE_SHA256.upper(),
    f"  {SAMPLE_SHA256}\n",
    f"{SAMPLE_SHA256}  listeblanchemssante.xml\n",
    f"{SAMPLE_SHA256.upper()} *listeblanchemssante.xml\n",
    f"SHA256 (listeblanchemssante.xml) = {SAMPLE_SHA256}\n",
])
def test_checksum_formats_are_accepted(published: str) -> None:
    assert trust.verify_checksum(SAMPLE, published) == SAMPLE_SHA256


def test_checksum_file_listing_several_files_is_read_by_name() -> None:
    other = "0" * 64
    published = f"{other}  autre.xml\n{SAMPLE_SHA256}  listeblanchemssante.xml\n"
    assert trust.verify_checksum(SAMPLE, published, filename="listeblanchemssante.xml") == SAMPLE_SHA256
    with pytest.raises(TrustListError, match="lists 2 files and none is named 'absent.xml'"):
        trust.verify_checksum(SAMPLE, published, filename="absent.xml")


def test_checksum_mismatch_is_refused() -> None:
    wrong = hashlib.sha256(b"autre chose").hexdigest()
    with pytest.raises(TrustListError) as caught:
        trust.verify_checksum(SAMPLE, f"{wrong}  listeblanchemssante.xml")
    assert caught.value.problems == [
        f"SHA-256 mismatch: the checksum says {wrong}, the file hashes to {SAMPLE_SHA256}"
    ]


@pytest.mark.parametrize("published, expected", [
    ("", "the checksum is empty"),
    ("d41d8cd98f00b204e9800998ecf8427e  liste.xml", "does not start with a SHA-256 hex digest"),
    ("<html>404</html>", "does not start with a SHA-256 hex digest"),
])
def test_malformed_checksum_is_refused(published: str, expected: str) -> None:
    with pytest.raises(TrustListError, match=expected):
        trust.verify_checksum(SAMPLE, published)


# -- distinguished names ---------------------------------------------------------------------------


def test_parse_dn_reads_rfc4514_with_escapes_and_spaces() -> None:
    assert trust.parse_dn("CN=a.example.fr, OU = 0002 1300 ,O=Hôpital\\, CHU,C=FR") == (
        (("2.5.4.3", "a.example.fr"),),
        (("2.5.4.11", "0002 1300"),),
        (("2.5.4.10", "Hôpital, CHU"),),
        (("2.5.4.6", "FR"),),
    )
    assert trust.parse_dn("cn=x+serialNumber=42,E=a@b.fr,2.5.4.97=VATFR-1") == (
        (("2.5.4.3", "x"), ("2.5.4.5", "42")),
        (("1.2.840.113549.1.9.1", "a@b.fr"),),
        (("2.5.4.97", "VATFR-1"),),
    )
    assert trust.parse_dn('O="Dupont, Durand et associés",CN=H\\C3\\B4pital\\ ') == (
        (("2.5.4.10", "Dupont, Durand et associés"),),
        (("2.5.4.3", "Hôpital "),),
    )


@pytest.mark.parametrize("dn, expected", [
    ("", "empty DN"),
    ("CN", "attribute 'CN' has no '=value'"),
    ("CN=a,OU", "attribute 'OU' has no '=value'"),
    ("CN=a,", "DN ends with ','"),
    ("CN=a+", "DN ends with '+'"),
    ("XYZ=a", "unknown attribute type 'XYZ'"),
    ("C N=a", "invalid attribute type 'C N'"),
    ("=a", "attribute type missing before '='"),
    ("CN=,O=x", "empty attribute value"),
    ("CN=#04024869", "hex-encoded"),
    ("CN=a\\", "lone backslash"),
    ("CN=a\\q", "invalid escape"),
    ("CN=\\FF", "not valid UTF-8"),
    ('CN="abc', "unterminated quoted value"),
    ('CN="abc"def', "unexpected text after a quoted value"),
])
def test_parse_dn_errors(dn: str, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        trust.parse_dn(dn)


def test_dn_matches_the_certificate_subject_in_any_order() -> None:
    assert trust.dn_matches(MIPIH_SUBJECT, MIPIH_DN)
    reversed_dn = ",".join(reversed(MIPIH_DN.split(",")))
    assert trust.dn_matches(MIPIH_SUBJECT, reversed_dn)
    assert trust.dn_matches(GCS_SUBJECT, GCS_DN)


def test_dn_matches_ignores_case_and_insignificant_spaces() -> None:
    assert trust.dn_matches(MIPIH_SUBJECT, "cn=MEDIMAIL-ASIP.MIPIH.FR, ou=318310021300028,  o=gip  mipih ,"
                                           "st=haute-garonne (31), c=fr")
    spaced = name((NameOID.COMMON_NAME, "  Medimail-ASIP.mipih.fr"),
                  (NameOID.ORGANIZATIONAL_UNIT_NAME, "318310021300028"),
                  (NameOID.ORGANIZATION_NAME, "GIP  MIPIH"),
                  (NameOID.STATE_OR_PROVINCE_NAME, "Haute-Garonne (31)"),
                  (NameOID.COUNTRY_NAME, "fr"))
    assert trust.dn_matches(spaced, MIPIH_DN)


def test_dn_matches_flattens_multi_valued_rdns() -> None:
    multi = x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GIP MIPIH"),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "318310021300028")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Haute-Garonne (31)")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "medimail-asip.mipih.fr")]),
    ])
    assert trust.dn_matches(multi, MIPIH_DN)


@pytest.mark.parametrize("whitelist_dn", [
    MIPIH_DN.replace("OU=318310021300028", "OU=318310021300029"),  # a different OU
    MIPIH_DN.replace(",ST=Haute-Garonne (31)", ""),  # an attribute missing from the whitelist
    MIPIH_DN + ",L=Toulouse",  # an attribute the certificate lacks
    MIPIH_DN.replace("OU=318310021300028", "O=318310021300028"),  # same value, another type
    MIPIH_DN + ",OU=318310021300028",  # the OU twice
    "CN=medimail-asip.mipih.fr",  # a CN alone is not the operator DN
    "CN=medimail-asip.mipih.fr,OU",  # does not parse: matches nothing
    GCS_DN,
])
def test_dn_does_not_match_another_name(whitelist_dn: str) -> None:
    assert not trust.dn_matches(MIPIH_SUBJECT, whitelist_dn)


def test_dn_matches_email_address_keywords() -> None:
    subject = name((NameOID.COMMON_NAME, "relais"), (NameOID.EMAIL_ADDRESS, "Relais@Exemple.fr"))
    assert trust.dn_matches(subject, "E=relais@exemple.fr,CN=relais")
    assert trust.dn_matches(subject, "emailAddress=relais@exemple.fr,CN=relais")
    assert not trust.dn_matches(subject, "CN=relais")


def test_dn_matches_a_real_certificate_subject_and_its_own_rendering() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = name((NameOID.COUNTRY_NAME, "FR"), (NameOID.ORGANIZATION_NAME, "Opérateur + Fils, \"Test\""),
                   (NameOID.ORGANIZATIONAL_UNIT_NAME, "#0002 1300"), (NameOID.COMMON_NAME, " relais.exemple.fr"))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    assert trust.dn_matches(cert.subject, cert.subject.rfc4514_string())
    assert not trust.dn_matches(cert.subject, cert.subject.rfc4514_string().replace("FR", "BE"))


_VALUES = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=15).filter(
    lambda v: v.strip() != "")


@settings(max_examples=300, deadline=None)
@given(cn=_VALUES, o=_VALUES, ou=_VALUES, locality=_VALUES)
def test_dn_round_trips_through_rfc4514(cn: str, o: str, ou: str, locality: str) -> None:
    subject = name((NameOID.COUNTRY_NAME, "FR"), (NameOID.LOCALITY_NAME, locality), (NameOID.ORGANIZATION_NAME, o),
                   (NameOID.ORGANIZATIONAL_UNIT_NAME, ou), (NameOID.COMMON_NAME, cn))
    rendered = subject.rfc4514_string()
    assert trust.dn_matches(subject, rendered)
    other = name((NameOID.COUNTRY_NAME, "FR"), (NameOID.LOCALITY_NAME, locality), (NameOID.ORGANIZATION_NAME, o),
                 (NameOID.ORGANIZATIONAL_UNIT_NAME, ou + "x"), (NameOID.COMMON_NAME, cn))
    assert not trust.dn_matches(other, rendered)


@pytest.mark.parametrize("domain, expected", [
    (" Exemple.MSSante.fr ", "exemple.mssante.fr"),
    ("xn--hpital-gva.mssante.fr", "xn--hpital-gva.mssante.fr"),
])
def test_normalise_domain(domain: str, expected: str) -> None:
    assert trust.normalise_domain(domain) == expected


@pytest.mark.parametrize("domain", ["", "localhost", "a..b.fr", "-a.fr", "a-.fr", "hôpital.fr", "a_b.fr",
                                    "1.2.3.4", "a." * 130 + "fr", "exemple.mssante.fr."])
def test_normalise_domain_refuses(domain: str) -> None:
    with pytest.raises(ValueError):
        trust.normalise_domain(domain)


# -- the store -------------------------------------------------------------------------------------


@pytest.fixture
def store(engines: tuple[sa.Engine, Writer], tmp_path: Path) -> TrustStore:
    read, writer = engines
    return TrustStore(read, writer, archive_dir=tmp_path / "trust")


def audit_details(engine: sa.Engine) -> list[dict[str, str]]:
    return [json.loads(e.detail or "{}") for e in audit.entries(engine) if e.event == "admin"]


def test_import_loads_the_list(store: TrustStore, tmp_path: Path) -> None:
    result = store.import_list(SAMPLE, source="listeblanchemssante.xml", expected_sha256=SAMPLE_SHA256,
                               actor="cli:test")
    assert (result.domains, result.operators, result.local, result.overridden) == (8, 2, 0, ())
    assert result.sha256 == SAMPLE_SHA256
    assert result.generated_at == dt.datetime(2025, 3, 13, 14, 54, 10, tzinfo=dt.timezone.utc)
    entries = store.entries()
    assert len(entries) == 8
    assert {e.source for e in entries} == {TrustSource.NATIONAL}
    found = store.lookup("CHU-EXEMPLE.mssante.fr.")
    assert found is not None
    assert (found.domain, found.operator_dn) == ("chu-exemple.mssante.fr", MIPIH_DN)
    assert store.lookup("inconnu.mssante.fr") is None

    last = store.last_import()
    assert last is not None
    assert (last.id, last.source, last.sha256, last.domains) == (result.import_id, "listeblanchemssante.xml",
                                                                  SAMPLE_SHA256, 8)
    assert last.generated_at == result.generated_at
    assert (tmp_path / "trust" / "listeblanchemssante.xml").read_bytes() == SAMPLE
    assert [p.name for p in (tmp_path / "trust").iterdir()] == ["listeblanchemssante.xml"]

    details = audit_details(store.engine)
    assert details == [{
        "action": "trust_import", "source": "listeblanchemssante.xml", "sha256": SAMPLE_SHA256,
        "generated_at": "2025-03-13T14:54:10+00:00", "domains": "8", "operators": "2", "overridden": "0",
    }]
    assert [e.actor for e in audit.entries(store.engine)] == ["cli:test"]
    assert audit.verify(store.engine) == (1, None)


def test_import_replaces_the_national_entries(store: TrustStore, tmp_path: Path) -> None:
    store.import_list(SAMPLE, source="v1")
    smaller = with_domains(SAMPLE, {"adsea29.mssante.fr", "pharmacie-des-terreaux.mssante.fr"})
    result = store.import_list(smaller, source="v2")
    assert result.domains == 2
    assert [e.domain for e in store.entries()] == ["adsea29.mssante.fr", "pharmacie-des-terreaux.mssante.fr"]
    assert store.lookup("chu-exemple.mssante.fr") is None
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(trust_imports)).scalar() == 2
    assert (tmp_path / "trust" / "listeblanchemssante.xml").read_bytes() == smaller


def test_a_refused_import_keeps_the_last_good_list(store: TrustStore, tmp_path: Path) -> None:
    store.import_list(SAMPLE, source="v1")
    before = (store.entries(), store.last_import(), audit_details(store.engine))
    with pytest.raises(TrustListError) as caught:
        store.import_list(BROKEN, source="v2")
    assert len(caught.value.problems) == 7
    assert (store.entries(), store.last_import(), audit_details(store.engine)) == before
    assert [p.name for p in (tmp_path / "trust").iterdir()] == ["listeblanchemssante.xml"]
    assert (tmp_path / "trust" / "listeblanchemssante.xml").read_bytes() == SAMPLE


def test_a_checksum_mismatch_changes_nothing_and_is_reported_with_the_parse_problems(store: TrustStore) -> None:
    with pytest.raises(TrustListError) as caught:
        store.import_list(BROKEN, source="v1", expected_sha256=SAMPLE_SHA256)
    assert caught.value.problems[0].startswith("SHA-256 mismatch")
    assert len(caught.value.problems) == 8
    with pytest.raises(TrustListError, match="SHA-256 mismatch"):
        store.import_list(SAMPLE, source="v1", expected_sha256="0" * 64)
    assert store.entries() == []
    assert store.last_import() is None
    assert audit_details(store.engine) == []


def test_a_local_entry_overrides_the_national_one(store: TrustStore) -> None:
    store.add("CHU-Exemple.mssante.fr", LOCAL_DN, "Relais du CHU (lien privé)")
    store.add("partenaire.exemple.fr", LOCAL_DN)
    result = store.import_list(SAMPLE, source="v1")
    assert result.local == 2
    assert result.overridden == ("chu-exemple.mssante.fr",)
    chu = store.lookup("chu-exemple.mssante.fr")
    assert chu is not None
    assert (chu.source, chu.operator_dn, chu.description) == (TrustSource.LOCAL, LOCAL_DN,
                                                             "Relais du CHU (lien privé)")
    assert store.counts() == {TrustSource.NATIONAL: 7, TrustSource.LOCAL: 2}
    # A second import keeps them too.
    assert store.import_list(with_domains(SAMPLE, {"adsea29.mssante.fr"}), source="v2").local == 2
    assert store.counts() == {TrustSource.NATIONAL: 1, TrustSource.LOCAL: 2}
    assert audit_details(store.engine)[-1]["overridden"] == "0"


def test_add_replaces_a_national_entry_and_remove_deletes(store: TrustStore) -> None:
    store.import_list(SAMPLE, source="v1")
    entry = store.add("adsea29.mssante.fr", LOCAL_DN)
    assert (entry.domain, entry.source) == ("adsea29.mssante.fr", TrustSource.LOCAL)
    looked = store.lookup("adsea29.mssante.fr")
    assert looked is not None
    assert looked.source is TrustSource.LOCAL
    removed = store.remove("ADSEA29.mssante.fr")
    assert removed is not None
    assert (removed.source, removed.operator_dn) == (TrustSource.LOCAL, LOCAL_DN)
    assert store.lookup("adsea29.mssante.fr") is None
    assert store.remove("adsea29.mssante.fr") is None
    national = store.remove("pharmacie-des-terreaux.mssante.fr")
    assert national is not None
    assert national.source is TrustSource.NATIONAL
    assert [d["action"] for d in audit_details(store.engine)] == [
        "trust_import", "trust_add", "trust_remove", "trust_remove"]
    assert audit_details(store.engine)[1]["replaces"] == "national"
    assert audit.verify(store.engine) == (4, None)


def test_add_reports_every_problem(store: TrustStore) -> None:
    with pytest.raises(TrustListError) as caught:
        store.add("pas un domaine", "CN=x,OU", "d" * 501)
    assert caught.value.problems == [
        "domain: 'pas un domaine' is not a fully qualified domain name",
        "DN 'CN=x,OU' does not parse: attribute 'OU' has no '=value'",
        "description: longer than 500 characters",
    ]
    assert store.entries() == []
    assert audit_details(store.engine) == []


def test_is_trusted_checks_the_domain_and_the_operator_dn(store: TrustStore) -> None:
    store.import_list(SAMPLE, source="v1")
    assert store.is_trusted("adsea29.mssante.fr", MIPIH_SUBJECT)
    assert store.is_trusted("Labo-Biologie-Rhone.mssante.fr", GCS_SUBJECT)
    assert not store.is_trusted("labo-biologie-rhone.mssante.fr", MIPIH_SUBJECT)  # another operator's domain
    assert not store.is_trusted("inconnu.mssante.fr", MIPIH_SUBJECT)
    wrong_ou = name((NameOID.COUNTRY_NAME, "FR"), (NameOID.STATE_OR_PROVINCE_NAME, "Haute-Garonne (31)"),
                    (NameOID.ORGANIZATION_NAME, "GIP MIPIH"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "999"),
                    (NameOID.COMMON_NAME, "medimail-asip.mipih.fr"))
    assert not store.is_trusted("adsea29.mssante.fr", wrong_ou)


def test_is_operator_knows_every_operator_in_force(store: TrustStore) -> None:
    assert not store.is_operator(MIPIH_SUBJECT)
    store.import_list(SAMPLE, source="v1")
    assert store.is_operator(MIPIH_SUBJECT)
    assert store.is_operator(GCS_SUBJECT)
    assert not store.is_operator(name((NameOID.COMMON_NAME, "medimail-asip.mipih.fr")))
    store.import_list(with_domains(SAMPLE, {"adsea29.mssante.fr"}), source="v2")
    assert not store.is_operator(GCS_SUBJECT)  # its last domain left the list


def test_the_snapshot_sees_other_processes_changes_after_its_ttl(
    engines: tuple[sa.Engine, Writer], store: TrustStore
) -> None:
    read, writer = engines
    cached = TrustStore(read, writer, snapshot_ttl=3600)
    fresh = TrustStore(read, writer, snapshot_ttl=0)
    assert cached.lookup("adsea29.mssante.fr") is None
    assert fresh.lookup("adsea29.mssante.fr") is None
    store.import_list(SAMPLE, source="v1")  # another TrustStore: another process for these two
    assert cached.lookup("adsea29.mssante.fr") is None  # no query until the TTL runs out
    assert fresh.lookup("adsea29.mssante.fr") is not None
    store.remove("adsea29.mssante.fr")
    assert fresh.lookup("adsea29.mssante.fr") is None
    store.add("adsea29.mssante.fr", LOCAL_DN)
    again = fresh.lookup("adsea29.mssante.fr")
    assert again is not None
    assert again.source is TrustSource.LOCAL
    # Changes made through the store itself are seen at once whatever the TTL.
    cached.remove("chu-exemple.mssante.fr")
    assert cached.lookup("chu-exemple.mssante.fr") is None
    assert cached.lookup("adsea29.mssante.fr") is not None


def test_lookup_does_not_query_while_the_snapshot_is_fresh(store: TrustStore) -> None:
    store.import_list(SAMPLE, source="v1")
    store.snapshot_ttl = 3600
    assert store.lookup("adsea29.mssante.fr") is not None
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda *args: statements.append(args[2]))
    for _ in range(100):
        assert store.lookup("adsea29.mssante.fr") is not None
        assert store.is_trusted("adsea29.mssante.fr", MIPIH_SUBJECT)
        assert store.is_operator(GCS_SUBJECT)
        assert len(store.entries()) == 8
    assert statements == []


def test_an_older_list_is_refused_when_asked(store: TrustStore) -> None:
    store.import_list(with_domains(SAMPLE, {"adsea29.mssante.fr"}, generated="2025-04-01T08:00:00Z"), source="v2")
    with pytest.raises(TrustListError, match="before the list in force"):
        store.import_list(SAMPLE, source="v1", allow_older=False)
    assert [e.domain for e in store.entries()] == ["adsea29.mssante.fr"]
    assert store.import_list(SAMPLE, source="v1").domains == 8  # an administrator may go back


# -- fetching and refreshing -----------------------------------------------------------------------


def test_fetch_source_reads_a_file_with_a_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "liste.xml"
    path.write_bytes(SAMPLE)
    assert trust.fetch_source(str(path)) == SAMPLE
    with pytest.raises(TrustListError, match="larger than 100 bytes"):
        trust.fetch_source(str(path), max_size=100)
    with pytest.raises(TrustListError, match="cannot read"):
        trust.fetch_source(str(tmp_path / "absent.xml"))
    with pytest.raises(TrustListError, match="plain http is refused"):
        trust.fetch_source("http://127.0.0.1:9/liste.xml")


@dataclasses.dataclass
class HttpsServer:
    url: str
    cafile: Path


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[HttpsServer]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = name((NameOID.COMMON_NAME, "127.0.0.1"))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_pem = tmp_path / "server.pem"
    key_pem = tmp_path / "server.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/listeblanchemssante.xml":
                self.send_response(200)
                self.send_header("Content-Length", str(len(SAMPLE)))
                self.end_headers()
                self.wfile.write(SAMPLE)
            elif self.path == "/downgrade":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:9/listeblanchemssante.xml")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_pem, key_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpsServer(f"https://127.0.0.1:{server.server_address[1]}", cert_pem)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_source_over_https_verifies_the_server(https_server: HttpsServer) -> None:
    url = https_server.url + "/listeblanchemssante.xml"
    assert trust.fetch_source(url, cafile=https_server.cafile) == SAMPLE
    with pytest.raises(TrustListError) as caught:
        trust.fetch_source(url)  # the system store does not know this server
    assert caught.value.problems == [f"{url}: server certificate refused (self-signed certificate)"]
    with pytest.raises(TrustListError) as caught:
        trust.fetch_source(https_server.url + "/absent", cafile=https_server.cafile)
    assert caught.value.problems == [f"{https_server.url}/absent: HTTP 404"]
    with pytest.raises(TrustListError) as caught:
        trust.fetch_source(https_server.url + "/downgrade", cafile=https_server.cafile)
    assert caught.value.problems == [f"{https_server.url}/downgrade: redirected to a non-https address"]


def state_with_list(tmp_path: Path, data: bytes = SAMPLE) -> Path:
    state = tmp_path / "state"
    (state / "national").mkdir(parents=True, exist_ok=True)
    (state / "national" / "liste.xml").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (state / "national" / "liste.sha256").write_text(f"{digest}  listeblanchemssante.xml\n")
    return state


def test_refresher_imports_then_sees_no_change(store: TrustStore, tmp_path: Path) -> None:
    state = state_with_list(tmp_path)
    settings_ = TrustConfig(source="national/liste.xml", checksum="national/liste.sha256")
    refresher = trust.TrustRefresher(store, settings_, state)

    async def scenario() -> tuple[trust.ImportResult | None, trust.ImportResult | None]:
        return await refresher.refresh_once(), await refresher.refresh_once()

    first, second = asyncio.run(scenario())
    assert first is not None
    assert (first.domains, first.source) == (8, "national/liste.xml")
    assert second is None
    assert (refresher.imports, refresher.failures) == (1, 0)
    assert refresher.last_success is not None
    assert [d["action"] for d in audit_details(store.engine)] == ["trust_import"]
    assert next(audit.entries(store.engine)).actor == "trust-refresh"


def test_refresher_keeps_the_last_good_list_on_failure(
    store: TrustStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = state_with_list(tmp_path)
    settings_ = TrustConfig(source="national/liste.xml", checksum="national/liste.sha256")
    refresher = trust.TrustRefresher(store, settings_, state)
    assert asyncio.run(refresher.refresh_once()) is not None
    before = store.entries()

    (state / "national" / "liste.xml").write_bytes(BROKEN)  # the checksum file still names the good one
    with caplog.at_level(logging.WARNING, logger="mailserver.trust"):
        assert asyncio.run(refresher.refresh_once()) is None
    assert refresher.failures == 1
    assert store.entries() == before
    messages = [r.getMessage() for r in caplog.records]
    assert "event=trust_refresh_failed problems=8 kept=last_good_list" in messages
    assert any("SHA-256 mismatch" in m for m in messages)

    (state / "national" / "liste.xml").unlink()
    assert asyncio.run(refresher.refresh_once()) is None
    assert refresher.failures == 2
    assert store.entries() == before


def test_refresher_refuses_an_older_list(store: TrustStore, tmp_path: Path) -> None:
    store.import_list(with_domains(SAMPLE, {"adsea29.mssante.fr"}, generated="2025-06-01T00:00:00Z"),
                      source="manual")
    state = state_with_list(tmp_path)
    refresher = trust.TrustRefresher(store, TrustConfig(source="national/liste.xml"), state)
    assert asyncio.run(refresher.refresh_once()) is None
    assert refresher.failures == 1
    assert [e.domain for e in store.entries()] == ["adsea29.mssante.fr"]


def test_refresher_with_a_bare_hex_checksum_and_an_absolute_path(store: TrustStore, tmp_path: Path) -> None:
    state = state_with_list(tmp_path)
    source = str(state / "national" / "liste.xml")
    good = trust.TrustRefresher(store, TrustConfig(source=source, checksum=SAMPLE_SHA256.upper()), tmp_path / "x")
    assert asyncio.run(good.refresh_once()) is not None
    bad = trust.TrustRefresher(store, TrustConfig(source=source, checksum="0" * 64), tmp_path / "x")
    assert asyncio.run(bad.refresh_once()) is None  # unchanged file, but the checksum disagrees
    assert bad.failures == 1


def test_refresher_task_runs_and_stops(store: TrustStore, tmp_path: Path) -> None:
    state = state_with_list(tmp_path)
    refresher = trust.TrustRefresher(store, TrustConfig(source="national/liste.xml", refresh_interval=3600), state)

    async def scenario() -> bool:
        refresher.start()
        assert refresher.running
        for _ in range(500):
            if refresher.imports:
                break
            await asyncio.sleep(0.01)
        await refresher.stop()
        return refresher.running

    assert asyncio.run(scenario()) is False
    assert refresher.imports == 1
    assert len(store.entries()) == 8


def test_refresher_without_source_does_nothing(store: TrustStore, tmp_path: Path) -> None:
    refresher = trust.TrustRefresher(store, TrustConfig(), tmp_path)

    async def scenario() -> trust.ImportResult | None:
        refresher.start()
        assert not refresher.running
        await refresher.stop()
        return await refresher.refresh_once()

    assert asyncio.run(scenario()) is None
    assert (refresher.imports, refresher.failures) == (0, 0)
    with pytest.raises(TrustListError, match=r"no whitelist source configured \(\[trust\] source\)"):
        trust.refresh(store, TrustConfig(), tmp_path)


def test_schema_columns_hold_what_the_store_writes(store: TrustStore) -> None:
    store.import_list(SAMPLE, source="s" * 2000)
    with store.engine.connect() as conn:
        sources = conn.execute(sa.select(trust_imports.c.source)).scalars().all()
        kinds = set(conn.execute(sa.select(trust_domains.c.source)).scalars())
    assert [len(s) for s in sources] == [1000]
    assert kinds == {"national"}
