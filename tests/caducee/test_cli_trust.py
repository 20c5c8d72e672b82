"""`caducee trust …` driven as users run it: the real command in a subprocess, on a real state folder."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trust"
SAMPLE = FIXTURES / "listeblanchemssante.xml"
BROKEN = FIXTURES / "listeblanche-invalide.xml"
SAMPLE_SHA256 = hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
LOCAL_DN = "CN=relais.chu-exemple.fr,O=CHU Exemple,C=FR"
EXIT_REFUSED = 2


def caducee(*args: str | Path, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "caducee", *map(str, args)]
    if state is not None:
        command += ["--state", str(state)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `caducee init` for the module (it takes seconds); each test works on a copy."""
    state = tmp_path_factory.mktemp("trust-cli") / "state"
    done = caducee("init", state=state)
    assert done.returncode == 0, done.stderr
    return state


@pytest.fixture
def state(initialised: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(initialised, copy)
    return copy


def list_json(state: Path) -> list[dict[str, str]]:
    done = caducee("trust", "list", "--json", state=state)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("action", ["import", "list", "add", "remove", "refresh", "status"])
def test_every_command_has_help_and_takes_state(action: str) -> None:
    done = caducee("trust", action, "--help")
    assert done.returncode == 0
    assert f"usage: caducee trust {action}" in done.stdout
    assert "--state DIR" in done.stdout


def test_import_with_sha256_then_list_and_status(state: Path) -> None:
    done = caducee("trust", "import", SAMPLE, "--sha256", SAMPLE_SHA256.upper(), state=state)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"imported 8 domains (2 operator certificates) from {SAMPLE}, sha256 {SAMPLE_SHA256}; "
                           "0 local entries kept\n")
    assert done.stderr == ""

    entries = list_json(state)
    assert len(entries) == 8
    assert {e["source"] for e in entries} == {"national"}
    labo = next(e for e in entries if e["domain"] == "labo-biologie-rhone.mssante.fr")
    assert labo["description"] == "Laboratoire de biologie médicale du Rhône"
    assert labo["operator_dn"].startswith("CN=mss.esante-exemple.fr,")

    text = caducee("trust", "list", state=state)
    assert text.returncode == 0
    assert len(text.stdout.splitlines()) == 8
    assert re.search(r"^adsea29\.mssante\.fr +national +CN=medimail-asip\.mipih\.fr,", text.stdout, re.M)

    status = caducee("trust", "status", state=state)
    assert status.returncode == 0
    assert re.fullmatch(
        rf"last import \S+ from {re.escape(str(SAMPLE))}, sha256 {SAMPLE_SHA256}, 8 domains "
        r"\(list generated 2025-03-13T14:54:10\+00:00\); in force: 8 national, 0 local entries\n",
        status.stdout,
    )
    assert (state / "trust" / "listeblanchemssante.xml").read_bytes() == SAMPLE.read_bytes()


def test_import_with_a_checksum_file(state: Path, tmp_path: Path) -> None:
    checksum = tmp_path / "checksum"
    checksum.write_text(f"{SAMPLE_SHA256}  listeblanchemssante.xml\n")
    done = caducee("trust", "import", SAMPLE, "--checksum-file", checksum, state=state)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 8 domains")


def test_sha256_and_checksum_file_are_exclusive(state: Path, tmp_path: Path) -> None:
    done = caducee("trust", "import", SAMPLE, "--sha256", SAMPLE_SHA256, "--checksum-file", tmp_path / "c",
                   state=state)
    assert done.returncode == 2  # argparse usage error
    assert "not allowed with argument" in done.stderr


def test_import_with_the_wrong_checksum_changes_nothing(state: Path) -> None:
    done = caducee("trust", "import", SAMPLE, "--sha256", "0" * 64, state=state)
    assert done.returncode == EXIT_REFUSED
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"caducee trust import: {SAMPLE} refused, the list in force is unchanged:",
        f"  - SHA-256 mismatch: the checksum says {'0' * 64}, the file hashes to {SAMPLE_SHA256}",
    ]
    assert list_json(state) == []
    assert caducee("trust", "status", state=state).stdout == "no whitelist imported; 0 local entries in force\n"


def test_a_broken_list_prints_every_problem_and_keeps_the_last_good_one(state: Path) -> None:
    assert caducee("trust", "import", SAMPLE, state=state).returncode == 0
    before = list_json(state)
    done = caducee("trust", "import", BROKEN, state=state)
    assert done.returncode == EXIT_REFUSED
    lines = done.stderr.splitlines()
    assert lines[0] == f"caducee trust import: {BROKEN} refused, the list in force is unchanged:"
    assert len(lines) == 8
    assert all(line.startswith("  - ") for line in lines[1:])
    assert "  - line 5: <Domaine> #1: <Nom> missing or empty" in lines
    assert any("doublon.mssante.fr" in line and "another operator DN" in line for line in lines)
    assert list_json(state) == before
    assert (state / "trust" / "listeblanchemssante.xml").read_bytes() == SAMPLE.read_bytes()


def test_import_of_a_missing_file_is_refused(state: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.xml"
    done = caducee("trust", "import", missing, state=state)
    assert done.returncode == EXIT_REFUSED
    assert done.stderr.splitlines()[1] == f"  - {missing}: cannot read (No such file or directory)"


def test_add_list_remove_and_local_override(state: Path) -> None:
    done = caducee("trust", "add", "CHU-Exemple.mssante.fr", "--dn", LOCAL_DN, "--description",
                   "Relais du CHU", state=state)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"added local entry chu-exemple.mssante.fr -> {LOCAL_DN}\n"

    imported = caducee("trust", "import", SAMPLE, state=state)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.rstrip().endswith(
        "1 local entry kept (1 overriding the national entry: chu-exemple.mssante.fr)")
    chu = next(e for e in list_json(state) if e["domain"] == "chu-exemple.mssante.fr")
    assert (chu["source"], chu["operator_dn"], chu["description"]) == ("local", LOCAL_DN, "Relais du CHU")
    assert "in force: 7 national, 1 local entry" in caducee("trust", "status", state=state).stdout

    removed = caducee("trust", "remove", "chu-exemple.mssante.fr", state=state)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == "removed local entry chu-exemple.mssante.fr\n"
    national = caducee("trust", "remove", "adsea29.mssante.fr", state=state)
    assert national.stdout == "removed national entry adsea29.mssante.fr; it returns with the next import\n"
    domains = {e["domain"] for e in list_json(state)}
    assert "chu-exemple.mssante.fr" not in domains
    assert "adsea29.mssante.fr" not in domains
    assert len(domains) == 6

    again = caducee("trust", "remove", "adsea29.mssante.fr", state=state)
    assert again.returncode == EXIT_REFUSED
    assert again.stderr.splitlines() == ["caducee trust remove: nothing removed:",
                                         "  - no entry for adsea29.mssante.fr"]


def test_add_prints_every_problem(state: Path) -> None:
    done = caducee("trust", "add", "pas un domaine", "--dn", "CN=x,OU", state=state)
    assert done.returncode == EXIT_REFUSED
    assert done.stderr.splitlines() == [
        "caducee trust add: pas un domaine refused:",
        "  - domain: 'pas un domaine' is not a fully qualified domain name",
        "  - DN 'CN=x,OU' does not parse: attribute 'OU' has no '=value'",
    ]
    assert list_json(state) == []


def test_add_requires_a_dn(state: Path) -> None:
    done = caducee("trust", "add", "exemple.mssante.fr", state=state)
    assert done.returncode == 2
    assert "the following arguments are required: --dn" in done.stderr


def test_refresh_without_a_source_says_so(state: Path) -> None:
    done = caducee("trust", "refresh", state=state)
    assert done.returncode == EXIT_REFUSED
    lines = done.stderr.splitlines()
    assert lines[0] == "caducee trust refresh: nothing to refresh:"
    assert lines[1].startswith("  - no whitelist source configured: set [trust] source in ")


def configure_source(state: Path, source: str, checksum: str) -> None:
    path = state / "caducee.toml"
    text = path.read_text(encoding="utf-8")
    assert text.count('source = ""') == 1 and text.count('checksum = ""') == 1
    path.write_text(text.replace('source = ""', f'source = "{source}"')
                    .replace('checksum = ""', f'checksum = "{checksum}"'), encoding="utf-8")


def test_refresh_from_the_configured_source(state: Path) -> None:
    (state / "national").mkdir()
    shutil.copy(SAMPLE, state / "national" / "listeblanchemssante.xml")
    (state / "national" / "checksum").write_text(f"{SAMPLE_SHA256}  listeblanchemssante.xml\n")
    configure_source(state, "national/listeblanchemssante.xml", "national/checksum")

    done = caducee("trust", "refresh", state=state)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 8 domains (2 operator certificates) from "
                                  "national/listeblanchemssante.xml, sha256 ")
    unchanged = caducee("trust", "refresh", state=state)
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout == (f"unchanged: national/listeblanchemssante.xml is the list in force "
                                f"(sha256 {SAMPLE_SHA256})\n")

    shutil.copy(BROKEN, state / "national" / "listeblanchemssante.xml")
    (state / "national" / "checksum").write_text(hashlib.sha256(BROKEN.read_bytes()).hexdigest() + "\n")
    refused = caducee("trust", "refresh", state=state)
    assert refused.returncode == EXIT_REFUSED
    assert len(refused.stderr.splitlines()) == 8
    assert len(list_json(state)) == 8


def test_changes_are_in_the_audit_trail(state: Path) -> None:
    assert caducee("trust", "import", SAMPLE, state=state).returncode == 0
    assert caducee("trust", "add", "partenaire.exemple.fr", "--dn", LOCAL_DN, state=state).returncode == 0
    assert caducee("trust", "remove", "partenaire.exemple.fr", state=state).returncode == 0
    assert caducee("trust", "import", BROKEN, state=state).returncode == EXIT_REFUSED

    done = caducee("audit", "list", "--json", state=state)
    assert done.returncode == 0, done.stderr
    admin = [json.loads(line) for line in done.stdout.splitlines()]
    admin = [e for e in admin if e["event"] == "admin"]
    assert [e["detail"]["action"] for e in admin] == ["trust_import", "trust_add", "trust_remove"]
    assert admin[0]["detail"]["sha256"] == SAMPLE_SHA256
    assert admin[0]["detail"]["domains"] == "8"
    assert all(e["actor"].startswith("cli:") for e in admin)
    verify = caducee("audit", "verify", state=state)
    assert verify.returncode == 0
    assert verify.stdout.startswith("audit trail intact")
