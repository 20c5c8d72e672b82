"""The state folder: `caducee init` creates it, idempotently (DESIGN.md §5).

    DIR/caducee.toml      configuration (commented sample on first run)
    DIR/pki/              development PKI modelled on IGC-Santé: root, persons CA, organisations CA, CRLs
    DIR/pki/server/       this node's certificate (serverAuth + clientAuth)
    DIR/caducee.db        SQLite database (embedded default), schema by Alembic migrations
    DIR/blobs/            message bodies
    DIR/demo/             with --demo: sample identities, their certificates and keys, demo.json
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from caducee import config as config_mod
from caducee import database
from crypto.pki import CertUsage, DevPKI
from directory.identifiers import PrincipalKind, luhn_complete
from directory.model import CertificateUsage, MailboxType
from directory.store import DirectoryStore
from mailserver.db import make_engine

log = logging.getLogger(__name__)

DEMO_P12_PASSWORD = "caducee"


@dataclass(frozen=True)
class DemoPerson:
    rpps: str
    given_name: str
    surname: str
    local_part: str

    @property
    def national_id(self) -> str:
        return "8" + self.rpps


# RPPS numbers pass the Luhn check (REFERENCE.md §3); the people are fictitious.
DEMO_PERSONS = (
    DemoPerson(luhn_complete("1000123456"), "Camille", "Martin", "camille.martin"),
    DemoPerson(luhn_complete("1000234567"), "Louis", "Bernard", "louis.bernard"),
    DemoPerson(luhn_complete("1000345678"), "Sophie", "Petit", "sophie.petit"),
)
DEMO_ORG_FINESS = luhn_complete("75000012")  # FINESS: 8 digits + Luhn key
DEMO_ORG_NAME = "Laboratoire Demo"


def _write_if_absent(path: Path, text: str) -> bool:
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def init_state(
    state_dir: Path,
    *,
    domain: str | None = None,
    demo: bool = False,
    say: Callable[[str], None] = print,
) -> config_mod.Config:
    """Create or complete the state folder; never overwrites what exists."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    cfg_path = config_mod.config_path(state_dir)
    if _write_if_absent(cfg_path, config_mod.sample(domain or "caducee.localhost")):
        say(f"wrote {cfg_path}")
    cfg = config_mod.load(state_dir)
    if domain and domain.lower() not in cfg.server.domains:
        say(f"note: {cfg_path} already exists with domains {', '.join(cfg.server.domains)}; --domain ignored")

    pki = DevPKI.create_or_load(state_dir / "pki", organisation=cfg.server.organisation)
    cert_path = cfg.path(cfg.tls.certificate)
    if not cert_path.exists():
        pki.issue_server(
            [cfg.server.hostname, "localhost", *cfg.server.domains],
            ["127.0.0.1", "::1"],
            cert_path.parent,
            "server",
            structure_id=cfg.server.structure_id,
            organisation=cfg.server.organisation,
        )
        say(f"issued the server certificate {cert_path}")

    database.upgrade(cfg.database_url)
    cfg.path(cfg.storage.blobs).mkdir(parents=True, exist_ok=True)
    if demo:
        _init_demo(cfg, pki, say)
    return cfg


def _der(pem_path: Path) -> bytes:
    """The first certificate of a PEM file, DER-encoded."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(Encoding.DER)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _init_demo(cfg: config_mod.Config, pki: DevPKI, say: Callable[[str], None]) -> None:
    demo_dir = cfg.state_dir / "demo"
    demo_dir.mkdir(exist_ok=True)
    domain = cfg.server.domains[0]
    engine = make_engine(cfg.database_url, writer=True)
    directory = DirectoryStore(engine)
    password = DEMO_P12_PASSWORD.encode()
    identities: list[dict[str, object]] = []
    # Each demo person is a practitioner of the national directory (profession TRE_G15, one savoir-faire,
    # an activity at the demo laboratory), so that searches by name, profession, specialty and city
    # (CLI, HTTP JSON, FHIR) find something. Codes as in PS_LibreAcces_* (REFERENCE.md §4).
    from directory.model import SkillKind

    practice = {
        "camille.martin": ("10", "Médecin", "DR", "Docteur",
                           ("S", "Spécialité ordinale", "SM53", "Spécialiste en Médecine Générale")),
        "louis.bernard": ("21", "Pharmacien", None, None,
                          ("C", "Compétence", "C01", "Soins palliatifs")),
        "sophie.petit": ("60", "Infirmier", None, None,
                         ("S", "Spécialité ordinale", "SI01",
                          "Exercice infirmier en pratique avancée pathologies chroniques stabilisées")),
    }
    demo_practitioners = []

    def issue(kind: str, base: str, fn: Callable[[], object]) -> tuple[Path, Path]:
        cert, key = demo_dir / f"{base}.pem", demo_dir / f"{base}.key"
        if not cert.exists():
            fn()
            say(f"issued {kind} certificate {cert}")
        return cert, key

    try:
        for person in DEMO_PERSONS:
            principal = directory.add_principal(
                PrincipalKind.PERSON, person.national_id, f"{person.given_name} {person.surname}"
            )
            address = f"{person.local_part}@{domain}"
            mailbox = directory.add_mailbox(address, MailboxType.PER, principal)
            code, label, title_code, title, (sf_type, sf_type_label, sf_code, sf_label) = practice[person.local_part]
            practitioner = directory.add_practitioner(
                principal, last_name=person.surname, first_names=person.given_name, profession_code=code,
                profession_label=label, exercise_civility_code=title_code, exercise_civility_label=title)
            directory.add_skill(practitioner, SkillKind.SAVOIR_FAIRE, sf_code, label=sf_label, type_code=sf_type,
                                type_label=sf_type_label)
            demo_practitioners.append(practitioner)
            paths = {}
            for usage, suffix in ((CertUsage.AUTH, "auth"), (CertUsage.SIGN, "sign"), (CertUsage.ENC, "enc")):
                base = f"{person.local_part}.{suffix}"
                paths[suffix] = issue(
                    suffix, base,
                    lambda usage=usage, base=base: pki.issue_person(
                        person.national_id, person.given_name, person.surname, address, usage,
                        demo_dir, base, password,
                    ),
                )
            # Published in the directory: the encryption certificate is what senders look up.
            for suffix, cert_usage in (("auth", CertificateUsage.AUTH), ("sign", CertificateUsage.SIGN),
                                       ("enc", CertificateUsage.ENC)):
                directory.add_certificate(principal, _der(paths[suffix][0]), cert_usage, mailbox)
            identities.append({
                "address": address, "mailbox_type": "PER", "national_id": person.national_id,
                "display_name": f"{person.given_name} {person.surname}",
                "cert": _rel(paths["auth"][0], cfg.state_dir), "key": _rel(paths["auth"][1], cfg.state_dir),
                "p12": _rel(demo_dir / f"{person.local_part}.auth.p12", cfg.state_dir),
                "sign_cert": _rel(paths["sign"][0], cfg.state_dir), "sign_key": _rel(paths["sign"][1], cfg.state_dir),
                "enc_cert": _rel(paths["enc"][0], cfg.state_dir), "enc_key": _rel(paths["enc"][1], cfg.state_dir),
            })

        structure_id = "1" + DEMO_ORG_FINESS
        org = directory.add_principal(PrincipalKind.ORGANISATION, structure_id, DEMO_ORG_NAME,
                                      organisation=DEMO_ORG_NAME)
        org_cert, org_key = issue(
            "organisation", "laboratoire",
            lambda: pki.issue_organisation(structure_id, DEMO_ORG_NAME, f"lis.{domain}", demo_dir,
                                           "laboratoire", password, email=f"resultats@{domain}"),
        )
        directory.add_certificate(org, _der(org_cert), CertificateUsage.ORG)
        site = directory.add_organisation(
            org, name=DEMO_ORG_NAME, finess=DEMO_ORG_FINESS, address="12 AVENUE DES GOBELINS\n75013 PARIS",
            postcode="75013", commune_code="75113", city="Paris", department_code="75", department_label="Paris")
        for practitioner in demo_practitioners:
            directory.add_activity(practitioner, site, mode_code="S", mode_label="Salarié")
        for local, mtype, description in (
            ("secretariat", MailboxType.ORG, "Secrétariat du laboratoire"),
            ("resultats", MailboxType.APP, "Serveur de résultats (logiciel)"),
        ):
            address = f"{local}@{domain}"
            directory.add_mailbox(address, mtype, org, description=description)
            identities.append({
                "address": address, "mailbox_type": mtype.value, "national_id": structure_id,
                "display_name": description,
                "cert": _rel(org_cert, cfg.state_dir), "key": _rel(org_key, cfg.state_dir),
                "p12": _rel(demo_dir / "laboratoire.p12", cfg.state_dir),
                "sign_cert": None, "sign_key": None, "enc_cert": None, "enc_key": None,
            })
    finally:
        engine.dispose()

    lst = cfg.listen
    index = {
        "ca_bundle": _rel(cfg.path(cfg.tls.trust_anchors), cfg.state_dir),
        "p12_password": DEMO_P12_PASSWORD,
        "domain": domain,
        "ports": {
            "relay": lst.relay.port if lst.relay else None,
            "submission": lst.submission.port if lst.submission else None,
            "submissions": lst.submissions.port if lst.submissions else None,
            "imap": lst.imap.port if lst.imap else None,
            "imaps": lst.imaps.port if lst.imaps else None,
            "ldaps": lst.ldaps.port if lst.ldaps else None,
            "admin": lst.admin.port if lst.admin else None,
            "metrics": None,
        },
        "identities": identities,
    }
    (demo_dir / "demo.json").write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    say(f"wrote {demo_dir / 'demo.json'}")
