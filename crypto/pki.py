"""A development PKI modelled on IGC-Santé.

The national health PKI (IGC-Santé) has a root and, below it, one CA for persons (health professionals'
CPS cards and e-CPS) and one CA for organisations (structures, software and servers). Person certificates
carry the practitioner's national id (``8`` + RPPS) in the subject ``serialNumber`` attribute; organisation
and server certificates carry the structure id (``1`` + FINESS, ``3`` + SIRET) in the subject ``OU``.
Authentication, signature and encryption use separate keys with separate key usages.

:class:`DevPKI` reproduces that shape with RSA keys and SHA-256 signatures (RFC 5280 profile, CRLs v2
with CRL number and authority key identifier). Everything lives under one directory::

    registry.json                  issued serials, revocations, CRL numbers (the PKI's own record)
    ca-bundle.pem                  root + both intermediate CAs
    ca/root.pem, ca/root.key       root CA (key PEM PKCS#8, mode 0600)
    ca/persons.pem, .key           intermediate CA for persons
    ca/organisations.pem, .key     intermediate CA for organisations and servers
    crl/root.crl.pem               CRL of the root (revokes intermediate CAs)
    crl/persons.crl.pem            CRL of the persons CA
    crl/organisations.crl.pem      CRL of the organisations CA

It is a development tool: CA keys are stored unencrypted. Creation and every state change hold an
exclusive ``flock`` on the directory, so several processes may call :meth:`DevPKI.create_or_load` on the
same directory at the same time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import ipaddress
import json
import logging
import os
import re
import tempfile
import threading
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

__all__ = [
    "CaRole",
    "CertUsage",
    "DevPKI",
    "IssuedCertificate",
]

REGISTRY_FORMAT: Final = 1
DEFAULT_CA_KEY_SIZE: Final = 3072
DEFAULT_LEAF_KEY_SIZE: Final = 2048
DEFAULT_ROOT_VALIDITY: Final = dt.timedelta(days=20 * 365 + 5)
DEFAULT_CA_VALIDITY: Final = dt.timedelta(days=10 * 365 + 2)
DEFAULT_LEAF_VALIDITY: Final = dt.timedelta(days=3 * 365 + 1)
DEFAULT_CRL_VALIDITY: Final = dt.timedelta(days=7)
# notBefore is back-dated so that peers whose clocks lag slightly accept a certificate issued just now.
CLOCK_SKEW_ALLOWANCE: Final = dt.timedelta(minutes=5)

_PUBLIC_MODE: Final = 0o644
_PRIVATE_MODE: Final = 0o600
_RSA_PUBLIC_EXPONENT: Final = 65537
_BASENAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# RFC 1123 host name made of LDH labels (A-labels for IDNs), at least one dot, or "localhost".
_HOST_LABEL_RE: Final = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertUsage(enum.Enum):
    """What a person certificate's key is for; IGC-Santé issues one key pair per usage."""

    AUTH = "auth"
    """TLS client authentication: keyUsage digitalSignature, extKeyUsage clientAuth."""
    SIGN = "sign"
    """S/MIME signature: keyUsage digitalSignature + nonRepudiation, extKeyUsage emailProtection."""
    ENC = "enc"
    """S/MIME encryption (RSA key transport): keyUsage keyEncipherment, extKeyUsage emailProtection."""


class CaRole(enum.Enum):
    """The three certification authorities of a :class:`DevPKI`."""

    ROOT = "root"
    PERSONS = "persons"
    ORGANISATIONS = "organisations"


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate issued by a :class:`DevPKI` and the files written for it.

    ``cert_path`` holds the certificate alone (PEM); ``chain_path`` the certificate followed by its issuing
    CA (what a TLS endpoint should send, RFC 8446 §4.4.2); ``key_path`` the unencrypted PKCS#8 PEM private
    key (mode 0600); ``p12_path`` a PKCS#12 file with key, certificate and chain when a password was given.
    """

    cert_path: Path
    key_path: Path
    p12_path: Path | None
    chain_path: Path
    serial: int
    subject_dn: str
    certificate: x509.Certificate

    @property
    def serial_hex(self) -> str:
        """The serial number as upper-case hexadecimal, as printed by ``openssl x509 -serial``."""
        return format(self.serial, "X")


@dataclass(frozen=True)
class _Authority:
    role: CaRole
    certificate: x509.Certificate
    cert_path: Path
    key_path: Path
    crl_path: Path

    @property
    def key_identifier(self) -> bytes:
        return self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


@dataclass(frozen=True)
class _Revocation:
    issuer: CaRole
    reason: x509.ReasonFlags
    revocation_date: dt.datetime


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _ascii_upper(text: str) -> str:
    """ "Caducée" → "CADUCEE": CA names in IGC-Santé style are upper-case ASCII."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return re.sub(r"\s+", " ", stripped.encode("ascii", "ignore").decode("ascii")).strip().upper()


def _is_host_name(name: str) -> bool:
    """True for an RFC 1123 host name in A-label form (``localhost`` or a dotted LDH name)."""
    if len(name) > 253 or name.endswith("."):
        return False
    labels = name.split(".")
    if len(labels) < 2 and name.lower() != "localhost":
        return False
    return all(_HOST_LABEL_RE.match(label) for label in labels)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``rename(2)``: readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _pem_certificate(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_private_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _load_certificate_file(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (a chain file works) or of a DER file."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)[0]
    return x509.load_der_x509_certificate(data)


class DevPKI:
    """An IGC-Santé-shaped development PKI stored in a directory.

    Obtain one with :meth:`create_or_load`; the constructor is internal. Two directories give two
    independent hierarchies (a "foreign" CA for tests is just another directory).
    """

    def __init__(
        self,
        pki_dir: Path,
        organisation: str,
        authorities: Mapping[CaRole, _Authority],
        *,
        leaf_key_size: int,
        crl_validity: dt.timedelta,
        private_keys: Mapping[CaRole, rsa.RSAPrivateKey] | None = None,
    ) -> None:
        self._dir = pki_dir
        self._organisation = organisation
        self._authorities = dict(authorities)
        # CA keys are loaded on first use: loading validates each RSA key, which costs ~0.1 s per key.
        self._private_keys: dict[CaRole, rsa.RSAPrivateKey] = dict(private_keys or {})
        self._leaf_key_size = leaf_key_size
        self._crl_validity = crl_validity
        self._thread_lock = threading.RLock()

    # -------------------- creation and loading

    @classmethod
    def create_or_load(
        cls,
        pki_dir: Path,
        *,
        organisation: str = "Caducée",
        ca_key_size: int = DEFAULT_CA_KEY_SIZE,
        leaf_key_size: int = DEFAULT_LEAF_KEY_SIZE,
        root_validity: dt.timedelta = DEFAULT_ROOT_VALIDITY,
        ca_validity: dt.timedelta = DEFAULT_CA_VALIDITY,
        crl_validity: dt.timedelta = DEFAULT_CRL_VALIDITY,
    ) -> DevPKI:
        """Create the PKI in ``pki_dir`` on first use, otherwise load it without changing anything.

        ``organisation`` (the ``O`` of the CA names and the default ``O`` of person certificates),
        ``ca_key_size``, ``root_validity`` and ``ca_validity`` only matter at creation; a loaded PKI keeps
        what it was created with (a different ``organisation`` is logged and ignored). ``leaf_key_size``
        and ``crl_validity`` apply to what this instance issues.
        """
        if ca_key_size < 3072:
            raise ValueError("CA keys must be at least 3072 bits")
        if leaf_key_size < 2048:
            raise ValueError("leaf keys must be at least 2048 bits")
        if not organisation.strip():
            raise ValueError("organisation must not be empty")
        if crl_validity <= dt.timedelta(0):
            raise ValueError("crl_validity must be positive")
        pki_dir = Path(pki_dir)
        pki_dir.mkdir(parents=True, exist_ok=True)
        with cls._directory_lock(pki_dir):
            registry_path = pki_dir / "registry.json"
            if registry_path.exists():
                return cls._load(
                    pki_dir, organisation, leaf_key_size=leaf_key_size, crl_validity=crl_validity
                )
            leftovers = [
                p for p in (pki_dir / "ca", pki_dir / "crl", pki_dir / "ca-bundle.pem") if p.exists()
            ]
            if leftovers:
                raise RuntimeError(
                    f"PKI directory {pki_dir} holds CA material but no registry.json (interrupted "
                    "creation?); refusing to overwrite it — remove the directory to start again"
                )
            return cls._create(
                pki_dir,
                organisation.strip(),
                ca_key_size=ca_key_size,
                leaf_key_size=leaf_key_size,
                root_validity=root_validity,
                ca_validity=ca_validity,
                crl_validity=crl_validity,
            )

    @staticmethod
    @contextlib.contextmanager
    def _directory_lock(pki_dir: Path) -> Iterator[None]:
        """An exclusive advisory lock on the PKI directory, shared by every process using it."""
        fd = os.open(pki_dir / ".lock", os.O_RDWR | os.O_CREAT, _PRIVATE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock, self._directory_lock(self._dir):
            yield

    @staticmethod
    def _paths(pki_dir: Path, role: CaRole) -> tuple[Path, Path, Path]:
        return (
            pki_dir / "ca" / f"{role.value}.pem",
            pki_dir / "ca" / f"{role.value}.key",
            pki_dir / "crl" / f"{role.value}.crl.pem",
        )

    @classmethod
    def _create(
        cls,
        pki_dir: Path,
        organisation: str,
        *,
        ca_key_size: int,
        leaf_key_size: int,
        root_validity: dt.timedelta,
        ca_validity: dt.timedelta,
        crl_validity: dt.timedelta,
    ) -> DevPKI:
        tag = _ascii_upper(organisation) or "CADUCEE"
        unit = f"IGC-{tag} DEV"
        names = {
            CaRole.ROOT: f"AC RACINE {tag} DEV",
            CaRole.PERSONS: f"AC PERSONNES {tag} DEV",
            CaRole.ORGANISATIONS: f"AC ORGANISATIONS {tag} DEV",
        }
        now = _utcnow()
        not_before = now - CLOCK_SKEW_ALLOWANCE

        def ca_name(role: CaRole) -> x509.Name:
            return x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                    x509.NameAttribute(NameOID.COMMON_NAME, names[role]),
                ]
            )

        authorities: dict[CaRole, _Authority] = {}
        keys: dict[CaRole, rsa.RSAPrivateKey] = {}
        root_key = rsa.generate_private_key(_RSA_PUBLIC_EXPONENT, ca_key_size)
        root_cert = cls._build_ca_certificate(
            subject=ca_name(CaRole.ROOT),
            public_key=root_key.public_key(),
            issuer_name=ca_name(CaRole.ROOT),
            issuer_key=root_key,
            issuer_ski=None,
            path_length=1,
            not_before=not_before,
            not_after=not_before + root_validity,
        )
        cert_path, key_path, crl_path = cls._paths(pki_dir, CaRole.ROOT)
        authorities[CaRole.ROOT] = _Authority(CaRole.ROOT, root_cert, cert_path, key_path, crl_path)
        keys[CaRole.ROOT] = root_key
        root_ski = authorities[CaRole.ROOT].key_identifier
        root_not_after = root_cert.not_valid_after_utc
        for role in (CaRole.PERSONS, CaRole.ORGANISATIONS):
            key = rsa.generate_private_key(_RSA_PUBLIC_EXPONENT, ca_key_size)
            cert = cls._build_ca_certificate(
                subject=ca_name(role),
                public_key=key.public_key(),
                issuer_name=root_cert.subject,
                issuer_key=root_key,
                issuer_ski=root_ski,
                path_length=0,
                not_before=not_before,
                not_after=min(not_before + ca_validity, root_not_after),
            )
            cert_path, key_path, crl_path = cls._paths(pki_dir, role)
            authorities[role] = _Authority(role, cert, cert_path, key_path, crl_path)
            keys[role] = key

        for authority in authorities.values():
            _atomic_write(authority.key_path, _pem_private_key(keys[authority.role]), _PRIVATE_MODE)
            _atomic_write(authority.cert_path, _pem_certificate(authority.certificate), _PUBLIC_MODE)
        bundle = b"".join(_pem_certificate(authorities[role].certificate) for role in CaRole)
        _atomic_write(pki_dir / "ca-bundle.pem", bundle, _PUBLIC_MODE)

        pki = cls(
            pki_dir,
            organisation,
            authorities,
            leaf_key_size=leaf_key_size,
            crl_validity=crl_validity,
            private_keys=keys,
        )
        registry: dict[str, Any] = {
            "format": REGISTRY_FORMAT,
            "organisation": organisation,
            "created": now.isoformat(),
            "crl_numbers": {role.value: 0 for role in CaRole},
            "certificates": {},
            "revoked": {},
        }
        for role in (CaRole.PERSONS, CaRole.ORGANISATIONS):
            cert = authorities[role].certificate
            registry["certificates"][format(cert.serial_number, "x")] = {
                "issuer": CaRole.ROOT.value,
                "subject": cert.subject.rfc4514_string(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "path": str(authorities[role].cert_path),
            }
        for role in CaRole:
            pki._publish_crl(role, registry)
        # The registry is written last: its presence marks a complete PKI.
        pki._write_registry(registry)
        log.info("created development PKI in %s (root %s)", pki_dir, names[CaRole.ROOT])
        return pki

    @staticmethod
    def _build_ca_certificate(
        *,
        subject: x509.Name,
        public_key: rsa.RSAPublicKey,
        issuer_name: x509.Name,
        issuer_key: rsa.RSAPrivateKey,
        issuer_ski: bytes | None,
        path_length: int,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> x509.Certificate:
        """A CA certificate per RFC 5280 §4.2.1: critical basicConstraints and keyUsage, SKI and AKI."""
        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        aki = (
            x509.AuthorityKeyIdentifier(ski.digest, None, None)
            if issuer_ski is None
            else x509.AuthorityKeyIdentifier(issuer_ski, None, None)
        )
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(aki, critical=False)
            .sign(issuer_key, hashes.SHA256())
        )

    @classmethod
    def _load(
        cls,
        pki_dir: Path,
        requested_organisation: str,
        *,
        leaf_key_size: int,
        crl_validity: dt.timedelta,
    ) -> DevPKI:
        registry = json.loads((pki_dir / "registry.json").read_text(encoding="utf-8"))
        if registry.get("format") != REGISTRY_FORMAT:
            raise RuntimeError(
                f"{pki_dir / 'registry.json'}: unsupported registry format {registry.get('format')!r}"
            )
        organisation = str(registry["organisation"])
        if requested_organisation.strip() != organisation:
            log.warning(
                "PKI in %s was created for organisation %r; ignoring %r",
                pki_dir,
                organisation,
                requested_organisation,
            )
        authorities: dict[CaRole, _Authority] = {}
        for role in CaRole:
            cert_path, key_path, crl_path = cls._paths(pki_dir, role)
            if not key_path.is_file():
                raise RuntimeError(f"PKI directory {pki_dir} is missing {key_path.name}")
            authorities[role] = _Authority(
                role, _load_certificate_file(cert_path), cert_path, key_path, crl_path
            )
        for role in (CaRole.PERSONS, CaRole.ORGANISATIONS):
            authorities[role].certificate.verify_directly_issued_by(authorities[CaRole.ROOT].certificate)
        return cls(pki_dir, organisation, authorities, leaf_key_size=leaf_key_size, crl_validity=crl_validity)

    def _private_key(self, role: CaRole) -> rsa.RSAPrivateKey:
        """The CA's signing key, loaded (and checked against its certificate) on first use."""
        with self._thread_lock:
            key = self._private_keys.get(role)
            if key is None:
                authority = self._authorities[role]
                loaded = serialization.load_pem_private_key(authority.key_path.read_bytes(), password=None)
                if not isinstance(loaded, rsa.RSAPrivateKey):
                    raise RuntimeError(f"{authority.key_path}: not an RSA private key")
                if _spki(loaded.public_key()) != _spki(authority.certificate.public_key()):
                    raise RuntimeError(f"{authority.key_path} does not match {authority.cert_path}")
                key = self._private_keys[role] = loaded
            return key

    # -------------------- registry

    def _read_registry(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self._dir / "registry.json").read_text(encoding="utf-8"))
        return data

    def _write_registry(self, registry: Mapping[str, Any]) -> None:
        text = json.dumps(registry, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        _atomic_write(self._dir / "registry.json", text.encode("utf-8"), _PUBLIC_MODE)

    @staticmethod
    def _revocations(registry: Mapping[str, Any]) -> dict[int, _Revocation]:
        return {
            int(serial_hex, 16): _Revocation(
                issuer=CaRole(entry["issuer"]),
                reason=x509.ReasonFlags(entry["reason"]),
                revocation_date=dt.datetime.fromisoformat(entry["revocation_date"]),
            )
            for serial_hex, entry in registry["revoked"].items()
        }

    # -------------------- properties

    @property
    def pki_dir(self) -> Path:
        return self._dir

    @property
    def organisation(self) -> str:
        """The organisation the PKI was created for (``O`` of the CA names)."""
        return self._organisation

    @property
    def ca_bundle_path(self) -> Path:
        """PEM file with the root and both intermediate CAs (trust anchors + intermediates)."""
        return self._dir / "ca-bundle.pem"

    @property
    def root_cert(self) -> x509.Certificate:
        return self._authorities[CaRole.ROOT].certificate

    @property
    def persons_ca_cert(self) -> x509.Certificate:
        return self._authorities[CaRole.PERSONS].certificate

    @property
    def organisations_ca_cert(self) -> x509.Certificate:
        return self._authorities[CaRole.ORGANISATIONS].certificate

    @property
    def root_cert_path(self) -> Path:
        return self._authorities[CaRole.ROOT].cert_path

    @property
    def persons_ca_cert_path(self) -> Path:
        return self._authorities[CaRole.PERSONS].cert_path

    @property
    def organisations_ca_cert_path(self) -> Path:
        return self._authorities[CaRole.ORGANISATIONS].cert_path

    def ca_cert(self, role: CaRole) -> x509.Certificate:
        return self._authorities[role].certificate

    def ca_cert_path(self, role: CaRole) -> Path:
        return self._authorities[role].cert_path

    def crl_path(self, role: CaRole) -> Path:
        """The PEM CRL published by one CA."""
        return self._authorities[role].crl_path

    def crl_paths(self) -> list[Path]:
        """The CRLs of all three CAs (root first), as a validator's ``crl_files``."""
        return [self._authorities[role].crl_path for role in CaRole]

    # -------------------- issuance

    def issue_person(
        self,
        national_id: str,
        given_name: str,
        surname: str,
        email: str,
        usage: CertUsage,
        out_dir: Path,
        basename: str,
        p12_password: bytes | None = None,
        *,
        organisation: str | None = None,
        validity: dt.timedelta = DEFAULT_LEAF_VALIDITY,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue a person certificate from the persons CA.

        Subject ``C=FR, O=<organisation>, SN=<surname>, GN=<given_name>, CN=<given> <surname>,
        serialNumber=<national_id>`` (the national id is ``8`` + RPPS for a practitioner); SAN rfc822Name
        ``email``. Key and extended key usages follow ``usage`` (see :class:`CertUsage`).
        ``not_before``/``not_after`` override the validity window (e.g. to issue an expired certificate).
        """
        for label, value in (("national_id", national_id), ("given_name", given_name), ("surname", surname)):
            if not value.strip():
                raise ValueError(f"{label} must not be empty")
        if not national_id.isascii() or not national_id.isalnum():
            raise ValueError("national_id must be ASCII letters and digits (PrintableString)")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation or self._organisation),
                x509.NameAttribute(NameOID.SURNAME, surname),
                x509.NameAttribute(NameOID.GIVEN_NAME, given_name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{given_name} {surname}"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, national_id),
            ]
        )
        key_usage, ekus = _PERSON_USAGES[usage]
        return self._issue(
            CaRole.PERSONS,
            subject,
            [self._email_name(email)],
            key_usage,
            ekus,
            out_dir,
            basename,
            p12_password,
            validity=validity,
            not_before=not_before,
            not_after=not_after,
        )

    def issue_organisation(
        self,
        structure_id: str,
        organisation: str,
        common_name: str,
        out_dir: Path,
        basename: str,
        p12_password: bytes | None = None,
        *,
        email: str | None = None,
        validity: dt.timedelta = DEFAULT_LEAF_VALIDITY,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue an organisation (software / APP mailbox) certificate from the organisations CA.

        Subject ``C=FR, O=<organisation>, OU=<structure_id>, CN=<common_name>`` (the structure id is
        ``1`` + FINESS or ``3`` + SIRET); extKeyUsage clientAuth. The SAN is ``email`` as an rfc822Name when
        given, else ``common_name`` as a dNSName when it is a host name; one of them is required.
        """
        subject = self._organisation_subject(structure_id, organisation, common_name)
        if email is not None:
            san: list[x509.GeneralName] = [self._email_name(email)]
        elif _is_host_name(common_name):
            san = [x509.DNSName(common_name.lower())]
        else:
            raise ValueError(
                "an organisation certificate needs a SAN: give an email or a host name as common_name"
            )
        return self._issue(
            CaRole.ORGANISATIONS,
            subject,
            san,
            _KU_DIGITAL_SIGNATURE,
            (ExtendedKeyUsageOID.CLIENT_AUTH,),
            out_dir,
            basename,
            p12_password,
            validity=validity,
            not_before=not_before,
            not_after=not_after,
        )

    def issue_server(
        self,
        hostnames: Sequence[str],
        ips: Sequence[str],
        out_dir: Path,
        basename: str,
        *,
        structure_id: str,
        organisation: str,
        p12_password: bytes | None = None,
        validity: dt.timedelta = DEFAULT_LEAF_VALIDITY,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue an operator server certificate from the organisations CA.

        Subject as an organisation certificate with ``CN`` = the first host name; SAN dNSNames and
        iPAddresses (RFC 6125 §6.4: clients match the SAN, not the CN). extKeyUsage serverAuth and
        clientAuth: the same certificate authenticates the operator in mutual TLS between operators.
        """
        if not hostnames:
            raise ValueError("a server certificate needs at least one host name")
        for name in hostnames:
            if not _is_host_name(name):
                raise ValueError(f"not a host name in A-label form: {name!r}")
        addresses = [ipaddress.ip_address(ip) for ip in ips]
        san: list[x509.GeneralName] = [x509.DNSName(name.lower()) for name in hostnames]
        san.extend(x509.IPAddress(address) for address in addresses)
        subject = self._organisation_subject(structure_id, organisation, hostnames[0].lower())
        return self._issue(
            CaRole.ORGANISATIONS,
            subject,
            san,
            _KU_DIGITAL_SIGNATURE,
            (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
            out_dir,
            basename,
            p12_password,
            validity=validity,
            not_before=not_before,
            not_after=not_after,
        )

    @staticmethod
    def _organisation_subject(structure_id: str, organisation: str, common_name: str) -> x509.Name:
        for label, value in (
            ("structure_id", structure_id),
            ("organisation", organisation),
            ("common_name", common_name),
        ):
            if not value.strip():
                raise ValueError(f"{label} must not be empty")
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, structure_id),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    @staticmethod
    def _email_name(email: str) -> x509.RFC822Name:
        local, at, domain = email.rpartition("@")
        if not at or not local or not _is_host_name(domain) or not email.isascii():
            raise ValueError(f"not an ASCII mailbox address: {email!r}")
        return x509.RFC822Name(email)

    def _issue(
        self,
        role: CaRole,
        subject: x509.Name,
        san: list[x509.GeneralName],
        key_usage: x509.KeyUsage,
        ekus: Sequence[x509.ObjectIdentifier],
        out_dir: Path,
        basename: str,
        p12_password: bytes | None,
        *,
        validity: dt.timedelta,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> IssuedCertificate:
        if not _BASENAME_RE.match(basename):
            raise ValueError(f"basename must be a plain file name: {basename!r}")
        if p12_password is not None and not p12_password:
            raise ValueError("p12_password must not be empty (pass None for no PKCS#12 file)")
        start = _as_utc(not_before) if not_before is not None else _utcnow() - CLOCK_SKEW_ALLOWANCE
        end = _as_utc(not_after) if not_after is not None else start + validity
        if end <= start:
            raise ValueError("notAfter must be later than notBefore")
        authority = self._authorities[role]
        key = rsa.generate_private_key(_RSA_PUBLIC_EXPONENT, self._leaf_key_size)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(authority.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier(authority.key_identifier, None, None), critical=False)
            .sign(self._private_key(role), hashes.SHA256())
        )
        out_dir = Path(out_dir)
        cert_path = out_dir / f"{basename}.pem"
        key_path = out_dir / f"{basename}.key"
        chain_path = out_dir / f"{basename}-fullchain.pem"
        p12_path = out_dir / f"{basename}.p12" if p12_password is not None else None
        _atomic_write(key_path, _pem_private_key(key), _PRIVATE_MODE)
        _atomic_write(cert_path, _pem_certificate(cert), _PUBLIC_MODE)
        _atomic_write(
            chain_path, _pem_certificate(cert) + _pem_certificate(authority.certificate), _PUBLIC_MODE
        )
        if p12_path is not None and p12_password is not None:
            friendly = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            p12 = pkcs12.serialize_key_and_certificates(
                name=str(friendly).encode("utf-8"),
                key=key,
                cert=cert,
                cas=[authority.certificate, self.root_cert],
                encryption_algorithm=serialization.BestAvailableEncryption(p12_password),
            )
            _atomic_write(p12_path, p12, _PRIVATE_MODE)
        with self._locked():
            registry = self._read_registry()
            registry["certificates"][format(cert.serial_number, "x")] = {
                "issuer": role.value,
                "subject": cert.subject.rfc4514_string(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "path": str(cert_path),
            }
            self._write_registry(registry)
        return IssuedCertificate(
            cert_path=cert_path,
            key_path=key_path,
            p12_path=p12_path,
            chain_path=chain_path,
            serial=cert.serial_number,
            subject_dn=cert.subject.rfc4514_string(),
            certificate=cert,
        )

    # -------------------- revocation

    def revoke(
        self,
        serial_or_cert_path: int | str | os.PathLike[str],
        reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise,
    ) -> Path:
        """Revoke a certificate and republish the CRL of its issuing CA with the next CRL number.

        The certificate is named by its serial number (an ``int``, or a ``str`` in hexadecimal as printed
        by ``openssl x509 -serial``, colons allowed) or by the path of its PEM/DER file (a ``Path``, or a
        ``str`` naming an existing file). Returns the path of the republished CRL.

        Revoking an already revoked certificate changes nothing. An intermediate CA is revoked in the
        root's CRL; the root cannot be revoked. ``removeFromCRL`` is only meaningful in delta CRLs
        (RFC 5280 §5.3.1) and is refused.
        """
        if reason is x509.ReasonFlags.remove_from_crl:
            raise ValueError("removeFromCRL only appears in delta CRLs")
        target: int | Path
        if isinstance(serial_or_cert_path, int):
            target = serial_or_cert_path
        elif isinstance(serial_or_cert_path, str) and not Path(serial_or_cert_path).is_file():
            text = serial_or_cert_path.strip().replace(":", "").removeprefix("0x").removeprefix("0X")
            if not text or not re.fullmatch(r"[0-9A-Fa-f]+", text):
                raise FileNotFoundError(
                    f"no certificate file and not a hexadecimal serial: {serial_or_cert_path}"
                )
            target = int(text, 16)
        else:
            target = Path(serial_or_cert_path)
        with self._locked():
            registry = self._read_registry()
            if isinstance(target, int):
                serial = target
                entry = registry["certificates"].get(format(serial, "x"))
                if entry is None:
                    raise KeyError(f"serial {serial:X} was not issued by this PKI")
                issuer = CaRole(entry["issuer"])
            else:
                cert = _load_certificate_file(target)
                serial = cert.serial_number
                issuer = self._issuer_of(cert)
            if serial == self.root_cert.serial_number and issuer is CaRole.ROOT:
                raise ValueError("the root CA cannot revoke itself")
            key = format(serial, "x")
            if key in registry["revoked"]:
                log.info("certificate %X already revoked", serial)
                return self._authorities[issuer].crl_path
            registry["revoked"][key] = {
                "issuer": issuer.value,
                "reason": reason.value,
                "revocation_date": _utcnow().isoformat(),
            }
            self._publish_crl(issuer, registry)
            self._write_registry(registry)
            log.info("revoked certificate %X (%s) of CA %s", serial, reason.value, issuer.value)
            return self._authorities[issuer].crl_path

    def is_revoked(self, serial: int) -> bool:
        """True when this PKI has revoked the certificate with that serial number."""
        return format(serial, "x") in self._read_registry()["revoked"]

    def refresh_crls(self) -> list[Path]:
        """Republish every CRL with a fresh thisUpdate/nextUpdate and the next CRL number.

        :meth:`create_or_load` never touches existing CRLs; a long-running development server calls this
        before the published CRLs reach their nextUpdate.
        """
        with self._locked():
            registry = self._read_registry()
            for role in CaRole:
                self._publish_crl(role, registry)
            self._write_registry(registry)
        return self.crl_paths()

    def _issuer_of(self, cert: x509.Certificate) -> CaRole:
        for role in (CaRole.PERSONS, CaRole.ORGANISATIONS, CaRole.ROOT):
            authority = self._authorities[role]
            if cert.issuer != authority.certificate.subject:
                continue
            try:
                cert.verify_directly_issued_by(authority.certificate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return role
        raise ValueError("certificate was not issued by this PKI")

    def _publish_crl(self, role: CaRole, registry: dict[str, Any]) -> None:
        """Sign and write the next CRL of ``role`` (RFC 5280 §5: v2, CRL number, AKI, reason codes).

        Updates ``registry["crl_numbers"]`` in place; the caller writes the registry afterwards.
        """
        authority = self._authorities[role]
        number = int(registry["crl_numbers"][role.value]) + 1
        now = _utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(authority.certificate.subject)
            .last_update(now)
            .next_update(now + self._crl_validity)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier(authority.key_identifier, None, None), critical=False)
        )
        for serial, revocation in sorted(self._revocations(registry).items()):
            if revocation.issuer is not role:
                continue
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revocation.revocation_date)
            )
            # RFC 5280 §5.3.1: the reasonCode "unspecified" SHOULD be absent rather than present.
            if revocation.reason is not x509.ReasonFlags.unspecified:
                entry = entry.add_extension(x509.CRLReason(revocation.reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self._private_key(role), hashes.SHA256())
        _atomic_write(authority.crl_path, crl.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)
        registry["crl_numbers"][role.value] = number


def _as_utc(moment: dt.datetime) -> dt.datetime:
    """A naive datetime is taken as UTC; an aware one is converted."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _key_usage(
    *, digital_signature: bool = False, content_commitment: bool = False, key_encipherment: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_KU_DIGITAL_SIGNATURE: Final = _key_usage(digital_signature=True)

_PERSON_USAGES: Final[Mapping[CertUsage, tuple[x509.KeyUsage, tuple[x509.ObjectIdentifier, ...]]]] = {
    CertUsage.AUTH: (_key_usage(digital_signature=True), (ExtendedKeyUsageOID.CLIENT_AUTH,)),
    CertUsage.SIGN: (
        _key_usage(digital_signature=True, content_commitment=True),
        (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
    ),
    CertUsage.ENC: (_key_usage(key_encipherment=True), (ExtendedKeyUsageOID.EMAIL_PROTECTION,)),
}
