"""atheris target: the national open-data files (directory/importers: header recognition, row parsers).

Input: a whole file, header line first, as `caducee directory import` reads it. Finding: anything raised,
a staged row that does not fit its staging table or holds a NUL, or an issue without a valid line number.
Seed with tests/fixtures/rpps. See fuzz/README.md.
"""

from __future__ import annotations

import _common
import atheris

# Every module under test is imported inside this block, so that atheris instruments it for coverage.
with atheris.instrument_imports(include=["directory"]):
    import directory.importers.formats
    import directory.importers.parsers
    import directory.importers.runner
    import directory.importers.text  # noqa: F401
    from tests.fuzz.harness import check_directory_file


def test_one_input(data: bytes) -> None:
    _common.check(check_directory_file(data[:200_000]))


if __name__ == "__main__":
    _common.main(test_one_input)
