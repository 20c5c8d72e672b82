"""The LDAPS listener (directory.ldap_server): filter translation and matching checked against a full scan,
limits, scopes, the root DSE, writes refused, hostile requests; then the listener itself, in-process on
127.0.0.1:0 over TLS, driven by ldap3 and by raw PDUs.

The Twisted asyncio reactor runs in a background thread for the session (as in the IMAP server tests).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.tls import client_context
from directory import ldap_server as srv
from directory import ldap_view as lv
from directory.identifiers import PrincipalKind
from directory.importers import import_file
from directory.ldap_server import (
    MAX_FILTER_DEPTH,
    LdapDirectory,
    ProtocolViolation,
    ResultCode,
    Scope,
    SearchRequest,
    _Ber,
    decode_filter,
    decode_message,
    evaluate,
    normalise_dn,
    parse_dn,
    redact_dn,
    select_attributes,
)
from directory.model import CertificateUsage, MailboxType
from directory.schema import mailboxes, principals
from directory.store import DirectoryStore
from mailserver.db import make_engine
from tests.directory.test_importers import (
    ACTIVITY_52,
    DIPLOMAS,
    LOCAL_DOMAIN,
    MSSANTE,
    SAVOIR_FAIRE,
    engine_for,
)

with warnings.catch_warnings():  # ldap3 imports pyasn1 APIs that warn of their deprecation
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.operation.search import compile_filter, parse_filter
    from ldap3.utils.conv import escape_filter_chars
    from pyasn1.codec.ber import encoder as ber_encoder

BASE = "dc=caducee,dc=test"
DUPRE = "810091234566"
DUPRE_MAIL = "elodie.dupre@medecin.mssante.fr"
LEGALL = "810000000042"  # a person known only here, with a compound surname
LEGALL_MAIL = "yann.legall@caducee.test"
HIDDEN_MAIL = "liste.rouge@caducee.test"
TIMEOUT = 10

# -- a directory: the national samples plus local holders --------------------------------------------------


def _certificate(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Seeded:
    engine: sa.Engine
    legall_cert: bytes
    hidden_cert: bytes


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    path = tmp_path_factory.mktemp("ldap") / "directory.db"
    engine = engine_for(f"sqlite:///{path}")
    for sample in (ACTIVITY_52, SAVOIR_FAIRE, DIPLOMAS, MSSANTE):
        import_file(engine, sample, local_domains={LOCAL_DOMAIN})
    store = DirectoryStore(engine)
    legall = store.add_principal(PrincipalKind.PERSON, LEGALL, "Yann LE GALL")
    with engine.begin() as conn:  # the national extraction's form of the name: "surname given"
        conn.execute(sa.update(principals).where(principals.c.id == legall.id).values(name_norm="le gall yann"))
    box = store.add_mailbox(LEGALL_MAIL, MailboxType.PER, legall)
    legall_cert = _certificate("Yann LE GALL")
    store.add_certificate(legall, legall_cert, CertificateUsage.ENC, box)
    hospital = store.principal_by_national_id("1259999993")
    assert hospital is not None
    store.add_mailbox("cardio.cab@caducee.test", MailboxType.CAB, hospital,
                      description="Secrétariat de  Cardiologie – Œdème")
    hidden = store.add_principal(PrincipalKind.PERSON, "810000000059", "Secret Holder")
    hidden_box = store.add_mailbox(HIDDEN_MAIL, MailboxType.PER, hidden, liste_rouge=True)
    hidden_cert = _certificate("Secret Holder")
    store.add_certificate(hidden, hidden_cert, CertificateUsage.ENC, hidden_box)
    yield Seeded(engine, legall_cert, hidden_cert)
    engine.dispose()


@pytest.fixture(scope="module")
def directory(seeded: Seeded) -> LdapDirectory:
    return LdapDirectory(seeded.engine, BASE, organisation="Caducée test", size_limit=0, time_limit=0)


@pytest.fixture(scope="module")
def published(seeded: Seeded) -> list[srv.IndexedEntry]:
    """Every published entry, for the full-scan oracle."""
    with seeded.engine.connect() as conn:
        entries = list(lv.iter_published(conn, BASE, organisation="Caducée test"))
    kinds = {f"ou={ou},{BASE}".lower(): kind for kind, ou in srv._KIND_OU.items()}
    out = []
    for e in entries:
        parent = e.dn.split(",", 1)[1].lower() if "," in e.dn else ""
        out.append(srv.IndexedEntry.of(e, kinds.get(parent, "structural")))
    return out


def ber_filter(text: str) -> bytes:
    absolute = {"(&)": ber(0xA0, b""), "(|)": ber(0xA1, b""), "(!(&))": ber(0xA2, ber(0xA0, b""))}  # RFC 4526
    if text in absolute:
        return absolute[text]
    return bytes(ber_encoder.encode(compile_filter(parse_filter(text, None, False, False, None, False).elements[0])))


def flt(text: str) -> srv.Filter:
    return decode_filter(_Ber(ber_filter(text)))


def run(directory: LdapDirectory, text: str, base: str = BASE, scope: Scope = Scope.SUBTREE, *, size: int = 0,
        time_limit: int = 0) -> tuple[srv.SearchOutcome, list[str]]:
    found: list[srv.IndexedEntry] = []
    outcome = directory.search(SearchRequest(base.encode(), scope, size, time_limit, False, flt(text), ()),
                               found.append)
    return outcome, [e.dn for e in found]


def oracle(published: list[srv.IndexedEntry], text: str) -> list[str]:
    f = flt(text)
    return [e.dn for e in published if evaluate(f, e) is True]


# -- filter translation: never an entry lost, never one too many ---------------------------------------------

FILTERS = [
    "(objectClass=*)", "(objectClass=inetOrgPerson)", "(objectClass=caduceeMailbox)", "(objectclass=2.5.6.4)",
    f"(mail={DUPRE_MAIL})", f"(MAIL={DUPRE_MAIL.upper()})", "(mail=elodie*)", "(mail=*@ch-exemple.mssante.fr)",
    "(mail=*dupre*)", f"(uid={DUPRE})", f"(caduceeNationalId={DUPRE})", "(uid=8100912*)", "(caduceeRpps=10091234566)",
    f"(caduceeOwner={DUPRE})", "(cn=élodie*)", "(cn=ÉLODIE DU*)", "(cn=Élodie  Dupré)", "(cn=elodie*)",
    "(sn=dupré)", "(sn=DUP*)", "(givenName=jean-m*)", "(displayName=*ozt*)", "(cn=*almeida)", "(sn=le g*)",
    "(cn=yann*)", "(givenName=Yann)", "(sn=LE GALL)", "(cn=*gall*)", "(cn=centre hosp*)", "(sn=ehpad*)",
    "(caduceeMailboxType=ORG)", "(caduceeMailboxType=per)", "(caduceeProfessionCode=10)",
    "(caduceeProfession=médecin)", "(caduceeProfession=méd*)", "(caduceeSpecialtyCode=sm53)",
    "(caduceeSpecialty=soins*)", "(caduceeStructureId=1259999993)", "(postalCode=25*)", "(postalCode=gl)",
    "(l=pontarlier)", "(l=l'haÿ*)", "(o=cabinet*)", "(o=CENTRE HOSPITALIER EXEMPLE DU HAUT-DOUBS)",
    "(caduceeFiness=259999993)", "(caduceeSiret=99912345600018)", "(caduceeDematerialisation=TRUE)",
    "(description=*)", "(ou=cardio*)", "(telephoneNumber=03 81 00 00 00)", "(userCertificate;binary=*)",
    "(userSMIMECertificate=*)", "(&(objectClass=inetOrgPerson)(!(mail=*)))", "(|(cn=élodie*)(mail=yann*))",
    "(&(|(sn=dup*)(sn=arn*))(caduceeMailboxType=PER))", "(!(caduceeMailboxType=PER))", "(!(uid=*))",
    "(&)", "(|)", "(!(&))", "(cn>=a)", "(!(cn<=z))", "(cn~=élodie dupré)", "(cn:=ÉLODIE DUPRÉ)",
    "(cn:caseExactMatch:=ÉLODIE DUPRÉ)", "(cn:caseExactMatch:=élodie dupré)", "(cn:1.2.3.4:=x)",
    "(uid:dn:=" + DUPRE + ")", "(unknownAttribute=x)", "(!(unknownAttribute=x))", "(cn;lang-fr=*)",
    "(caduceeRpps=1009*)", f"(mail={HIDDEN_MAIL})", "(cn=secret*)", "(seeAlso=*)", "(title=docteur)",
    "(dc=caducee)", "(ou=people)", "(cn=-)", "(cn=*)", "(sn=*é*)", "(cn=*o*e*)",
    "(cn=secrétariat de c*)", "(cn=SECRÉTARIAT DE CARDIOLOGIE – ŒDÈME)", "(cn=*œdème)", "(description=secr*)",
    "(displayName=*cardio*)", "(sn=secretariat*)",
]


@pytest.mark.parametrize("text", FILTERS)
def test_translated_search_returns_exactly_what_a_full_scan_finds(directory: LdapDirectory,
                                                                   published: list[srv.IndexedEntry],
                                                                   text: str) -> None:
    outcome, dns = run(directory, text)
    assert outcome.code is ResultCode.SUCCESS
    assert dns == oracle(published, text)


def test_liste_rouge_never_answers(directory: LdapDirectory, seeded: Seeded) -> None:
    assert run(directory, f"(mail={HIDDEN_MAIL})")[1] == []
    _, dns = run(directory, "(userCertificate;binary=*)")
    assert not any("liste.rouge" in dn for dn in dns)
    with pytest.raises(srv.LdapError) as err, seeded.engine.connect() as conn:
        directory._locate(conn, normalise_dn(f"mail={HIDDEN_MAIL},ou=mailboxes,{BASE}"))
    assert err.value.code is ResultCode.NO_SUCH_OBJECT and err.value.matched_dn == f"ou=mailboxes,{BASE}"


_ATTRS = ["cn", "sn", "givenName", "displayName", "mail", "uid", "o", "l", "postalCode", "caduceeMailboxType",
          "caduceeProfession", "caduceeSpecialty", "caduceeOwner", "caduceeSpecialtyCode", "description", "ou"]


@st.composite
def filters(draw: st.DrawFn, published: list[srv.IndexedEntry], depth: int = 0) -> str:
    if depth < 3 and draw(st.booleans()):
        op = draw(st.sampled_from("&|!"))
        if op == "!":
            return f"(!{draw(filters(published, depth + 1))})"
        return f"({op}{''.join(draw(st.lists(filters(published, depth + 1), min_size=1, max_size=3)))})"
    attr = draw(st.sampled_from(_ATTRS))
    values = [str(v) for e in published for v in e.values.get(attr.lower(), []) if isinstance(v, str)]
    value = draw(st.sampled_from(values)) if values and draw(st.booleans()) else draw(
        st.text(alphabet="aàeéÉlLoOdDuU -'", min_size=1, max_size=6))
    value = draw(st.sampled_from([value, value.upper(), value.lower(), value.swapcase()]))
    cut = draw(st.integers(1, max(1, len(value))))
    kind = draw(st.sampled_from(["eq", "initial", "any", "final", "present"]))
    esc = escape_filter_chars
    if kind == "present":
        return f"({attr}=*)"
    if kind == "eq":
        return f"({attr}={esc(value)})"
    if not value[:cut].strip() or not value[-cut:].strip():
        return f"({attr}=*)"  # ldap3 cannot encode a substring of spaces only
    if kind == "initial":
        return f"({attr}={esc(value[:cut])}*)"
    if kind == "final":
        return f"({attr}=*{esc(value[-cut:])})"
    return f"({attr}=*{esc(value[:cut])}*)"


def test_random_filters_match_a_full_scan(directory: LdapDirectory, published: list[srv.IndexedEntry]) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(filters(published))
    def check(text: str) -> None:
        outcome, dns = run(directory, text)
        assert outcome.code is ResultCode.SUCCESS
        assert dns == oracle(published, text), text

    check()


def test_word_indexes_follow_the_database(seeded: Seeded) -> None:
    d = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0, word_index_ttl=3600)
    assert run(d, "(cn=zoé*)")[1] == []
    store = DirectoryStore(seeded.engine)
    zoe = store.add_principal(PrincipalKind.PERSON, "810000000067", "Zoé N'DIAYE")
    box = store.add_mailbox("zoe.ndiaye@caducee.test", MailboxType.PER, zoe)  # published: holds a mailbox
    try:
        assert run(d, "(cn=zoé*)")[1] == []  # the index is an hour old at most: not yet
        with seeded.engine.connect() as conn:
            d.refresh_word_indexes(conn, force=True)
        both = {f"uid={zoe.national_id},ou=people,{BASE}", f"mail=zoe.ndiaye@caducee.test,ou=mailboxes,{BASE}"}
        assert set(run(d, "(cn=zoé n*)")[1]) == both
        assert set(run(d, "(sn=n'diaye)")[1]) == both
    finally:
        with seeded.engine.begin() as conn:
            conn.execute(sa.delete(mailboxes).where(mailboxes.c.id == box.id))
            conn.execute(sa.delete(principals).where(principals.c.id == zoe.id))


def test_every_published_attribute_is_declared_for_its_container(published: list[srv.IndexedEntry]) -> None:
    for e in published:
        if e.kind in srv.KIND_ATTRIBUTES:
            assert set(e.values) <= srv.KIND_ATTRIBUTES[e.kind], e.dn
            assert {c.lower() for c in e.values["objectclass"]} == srv.KIND_CLASSES[e.kind]
        assert set(e.values) <= {t.key for t in srv.ATTRIBUTE_TYPES}


def _plan(directory: LdapDirectory, kind: str, text: str) -> str:
    statement = directory.candidates(kind, flt(text))
    assert statement is not None
    with directory.engine.connect() as conn:
        compiled = statement.compile(conn, compile_kwargs={"literal_binds": True})
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
    return "\n".join(r[-1] for r in rows)


def test_exact_mail_uses_the_unique_index(directory: LdapDirectory) -> None:
    plan = _plan(directory, "mailboxes", f"(mail={DUPRE_MAIL})")
    assert "USING COVERING INDEX sqlite_autoindex_mailboxes_1" in plan or "uq_mailboxes_address" in plan, plan
    assert "SCAN mailboxes" not in plan
    assert directory.candidates("people", flt(f"(mail={DUPRE_MAIL})")) is None  # people have no mail
    assert directory.candidates("organisations", flt(f"(mail={DUPRE_MAIL})")) is None


def test_name_prefixes_use_the_name_indexes(directory: LdapDirectory) -> None:
    plan = _plan(directory, "people", "(cn=élod*)")
    assert "ix_practitioners_given_name_norm" in plan and "SCAN practitioners" not in plan, plan
    plan = _plan(directory, "people", "(sn=dup*)")
    assert "ix_practitioners_name_norm" in plan and "SCAN practitioners" not in plan, plan
    plan = _plan(directory, "mailboxes", "(|(cn=dup*)(sn=dup*))")
    assert "ix_mailboxes_owner_id" in plan, plan
    plan = _plan(directory, "organisations", "(o=centre*)")
    assert "ix_organisations_name_norm" in plan and "SCAN organisations" not in plan, plan
    plan = _plan(directory, "mailboxes", "(caduceeMailboxType=ORG)")
    assert "ix_mailboxes_mailbox_type" in plan, plan


def test_compound_surnames_come_from_the_national_name_order(directory: LdapDirectory) -> None:
    _, dns = run(directory, "(&(sn=LE GALL)(givenName=yann))")
    assert dns == [f"uid={LEGALL},ou=people,{BASE}", f"mail={LEGALL_MAIL},ou=mailboxes,{BASE}"]


def test_three_valued_logic(published: list[srv.IndexedEntry]) -> None:
    dupre = next(e for e in published if e.dn.startswith(f"uid={DUPRE}"))
    assert evaluate(flt("(unknownAttribute=x)"), dupre) is None
    assert evaluate(flt("(!(unknownAttribute=x))"), dupre) is None
    assert evaluate(flt(f"(|(unknownAttribute=x)(uid={DUPRE}))"), dupre) is True
    assert evaluate(flt("(&(unknownAttribute=x)(uid=0))"), dupre) is False
    assert evaluate(flt("(cn>=a)"), dupre) is None  # no ORDERING rule
    assert evaluate(flt("(caduceeRpps=1009*)"), dupre) is None  # no SUBSTR rule
    assert evaluate(flt("(userCertificate=x)"), dupre) is None  # certificateExactMatch not supported
    assert evaluate(flt("(unknownAttribute=*)"), dupre) is False
    assert evaluate(flt("(&)"), dupre) is True and evaluate(flt("(|)"), dupre) is False  # RFC 4526
    assert evaluate(flt("(cn=ÉLODIE   dupré)"), dupre) is True  # insignificant spaces, case
    assert evaluate(flt("(cn= élodie dupré )"), dupre) is True
    assert evaluate(flt("(cn=élodie *)"), dupre) is True
    assert evaluate(flt("(cn=*die*dup*)"), dupre) is True
    assert evaluate(flt("(cn=*dup*die*)"), dupre) is False
    assert evaluate(flt("(cn=élodie*dupré*é)"), dupre) is False  # pieces may not overlap
    assert evaluate(flt("(caduceeSpecialtyCode=sm53)"), dupre) is True
    assert evaluate(flt("(objectClass=2.16.840.1.113730.3.2.2)"), dupre) is True  # inetOrgPerson by OID
    assert evaluate(flt(f"(0.9.2342.19200300.100.1.1={DUPRE})"), dupre) is True  # uid by OID
    assert evaluate(flt("(cn:caseExactMatch:=élodie dupré)"), dupre) is False
    assert evaluate(flt(f"(uid:dn:={DUPRE})"), dupre) is True
    invalid_utf8 = srv.Compare("eq", srv.AttributeDescription.parse(b"cn"), b"\xff\xfe")
    assert evaluate(invalid_utf8, dupre) is None
    nul = srv.Compare("eq", srv.AttributeDescription.parse(b"cn"), "ÉLODIE\x00DUPRÉ".encode())
    assert evaluate(nul, dupre) is False


def test_attribute_selection(published: list[srv.IndexedEntry], seeded: Seeded) -> None:
    box = next(e for e in published if e.dn.startswith(f"mail={LEGALL_MAIL}"))
    assert select_attributes(box, ["1.1"], False) == []
    assert [n for n, _ in select_attributes(box, ["mail", "1.1"], False)] == ["mail"]
    for name in ("userCertificate", "userCertificate;binary", "USERCERTIFICATE;BINARY", "2.5.4.36"):
        assert select_attributes(box, [name], False) == [("userCertificate;binary", [seeded.legall_cert])]
    everything = dict(select_attributes(box, [], False))
    assert everything == dict(select_attributes(box, ["*"], False))
    assert everything["userCertificate;binary"] == [seeded.legall_cert]
    smime = everything["userSMIMECertificate"][0]
    assert isinstance(smime, bytes) and seeded.legall_cert in smime  # a certs-only PKCS#7 holding it
    assert dict(select_attributes(box, ["cn", "mail"], True)) == {"cn": [], "mail": []}
    assert select_attributes(box, ["cn;lang-fr", "nonsense", "+"], False) == []


# -- scopes, the base, the root DSE -----------------------------------------------------------------------


def test_scopes(directory: LdapDirectory) -> None:
    assert run(directory, "(objectClass=*)", BASE, Scope.BASE)[1] == [BASE]
    assert run(directory, "(objectClass=*)", BASE, Scope.ONE)[1] == [f"ou={ou},{BASE}" for ou in
                                                                     ("people", "organisations", "mailboxes")]
    people = run(directory, "(objectClass=*)", f"ou=people,{BASE}", Scope.ONE)[1]
    assert people and all(dn.endswith(f",ou=people,{BASE}") for dn in people)
    assert run(directory, "(objectClass=*)", f"OU=People,{BASE.upper()}", Scope.SUBTREE)[1] == [
        f"ou=people,{BASE}", *people]
    assert run(directory, "(objectClass=*)", f"ou=people,{BASE}", Scope.SUBORDINATE)[1] == people
    leaf = f"mail={DUPRE_MAIL},ou=mailboxes,{BASE}"
    assert run(directory, "(objectClass=*)", leaf.upper(), Scope.BASE)[1] == [leaf]
    assert run(directory, "(objectClass=*)", leaf, Scope.ONE)[1] == []
    assert run(directory, "(caduceeMailboxType=ORG)", leaf, Scope.BASE)[1] == []
    # from the empty DN: the naming context (the root DSE is never in a subtree search, RFC 4512 §5.1)
    everything = run(directory, "(objectClass=*)", "", Scope.SUBTREE)[1]
    assert everything[0] == BASE and "" not in everything
    assert run(directory, "(objectClass=*)", "", Scope.ONE)[1] == [BASE]


@pytest.mark.parametrize(("base", "matched"), [
    (f"uid=000,ou=people,{BASE}", f"ou=people,{BASE}"),
    (f"mail=nobody@x.test,ou=mailboxes,{BASE}", f"ou=mailboxes,{BASE}"),
    (f"cn=x,mail={DUPRE_MAIL},ou=mailboxes,{BASE}", f"mail={DUPRE_MAIL},ou=mailboxes,{BASE}"),
    (f"ou=elsewhere,{BASE}", BASE),
    ("dc=other,dc=test", ""),
    ("dc=test", ""),
])
def test_unknown_bases_are_no_such_object_with_the_matched_dn(directory: LdapDirectory, base: str,
                                                               matched: str) -> None:
    outcome, dns = run(directory, "(objectClass=*)", base)
    assert (outcome.code, outcome.matched_dn, dns) == (ResultCode.NO_SUCH_OBJECT, matched, [])


def test_invalid_base_dn(directory: LdapDirectory) -> None:
    for base in ("no equals sign", "cn=a,,dc=x", "cn=\\zz", "=x"):
        assert run(directory, "(objectClass=*)", base)[0].code is ResultCode.INVALID_DN_SYNTAX


def test_root_dse(directory: LdapDirectory) -> None:
    found: list[srv.IndexedEntry] = []
    outcome = directory.search(SearchRequest(b"", 0, 0, 0, False, flt("(objectClass=*)"), ("+",)), found.append)
    assert outcome.code is ResultCode.SUCCESS and len(found) == 1
    attrs = dict(select_attributes(found[0], ["+"], False))
    assert attrs["namingContexts"] == [BASE] and attrs["supportedLDAPVersion"] == ["3"]
    assert "supportedControl" not in attrs  # none implemented
    assert srv.WHO_AM_I in attrs["supportedExtension"]


def test_dn_parsing() -> None:
    assert parse_dn("cn=a\\,b+sn=c , ou=x\\20 ,dc=\\C3\\A9") == [[("cn", "a,b"), ("sn", "c")], [("ou", "x ")],
                                                                  [("dc", "é")]]
    assert normalise_dn("CN=A  B,commonName=x") == ((("cn", "a b"),), (("cn", "x"),))
    assert parse_dn("") == []
    for bad in ("cn", "cn=a,", "cn=a\\", "cn=\"q\"", "c n=x", "cn=a\x00"):
        with pytest.raises(srv.InvalidDn):
            parse_dn(bad)
    assert redact_dn(f"mail={DUPRE_MAIL},ou=mailboxes,{BASE}".encode(), BASE) == f"mail=*,ou=mailboxes,{BASE}"
    assert redact_dn(f"ou=people,{BASE}".encode(), BASE) == f"ou=people,{BASE}"
    assert redact_dn(b"", BASE) == '""'


# -- limits ----------------------------------------------------------------------------------------------


def test_size_limits_client_and_server(seeded: Seeded) -> None:
    limited = LdapDirectory(seeded.engine, BASE, size_limit=5, time_limit=0)
    outcome, dns = run(limited, "(objectClass=*)")
    assert (outcome.code, len(dns)) == (ResultCode.SIZE_LIMIT_EXCEEDED, 5)
    outcome, dns = run(limited, "(objectClass=*)", size=3)
    assert (outcome.code, len(dns)) == (ResultCode.SIZE_LIMIT_EXCEEDED, 3)
    outcome, dns = run(limited, "(caduceeMailboxType=ORG)", size=2)  # exactly the limit: success
    assert (outcome.code, len(dns)) == (ResultCode.SUCCESS, 2)


def test_time_limit_stops_the_search_and_interrupts_sql(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    d = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=1, batch=1)
    real = lv.people

    def slow(conn: sa.Connection, ids: Any, base: str) -> list[lv.LdapEntry]:
        time.sleep(0.4)
        return real(conn, ids, base)

    monkeypatch.setattr(lv, "people", slow)
    started = time.monotonic()
    outcome, dns = run(d, "(objectClass=inetOrgPerson)", f"ou=people,{BASE}", Scope.ONE)
    assert outcome.code is ResultCode.TIME_LIMIT_EXCEEDED and time.monotonic() - started < 3
    assert 0 < len(dns) < 7
    monkeypatch.setattr(lv, "people", real)
    # a statement still running at the deadline is interrupted (SQLite progress handler)
    spec = SearchRequest(BASE.encode(), Scope.SUBTREE, 0, 0, False, flt("(cn=*)"), ())
    with seeded.engine.connect() as conn:
        run_ = srv._Run(spec, time.monotonic() + 0.2, 0, lambda e: None, lambda: False)
        with pytest.raises(srv._TimeLimit), d._interruptible(conn, run_):
            conn.exec_driver_sql("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                                 "SELECT count(*) FROM c").all()


# -- requests as bytes ------------------------------------------------------------------------------------


def ber(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def integer(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)


def search_pdu(msg_id: int, filter_bytes: bytes, base: str = BASE, scope: int = 2, size: int = 0,
               attrs: tuple[str, ...] = (), controls: bytes = b"") -> bytes:
    body = (ber(0x04, base.encode()) + ber(0x0A, bytes([scope])) + ber(0x0A, b"\x00") + ber(0x02, integer(size))
            + ber(0x02, b"\x00") + ber(0x01, b"\x00") + filter_bytes
            + ber(0x30, b"".join(ber(0x04, a.encode()) for a in attrs)))
    return ber(0x30, ber(0x02, integer(msg_id)) + ber(0x63, body) + controls)


def eq(attr: str, value: bytes) -> bytes:
    return ber(0xA3, ber(0x04, attr.encode()) + ber(0x04, value))


def nested(depth: int) -> bytes:
    f = eq("cn", b"x")
    for _ in range(depth):
        f = ber(0xA2, f)
    return f


def test_decoding_limits_and_malformed_requests() -> None:
    assert decode_message(search_pdu(1, nested(MAX_FILTER_DEPTH))).error is None
    too_deep = decode_message(search_pdu(2, nested(MAX_FILTER_DEPTH + 1)))
    assert too_deep.error is not None and too_deep.error.code is ResultCode.UNWILLING_TO_PERFORM
    wide = ber(0xA1, b"".join(eq("cn", b"x") for _ in range(srv.MAX_FILTER_ITEMS + 1)))
    assert decode_message(search_pdu(3, wide)).error is not None
    bad = [
        search_pdu(4, ber(0xAA, b"")),  # unknown filter choice: ldaptor would drop it silently
        search_pdu(5, ber(0xA0, eq("cn", b"x") + ber(0xAB, b""))),
        search_pdu(0, eq("cn", b"x")),  # message id 0
        search_pdu(6, ber(0xA4, ber(0x04, b"cn") + ber(0x30, ber(0x82, b"a") + ber(0x80, b"b")))),  # order
        search_pdu(7, ber(0xA4, ber(0x04, b"cn") + ber(0x30, b""))),
        search_pdu(8, eq("cn", b"x"), scope=7),
        ber(0x30, ber(0x02, b"\x09") + ber(0x64, b"")),  # a response sent as a request
        b"\x30\x80" + ber(0x02, b"\x01") + b"\x00\x00",  # indefinite length
        ber(0x30, ber(0x02, b"\x01") + ber(0x63, b"\x04")),  # truncated inside
    ]
    for pdu in bad:
        with pytest.raises(ProtocolViolation):
            decode_message(pdu)
    with pytest.raises(ProtocolViolation):
        srv.frame(b"\x31\x00")
    with pytest.raises(ProtocolViolation):
        srv.frame(b"\x30\x84\x00\x10\x00\x00")  # 1 MiB announced
    assert srv.frame(b"\x30\x05\x02") is None


# -- the listener: in-process, TLS, ldap3 and raw PDUs ------------------------------------------------------


@pytest.fixture(scope="session")
def reactor_loop() -> Iterator[Any]:
    from twisted.internet import asyncioreactor

    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if not isinstance(reactor, asyncioreactor.AsyncioSelectorReactor):
            pytest.fail("another test installed a non-asyncio Twisted reactor")
        loop = reactor._asyncioEventloop
    else:
        loop = asyncio.new_event_loop()
        asyncioreactor.install(loop)
        from twisted.internet import reactor
    if reactor.running:
        yield reactor
        return

    def run_reactor() -> None:
        asyncio.set_event_loop(loop)
        reactor.run(installSignalHandlers=False)

    thread = threading.Thread(target=run_reactor, name="twisted-reactor", daemon=True)
    thread.start()
    started = threading.Event()
    reactor.callFromThread(started.set)
    assert started.wait(TIMEOUT)
    yield reactor
    reactor.callFromThread(reactor.stop)
    thread.join(TIMEOUT)
    if not thread.is_alive():
        loop.close()


class _Tls(ldap3.Tls):  # type: ignore[misc]
    """ldap3 with a verifying context (its own wrapper calls the deprecated ssl.match_hostname)."""

    def __init__(self, ca: Path) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca))
        self._context = client_context(ca)

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(connection.socket, server_side=False,
                                                      do_handshake_on_connect=do_handshake,
                                                      server_hostname="localhost")


@dataclass
class Listener:
    port: int
    ca: Path
    reactor: Any

    def ldap3(self, **kwargs: Any) -> ldap3.Connection:
        server = ldap3.Server("localhost", self.port, use_ssl=True, tls=_Tls(self.ca), get_info=ldap3.NONE,
                              connect_timeout=TIMEOUT)
        kwargs.setdefault("auto_bind", ldap3.AUTO_BIND_NO_TLS)
        return ldap3.Connection(server, receive_timeout=TIMEOUT, raise_exceptions=False, **kwargs)

    def raw(self) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        return ctx.wrap_socket(sock, server_hostname="localhost")


@pytest.fixture(scope="module")
def listener(reactor_loop: Any, seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    from twisted.internet.threads import blockingCallFromThread

    folder = tmp_path_factory.mktemp("ldaps-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test LDAP CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    engine = make_engine(str(seeded.engine.url))
    d = LdapDirectory(engine, BASE, organisation="Caducée test", size_limit=10, time_limit=5)
    port = blockingCallFromThread(reactor_loop, srv.listen_ldaps, reactor_loop, d, cert_path, key_path,
                                  "127.0.0.1", 0)
    yield Listener(port.getHost().port, ca_path, reactor_loop)
    blockingCallFromThread(reactor_loop, port.stopListening)
    engine.dispose()


def test_ldap3_anonymous_search_returns_the_encryption_certificate(listener: Listener, seeded: Seeded) -> None:
    conn = listener.ldap3()
    try:
        assert conn.bound
        assert conn.search(BASE, f"(mail={LEGALL_MAIL})", attributes=["userCertificate;binary", "cn", "mail"])
        (entry,) = conn.response
        assert entry["dn"] == f"mail={LEGALL_MAIL},ou=mailboxes,{BASE}"
        assert entry["raw_attributes"]["userCertificate;binary"] == [seeded.legall_cert]
        assert entry["attributes"]["cn"] == ["Yann LE GALL"]
        assert conn.search(BASE, "(userCertificate=*)", attributes=["userCertificate"])
        assert all(e["raw_attributes"]["userCertificate;binary"] for e in conn.response)
        assert seeded.hidden_cert not in [v for e in conn.response for v in e["raw_attributes"]["userCertificate;binary"]]
        assert conn.search(f"ou=people,{BASE}", "(cn=élodie*)", search_scope=ldap3.LEVEL, attributes=["1.1"])
        assert [e["dn"] for e in conn.response] == [f"uid={DUPRE},ou=people,{BASE}"]
        assert conn.response[0]["raw_attributes"] == {}
    finally:
        conn.unbind()


def test_binds_other_than_anonymous_are_refused(listener: Listener) -> None:
    conn = listener.ldap3(user=f"uid={DUPRE},ou=people,{BASE}", password="secret", auto_bind=ldap3.AUTO_BIND_NONE)
    try:
        assert not conn.bind()
        assert conn.result["result"] == ResultCode.UNWILLING_TO_PERFORM
        conn.authentication, conn.sasl_mechanism = ldap3.SASL, ldap3.EXTERNAL
        assert not conn.bind() and conn.result["result"] == ResultCode.AUTH_METHOD_NOT_SUPPORTED
        conn.authentication, conn.user, conn.password = ldap3.ANONYMOUS, None, None
        assert conn.bind() and conn.search(BASE, "(mail=*)", attributes=["1.1"])  # anonymous still works
    finally:
        conn.unbind()


def bind_pdu(msg_id: int, name: bytes, password: bytes, version: int = 3) -> bytes:
    body = ber(0x02, bytes([version])) + ber(0x04, name) + ber(0x80, password)
    return ber(0x30, ber(0x02, integer(msg_id)) + ber(0x60, body))


def test_unauthenticated_and_v2_binds(listener: Listener) -> None:
    with listener.raw() as sock:
        sock.sendall(bind_pdu(1, f"uid={DUPRE},ou=people,{BASE}".encode(), b""))  # RFC 4513 §5.1.2
        sock.sendall(bind_pdu(2, b"", b"", version=2) + bind_pdu(3, b"", b""))
        assert _responses(sock, 3) == [(1, 0x61, ResultCode.UNWILLING_TO_PERFORM),
                                       (2, 0x61, ResultCode.PROTOCOL_ERROR), (3, 0x61, ResultCode.SUCCESS)]


def test_writes_are_refused_compare_is_answered(listener: Listener) -> None:
    conn = listener.ldap3()
    dn = f"mail={DUPRE_MAIL},ou=mailboxes,{BASE}"
    try:
        assert not conn.add(f"mail=new@x.test,ou=mailboxes,{BASE}", ["inetOrgPerson"], {"sn": "x", "cn": "x"})
        assert (conn.result["result"], conn.result["description"]) == (53, "unwillingToPerform")
        assert not conn.modify(dn, {"cn": [(ldap3.MODIFY_REPLACE, ["x"])]})
        assert conn.result["result"] == 53
        assert not conn.delete(dn) and conn.result["result"] == 53
        assert not conn.modify_dn(dn, "mail=other@x.test") and conn.result["result"] == 53
        assert conn.compare(dn, "caduceeMailboxType", "per") and conn.result["result"] == ResultCode.COMPARE_TRUE
        assert not conn.compare(dn, "caduceeMailboxType", "ORG") and conn.result["result"] == ResultCode.COMPARE_FALSE
        conn.compare(f"mail=nobody@x.test,ou=mailboxes,{BASE}", "cn", "x")
        assert conn.result["result"] == ResultCode.NO_SUCH_OBJECT
        assert conn.search(BASE, f"(mail={DUPRE_MAIL})", attributes=["cn"])  # still there, unchanged
        assert conn.response[0]["attributes"]["cn"] == ["ÉLODIE DUPRÉ"]
    finally:
        conn.unbind()


def test_limits_scopes_and_controls_over_the_wire(listener: Listener) -> None:
    conn = listener.ldap3()
    try:
        conn.search(BASE, "(objectClass=*)", attributes=["1.1"])  # server limit: 10
        assert conn.result["result"] == ResultCode.SIZE_LIMIT_EXCEEDED and len(conn.response) == 10
        conn.search(BASE, "(objectClass=*)", attributes=["1.1"], size_limit=2)
        assert conn.result["result"] == ResultCode.SIZE_LIMIT_EXCEEDED and len(conn.response) == 2
        conn.search(f"uid=0,ou=people,{BASE}", "(objectClass=*)")
        assert (conn.result["result"], conn.result["dn"]) == (ResultCode.NO_SUCH_OBJECT, f"ou=people,{BASE}")
        conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["namingContexts",
                                                                                 "supportedLDAPVersion"])
        assert conn.response[0]["attributes"]["namingContexts"] == [BASE]
        paged = ("1.2.840.113556.1.4.319", True, b"\x30\x05\x02\x01\x05\x04\x00")
        conn.search(BASE, "(caduceeMailboxType=ORG)", attributes=["1.1"], controls=[paged])
        assert conn.result["result"] == ResultCode.UNAVAILABLE_CRITICAL_EXTENSION and conn.response == []
        conn.search(BASE, "(caduceeMailboxType=ORG)", attributes=["1.1"], controls=[(paged[0], False, paged[2])])
        assert conn.result["result"] == ResultCode.SUCCESS and len(conn.response) == 2
        assert conn.extend.standard.who_am_i() in ("", None)
        conn.extended(srv.START_TLS)
        assert conn.result["result"] == ResultCode.OPERATIONS_ERROR
    finally:
        conn.unbind()


@pytest.mark.parametrize("value", ["*)(uid=*", "*", "\\2a", ")(|(objectClass=*", "x\x00y", "é" * 20000,
                                   "*)(|(mail=*", "\\"])
def test_hostile_values_are_only_values(listener: Listener, value: str) -> None:
    conn = listener.ldap3()
    try:
        for template in ("(mail={})", "(cn={})", "(&(uid={})(objectClass=*))", "(cn={}*)"):
            assert conn.search(BASE, template.format(escape_filter_chars(value)), attributes=["1.1"]) is False
            assert conn.result["result"] == ResultCode.SUCCESS and conn.response == []
    finally:
        conn.unbind()


def _responses(sock: ssl.SSLSocket, count: int) -> list[tuple[int, int, int | None]]:
    """(message id, protocolOp tag, result code) of the next `count` responses."""
    out: list[tuple[int, int, int | None]] = []
    data = b""
    while len(out) < count:
        size = srv.frame(data)
        if size is None:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            continue
        _, env = _Ber(data[:size]).read(0x30)
        data = data[size:]
        msg_id = env.read(0x02)[1].integer()
        tag, content = env.read()
        code = content.read(0x0A)[1].integer() if tag in (0x61, 0x65, 0x67, 0x69, 0x6B, 0x6D, 0x6F, 0x78) else None
        out.append((msg_id, tag, code))
    return out


def test_raw_requests_nesting_nul_long_values_and_garbage(listener: Listener) -> None:
    with listener.raw() as sock:
        sock.sendall(search_pdu(1, nested(MAX_FILTER_DEPTH + 1)))
        assert _responses(sock, 1) == [(1, 0x65, ResultCode.UNWILLING_TO_PERFORM)]
        sock.sendall(search_pdu(2, nested(MAX_FILTER_DEPTH)))  # the connection goes on
        assert _responses(sock, 1) == [(2, 0x65, ResultCode.SUCCESS)]
        sock.sendall(search_pdu(3, eq("mail", DUPRE_MAIL.encode() + b"\x00")) + search_pdu(4, eq("cn", b"\xff\xfe"))
                     + search_pdu(5, eq("cn", b"a" * 200_000)) + search_pdu(6, eq("mail", DUPRE_MAIL.encode())))
        got = _responses(sock, 5)  # answered as they finish (LDAP operations are asynchronous)
        assert sorted(got) == [(3, 0x65, 0), (4, 0x65, 0), (5, 0x65, 0), (6, 0x64, None), (6, 0x65, 0)]
        assert got.index((6, 0x64, None)) < got.index((6, 0x65, 0))  # the entry, then done
        sock.sendall(search_pdu(7, ber(0xA0, eq("mail", DUPRE_MAIL.encode()) + ber(0xAB, b""))))
        assert _responses(sock, 1) == [(0, 0x78, ResultCode.PROTOCOL_ERROR)]  # notice of disconnection
        assert sock.recv(100) == b""
    with listener.raw() as sock:
        sock.sendall(search_pdu(1, eq("cn", b"a" * (srv.MAX_PDU + 10))))
        assert _responses(sock, 1) == [(0, 0x78, ResultCode.PROTOCOL_ERROR)]
    with listener.raw() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert _responses(sock, 1) == [(0, 0x78, ResultCode.PROTOCOL_ERROR)]


def test_plaintext_is_not_spoken(listener: Listener) -> None:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=TIMEOUT) as sock:
        sock.sendall(search_pdu(1, eq("mail", DUPRE_MAIL.encode())))
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        assert DUPRE_MAIL.encode() not in data and not data.startswith(b"\x30")


def test_no_client_certificate_is_requested(listener: Listener) -> None:
    for version in ("-tls1_2", "-tls1_3"):
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{listener.port}", "-CAfile",
                            str(listener.ca), "-verify_return_error", "-state", version], check=False, input="",
                           capture_output=True, text=True, timeout=30)
        assert "Verify return code: 0 (ok)" in r.stdout, r.stdout + r.stderr
        assert "read server certificate request" not in (r.stdout + r.stderr).lower(), r.stderr


def test_one_log_line_per_search_without_values(listener: Listener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="directory.ldap_server")
    conn = listener.ldap3()
    try:
        conn.search(f"mail={DUPRE_MAIL},ou=mailboxes,{BASE}", "(&(cn=élodie*)(caduceeOwner=810091234566))",
                    search_scope=ldap3.BASE, attributes=["1.1"])
    finally:
        conn.unbind()
    deadline = time.monotonic() + TIMEOUT
    while not [r for r in caplog.records if "event=ldap_search" in r.getMessage()] and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "event=ldap_search" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert f"base=mail=*,ou=mailboxes,{BASE}" in line and "scope=base" in line
    assert "filter=caduceeOwner,cn" in line and "result=0 entries=1" in line
    assert "elodie" not in line.lower() and "810091234566" not in line


def test_the_documented_schema_is_the_schema() -> None:
    """docs/directory-ldap.md carries tables generated from directory.ldap_schema: they must not drift."""
    from directory import ldap_schema as ls

    doc = (Path(__file__).resolve().parents[2] / "docs" / "directory-ldap.md").read_text(encoding="utf-8")
    for a in ls.ATTRIBUTE_TYPES:
        matching = a.equality + (" / " + a.substr if a.substr else "")
        row = f"| `{a.name}` | `{a.oid}` | {matching} | {'single' if a.single_value else 'multi'} | {a.description} |"
        assert row in doc, row
    for c in ls.OBJECT_CLASSES:
        row = f"| `{c.name}` | `{c.oid}` | {', '.join(c.must) or '—'} | {', '.join(c.may)} |"
        assert row in doc, row


# -- per-search work: the encoder, batches sized to the size limit, the entry cache ------------------------


@pytest.mark.parametrize("requested", [(), ("*",), ("1.1",), ("cn", "mail"), ("+",), ("userCertificate;binary",),
                                       ("cn", "1.1", "CN", "sn;lang-fr")])
def test_the_entry_encoder_writes_what_ldaptor_writes(directory: LdapDirectory, published: list[srv.IndexedEntry],
                                                       requested: tuple[str, ...]) -> None:
    selection = srv.AttributeSelection(requested, False)
    typed = srv.AttributeSelection(requested, True)
    entries = [*published, directory.root_dse()]
    for msg_id in (1, 127, 128, 255, 256, 2**31 - 1):
        for e in entries:
            assert selection.encode(msg_id, e) == srv.encode_entry_ldaptor(msg_id, e, requested, False), e.dn
            assert typed.encode(msg_id, e) == srv.encode_entry_ldaptor(msg_id, e, requested, True), e.dn


def test_the_search_result_done_encoder_writes_what_ldaptor_writes() -> None:
    from ldaptor.protocols import pureldap

    for msg_id in (1, 127, 128, 2**31 - 1):
        for code in ResultCode:
            for matched, text in (("", ""), (f"ou=mailboxes,{BASE}", "no such entry"), ("", "é" * 200)):
                expected = pureldap.LDAPMessage(pureldap.LDAPSearchResultDone(
                    resultCode=code, matchedDN=matched, errorMessage=text), id=msg_id).toWire()
                assert srv.encode_search_done(msg_id, code, matched, text) == expected


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[list[int]]:
    """Record the ids each call of the ldap_view builder `name` is given."""
    calls: list[list[int]] = []
    real = getattr(lv, name)

    def counted(conn: sa.Connection, ids: Any, base: str) -> list[lv.LdapEntry]:
        calls.append(list(ids))
        return real(conn, ids, base)  # type: ignore[no-any-return]

    monkeypatch.setattr(lv, name, counted)
    return calls


def test_a_size_limited_search_builds_no_more_entries_than_it_can_send(seeded: Seeded,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0, cache_ttl=0)
    assert d.cache is None
    calls = _counting(monkeypatch, "people")
    outcome, dns = run(d, "(objectClass=inetOrgPerson)", f"ou=people,{BASE}", Scope.ONE, size=2)
    assert (outcome.code, len(dns)) == (ResultCode.SIZE_LIMIT_EXCEEDED, 2)
    assert [len(c) for c in calls][:1] == [3]  # two to send, one to tell sizeLimitExceeded
    everything = run(d, "(objectClass=inetOrgPerson)", f"ou=people,{BASE}", Scope.ONE)[1]
    assert dns == everything[:2]


def test_the_entry_cache_serves_repeated_searches_and_follows_every_change(seeded: Seeded,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    d = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0)
    assert d.cache is not None and d.watch.available
    calls = _counting(monkeypatch, "mailbox_entries")
    reference = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0, cache_ttl=0)
    for text in ("(cn=secrétariat*)", "(mail=cardio.cab@caducee.test)", "(caduceeMailboxType=CAB)"):
        first, again = run(d, text), run(d, text)
        assert first == again == run(reference, text)
    built = len(calls)
    for text in ("(cn=secrétariat*)", "(mail=cardio.cab@caducee.test)", "(caduceeMailboxType=CAB)"):
        run(d, text)
    assert len(calls) == built  # nothing built again

    def description() -> list[Any]:
        found: list[srv.IndexedEntry] = []
        d.search(SearchRequest(BASE.encode(), Scope.SUBTREE, 0, 0, False, flt("(mail=cardio.cab@caducee.test)"),
                               ()), found.append)
        return [v for e in found for v in e.values.get("description", [])]

    before = description()
    assert before == ["Secrétariat de  Cardiologie – Œdème"]
    try:
        with seeded.engine.begin() as conn:  # another connection commits: the next search sees it
            conn.execute(sa.update(mailboxes).where(mailboxes.c.address == "cardio.cab@caducee.test")
                         .values(description="Accueil"))
        assert description() == ["Accueil"]
        assert run(d, "(cn=secrétariat*)")[1] == run(reference, "(cn=secrétariat*)")[1]
        with seeded.engine.begin() as conn:  # on the liste rouge: gone at once
            conn.execute(sa.update(mailboxes).where(mailboxes.c.address == "cardio.cab@caducee.test")
                         .values(liste_rouge=True))
        assert run(d, "(mail=cardio.cab@caducee.test)")[1] == []
        assert run(d, "(caduceeMailboxType=CAB)") == run(reference, "(caduceeMailboxType=CAB)")
    finally:
        with seeded.engine.begin() as conn:
            conn.execute(sa.update(mailboxes).where(mailboxes.c.address == "cardio.cab@caducee.test")
                         .values(description=before[0], liste_rouge=False))
    assert description() == before


def test_the_entry_cache_is_emptied_after_its_ttl_even_without_a_change_signal(
        seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    d = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0, cache_ttl=30)
    assert d.cache is not None
    monkeypatch.setattr(d.watch, "version", lambda: 0)  # as if no change could be seen
    run(d, "(mail=nobody@caducee.test)")  # the word indexes are built (which empties the cache)
    calls = _counting(monkeypatch, "mailbox_entries")
    run(d, f"(mail={LEGALL_MAIL})")
    run(d, f"(mail={LEGALL_MAIL})")
    assert len(calls) == 1
    d.cache.started -= 31  # older than its TTL
    run(d, f"(mail={LEGALL_MAIL})")
    assert len(calls) == 2


def test_a_search_that_started_before_a_change_does_not_fill_the_next_generation(seeded: Seeded) -> None:
    cache = srv.EntryCache(ttl=60)
    old = cache.sync(1)
    assert cache.sync(1) is old
    new = cache.sync(2)  # the database changed
    assert new is not old
    old.put_entries("mailboxes", {1: "stale"})
    old.put_candidates(("mailboxes", flt("(mail=x@y)")), [1], True)
    assert new.entries == {} and new.candidates == {}
    small = srv.CacheView(max_entries=2, max_filters=1)
    small.put_entries("people", {1: "a", 2: "b", 3: "c"})
    assert list(small.entries) == [("people", 2), ("people", 3)]
    small.put_candidates(("people", flt("(cn=a*)")), list(range(5000)), True)
    small.put_candidates(("people", flt("(cn=b*)")), [1], True)
    assert list(small.candidates.values()) == [([1], True)]
    small.put_candidates(("people", flt("(cn=a*)")), list(range(5000)), True)
    ids, complete = small.candidates[("people", flt("(cn=a*)"))]
    assert len(ids) == srv.EntryCache.MAX_IDS and not complete  # a prefix, read on in SQL when needed


def test_no_entry_cache_without_a_change_signal() -> None:
    memory = make_engine("sqlite://")
    try:
        assert not srv.ChangeWatch(memory).available
        assert LdapDirectory(memory, BASE).cache is None
    finally:
        memory.dispose()


def test_candidates_kept_as_a_prefix_are_read_on_in_sql(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    d = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0, batch=1)
    reference = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0, cache_ttl=0)
    monkeypatch.setattr(srv.EntryCache, "MAX_IDS", 1)
    text, people = "(|(uid=8*)(uid=0*))", f"ou=people,{BASE}"
    full = run(reference, text, people, Scope.ONE)[1]
    assert len(full) > 3
    run(d, "(uid=nobody)", people, Scope.ONE)  # the word indexes are built (which empties the cache)
    assert run(d, text, people, Scope.ONE, size=1)[0].code is ResultCode.SIZE_LIMIT_EXCEEDED
    assert d.cache is not None
    (ids, complete), = (v for k, v in d.cache.view.candidates.items() if k[1] == flt(text))
    assert len(ids) == 1 and not complete
    assert run(d, text, people, Scope.ONE)[1] == full
    assert run(d, text, people, Scope.ONE)[1] == full


def test_searches_and_compares_run_a_few_at_a_time(seeded: Seeded) -> None:
    d = LdapDirectory(seeded.engine, BASE)
    size = seeded.engine.pool.size()  # type: ignore[attr-defined]
    assert 1 <= d.workers <= min(size, 4)
    assert LdapDirectory(seeded.engine, BASE, workers=2).limiter().limit == 2


def test_the_fast_dns_of_the_view_are_the_escaped_ones() -> None:
    import itertools

    from directory import ldap_schema as ls

    chars = ["a", " ", ",", "+", '"', "\\", "<", ">", ";", "=", "#", "\x00", "é", "@"]
    values = ["", *("".join(p) for n in (1, 2, 3) for p in itertools.product(chars, repeat=n)),
              "praticien.1@bench.mssante.fr", " lead", "trail ", "#x", "a#b"]
    for v in values:
        assert lv._mailbox_dn(v, BASE) == ls.mailbox_dn(v, BASE), repr(v)
        assert lv._person_dn(v, BASE) == ls.person_dn(v, BASE), repr(v)


def test_word_indexes_are_rebuilt_only_when_the_database_changed(seeded: Seeded) -> None:
    d = LdapDirectory(seeded.engine, BASE, size_limit=0, time_limit=0, word_index_ttl=3600)
    run(d, "(cn=yann*)")
    built = d.planner.orphans
    assert built is not None
    built.built -= 4000  # due
    run(d, "(cn=yann*)")
    assert d.planner.orphans is built and time.monotonic() - built.built < 60  # the same, younger
    with seeded.engine.begin() as conn:
        conn.execute(sa.update(mailboxes).where(mailboxes.c.address == LEGALL_MAIL).values(service="x"))
    try:
        built.built -= 4000
        run(d, "(cn=yann*)")
        assert d.planner.orphans is not built
    finally:
        with seeded.engine.begin() as conn:
            conn.execute(sa.update(mailboxes).where(mailboxes.c.address == LEGALL_MAIL).values(service=None))
