"""mailserver.headers: RFC 2047 decoding in linear time, comment nesting, header caps (docs/security.md
row 14). The decoder is checked against the standard library on ordinary values and for its growth on
hostile ones (research/security.md §1.6 test 1: t(2n)/t(n) < 3)."""

from __future__ import annotations

import time
from email.header import decode_header, make_header

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver.headers import (
    MAX_HEADER_FIELD,
    MAX_HEADER_FIELDS,
    comment_depth,
    decode_encoded_words,
    header_limits,
    strip_comments,
)

ORDINARY = [
    "plain text",
    "=?utf-8?q?R=C3=A9sultats_labo?= 7",
    "a =?utf-8?q?b?= c",
    "=?utf-8?q?a?= =?utf-8?q?b?=",
    "=?utf-8?b?w6k=?=",
    "=?ISO-8859-1?Q?caf=E9?= ok",
    "=?utf-8?q?=C3?= =?utf-8?q?=A9?=",  # one character split across two words
    "=?utf-8?q?a?=\r\n =?utf-8?q?b?=",
    "Re: =?utf-8?B?TcOpZGVjaW4=?= et =?iso-8859-1?Q?h=F4pital?=",
]


@pytest.mark.parametrize("value", ORDINARY)
def test_decoding_agrees_with_the_standard_library(value: str) -> None:
    assert decode_encoded_words(value) == str(make_header(decode_header(value)))


def test_undecodable_words_are_kept_as_written() -> None:
    assert decode_encoded_words("=?x-unknown?q?a?= b") == "=?x-unknown?q?a?= b"
    assert decode_encoded_words("=?utf-8?b?***?= b") == "=?utf-8?b?***?= b"
    assert decode_encoded_words("=?UTF-8*fr?Q?Bonjour?=") == "Bonjour"  # RFC 2231 language suffix
    assert decode_encoded_words("=?utf-8?q?x=0D=0Ay?=") == "x\r\ny"  # decoded, for SEARCH; never re-emitted


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"=?qQbB_ az0é\r\n\t*", "=?utf-8?q?", "=?utf-8?b?", "?=", "=C3=A9", "w6k"]),
                max_size=40).map("".join))
def test_decoding_never_raises(value: str) -> None:
    assert isinstance(decode_encoded_words(value), str)


def _seconds(fn: object, arg: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        fn(arg)  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("word", ["=?utf-8?q?a=C3=A9?= ", "=?utf-8?q?a=C3=A9?=", "=?iso-8859-1?q?b?= =?utf-8?q?a?= "])
def test_decoding_time_grows_linearly(word: str) -> None:
    n = 20_000
    small, large = _seconds(decode_encoded_words, word * n), _seconds(decode_encoded_words, word * 2 * n)
    assert large / small < 3, (small, large)


def test_comment_depth_and_stripping() -> None:
    assert comment_depth("a@b.test") == 0
    assert comment_depth('a (b (c)) "(((" \\( (x)') == 2
    assert comment_depth("(" * 5000 + ")" * 5000) == 5000
    assert strip_comments('a@b.test (c (d)) "q (x)" <e@f.test>') == 'a@b.test   "q (x)" <e@f.test>'
    assert strip_comments("x" + "(" * 10000 + ")" * 10000 + "@y") == "x @y"


def test_header_limits_count_fields_and_field_length() -> None:
    ok = b"From: a@b.test\r\nTo: c@d.test,\r\n e@f.test\r\n"
    assert header_limits(ok) is None
    assert header_limits(b"X: y\r\n" * MAX_HEADER_FIELDS) is None
    assert header_limits(b"X: y\r\n" * (MAX_HEADER_FIELDS + 1)) == "too many header fields"
    folded = b"To: " + b",\r\n ".join([b"a" * 70] * (MAX_HEADER_FIELD // 72 + 1)) + b"\r\nX: y\r\n"
    assert header_limits(folded) == "header field too long"
    assert header_limits(b"X: " + b"y" * (MAX_HEADER_FIELD - 10) + b"\r\n") is None
