"""The published LDAP view: what is published, what never is, and the schema it is written in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from crypto.pki import CertUsage, DevPKI
from directory import ldap_schema
from directory.identifiers import PrincipalKind
from directory.importers import import_file
from directory.ldap_view import LdapEntry, iter_published, mailbox_entries, people
from directory.model import CertificateStatus, CertificateUsage, MailboxType
from directory.schema import mailboxes, principals
from directory.store import DirectoryStore
from tests.directory.test_importers import (
    ACTIVITY_52,
    DUPRE,
    HOSPITAL,
    LOCAL_DOMAIN,
    MSSANTE,
    SAVOIR_FAIRE,
    engine_for,
)

BASE = "dc=ch-exemple,dc=mssante,dc=fr"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    e = engine_for(f"sqlite:///{tmp_path / 'directory.db'}")
    for sample in (ACTIVITY_52, SAVOIR_FAIRE, MSSANTE):
        import_file(e, sample, local_domains={LOCAL_DOMAIN})
    yield e
    e.dispose()


def published(engine: sa.Engine) -> dict[str, LdapEntry]:
    with engine.connect() as conn:
        return {e.dn: e for e in iter_published(conn, BASE, batch=2)}


def test_layout_parents_first_and_every_entry_once(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        entries = list(iter_published(conn, BASE, batch=2))
    dns = [e.dn for e in entries]
    assert dns[:4] == [BASE, f"ou=people,{BASE}", f"ou=organisations,{BASE}", f"ou=mailboxes,{BASE}"]
    assert len(dns) == len(set(dns))
    assert f"uid={DUPRE},ou=people,{BASE}" in dns
    assert f"uid={HOSPITAL},ou=organisations,{BASE}" in dns
    boxes = [e for e in entries if e.dn.endswith(f",ou=mailboxes,{BASE}")]
    assert boxes and all(e.get("mail") and e.get("caduceeMailboxType") for e in boxes)


def test_practitioner_entry_carries_profession_specialty_and_sites(engine: sa.Engine) -> None:
    entry = published(engine)[f"uid={DUPRE},ou=people,{BASE}"]
    assert "inetOrgPerson" in entry.get("objectClass") and "caduceePractitioner" in entry.get("objectClass")
    assert entry.get("caduceeRpps") == [DUPRE[1:]]
    assert entry.get("caduceeProfessionCode") == ["10"]
    assert "SM53" in entry.get("caduceeSpecialtyCode")
    assert HOSPITAL in entry.get("caduceeStructureId")
    assert entry.get("sn") and entry.get("cn")
    assert not entry.get("mail"), "mail is on the mailbox entries only (no duplicate hits by mail)"


def test_liste_rouge_inactive_and_their_certificates_are_never_published(engine: sa.Engine, tmp_path: Path) -> None:
    store = DirectoryStore(engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(mailboxes.c.address, mailboxes.c.id).where(
            mailboxes.c.liste_rouge.is_(False), mailboxes.c.active.is_(True)).order_by(mailboxes.c.id)).all()
    assert len(rows) >= 2
    hidden, closed = rows[0].address, rows[1].address
    store.update_mailbox(hidden, liste_rouge=True)
    store.update_mailbox(closed, active=False)
    dns = published(engine)
    assert ldap_schema.mailbox_dn(hidden, BASE) not in dns
    assert ldap_schema.mailbox_dn(closed, BASE) not in dns
    for entry in dns.values():
        assert hidden not in entry.get("mail") and closed not in entry.get("mail")
        assert ldap_schema.mailbox_dn(hidden, BASE) not in entry.get("seeAlso")


def test_only_valid_encryption_certificates_are_published(engine: sa.Engine, tmp_path: Path) -> None:
    pki = DevPKI.create_or_load(tmp_path / "pki", organisation="Test")
    store = DirectoryStore(engine)
    person = store.add_principal(PrincipalKind.PERSON, "899900000011", "Alice Durand")
    box = store.add_mailbox(f"alice.durand@{LOCAL_DOMAIN}", MailboxType.PER, person)
    ders = {}
    for usage in (CertUsage.AUTH, CertUsage.SIGN, CertUsage.ENC):
        issued = pki.issue_person(person.national_id, "Alice", "Durand", box.address, usage, tmp_path,
                                  f"alice.{usage.value}")
        ders[usage] = x509.load_pem_x509_certificate(issued.cert_path.read_bytes()).public_bytes(Encoding.DER)
        store.add_certificate(person, ders[usage], CertificateUsage(usage.value), box)
    old = pki.issue_person(person.national_id, "Alice", "Durand", box.address, CertUsage.ENC, tmp_path, "old",
                           not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                           not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    old_der = x509.load_pem_x509_certificate(old.cert_path.read_bytes()).public_bytes(Encoding.DER)
    store.add_certificate(person, old_der, CertificateUsage.ENC, box)

    with engine.connect() as conn:
        [person_entry] = people(conn, [person.id], BASE)
        [box_entry] = mailbox_entries(conn, [box.id], BASE)
    for entry in (person_entry, box_entry):
        assert entry.get("userCertificate;binary") == [ders[CertUsage.ENC]]
        [smime] = entry.get("userSMIMECertificate")
        assert [c.public_bytes(Encoding.DER) for c in pkcs7.load_der_pkcs7_certificates(smime)] == [ders[CertUsage.ENC]]
    assert box_entry.get("cn") == ["Alice Durand"] and box_entry.get("sn") == ["Durand"]
    assert box_entry.get("caduceeOwner") == ["899900000011"]

    fingerprint = store.certificates_of(person.id, CertificateUsage.ENC)[0].fingerprint
    store.set_certificate_status(fingerprint, CertificateStatus.REVOKED)
    with engine.connect() as conn:
        [box_entry] = mailbox_entries(conn, [box.id], BASE)
    assert not box_entry.get("userCertificate;binary")


def test_inactive_people_are_not_published(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        pid = conn.execute(sa.select(principals.c.id).where(principals.c.national_id == DUPRE)).scalar_one()
        conn.execute(sa.update(principals).where(principals.c.id == pid).values(active=False))
    assert f"uid={DUPRE},ou=people,{BASE}" not in published(engine)


@pytest.mark.parametrize(("value", "escaped"), [
    ("a,b", "a\\,b"), ("+x", "\\+x"), ("#x#", "\\#x#"), (" x ", "\\ x\\ "), ("a=b;c", "a\\=b\\;c"),
    ('q"<>\\', 'q\\"\\<\\>\\\\'),
])
def test_rdn_values_are_escaped(value: str, escaped: str) -> None:
    assert ldap_schema.escape_rdn_value(value) == escaped


def test_schema_names_every_attribute_the_view_writes(engine: sa.Engine) -> None:
    known = {a.name.lower() for a in ldap_schema.ATTRIBUTE_TYPES}
    known |= {a.lower() for a in ldap_schema.STANDARD_ATTRIBUTES} | {"dc"}
    for entry in published(engine).values():
        for name in entry.attributes:
            assert name.lower() in known, f"{name} of {entry.dn} is not in the schema"


def test_a_holder_whose_only_mailbox_is_on_the_liste_rouge_is_not_published(engine: sa.Engine) -> None:
    store = DirectoryStore(engine)
    holder = store.add_principal(PrincipalKind.PERSON, "899900000029", "Basile Roux")
    store.add_mailbox(f"basile.roux@{LOCAL_DOMAIN}", MailboxType.PER, holder)
    assert f"uid=899900000029,ou=people,{BASE}" in published(engine)
    store.update_mailbox(f"basile.roux@{LOCAL_DOMAIN}", liste_rouge=True)
    assert f"uid=899900000029,ou=people,{BASE}" not in published(engine)
    # A practitioner stays: the national directory is open data; only the mailbox is withheld.
    assert f"uid={DUPRE},ou=people,{BASE}" in published(engine)


@pytest.mark.parametrize(("raw", "published_as"), [
    ("01 23 45 67 89", "01 23 45 67 89"), ("+33 1 23 45 67 89", "+33 1 23 45 67 89"),
    ("01.23.45.67.89 #2", "01.23.45.67.89 2"), ("0123456789 poste é12", "0123456789 poste 12"),
    ("#", None), ("", None), (None, None),
])
def test_phone_numbers_are_printable_strings(raw: str | None, published_as: str | None) -> None:
    from directory.ldap_view import _PRINTABLE, _phone

    assert _phone(raw) == published_as
    assert published_as is None or set(published_as) <= _PRINTABLE
