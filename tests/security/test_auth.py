"""Certificate login (docs/security.md rows 24, 26): a certificate for the wrong purpose never logs in, and
every refusal looks the same to the client — same code, same text, and no timing difference a client
could use to tell an unknown practitioner from a known one."""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.security.clients import IMAP, SMTP, tls_context
from tests.security.conftest import Space

pytestmark = pytest.mark.blackbox

AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
IMAP_FAILED = b"NO [AUTHENTICATIONFAILED] Authentication failed"
ATTEMPTS = 51  # per kind of refusal; three AUTH commands per connection (the fourth closes it)
MEDIAN_BOUND = 0.020  # seconds; generous (measured spread: about 0.5 ms), see test_refusals_take_the_same_time


@dataclass(frozen=True)
class Login:
    cert: Path | None
    key: Path | None
    authzid: str = ""


@pytest.fixture(scope="module")
def logins(space: Space, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Login]]:
    from crypto.pki import CertUsage, DevPKI

    out = tmp_path_factory.mktemp("logins")
    pki = DevPKI.create_or_load(space.server.state / "pki")
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    stranger = pki.issue_person("810000000001", "Inconnu", "Personne", "inconnu@caducee.localhost", CertUsage.AUTH,
                                out, "stranger")
    revoked = pki.issue_person(alice["national_id"], "Camille", "Martin", alice["address"], CertUsage.AUTH, out,
                               "revoked")
    pki.revoke(revoked.serial)
    serveronly = space.certs["person-serverauth"]
    yield {
        "unknown-principal": Login(stranger.cert_path, stranger.key_path),
        "wrong-authzid": Login(Path(alice["cert"]), Path(alice["key"]), bob["address"]),
        "revoked": Login(revoked.cert_path, revoked.key_path),
        "no-certificate": Login(None, None),
        "encryption-certificate": Login(Path(alice["enc_cert"]), Path(alice["enc_key"])),
        "serverauth-only": Login(serveronly.chain, serveronly.key),
    }


def _argument(login: Login) -> str:
    return base64.b64encode(login.authzid.encode()).decode() if login.authzid else "="


def _smtp(space: Space, login: Login) -> SMTP:
    ctx = tls_context(space.server, login.cert, login.key) if login.cert else tls_context(space.server)
    c = SMTP.connect(space.server, "submissions", ctx=ctx)
    assert c.cmd("EHLO client.test").startswith("250")
    return c


# -- row 24: purpose of the certificate -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["serverauth-only", "encryption-certificate"])
def test_certificate_for_another_purpose_never_logs_in(space: Space, logins: dict[str, Login], kind: str) -> None:
    """A practitioner's own certificate, valid and not revoked, but whose extended key usage is not
    clientAuth (a TLS server certificate, an S/MIME encryption certificate): refused on SMTP and IMAP."""
    login = logins[kind]
    c = _smtp(space, login)
    try:
        assert c.cmd("AUTH EXTERNAL =") == AUTH_INVALID
        assert c.cmd("MAIL FROM:<sophie.petit@caducee.localhost>").startswith("530 5.7.0")
    finally:
        c.quit()
    with IMAP.open(space.server, "imaps", tls_context(space.server, login.cert, login.key)) as i:
        i.line()
        assert i.command(b"A1", b"AUTHENTICATE EXTERNAL =")[-1] == b"A1 " + IMAP_FAILED


# -- row 26: the same refusal for everyone ------------------------------------------------------------------------

REFUSALS = ["unknown-principal", "wrong-authzid", "revoked", "no-certificate", "encryption-certificate"]


def test_every_refusal_has_the_same_code_and_text(space: Space, logins: dict[str, Login]) -> None:
    for kind in REFUSALS:
        login = logins[kind]
        c = _smtp(space, login)
        try:
            assert c.cmd(f"AUTH EXTERNAL {_argument(login)}") == AUTH_INVALID, kind
        finally:
            c.quit()
        ctx = tls_context(space.server, login.cert, login.key) if login.cert else tls_context(space.server)
        with IMAP.open(space.server, "imaps", ctx) as i:
            i.line()
            reply = i.command(b"A1", b"AUTHENTICATE EXTERNAL " + _argument(login).encode())[-1]
            assert reply == b"A1 " + IMAP_FAILED, kind


def test_refusals_take_the_same_time(space: Space, logins: dict[str, Login]) -> None:
    """A statistical check, not a proof: ATTEMPTS timed AUTH round trips per kind, interleaved by
    connection so that load on the machine hits every kind alike; the medians may differ by at most
    MEDIAN_BOUND. It catches a gross difference — a password-hash-like cost or a network lookup on only one
    path — not a difference of microseconds, which loopback jitter hides anyway."""
    kinds = ["unknown-principal", "wrong-authzid", "revoked"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    while min(len(v) for v in times.values()) < ATTEMPTS:
        for kind in kinds:
            login = logins[kind]
            c = _smtp(space, login)
            try:
                for _ in range(3):
                    started = time.perf_counter()
                    reply = c.cmd(f"AUTH EXTERNAL {_argument(login)}")
                    times[kind].append(time.perf_counter() - started)
                    assert reply == AUTH_INVALID
            finally:
                c.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    spread = max(medians.values()) - min(medians.values())
    assert spread < MEDIAN_BOUND, {k: f"{v * 1000:.2f} ms" for k, v in medians.items()}
