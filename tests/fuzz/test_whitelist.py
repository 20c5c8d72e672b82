"""The national whitelist reader (mailserver/trust.py, `ListeBlancheMSSante`) under hostile XML.

Arbitrary XML-ish documents give a `Whitelist` or a `TrustListError` listing what is wrong, nothing else;
an accepted entry always parses again. Documents with a DOCTYPE (entity expansion, external entities,
external DTDs, in any encoding) are refused before anything is expanded or fetched.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailserver import trust
from tests.fuzz.harness import check_whitelist, examples

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLE = (Path(__file__).parent.parent / "fixtures" / "trust" / "listeblanchemssante.xml").read_bytes()
NS = trust.NAMESPACE

_TEXT = st.sampled_from([
    "chu-exemple.mssante.fr", "CHU-Exemple.MSSante.FR", "xn--hpital-fxa.mssante.fr", "exemple", "a..b", "-a.fr",
    "a.123", "é.fr", "x" * 300 + ".fr", "", " ", "CN=mx.a.fr,OU=1,O=Op,C=FR", "CN=a\\,b+OU=x,C=FR", "CN=\\C3\\A9,C=FR",
    "CN=\\FF\\FE,C=FR", "CN=\\", "=x", "CN=a,,C=FR", "1.2.3=#0403616263", "CN=" + "a" * 1100, "2025-03-13T14:54:10Z",
    "2025-03-13", "2025-13-45T99:99:99", "9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00-23:59", "yesterday",
    "&amp;", "&lt;", "&#x0;", "&#1114112;", "&#65;", "&undefined;", "<![CDATA[a.fr]]>", "<!-- c -->", "<?pi x?>",
]) | st.text(max_size=30).map(lambda t: t.replace("<", "&lt;").replace("&", "&amp;"))
_CHILDREN = ["Nom", "Description", "DNCertificatOperateur", "ResponsableContact", "SupportContact", "DateMAJ", "Autre"]


@st.composite
def _element(draw: st.DrawFn, name: str, prefix: str) -> str:
    attrs = draw(st.sampled_from(["", ' a="1"', " xmlns:x=\"urn:x\"", f' xmlns="{NS}"', ' xml:lang="fr"']))
    return f"<{prefix}{name}{attrs}>{draw(_TEXT)}</{prefix}{name}>"


@st.composite
def whitelist(draw: st.DrawFn) -> bytes:
    """A document shaped like ListeBlancheMSSante, with every part optional, repeated or wrong."""
    prefix = draw(st.sampled_from(["", "", "lb:"]))
    ns = draw(st.sampled_from([f' xmlns="{NS}"', "", f' xmlns:lb="{NS}"', ' xmlns="urn:other"']))
    root = draw(st.sampled_from(["ListeBlancheMSSante", "ListeBlancheMSSante", "Autre", "listeblanchemssante"]))
    domains = []
    for _ in range(draw(st.integers(0, 4))):
        children = draw(st.lists(st.sampled_from(_CHILDREN), max_size=8))
        inner = "".join(draw(_element(c, prefix)) for c in children)
        domains.append(f"<{prefix}Domaine>{inner}</{prefix}Domaine>")
    body = ""
    if draw(st.integers(0, 4)):
        body += draw(_element("DateDeGeneration", prefix))
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        body += f"<{prefix}ListeDomaines>{''.join(domains)}</{prefix}ListeDomaines>"
    declaration = draw(st.sampled_from(['<?xml version="1.0" encoding="UTF-8"?>\n', "", '<?xml version="1.1"?>',
                                        '<?xml version="1.0" encoding="ISO-8859-1"?>', '<?xml version="1.0" encoding="bogus"?>']))
    text = f"{declaration}<{prefix}{root}{ns}>{body}</{prefix}{root}>"
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]))
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode("utf-8")


@st.composite
def mutated_sample(draw: st.DrawFn) -> bytes:
    data = bytearray(SAMPLE)
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        chunk = draw(st.binary(min_size=1, max_size=12) | st.sampled_from(
            [b"<", b">", b"</Nom>", b"<Domaine>", b"&", b"&#0;", b"]]>", b"\x00", b"\xff", b"<!DOCTYPE x>"]))
        if draw(st.booleans()):
            data[at:at + len(chunk)] = chunk
        else:
            data[at:at] = chunk
    return bytes(data)


@FUZZ
@given(whitelist() | mutated_sample() | st.binary(max_size=300))
def test_whitelist_reader_returns_a_list_or_its_problems(data: bytes) -> None:
    assert check_whitelist(data) == []


_LAUGHS = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
ATTACKS = {
    "billion laughs": f'<?xml version="1.0"?><!DOCTYPE ListeBlancheMSSante [<!ENTITY l0 "ha">{_LAUGHS}]>'
                      "<ListeBlancheMSSante>&l9;</ListeBlancheMSSante>",
    "quadratic blowup": '<!DOCTYPE ListeBlancheMSSante [<!ENTITY a "' + "x" * 50_000 + '">]>'
                        "<ListeBlancheMSSante>" + "&a;" * 2_000 + "</ListeBlancheMSSante>",
    "external entity": '<!DOCTYPE ListeBlancheMSSante [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
                       "<ListeBlancheMSSante><ListeDomaines><Domaine><Nom>&x;</Nom></Domaine></ListeDomaines>"
                       "</ListeBlancheMSSante>",
    "parameter entity": '<!DOCTYPE ListeBlancheMSSante [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>'
                        "<ListeBlancheMSSante/>",
    "external DTD": '<!DOCTYPE ListeBlancheMSSante SYSTEM "http://127.0.0.1:9/x.dtd"><ListeBlancheMSSante/>',
    "public DTD": '<!DOCTYPE ListeBlancheMSSante PUBLIC "-//X//EN" "file:///etc/passwd"><ListeBlancheMSSante/>',
    "doctype after comment": '<!-- x --><!DOCTYPE ListeBlancheMSSante [<!ENTITY a "b">]><ListeBlancheMSSante>&a;'
                             "</ListeBlancheMSSante>",
}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_doctype_attacks_are_refused_before_any_expansion(attack: str, encoding: str) -> None:
    document = ATTACKS[attack]
    data = document.encode(encoding) if encoding != "utf-8" else document.encode()
    started = time.perf_counter()
    with pytest.raises(trust.TrustListError) as caught:
        trust.parse_whitelist(data)
    assert time.perf_counter() - started < 1.0
    problems = caught.value.problems
    assert len(problems) == 1 and len(problems[0]) < 200
    if encoding in ("utf-8", "utf-16"):  # expat reads these itself (BOM or declaration)
        assert problems == ["a DOCTYPE is not allowed in the whitelist"]
    assert "ha" * 10 not in str(caught.value) and "root:" not in str(caught.value)


@pytest.mark.parametrize("encoding", ["bogus", "rot13", "base64", "utf-7", "shift_jis", "idna", "punycode"])
def test_an_unusable_encoding_declaration_is_a_trust_list_error(encoding: str) -> None:
    """expat hands an encoding it does not know to Python's codecs, which raised LookupError, ValueError
    or UnicodeError out of `parse_whitelist` (found by fuzzing)."""
    document = f'<?xml version="1.0" encoding="{encoding}"?><ListeBlancheMSSante/>'.encode()
    with pytest.raises(trust.TrustListError) as caught:
        trust.parse_whitelist(document)
    assert caught.value.problems == ["not well-formed XML: unsupported encoding declaration"]
