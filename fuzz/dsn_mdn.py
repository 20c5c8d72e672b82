"""atheris target: delivery and disposition reports (mailserver/dsn.py, mailserver/mdn.py).

Input: a whole message. Finding: `parse_dsn`, `parse_mdn`, `report_kind` or `mdn_request` raising anything
(their documented outcome is a value or None). Seed with the real reports of tests/fixtures/mime/dsn and
tests/fixtures/mime/mdn. See fuzz/README.md.
"""

from __future__ import annotations

import _common
import atheris

# Every module under test is imported inside this block, so that atheris instruments it for coverage.
with atheris.instrument_imports(include=["mailserver", "email"]):
    import mailserver.dsn
    import mailserver.mdn  # noqa: F401
    from tests.fuzz.harness import check_reports


def test_one_input(data: bytes) -> None:
    _common.check(check_reports(data))


if __name__ == "__main__":
    _common.main(test_one_input)
