from __future__ import annotations

import pytest

from directory.identifiers import is_finess, is_rpps, luhn_complete, luhn_valid


@pytest.mark.parametrize("rpps", ["10001234565", "10002345675", "10003456786"])
def test_demo_rpps_pass_luhn(rpps: str) -> None:
    assert is_rpps(rpps)


def test_luhn_rejects_a_changed_digit() -> None:
    assert luhn_valid("79927398713")  # the classic ISO/IEC 7812 example
    assert not luhn_valid("79927398714")
    assert not luhn_valid("7992739871a")


def test_luhn_complete_appends_the_key() -> None:
    assert luhn_complete("7992739871") == "79927398713"
    assert is_finess(luhn_complete("75000012"))
    assert not is_rpps("1000123456")  # 10 digits
