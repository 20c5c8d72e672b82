"""`caducee directory publish` against a real OpenLDAP slapd (directory/testing_slapd.py).

The node is a demo state folder (three practitioners with mailboxes and certificates, a laboratory with
an ORG and an APP mailbox) plus the national sample file of tests/fixtures/rpps; slapd's suffix is the
node's base DN and its certificate comes from the node's dev PKI.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from caducee import config as config_mod
from caducee.cli import main
from crypto.pki import CertUsage, DevPKI
from directory.importers import import_file
from directory.ldap_client import LdapError, ldap3, parse_url
from directory.ldap_sync import (
    Publisher,
    PublishError,
    Target,
    attributes_digest,
    dn_key,
    normalise_attributes,
    normalise_dn,
)
from directory.ldap_view import iter_published
from directory.model import CertificateUsage
from directory.schema import ldap_published, ldap_targets, organisations, practitioners
from directory.store import DirectoryStore
from mailserver.db import make_engine
from directory.testing_slapd import Slapd, SlapdTls, ldif_entry
from tests.directory.test_importers import ACTIVITY_52, DUPRE, HOSPITAL, LEFEVRE

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def node(node_state: Path) -> Path:
    """The demo node with the national sample imported (practitioners and organisations)."""
    cfg = config_mod.load(node_state)
    engine = make_engine(cfg.database_url)
    try:
        import_file(engine, ACTIVITY_52, local_domains=cfg.server.domains)
    finally:
        engine.dispose()
    return node_state


@pytest.fixture
def engine(node: Path) -> Any:
    engine = make_engine(config_mod.load(node).database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def publish(node: Path, slapd: Slapd, capsys: pytest.CaptureFixture[str]) -> Run:
    """`caducee directory publish` run in-process against the test's slapd: (exit status, stdout, stderr)."""

    def run(*extra: str, url: str | None = None, password_file: Path | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(["directory", "publish", url or slapd.ldaps_url, "--bind-dn", slapd.root_dn,
                       "--password-file", str(password_file or slapd.password_file), "--state", str(node), *extra])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def expected_dns(engine: Any, base: str) -> set[str]:
    with engine.connect() as conn:
        return {entry.dn.lower() for entry in iter_published(conn, base)}


def server_entries(server: Slapd) -> dict[str, dict[str, list[bytes]]]:
    conn = server.connection()
    try:
        found = conn.extend.standard.paged_search(server.base, "(objectClass=*)", attributes=["*"], paged_size=200,
                                                  generator=False)
        return {e["dn"].lower(): dict(e["raw_attributes"]) for e in found if e["type"] == "searchResEntry"}
    finally:
        conn.unbind()


def summary_line(out: str) -> dict[str, int]:
    found = re.search(r"(\d[\d,]*) entr(?:y|ies): (\d+) added, (\d+) modified, (\d+) deleted, (\d+) unchanged, "
                      r"(\d+) failed", out)
    assert found, out
    values = [int(v.replace(",", "")) for v in found.groups()]
    return dict(zip(("entries", "added", "modified", "deleted", "unchanged", "failed"), values))


def demo_identity(node: Path, address: str) -> dict[str, Any]:
    index = json.loads((node / "demo" / "demo.json").read_text(encoding="utf-8"))
    return next(i for i in index["identities"] if i["address"] == address)


def der_of(node: Path, relative: str) -> bytes:
    path = Path(relative)
    pem = (path if path.is_absolute() else node / path).read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


CAMILLE = "camille.martin@caducee.localhost"
LOUIS = "louis.bernard@caducee.localhost"
SOPHIE = "sophie.petit@caducee.localhost"


# -------------------- publication against slapd


def test_first_publish_creates_the_base_the_ous_and_every_entry(publish: Run, node: Path, slapd: Slapd,
                                                                engine: Any) -> None:
    status, out, err = publish()
    assert status == 0, err
    counts = summary_line(out)
    expected = expected_dns(engine, slapd.base)
    assert counts["added"] == counts["entries"] == len(expected) > 20
    assert counts["failed"] == counts["modified"] == counts["deleted"] == 0

    entries = server_entries(slapd)
    assert set(entries) == expected
    for ou in ("people", "organisations", "mailboxes"):
        assert f"ou={ou},{slapd.base}" in entries
    dupre = entries[f"uid={DUPRE},ou=people,{slapd.base}"]
    assert dupre["sn"] == ["DUPRÉ".encode()] and dupre["caduceeRpps"] == [DUPRE[1:].encode()]
    assert f"uid={HOSPITAL},ou=organisations,{slapd.base}" in entries

    # The demo mailbox's encryption certificate, as DER, read with ldap3 and with the ldapsearch CLI.
    enc_der = der_of(node, demo_identity(node, CAMILLE)["enc_cert"])
    box = entries[f"mail={CAMILLE},ou=mailboxes,{slapd.base}"]
    assert box["userCertificate;binary"] == [enc_der]
    smime = pkcs7.load_der_pkcs7_certificates(box["userSMIMECertificate"][0])
    assert [c.public_bytes(Encoding.DER) for c in smime] == [enc_der]
    done = slapd.ldapsearch("-b", slapd.base, f"(mail={CAMILLE})", "userCertificate;binary")
    assert done.returncode == 0, done.stderr
    values = re.findall(r"^userCertificate;binary:: (\S+)$", done.stdout, re.MULTILINE)
    assert [base64.b64decode(v) for v in values] == [enc_der]
    # Only encryption certificates are published: never the authentication or signature ones.
    auth_der = der_of(node, demo_identity(node, CAMILLE)["cert"])
    assert all(auth_der not in e.get("userCertificate;binary", []) for e in entries.values())


def test_slapadd_of_the_published_ldif_gives_what_publish_gives(node: Path, engine: Any, tmp_path: Path,
                                                                ldap_tools: None) -> None:
    """The offline load of `caducee bench ldap`: iter_published written with ldif_entry (base64 for the
    certificates and the accented names), `Slapd.load` (slapadd) before the start: every entry, every value."""
    base = config_mod.load(node).ldap_base
    with engine.connect() as conn:
        published = {e.dn.lower(): e for e in iter_published(conn, base)}
        ldif = tmp_path / "published.ldif"
        ldif.write_text("".join(ldif_entry(e.dn, e.attributes) for e in iter_published(conn, base)),
                        encoding="utf-8")
    server = Slapd.create(tmp_path / "slapd", base=base)
    server.load(ldif)
    with server:
        entries = server_entries(server)
    assert set(entries) == set(published)
    for dn, entry in published.items():
        got = {name.lower(): sorted(values) for name, values in entries[dn].items()}
        want = {name.lower(): sorted(v if isinstance(v, bytes) else v.encode() for v in values)
                for name, values in entry.attributes.items()}
        assert got == want, dn
    camille = entries[f"mail={CAMILLE},ou=mailboxes,{base}"]
    assert camille["userCertificate;binary"] == [der_of(node, demo_identity(node, CAMILLE)["enc_cert"])]


def test_a_second_publish_with_no_change_sends_nothing(publish: Run, slapd: Slapd) -> None:
    assert publish()[0] == 0
    offset = slapd.log_size()
    status, out, _ = publish()
    assert status == 0
    counts = summary_line(out)
    assert counts["unchanged"] == counts["entries"] and counts["added"] == counts["modified"] == 0
    assert "0 updates and 0 searches sent" in out
    slapd.wait_for_log(r"op=\d+ UNBIND", offset=offset)
    ops = slapd.operations(offset)
    assert ops["BIND"] == 1
    assert ops["ADD"] == ops["MOD"] == ops["DEL"] == ops["SRCH"] == 0


def test_changes_publish_only_the_difference(publish: Run, node: Path, slapd: Slapd, engine: Any) -> None:
    """A practitioner renamed, a mailbox deactivated, one put on the liste rouge, a certificate added:
    only those entries are sent (and the holders of the two mailboxes, who hold no other published
    mailbox and are not in the national directory: ldap_view stops publishing them)."""
    assert publish()[0] == 0
    before = expected_dns(engine, slapd.base)
    store = DirectoryStore(engine)
    with engine.begin() as conn:
        conn.execute(sa.update(practitioners).where(practitioners.c.national_id == LEFEVRE)
                     .values(last_name="LEFEBVRE"))
    store.update_mailbox(LOUIS, active=False)
    store.update_mailbox(SOPHIE, liste_rouge=True)
    pki = DevPKI.create_or_load(node / "pki")
    issued = pki.issue_person(DUPRE, "Élodie", "Dupré", "elodie.dupre@ch-exemple.test", CertUsage.ENC,
                              node / "issued", "dupre.enc")
    dupre_der = issued.certificate.public_bytes(Encoding.DER)
    principal = store.principal_by_national_id(DUPRE)
    assert principal is not None
    store.add_certificate(principal, dupre_der, CertificateUsage.ENC)

    offset = slapd.log_size()
    status, out, err = publish()
    assert status == 0, err
    counts = summary_line(out)
    base = slapd.base
    after = expected_dns(engine, base)
    gone = before - after
    assert {f"mail={LOUIS},ou=mailboxes,{base}", f"mail={SOPHIE},ou=mailboxes,{base}"} <= gone
    assert gone <= {f"mail={LOUIS},ou=mailboxes,{base}", f"mail={SOPHIE},ou=mailboxes,{base}",
                    f"uid=8{demo_rpps(node, LOUIS)},ou=people,{base}", f"uid=8{demo_rpps(node, SOPHIE)},ou=people,{base}"}
    slapd.wait_for_log(r"op=\d+ UNBIND", offset=offset)
    log = slapd.log_text(offset)
    modified = set(re.findall(r'MOD dn="([^"]+)"', log))
    deleted = {dn.lower() for dn in re.findall(r'DEL dn="([^"]+)"', log)}
    assert deleted == gone
    # Lefèvre (name), Dupré (certificate); Louis and Sophie only if still published (their seeAlso changed)
    assert {f"uid={LEFEVRE},ou=people,{base}", f"uid={DUPRE},ou=people,{base}"} <= modified
    assert modified <= {f"uid={LEFEVRE},ou=people,{base}", f"uid={DUPRE},ou=people,{base}",
                        *({f"uid=8{demo_rpps(node, a)},ou=people,{base}" for a in (LOUIS, SOPHIE)} & after)}
    assert (counts["added"], counts["modified"], counts["deleted"], counts["failed"]) == (
        0, len(modified), len(deleted), 0)
    assert slapd.operations(offset)["ADD"] == 0
    # Only the attributes that changed are replaced (slapd logs them on the MOD attr= line).
    dns = dict(re.findall(r'conn=(\d+ op=\d+) MOD dn="([^"]+)"', log))
    replaced = {dns[op]: set(names.split()) for op, names in re.findall(r"conn=(\d+ op=\d+) MOD attr=(.*)$", log,
                                                                         re.MULTILINE)}
    certificate = {"userCertificate;binary", "userSMIMECertificate"}
    assert replaced[f"uid={LEFEVRE},ou=people,{base}"] == {"cn", "sn"}
    assert replaced[f"uid={DUPRE},ou=people,{base}"] == certificate
    for address in (LOUIS, SOPHIE):
        # seeAlso lost the mailbox; a certificate bound to that mailbox leaves the person too (ldap_view)
        names = replaced.get(f"uid=8{demo_rpps(node, address)},ou=people,{base}")
        assert names is None or ("seeAlso" in names and names <= {"seeAlso"} | certificate)

    entries = server_entries(slapd)
    assert f"mail={SOPHIE},ou=mailboxes,{base}".lower() not in entries
    assert f"mail={LOUIS},ou=mailboxes,{base}".lower() not in entries
    assert entries[f"uid={LEFEVRE},ou=people,{base}"]["sn"] == [b"LEFEBVRE"]
    assert entries[f"uid={DUPRE},ou=people,{base}"]["userCertificate;binary"] == [dupre_der]
    assert set(entries) == after
    # Anonymous readers of the directory no longer find the liste rouge mailbox.
    done = slapd.ldapsearch("-b", base, f"(mail={SOPHIE})", "dn")
    assert done.returncode == 0 and "dn:" not in done.stdout
    # And the next run has nothing to do.
    assert summary_line(publish()[1])["unchanged"] == counts["entries"]


def demo_rpps(node: Path, address: str) -> str:
    return str(demo_identity(node, address)["national_id"])[1:]


def test_a_refused_entry_is_reported_and_the_others_go_in(publish: Run, slapd: Slapd, engine: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """telephoneNumber has the PrintableString-like syntax of RFC 4517 §3.3.31: '#' is refused by slapd.
    The view cleans such values (test_ldap_view); here the cleaning is bypassed to have slapd refuse one."""
    import directory.ldap_view

    monkeypatch.setattr(directory.ldap_view, "_phone", lambda value: value)
    with engine.begin() as conn:
        conn.execute(sa.update(organisations).where(organisations.c.structure_id == HOSPITAL)
                     .values(phone="03 81 00 00 00 #2"))
    status, out, err = publish()
    assert status == 1
    counts = summary_line(out)
    assert counts["failed"] == 1 and counts["added"] == counts["entries"] - 1
    hospital_dn = f"uid={HOSPITAL},ou=organisations,{slapd.base}"
    assert f"refused: add {hospital_dn}: invalidAttributeSyntax (21)" in err
    assert "telephoneNumber" in err
    assert f"add {hospital_dn}: invalidAttributeSyntax (21)" in out  # in the summary too
    entries = server_entries(slapd)
    assert hospital_dn.lower() not in entries
    assert set(entries) == expected_dns(engine, slapd.base) - {hospital_dn.lower()}

    # Fixed at the source, the entry goes in at the next run; nothing else is sent.
    with engine.begin() as conn:
        conn.execute(sa.update(organisations).where(organisations.c.structure_id == HOSPITAL)
                     .values(phone="03 81 00 00 00"))
    status, out, _ = publish()
    assert status == 0
    counts = summary_line(out)
    assert (counts["added"], counts["modified"], counts["failed"]) == (1, 0, 0)
    assert hospital_dn.lower() in server_entries(slapd)


def test_wrong_password_is_a_clear_error(publish: Run, slapd: Slapd, tmp_path: Path, engine: Any) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    status, _out, err = publish(password_file=wrong)
    assert status == 2
    assert f"bind as '{slapd.root_dn}' refused: invalid credentials (wrong DN or password)" in err
    assert "Traceback" not in err
    assert server_entries(slapd) == {}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ldap_published)).scalar() == 0


def test_dry_run_changes_nothing(publish: Run, slapd: Slapd, engine: Any) -> None:
    offset = slapd.log_size()
    status, out, _ = publish("--dry-run")
    assert status == 0
    assert summary_line(out)["added"] > 20 and "would be added" in out and "dry run: nothing was changed" in out
    slapd.wait_for_log(r"op=\d+ UNBIND", offset=offset)
    ops = slapd.operations(offset)
    assert ops["ADD"] == ops["MOD"] == ops["DEL"] == 0
    assert server_entries(slapd) == {}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ldap_targets)).scalar() == 0

    assert publish()[0] == 0
    DirectoryStore(engine).update_mailbox(SOPHIE, liste_rouge=True)
    before = server_entries(slapd)
    status, out, _ = publish("--dry-run")
    assert status == 0
    planned = summary_line(out)
    assert planned["deleted"] >= 1 and planned["added"] == 0
    assert f"mail={SOPHIE},ou=mailboxes,{slapd.base}" in out
    assert server_entries(slapd) == before
    assert summary_line(publish()[1]) == planned  # the real run still has the work to do, the same


def test_full_repairs_what_was_changed_on_the_server(publish: Run, slapd: Slapd, engine: Any) -> None:
    assert publish()[0] == 0
    base = slapd.base
    conn = slapd.connection()
    try:
        assert conn.delete(f"mail={CAMILLE},ou=mailboxes,{base}")
        assert conn.modify(f"uid={DUPRE},ou=people,{base}", {"sn": [(ldap3.MODIFY_REPLACE, ["HACKED"])],
                                                             "description": [(ldap3.MODIFY_ADD, ["added by hand"])]})
        assert conn.add(f"uid=899999999999,ou=people,{base}",
                        ["top", "person", "organizationalPerson", "inetOrgPerson", "caduceePractitioner"],
                        {"uid": "899999999999", "cn": "Stray", "sn": "Stray", "caduceeNationalId": "899999999999"})
        assert conn.add(f"cn=replicator,{base}", ["top", "person"], {"cn": "replicator", "sn": "replicator"})
    finally:
        conn.unbind()
    # What was published last has not changed: an incremental run does not see the drift.
    assert summary_line(publish()[1])["unchanged"] == len(expected_dns(engine, base))

    status, out, err = publish("--full")
    assert status == 0, err
    counts = summary_line(out)
    assert (counts["added"], counts["modified"], counts["deleted"], counts["failed"]) == (1, 1, 1, 0)
    entries = server_entries(slapd)
    assert f"uid={DUPRE},ou=people,{base}" in entries and "description" not in entries[f"uid={DUPRE},ou=people,{base}"]
    assert entries[f"uid={DUPRE},ou=people,{base}"]["sn"] == ["DUPRÉ".encode()]
    assert f"cn=replicator,{base}" in entries  # not ours: left alone
    assert set(entries) - {f"cn=replicator,{base}"} == expected_dns(engine, base)
    # The record was rebuilt: the next incremental run sends nothing.
    counts = summary_line(publish()[1])
    assert counts["unchanged"] == counts["entries"]


def test_starttls_and_the_servers_name_are_verified(publish: Run, slapd: Slapd, slapd_factory: Any,
                                                    node: Path) -> None:
    status, out, err = publish("--starttls", url=slapd.url)
    assert status == 0, err
    assert "with StartTLS" in out
    # A certificate that does not name 127.0.0.1: refused before the password is sent.
    pki = DevPKI.create_or_load(node / "pki")
    other = Slapd.create(node.parent / "unnamed", base=slapd.base,
                         tls=SlapdTls.issue(pki, node.parent / "unnamed-tls", ips=(), hostnames=("ldap.other.test",)))
    with other:
        status, _, err = publish(url=other.ldaps_url, password_file=other.password_file)
        assert status == 2
        assert "CERTIFICATE_VERIFY_FAILED" in err and "127.0.0.1" in err
        assert other.operations()["BIND"] == 0


def test_writing_to_a_syncrepl_replica_is_refused_and_replicas_follow_the_provider(
        slapd_factory: Any, node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The deployment of docs/operations.md: publish to the provider, consumers copy it (syncrepl)."""
    from mailserver.testing import wait_for

    base = config_mod.load(node).ldap_base
    provider = slapd_factory(base, state=node, provider=True)
    consumer = slapd_factory(base, state=node, replica_of=provider)

    def run(server: Slapd) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(["directory", "publish", server.ldaps_url, "--bind-dn", server.root_dn, "--password-file",
                       str(server.password_file), "--state", str(node)])
        return (status, *capsys.readouterr())

    status, _, err = run(consumer)
    assert status == 2
    assert "referral (10)" in err and "read-only replica" in err and provider.url in err
    status, out, _ = run(provider)
    assert status == 0
    total = summary_line(out)["entries"]

    def replicated() -> bool:
        return len(server_entries(consumer)) == total

    wait_for(replicated, timeout=20)
    DirectoryStore(make_engine(config_mod.load(node).database_url)).update_mailbox(SOPHIE, liste_rouge=True)
    assert run(provider)[0] == 0
    wait_for(lambda: f"mail={SOPHIE},ou=mailboxes,{base}" not in server_entries(consumer), timeout=20)


def test_progress_on_a_terminal(node: Path, slapd: Slapd, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    status = main(["directory", "publish", slapd.ldaps_url, "--bind-dn", slapd.root_dn, "--password-file",
                   str(slapd.password_file), "--state", str(node)])
    assert status == 0
    assert re.search(r"\r  publishing \[[#.]+\] +\d+%  \d+ entries  [\d,]+ entries/s", terminal.getvalue())
    assert terminal.getvalue().endswith("\r\x1b[K")


def test_the_cli_takes_no_password_argument_and_reads_the_environment(node: Path, slapd: Slapd) -> None:
    """A real process: the password travels in the environment, never in argv (what `ps` shows)."""
    from mailserver.testing import caducee_command

    command = caducee_command("directory", "publish", slapd.ldaps_url, "--bind-dn", slapd.root_dn,
                              "--state", str(node))
    env = dict(os.environ, CADUCEE_LDAP_PASSWORD=slapd.root_password)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert summary_line(done.stdout)["failed"] == 0
    assert slapd.root_password not in " ".join(command)
    for attempt in (["--password", "s3cr3t-value"], ["--password=s3cr3t-value"]):
        refused = subprocess.run([*command, *attempt], capture_output=True, text=True, env=env, timeout=60,
                                 check=False)
        assert refused.returncode == 2
        assert "s3cr3t-value" not in refused.stderr + refused.stdout
        assert "--password is not accepted" in refused.stderr


# -------------------- pieces


def test_transport_rule() -> None:
    assert parse_url("ldaps://ldap.example.org").port == 636
    assert parse_url("ldap://ldap.example.org", starttls=True).tls
    for loopback in ("ldap://127.0.0.1:3890", "ldap://localhost", "ldap://[::1]:389"):
        assert not parse_url(loopback).tls
    for refused, starttls in (("ldap://ldap.example.org", False), ("ldap://10.0.0.1", False),
                              ("ldaps://ldap.example.org", True), ("http://ldap.example.org", False),
                              ("ldaps://ldap.example.org/dc=x", False), ("ldaps://", False)):
        with pytest.raises(LdapError):
            parse_url(refused, starttls=starttls)


def test_dn_normalisation() -> None:
    assert normalise_dn("UID=810001234565, OU=People ,DC=Caducee,dc=localhost") == (
        "uid=810001234565,ou=people,dc=caducee,dc=localhost", 4)
    assert normalise_dn(r"mail=a\2Cb@x.test,ou=m,dc=t")[0] == normalise_dn(r"mail=A\,B@x.test,ou=m,dc=t")[0]
    assert normalise_dn(r"cn=a\+b+uid=1,dc=t") == normalise_dn(r"uid=1+cn=a\+b,dc=t")
    assert normalise_dn(r"cn=trailing\ ,dc=t")[0] == r"cn=trailing\ ,dc=t"
    assert dn_key("ou=People,dc=T") == dn_key("ou=people,dc=t")
    # the fast path (no escape) and the general one agree
    assert normalise_dn("mail=Alice@X.test, ou=M,dc=t") == normalise_dn(r"mail=\41lice@X.test,ou=M,dc=t")
    assert normalise_dn("cn=a=b,dc=t") == normalise_dn(r"cn=a\=b,dc=t")
    assert normalise_dn("cn=#x,dc=t") == normalise_dn(r"cn=\#x,dc=t")
    with pytest.raises(ValueError):
        normalise_dn("not a dn")


def test_attribute_digest_ignores_order_case_and_binary_option() -> None:
    a = normalise_attributes({"cn": ["B", "A"], "userCertificate;binary": [b"\x30\x01"], "mail": []})
    b = normalise_attributes({"CN": ["A", "B", "A"], "usercertificate": [b"\x30\x01"]})
    assert attributes_digest(a) == attributes_digest(b)
    assert attributes_digest(a) != attributes_digest(normalise_attributes({"cn": ["A"]}))
    # no ambiguity between values and attribute layout
    assert attributes_digest(normalise_attributes({"a": ["bc"]})) != attributes_digest(
        normalise_attributes({"a": ["b", "c"]}))


def test_a_stopped_run_keeps_what_was_done(node: Path, slapd: Slapd, engine: Any) -> None:
    """The server goes away in the middle of a run: PublishError, and the next run sends only the rest."""
    from directory.ldap_client import connect

    cfg = config_mod.load(node)
    endpoint = parse_url(slapd.url)
    conn = connect(endpoint, ca_file=None, bind_dn=slapd.root_dn, password=slapd.root_password, check_names=False)
    calls = 0
    add = conn.add

    def failing_add(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 10:
            slapd.stop()
        return add(*args, **kwargs)

    conn.add = failing_add
    with pytest.raises(PublishError, match="connection to .* lost|unavailable|closed"):
        Publisher(engine, conn, Target(endpoint, cfg.ldap_base), batch=4).run()
    with engine.connect() as db:
        recorded = db.execute(sa.select(sa.func.count()).select_from(ldap_published)).scalar()
    assert 4 <= recorded < 10
    slapd.start()
    conn = connect(endpoint, ca_file=None, bind_dn=slapd.root_dn, password=slapd.root_password, check_names=False)
    try:
        summary = Publisher(engine, conn, Target(endpoint, cfg.ldap_base)).run()
    finally:
        conn.unbind()
    assert summary.failed == 0
    assert summary.unchanged >= recorded
    assert set(server_entries(slapd)) == expected_dns(engine, cfg.ldap_base)


def test_publish_from_postgresql(slapd: Slapd) -> None:
    """The same run on PostgreSQL (temporary tables, executemany updates, keyset pages of deletions)."""
    import secrets

    from caducee import database
    from directory.identifiers import PrincipalKind
    from directory.ldap_client import connect
    from directory.model import MailboxType
    from tests.directory.test_postgres_directory import ADMIN_URL

    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"caducee_publish_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL}: {type(exc).__name__}")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        database.upgrade(url)
        import_file(engine, ACTIVITY_52, local_domains=("caducee.localhost",))
        store = DirectoryStore(engine)
        holder = store.add_principal(PrincipalKind.PERSON, "810001234565", "Camille Martin")
        store.add_mailbox(CAMILLE, MailboxType.PER, holder)
        store.add_mailbox("cabinet.martin@caducee.localhost", MailboxType.CAB, holder)
        endpoint = parse_url(slapd.url)

        def run(**options: Any) -> Any:
            conn = connect(endpoint, ca_file=None, bind_dn=slapd.root_dn, password=slapd.root_password,
                           check_names=False)
            try:
                return Publisher(engine, conn, Target(endpoint, slapd.base), batch=3, **options).run()
            finally:
                conn.unbind()

        first = run()
        assert first.added == first.entries == len(expected_dns(engine, slapd.base)) and first.failed == 0
        assert run().unchanged == first.entries
        store.update_mailbox("cabinet.martin@caducee.localhost", liste_rouge=True)
        second = run()
        assert (second.added, second.modified, second.deleted) == (0, 1, 1)
        assert set(server_entries(slapd)) == expected_dns(engine, slapd.base)
        full = run(full=True)
        assert full.unchanged == full.entries == full.remote_entries
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()
