"""`caducee mdn`: the read receipt built from the command line, and its refusals (RFC 8098 §2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from caducee import config
from mailserver.mdn import Disposition, DispositionType, MssErrorCode, parse_mdn

ORIGINAL_ID = "<20240219230100.23456@chb.mssante.fr>"


def message(*, notify_to: str | None = "pfi@chb.mssante.fr", return_path: str = "<pfi@chb.mssante.fr>",
            subject: str = "XDM/1.0/DDM+ECHOGRAPHIE") -> bytes:
    lines = [f"Return-Path: {return_path}", "From: pfi@chb.mssante.fr", "To: service@chu.mssante.fr",
             f"Subject: {subject}", f"Message-ID: {ORIGINAL_ID}", "Date: Mon, 19 Feb 2024 23:01:00 +0100"]
    if notify_to is not None:
        lines.append(f"Disposition-Notification-To: {notify_to}")
    return ("\r\n".join(lines) + "\r\n\r\nCompte rendu\r\n").encode("ascii")


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "caducee", "mdn", *args], cwd=tmp_path, capture_output=True,
                          timeout=60, check=False)


@pytest.fixture
def eml(tmp_path: Path) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(message())
    return path


def test_writes_the_mdn_to_out(tmp_path: Path, eml: Path) -> None:
    out = tmp_path / "mdn.eml"
    result = run(tmp_path, str(eml), "--recipient", "service@chu.mssante.fr", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    report = parse_mdn(out.read_bytes())
    assert report is not None
    assert report.disposition == Disposition.automatic(DispositionType.PROCESSED)
    assert report.final_recipient == "service@chu.mssante.fr"
    assert report.original_message_id == ORIGINAL_ID
    assert report.reporting_ua is not None and report.reporting_ua.startswith("chu.mssante.fr; Caducee")
    assert b"\r\nTo: pfi@chb.mssante.fr\r\n" in out.read_bytes()


def test_writes_to_standard_output_with_an_error_code(tmp_path: Path, eml: Path) -> None:
    result = run(tmp_path, str(eml), "--recipient", "service@chu.mssante.fr", "--error", "903")
    assert result.returncode == 0, result.stderr
    report = parse_mdn(result.stdout)
    assert report is not None
    assert report.disposition.error is MssErrorCode.INS_ABSENT
    assert b"processed/Error: 903^INS non present dans le document" in result.stdout


def test_disposition_and_manual_flags(tmp_path: Path, eml: Path) -> None:
    result = run(tmp_path, str(eml), "--recipient", "service@chu.mssante.fr", "--disposition", "displayed",
                 "--manual")
    assert result.returncode == 0, result.stderr
    report = parse_mdn(result.stdout)
    assert report is not None and report.disposition == Disposition.manual(DispositionType.DISPLAYED)
    assert b"Auto-Submitted" not in result.stdout.split(b"\r\n\r\n")[0]


def test_reporting_ua_and_domain_come_from_the_configuration(tmp_path: Path, eml: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "caducee.toml").write_text(config.sample("chu.mssante.fr", hostname="mx.chu.mssante.fr"),
                                        encoding="utf-8")
    result = run(tmp_path, str(eml), "--recipient", "service@chu.mssante.fr", "--state", str(state))
    assert result.returncode == 0, result.stderr
    report = parse_mdn(result.stdout)
    assert report is not None and report.reporting_ua is not None
    assert report.reporting_ua.startswith("mx.chu.mssante.fr; Caducee ")


def test_refuses_a_message_that_asks_for_no_mdn(tmp_path: Path) -> None:
    path = tmp_path / "plain.eml"
    path.write_bytes(message(notify_to=None))
    out = tmp_path / "mdn.eml"
    result = run(tmp_path, str(path), "--recipient", "service@chu.mssante.fr", "--out", str(out), "--manual")
    assert result.returncode == 2
    assert b"asks for no MDN" in result.stderr and b"Disposition-Notification-To" in result.stderr
    assert not out.exists() and result.stdout == b""


def test_refuses_automatic_sending_when_the_requester_is_not_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "other.eml"
    path.write_bytes(message(notify_to="secretariat@chb.mssante.fr"))
    result = run(tmp_path, str(path), "--recipient", "service@chu.mssante.fr")
    assert result.returncode == 2
    assert b"must not be sent automatically" in result.stderr
    assert b"differs from Return-Path" in result.stderr and b"--manual" in result.stderr
    assert result.stdout == b""
    consented = run(tmp_path, str(path), "--recipient", "service@chu.mssante.fr", "--manual")
    assert consented.returncode == 0, consented.stderr
    report = parse_mdn(consented.stdout)
    assert report is not None and report.disposition.sending_mode == "MDN-sent-manually"


def test_refuses_to_answer_a_report(tmp_path: Path) -> None:
    path = tmp_path / "mdn-in.eml"
    first = run(tmp_path, str(tmp_path / "missing.eml"), "--recipient", "a@b.fr")
    assert first.returncode == 2 and b"cannot read" in first.stderr
    (tmp_path / "message.eml").write_bytes(message())
    built = run(tmp_path, "message.eml", "--recipient", "service@chu.mssante.fr", "--out", str(path))
    assert built.returncode == 0, built.stderr
    result = run(tmp_path, str(path), "--recipient", "pfi@chb.mssante.fr", "--manual")
    assert result.returncode == 2
    assert b"never answered with another report" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipient", "not-an-address"], b"not a plain mail address"),
        (["--recipient", "service@chu.mssante.fr", "--send"], b"--send needs --server"),
        (["--recipient", "service@chu.mssante.fr", "--send", "--server", "nohost", "--ca", "c", "--cert", "c",
          "--key", "k"], b"expected HOST:PORT"),
    ],
)
def test_refuses_bad_arguments(tmp_path: Path, eml: Path, args: list[str], message: bytes) -> None:
    result = run(tmp_path, str(eml), *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_refuses_an_unknown_error_code(tmp_path: Path, eml: Path) -> None:
    result = run(tmp_path, str(eml), "--recipient", "service@chu.mssante.fr", "--error", "907")
    assert result.returncode == 2
    assert b"900 to 906" in result.stderr
