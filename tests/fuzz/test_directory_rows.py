"""Rows of the national open-data files (directory/importers: runner.read_lines and the per-kind parsers).

Any line, as bytes from the file, is either staged as rows that fit their staging table or rejected with its
line number and a reason; nothing is raised, and no staged value holds a NUL (PostgreSQL text cannot store
one, so a single NUL would abort the COPY of the whole import). Header lines give a `Header` or a
`FormatError`.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directory.importers import FormatError, parse_header
from tests.fuzz.harness import (
    DIRECTORY_SAMPLES,
    check_directory_rows,
    directory_sample,
    examples,
    run_directory_rows,
)

FUZZ = settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLES = {kind: directory_sample(kind) for kind in DIRECTORY_SAMPLES}

_FIELD = st.sampled_from([
    "", " ", "8", "0", "3", "9", "10091234566", "10091234567", "1009123456", "810091234566", "010012345",
    "0100123 5", "PER", "org", "APP", "CAB", "XXX", "dr.martin@caducee.localhost", "Dr.Martin@CADUCEE.localhost",
    "a@b", "x@-a.fr", "a b@c.fr", "@c.fr", "DUPRÉ", "Élodie", "O'Brien-Łukasz", "ß", "True", "faux", "oui",
    "peut-être", "259999993", "1259999993", "99999999999999999999999999999999999", "SM53", "DE09", "x" * 250,
    "\x00", "a\x00b", "\ufeff", "\u202e", "é" * 40, "1|2", "\t", "\r", "\x85",
]) | st.text(max_size=20)
_ENDINGS = st.sampled_from([b"|\n", b"|\r\n", b"\n", b"\r\n", b"|", b"", b"||\n"])


@st.composite
def data_line(draw: st.DrawFn, kind: str) -> bytes:
    """A line of `kind`: a real line with some fields replaced, or fields drawn from scratch, or bytes."""
    header, lines = SAMPLES[kind]
    width = header.rstrip("\r\n|").count("|") + 1
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.binary(max_size=120)) + draw(_ENDINGS)
    if choice <= 3 and lines:
        fields = draw(st.sampled_from(lines)).decode("utf-8").rstrip("\r\n").split("|")
        for _ in range(draw(st.integers(1, 4))):
            fields[draw(st.integers(0, len(fields) - 1))] = draw(_FIELD)
    else:
        fields = draw(st.lists(_FIELD, min_size=width - 1, max_size=width + 1))
    text = "|".join(fields).rstrip("|")
    return text.encode("utf-8", "surrogatepass") + draw(_ENDINGS)


@st.composite
def data_lines(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    kind = draw(st.sampled_from(sorted(SAMPLES)))
    lines = draw(st.lists(data_line(kind), min_size=1, max_size=10))
    return kind, [line if line.endswith(b"\n") else line + b"\n" for line in lines]


@FUZZ
@given(data_lines())
def test_every_line_is_staged_or_rejected_with_its_number(case: tuple[str, list[bytes]]) -> None:
    kind, lines = case
    assert check_directory_rows(kind, lines) == []


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)).map(lambda k: SAMPLES[k][0]) | st.text(max_size=200),
       st.lists(st.sampled_from(["|", "Type BAL", "Adresse BAL", "Nom d'exercice", "\ufeff", ""]), max_size=4))
def test_a_header_line_is_recognised_or_refused(header: str, extra: list[str]) -> None:
    line = header.rstrip("\r\n") + "|".join(extra)
    try:
        parsed = parse_header(line)
    except FormatError as exc:
        assert str(exc)
    else:
        assert parsed.width == len(parsed.columns) and all(0 <= i < parsed.width for i in parsed.index.values())


# -- regressions found by fuzzing -----------------------------------------------------------------------------


def test_a_nul_character_rejects_its_line_instead_of_aborting_the_import() -> None:
    _, lines = SAMPLES["mssante"]
    bad = lines[0].replace(b"|True|", b"|Tr\x00ue|").replace("DUPRÉ".encode(), "DU\x00PRÉ".encode())
    run = run_directory_rows("mssante", [lines[1], bad])
    assert check_directory_rows("mssante", [lines[1], bad]) == []
    assert [i.line for i in run.report.errors] == [3]
    assert "NUL" in run.report.errors[0].message
    assert len(run.rows["caducee_stg_mailboxes"]) == 1
