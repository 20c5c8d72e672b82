"""atheris target: the national whitelist reader (mailserver/trust.py, ListeBlancheMSSante XML).

Input: a whole document. Finding: `parse_whitelist` raising anything but `TrustListError`, or accepting a
list whose entries do not parse again. Seed with tests/fixtures/trust. See fuzz/README.md.
"""

from __future__ import annotations

import _common
import atheris

# Every module under test is imported inside this block, so that atheris instruments it for coverage.
with atheris.instrument_imports(include=["mailserver", "xml.etree"]):
    import mailserver.trust  # noqa: F401
    from tests.fuzz.harness import check_whitelist


def test_one_input(data: bytes) -> None:
    _common.check(check_whitelist(data))


if __name__ == "__main__":
    _common.main(test_one_input)
