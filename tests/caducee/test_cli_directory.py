"""`caducee directory …` driven as users run it: the real command in a subprocess, on a real state folder."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rpps"
ACTIVITY = FIXTURES / "PS_LibreAcces_Personne_activite_52cols_sample.txt"
SAVOIR_FAIRE = FIXTURES / "PS_LibreAcces_SavoirFaire_sample.txt"
DIPLOMAS = FIXTURES / "PS_LibreAcces_Dipl_AutExerc_sample.txt"
MSSANTE = FIXTURES / "Extraction_Correspondance_MSSante_sample.txt"
DOMAIN = "ch-exemple.mssante.fr"
DUPRE = "810091234566"


def caducee(*args: str | Path, state: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "caducee", *map(str, args)]
    if state is not None:
        command += ["--state", str(state)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `caducee init` for the module (it takes seconds); each test works on a copy."""
    state = tmp_path_factory.mktemp("directory-cli") / "state"
    done = caducee("init", "--domain", DOMAIN, state=state)
    assert done.returncode == 0, done.stderr
    return state


@pytest.fixture
def state(initialised: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(initialised, copy)
    return copy


@pytest.mark.parametrize("action", ["import", "search"])
def test_every_command_has_help_and_takes_state(action: str) -> None:
    done = caducee("directory", action, "--help")
    assert done.returncode == 0
    assert f"usage: caducee directory {action}" in done.stdout
    assert "--state DIR" in done.stdout


def test_import_applies_files_in_dependency_order_and_summarises(state: Path) -> None:
    done = caducee("directory", "import", MSSANTE, DIPLOMAS, SAVOIR_FAIRE, ACTIVITY, state=state)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress bar
    kinds = re.findall(r"^\S+: (\w+) \(", done.stdout, re.MULTILINE)
    assert kinds == ["PS_LibreAcces_Personne_activite", "PS_LibreAcces_SavoirFaire", "PS_LibreAcces_Dipl_AutExerc",
                     "Extraction_Correspondance_MSSante"]
    assert f"{ACTIVITY}: PS_LibreAcces_Personne_activite (practitioners, organisations and activities)" in done.stdout
    assert re.search(r"^  6 lines read: 18 added, 0 changed, 0 removed, 0 rejected, 1 warning \(", done.stdout, re.MULTILINE)
    assert re.search(r"^    practitioners  \+5 +~0 +-0$", done.stdout, re.MULTILINE)
    assert "    line 5: RPPS 10091234560 fails the Luhn check (imported)" in done.stdout
    assert re.search(r"^  8 lines read: 8 added, 0 changed, 0 removed, 0 rejected, 0 warnings", done.stdout, re.MULTILINE)

    again = caducee("directory", "import", ACTIVITY, state=state)
    assert again.returncode == 0
    assert "6 lines read: 0 added, 0 changed, 0 removed" in again.stdout

    # National mailboxes in this server's domain are hosted here: they are this operator's mailboxes.
    listed = caducee("mailbox", "list", state=state)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        f"elodie.dupre@{DOMAIN}", f"lis@{DOMAIN}", f"secretariat.cardio@{DOMAIN}"]

    audit = caducee("audit", "list", "--json", state=state)
    imports = [json.loads(line) for line in audit.stdout.splitlines()]
    details = [e["detail"] for e in imports if e["event"] == "admin"]
    assert [(d["action"], d["kind"], d["added"]) for d in details] == [
        ("directory_import", "PS_LibreAcces_Personne_activite", "18"),
        ("directory_import", "PS_LibreAcces_SavoirFaire", "4"),
        ("directory_import", "PS_LibreAcces_Dipl_AutExerc", "4"),
        ("directory_import", "Extraction_Correspondance_MSSante", "8"),
        ("directory_import", "PS_LibreAcces_Personne_activite", "0"),
    ]
    assert caducee("audit", "verify", state=state).returncode == 0


def test_a_file_that_cannot_be_imported_exits_2_and_the_others_go_in(state: Path, tmp_path: Path) -> None:
    unknown = tmp_path / "notes.txt"
    unknown.write_text("nom|prénom|\nDupont|Jean|\n", encoding="utf-8")
    header_only = tmp_path / "PS_LibreAcces_SavoirFaire_empty.txt"
    header_only.write_text(SAVOIR_FAIRE.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    done = caducee("directory", "import", unknown, ACTIVITY, header_only, state=state)
    assert done.returncode == 2
    assert f"caducee directory import: {unknown}: unrecognised header" in done.stderr
    assert (f"caducee directory import: {header_only}: no usable line among 0: nothing imported; "
            "the directory is unchanged") in done.stderr
    assert "6 lines read: 18 added" in done.stdout
    found = caducee("directory", "search", "--rpps", "10091234566", state=state)
    assert found.returncode == 0 and DUPRE in found.stdout


def test_rejected_lines_are_listed_with_their_numbers_and_exit_0(state: Path, tmp_path: Path) -> None:
    header, *rows = ACTIVITY.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "PS_LibreAcces_Personne_activite_bad.txt"
    bad.write_text("\n".join([header, *rows, "8|123|8123|", rows[0].replace("|810091234566|", "|899|")]) + "\n",
                   encoding="utf-8")
    done = caducee("directory", "import", bad, state=state)
    assert done.returncode == 0, done.stderr
    assert "8 lines read: 18 added, 0 changed, 0 removed, 2 rejected, 1 warning" in done.stdout
    assert "  rejected (2):\n    line 8: 3 fields instead of 52\n" in done.stdout
    assert "    line 9: Identification nationale PP 899 does not match type 8 + 10091234566\n" in done.stdout

    refused = caducee("directory", "import", bad, "--max-rejected", "10", state=state)
    assert refused.returncode == 2
    assert "2 of 8 lines rejected (more than 10%): nothing imported" in refused.stderr


def test_search_prints_a_table_or_json_lines(state: Path) -> None:
    assert caducee("directory", "import", ACTIVITY, SAVOIR_FAIRE, MSSANTE, state=state).returncode == 0
    table = caducee("directory", "search", "--name", "dupré", "--city", "PONTARL", state=state)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["NATIONAL", "ID", "NAME", "PROFESSION", "SPECIALTY", "PLACE", "MAILBOXES"]
    assert row.startswith(f"{DUPRE}  DUPRÉ ÉLODIE  Médecin")
    assert "cabinet.dupre@medecin.mssante.fr (CAB), elodie.dupre@ch-exemple.mssante.fr (PER)" in row

    js = caducee("directory", "search", "--type", "org", "--json", state=state)
    assert js.returncode == 0
    entries = [json.loads(line) for line in js.stdout.splitlines()]
    assert [(e["kind"], e["national_id"]) for e in entries] == [
        ("organisation", "1259999993"), ("organisation", "1259999977")]
    assert entries[0]["organisation"]["city"] == "Pontarlier"

    limited = caducee("directory", "search", "--profession", "médecin", "--limit", "1", state=state)
    assert limited.returncode == 0 and len(limited.stdout.splitlines()) == 2
    assert "(the first 1; --limit N for more)" in limited.stderr

    nothing = caducee("directory", "search", "--name", "zzz", state=state)
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (1, "", "no entry matches\n")
    empty = caducee("directory", "search", state=state)
    assert empty.returncode == 2 and "give at least one criterion" in empty.stderr
    both = caducee("directory", "search", "--rpps", "1", "--national-id", "2", state=state)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_a_progress_bar_goes_to_stderr_on_a_terminal(state: Path) -> None:
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "caducee", "directory", "import", str(ACTIVITY),
                               "--state", str(state)], stdout=subprocess.PIPE, stderr=follower, timeout=120,
                              check=False)
        os.close(follower)
        follower = -1
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert done.returncode == 0
    text = output.decode("utf-8")
    assert re.search(r"\r  applying +\[#{30}\] 100%  6 lines  [\d,]+ lines/s", text), text
    assert text.endswith("\r\x1b[K")  # the bar is erased: the summary on stdout stays clean
    assert b"6 lines read" in done.stdout
