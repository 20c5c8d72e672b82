"""Text normalisation shared by the importers (header names, search columns) and the search.

`normalise` turns a French name, label or city into lower-case ASCII words separated by one space:
accents are stripped (é → e, œ → oe), apostrophes, hyphens and other punctuation become spaces. The
national files' headers drift between releases (research/formats.md §1.3: "Libellé civilité
d'exercice" vs "Libellé civilité exercice", "(coord. Structure)" vs "(coord. structure)"), so columns
are found by `header_key`, which also drops French articles and the word "coord".

The translation table is built once at import time; `normalise` is memoised because the same first
names, professions and cities repeat across millions of lines.
"""

from __future__ import annotations

import functools
import unicodedata

# Letters that Unicode does not decompose into a base letter plus accents.
_SPECIAL = {
    "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe", "ß": "ss", "ø": "o", "Ø": "o", "đ": "d", "Đ": "d",
    "ð": "d", "Ð": "d", "ł": "l", "Ł": "l", "ı": "i", "þ": "th", "Þ": "th", "ŀ": "l", "Ŀ": "l",
}

# Words that carry no meaning in a column name ("Code civilité d'exercice" = "Code civilité exercice").
_HEADER_STOPWORDS = frozenset({"d", "de", "des", "du", "l", "la", "le", "les", "coord"})


def _build_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for cp in range(0x80):
        ch = chr(cp)
        table[cp] = ch.lower() if ch.isalnum() else " "
    for cp in [*range(0x80, 0x250), *range(0x1E00, 0x1F00), 0x2019, 0x2018, 0x02BC, 0x00A0, 0x202F]:
        ch = chr(cp)
        if ch in _SPECIAL:
            table[cp] = _SPECIAL[ch]
            continue
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)).lower()
        table[cp] = base if base and base.isascii() and base.isalnum() else " "
    return table


_TABLE = _build_table()
# The same mapping for ASCII text as a byte table: bytes.translate is a single C loop.
_ASCII_BYTES = bytes(ord(_TABLE[i]) for i in range(128)) + b" " * 128


@functools.lru_cache(maxsize=1 << 17)
def normalise(text: str) -> str:
    """Lower-case ASCII words separated by single spaces: "Évelyne D'ALMÉIDA-Œuf" → "evelyne d almeida oeuf".

    Letters outside the Latin scripts are kept (lower-cased, without combining marks).
    """
    if text.isascii():
        return " ".join(text.encode("ascii").translate(_ASCII_BYTES).decode("ascii").split())
    out = text.translate(_TABLE)
    if not out.isascii():
        out = "".join(
            c if c.isalnum() else " "
            for c in unicodedata.normalize("NFKD", out)
            if not unicodedata.combining(c)
        ).lower()
    return " ".join(out.split())


def header_key(name: str) -> str:
    """The key a column is found by: normalised, without French articles nor "coord".

    "Téléphone 2 (coord. structure)" → "telephone 2 structure"; "Type d'identifiant PP" → "type identifiant pp".
    """
    return " ".join(w for w in normalise(name).split() if w not in _HEADER_STOPWORDS)


def prefix_bounds(prefix: str) -> tuple[str, str]:
    """`(low, high)` such that `low <= s < high` holds exactly for the strings starting with `prefix`.

    Valid under byte-wise (code point) ordering, which the normalised columns use on every backend
    (`directory.schema.NormText`); `prefix` must not be empty.
    """
    if not prefix:
        raise ValueError("empty prefix")
    last = prefix[-1]
    if ord(last) >= 0x10FFFF:  # cannot happen with normalised text; kept exact anyway
        return prefix, prefix + "\U0010ffff"
    return prefix, prefix[:-1] + chr(ord(last) + 1)
