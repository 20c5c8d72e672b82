"""The OpenLDAP deployment files (deploy/openldap) against a real slapd, and the test harness itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from directory import ldap_schema
from directory.ldap_client import ldap3  # imported there, deprecation warnings filtered
from directory.testing_slapd import (
    DEPLOY_DIR,
    SCHEMA_DIR,
    SYSTEM_SCHEMAS,
    Slapd,
    slaptest_conf,
)

BASE = "dc=operateur,dc=test"


def test_deploy_files_are_what_ldap_schema_generates() -> None:
    """deploy/openldap never drifts from directory.ldap_schema (regenerate them with the two functions)."""
    assert (DEPLOY_DIR / "caducee.ldif").read_text(encoding="utf-8") == ldap_schema.schema_ldif()
    assert (DEPLOY_DIR / "caducee.schema").read_text(encoding="utf-8") == ldap_schema.schema_text()


def test_slaptest_accepts_the_schema_in_slapd_conf_form(tmp_path: Path, ldap_tools: None) -> None:
    includes = [SCHEMA_DIR / f"{name}.schema" for name in SYSTEM_SCHEMAS]
    output = slaptest_conf(tmp_path, [*includes, DEPLOY_DIR / "caducee.schema"])
    assert "config file testing succeeded" in output


def test_the_schema_needs_inetorgperson_first(tmp_path: Path, ldap_tools: None) -> None:
    """The order documented in caducee.ldif matters: without inetorgperson, `displayName` is unknown."""
    from directory.testing_slapd import SlapdError

    with pytest.raises(SlapdError, match="displayName"):
        slaptest_conf(tmp_path, [SCHEMA_DIR / "core.schema", SCHEMA_DIR / "cosine.schema",
                                 DEPLOY_DIR / "caducee.schema"])


def test_caducee_ldif_loads_into_cn_config(slapd_factory: Callable[..., Slapd]) -> None:
    """`slapadd -n0 -F DIR -l` with caducee.ldif after core, cosine and inetorgperson; slapd then serves
    the schema (subschema entry) and starts."""
    server = slapd_factory(BASE, tls=False)
    schema_entries = sorted(p.name for p in (server.config_dir / "cn=config" / "cn=schema").iterdir())
    assert schema_entries == ["cn={0}core.ldif", "cn={1}cosine.ldif", "cn={2}inetorgperson.ldif",
                              "cn={3}caducee.ldif"]
    conn = server.connection(bind=False)
    try:
        assert conn.search("cn=Subschema", "(objectClass=*)", ldap3.BASE,
                           attributes=["objectClasses", "attributeTypes"])
        attributes = conn.response[0]["raw_attributes"]
        classes = b"\n".join(attributes["objectClasses"]).decode()
        types = b"\n".join(attributes["attributeTypes"]).decode()
    finally:
        conn.unbind()
    for oc in ldap_schema.OBJECT_CLASSES:
        assert f"{oc.oid} NAME '{oc.name}'" in classes
    for at in ldap_schema.ATTRIBUTE_TYPES:
        assert f"{at.oid} NAME '{at.name}'" in types


def test_slapd_enforces_the_schema(slapd_factory: Callable[..., Slapd]) -> None:
    server = slapd_factory(BASE, tls=False)
    conn = server.connection()
    try:
        assert conn.add(BASE, ["top", "dcObject", "organization"], {"dc": "operateur", "o": "Opérateur"})
        assert conn.add(f"ou=mailboxes,{BASE}", ["top", "organizationalUnit"], {"ou": "mailboxes"})
        dn = f"mail=alice@operateur.test,ou=mailboxes,{BASE}"
        classes = ["top", "person", "organizationalPerson", "inetOrgPerson", "caduceeMailbox"]
        # caduceeMailbox MUST caduceeMailboxType $ caduceeOwner
        assert not conn.add(dn, classes, {"mail": "alice@operateur.test", "cn": "Alice", "sn": "Alice",
                                          "caduceeMailboxType": "PER"})
        assert conn.result["result"] == 65  # objectClassViolation
        assert conn.add(dn, classes, {"mail": "alice@operateur.test", "cn": "Alice", "sn": "Alice",
                                      "caduceeMailboxType": "PER", "caduceeOwner": "810001234567"})
        # SINGLE-VALUE
        assert not conn.modify(dn, {"caduceeMailboxType": [(ldap3.MODIFY_ADD, ["ORG"])]})
        assert conn.result["result"] in (19, 20)  # constraintViolation / attributeOrValueExists
        assert conn.search(BASE, "(caduceeOwner=810001234567)", attributes=["mail"])
        assert [e["dn"] for e in conn.response] == [dn]
    finally:
        conn.unbind()


def test_ldaps_with_a_dev_pki_certificate(slapd_factory: Callable[..., Slapd], tmp_path: Path) -> None:
    """ldapsearch over ldaps:// verifies slapd's certificate against the CA bundle; another CA fails."""
    from crypto.pki import DevPKI

    server = slapd_factory(BASE)
    done = server.ldapsearch("-s", "base", "-b", "", "namingContexts")
    assert done.returncode == 0, done.stderr
    assert f"namingContexts: {BASE}" in done.stdout

    other = DevPKI.create_or_load(tmp_path / "other-pki")
    import os
    import subprocess

    env = dict(os.environ, LDAPTLS_CACERT=str(other.ca_bundle_path), LDAPTLS_REQCERT="demand")
    refused = subprocess.run(["ldapsearch", "-x", "-H", server.ldaps_url, "-s", "base", "-b", ""],
                             check=False, capture_output=True, text=True, env=env, timeout=30)
    assert refused.returncode != 0
    assert "Can't contact LDAP server" in refused.stderr


def test_stats_log_counts_operations(slapd_factory: Callable[..., Slapd]) -> None:
    server = slapd_factory(BASE, tls=False)
    offset = server.log_size()
    conn = server.connection()
    try:
        conn.add(BASE, ["top", "dcObject", "organization"], {"dc": "operateur", "o": "Opérateur"})
        conn.search(BASE, "(objectClass=*)")
    finally:
        conn.unbind()
    server.wait_for_log(r"op=\d+ UNBIND", offset=offset)
    ops = server.operations(offset)
    assert (ops["BIND"], ops["ADD"], ops["SRCH"], ops["MOD"], ops["DEL"]) == (1, 1, 1, 0, 0)
