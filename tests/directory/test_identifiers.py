from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from directory.identifiers import (
    LA_POSTE_HEAD_OFFICE_SIRET,
    OID_INS_NIA,
    OID_INS_NIR,
    OID_INS_NIR_DEMO,
    OID_INS_NIR_TEST,
    OID_PERSON_ID,
    OID_STRUCTURE_ID,
    PERSON_ADELI_PREFIX,
    PERSON_RPPS_PREFIX,
    STRUCTURE_FINESS_PREFIX,
    STRUCTURE_SIRET_PREFIX,
    Adeli,
    Finess,
    IdentifierError,
    IdentifierKind,
    Ins,
    InsKind,
    InsUsage,
    PersonId,
    PersonIdKind,
    PrincipalKind,
    Rpps,
    Siren,
    Siret,
    StructureId,
    StructureIdKind,
    describe_ins_oid,
    ins_oid,
    is_adeli,
    is_finess,
    is_ins,
    is_person_id,
    is_rpps,
    is_siren,
    is_siret,
    is_structure_id,
    luhn_complete,
    luhn_valid,
    mask_ins,
    nir_key,
    normalise_name,
    person_national_id_from_rpps,
    structure_national_id_from_finess,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ins"

DIGITS = "0123456789"


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


# --- Luhn ------------------------------------------------------------------------------------------------


def test_luhn_refuses_non_ascii_digits_and_empty_strings() -> None:
    assert not luhn_valid("")
    assert not luhn_valid("٧٩٩٢٧٣٩٨٧١٣")  # Arabic-Indic digits are digits to str.isdigit, not to Luhn
    assert not luhn_valid("²")
    assert luhn_complete("") == "0"
    with pytest.raises(ValueError, match="not a decimal string"):
        luhn_complete("12a")


@given(st.text(alphabet=DIGITS, min_size=10, max_size=10))
def test_luhn_complete_validates_and_any_single_digit_change_breaks_it(prefix: str) -> None:
    number = luhn_complete(prefix)
    assert number.startswith(prefix) and len(number) == 11
    assert luhn_valid(number)
    for position, original in enumerate(number):
        for digit in DIGITS:
            if digit != original:
                changed = number[:position] + digit + number[position + 1 :]
                assert not luhn_valid(changed), changed


# --- RPPS ------------------------------------------------------------------------------------------------

# The real RPPS numbers of formats.md §1.9 (public Annuaire Santé and ANS test files).
REAL_RPPS = [
    "10100271385",
    "10001045367",
    "10104335319",
    "10005814339",
    "10100224947",
    "10104257190",
    "10100124576",
    "10005810808",
    "10100356202",
    "10100779536",
]


@pytest.mark.parametrize("value", REAL_RPPS)
def test_real_rpps_parse_without_warnings(value: str) -> None:
    rpps = Rpps.parse(value)
    assert rpps.value == value and str(rpps) == value
    assert rpps.warnings == ()
    assert rpps.national_id == "8" + value
    assert is_rpps(value)


@pytest.mark.parametrize("value", ["01234567866", "10107582544"])  # ANS examples (formats.md §1.9)
def test_ans_example_rpps_failing_luhn_are_accepted_with_a_warning(value: str) -> None:
    rpps = Rpps.parse(value)
    assert rpps.value == value
    assert len(rpps.warnings) == 1 and "Luhn" in rpps.warnings[0]
    assert not is_rpps(value)


def test_rpps_parse_strips_whitespace() -> None:
    assert Rpps.parse(" 101 002\t713\u00a085 \n") == Rpps("10100271385")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1010027138", "expected 11 characters (11 digits), got 10"),
        ("101002713855", "expected 11 characters (11 digits), got 12"),
        ("1010027138A", "expected 11 digits"),
        ("١٠١٠٠٢٧١٣٨٥", "expected 11 digits"),  # Arabic-Indic digits
        ("", "got 0"),
    ],
)
def test_malformed_rpps_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        Rpps.parse(text)
    assert caught.value.kind is IdentifierKind.RPPS
    assert reason in caught.value.reason
    assert str(caught.value).startswith("invalid RPPS ")


def test_direct_construction_validates_the_canonical_form() -> None:
    with pytest.raises(IdentifierError):
        Rpps("101 002 713 85")
    with pytest.raises(IdentifierError):
        Adeli("2a1234567")


@given(st.text(alphabet=DIGITS, min_size=10, max_size=10))
def test_rpps_parse_of_str_round_trips(prefix: str) -> None:
    rpps = Rpps.parse(luhn_complete(prefix))
    assert Rpps.parse(str(rpps)) == rpps
    assert Rpps.parse(" ".join(str(rpps))) == rpps
    assert rpps.warnings == ()


# --- ADELI and person national ids ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["012600631", "759124159", "533100558", "2A1234567", "2B0000001"])
def test_adeli_shapes_are_accepted(value: str) -> None:
    adeli = Adeli.parse(value)
    assert str(adeli) == value and adeli.warnings == ()
    assert adeli.national_id == "0" + value
    assert is_adeli(value)


def test_adeli_parse_upper_cases_corsica() -> None:
    assert Adeli.parse("2a 123 456 7").value == "2A1234567"


@pytest.mark.parametrize(
    "value",
    ["00ALTAMAR01", "01260063", "0126006311", "2C1234567", "A21234567", "01260063X", "20A123456"],
)
def test_adeli_with_a_wrong_shape_are_refused(value: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        Adeli.parse(value)
    assert caught.value.kind is IdentifierKind.ADELI
    assert "two digits or 2A/2B, then seven digits" in caught.value.reason
    assert not is_adeli(value)


@pytest.mark.parametrize(
    ("value", "kind", "number"),
    [
        ("810100271385", PersonIdKind.RPPS, "10100271385"),
        ("810001045367", PersonIdKind.RPPS, "10001045367"),
        ("0012600631", PersonIdKind.ADELI, "012600631"),
        ("0759124159", PersonIdKind.ADELI, "759124159"),
    ],
)
def test_person_ids_of_the_open_data_files_tell_their_register(
    value: str, kind: PersonIdKind, number: str
) -> None:
    person = PersonId.parse(value)
    assert person.kind is kind
    assert str(person.identifier) == number
    assert str(person) == value and person.warnings == ()
    if kind is PersonIdKind.RPPS:
        assert person.rpps == Rpps(number) and person.adeli is None
    else:
        assert person.adeli == Adeli(number) and person.rpps is None
    assert is_person_id(value)


def test_person_id_carries_the_warning_of_an_ans_example_rpps() -> None:
    person = PersonId.parse("801234567866")  # ANS CDA example author (formats.md §1.9)
    assert person.kind is PersonIdKind.RPPS
    assert person.warnings == Rpps("01234567866").warnings != ()


def test_person_id_of_builds_the_national_id() -> None:
    assert PersonId.of(Rpps("10100271385")) == PersonId("810100271385")
    assert PersonId.of(Adeli("2A1234567")).value == "02A1234567"
    assert PersonId.parse("0 2a1234567").adeli == Adeli("2A1234567")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("910100271385", "unknown type digit '9'"),
        ("310100271385", "unknown type digit '3'"),
        ("81010027138", "RPPS after type digit 8: expected 11 characters"),
        ("00ALTAMAR01", "ADELI after type digit 0: expected 9 characters"),
        ("0012600631X", "ADELI after type digit 0: expected 9 characters"),
    ],
)
def test_invalid_person_ids_are_refused_with_the_reason(value: str, reason: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        PersonId.parse(value)
    assert caught.value.kind is IdentifierKind.PERSON_ID
    assert reason in caught.value.reason
    assert not is_person_id(value)


# --- FINESS ----------------------------------------------------------------------------------------------

# Real FINESS numbers: the Annuaire Santé sample rows (formats.md §1.3) and FINESS open-data examples.
REAL_FINESS = ["250000700", "250000452", "010003820", "010003812", "350000741", "080010101"]


@pytest.mark.parametrize("value", REAL_FINESS)
def test_real_finess_parse(value: str) -> None:
    finess = Finess.parse(value)
    assert str(finess) == value and finess.warnings == ()
    assert finess.department == value[:2]
    assert finess.national_id == "1" + value
    assert is_finess(value)


def test_finess_parse_accepts_the_published_spaced_form() -> None:
    assert Finess.parse("25 000 070 0") == Finess("250000700")  # "NN NNN NNN N" (ansforge/finess#22)


def test_finess_with_a_failing_key_is_refused() -> None:
    with pytest.raises(IdentifierError) as caught:
        Finess.parse("120459876")  # ANS CDA example organisation 1120459876 (formats.md §3.3)
    assert caught.value.kind is IdentifierKind.FINESS
    assert caught.value.reason == "key 6 fails the Luhn check (expected 0)"
    assert not is_finess("120459876")


def test_corsican_finess_key_is_checked_on_its_digit_form() -> None:
    body = "2A000001"
    key = luhn_complete("10" + body[2:])[-1]
    valid = Finess.parse((body + key).lower())
    assert valid.value == body + key and valid.department == "2A"
    assert valid.warnings == ()
    assert is_finess(valid.value)
    wrong = body + str((int(key) + 1) % 10)
    accepted = Finess.parse(wrong)
    assert len(accepted.warnings) == 1 and "unconfirmed" in accepted.warnings[0]
    assert not is_finess(wrong)


@pytest.mark.parametrize("value", ["25000070", "2500007000", "2C0000014", "25000070A", "A50000700"])
def test_finess_with_a_wrong_shape_are_refused(value: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        Finess.parse(value)
    assert "two digits or 2A/2B, then seven digits" in caught.value.reason


@given(st.text(alphabet=DIGITS, min_size=8, max_size=8))
def test_finess_parse_of_str_round_trips(prefix: str) -> None:
    finess = Finess.parse(luhn_complete(prefix))
    assert Finess.parse(str(finess)) == finess
    assert Finess.parse(f" {finess.value[:2]} {finess.value[2:5]} {finess.value[5:]} ") == finess


# --- SIREN and SIRET -------------------------------------------------------------------------------------

# Real SIRET numbers: the Annuaire Santé sample rows (formats.md §1.3) and INSEE's example 732 829 320 00074.
REAL_SIRET = ["49940088500020", "26250462400012", "85131528300016", "73282932000074"]


@pytest.mark.parametrize("value", REAL_SIRET)
def test_real_siret_parse(value: str) -> None:
    siret = Siret.parse(value)
    assert str(siret) == value and siret.warnings == ()
    assert siret.siren == Siren(value[:9]) and siret.nic == value[9:]
    assert siret.national_id == "3" + value
    assert is_siret(value) and is_siren(value[:9])


def test_siret_parse_accepts_the_spaced_form() -> None:
    assert Siret.parse("732 829 320 00074") == Siret("73282932000074")
    assert Siren.parse("732 829 320") == Siren("732829320")


def test_siret_and_siren_with_a_failing_key_are_refused() -> None:
    with pytest.raises(IdentifierError) as caught:
        Siret.parse("73282932000079")
    assert caught.value.kind is IdentifierKind.SIRET
    assert caught.value.reason == "key 9 fails the Luhn check (expected 4)"
    with pytest.raises(IdentifierError) as caught:
        Siren.parse("732829321")
    assert caught.value.kind is IdentifierKind.SIREN
    assert caught.value.reason == "key 1 fails the Luhn check (expected 0)"


def test_siret_whose_siren_fails_luhn_is_refused() -> None:
    siret = luhn_complete("1234567800001")  # passes Luhn over 14 digits, but SIREN 123456780 does not
    assert luhn_valid(siret) and not luhn_valid(siret[:9])
    with pytest.raises(IdentifierError, match="its SIREN 123456780 fails the Luhn check"):
        Siret.parse(siret)


def test_la_poste_siret_follow_the_digit_sum_rule() -> None:
    assert Siren.parse("356000000").value == "356000000"
    head_office = Siret.parse(LA_POSTE_HEAD_OFFICE_SIRET)  # Luhn; digit sum 26
    assert head_office.siren == Siren("356000000")
    # An establishment: digit sum 15, divisible by 5, while the Luhn check fails.
    assert not luhn_valid("35600000000001")
    assert Siret.parse("35600000000001").nic == "00001"
    with pytest.raises(IdentifierError) as caught:
        Siret.parse("35600000000002")
    assert caught.value.reason == "La Poste SIRET: digit sum 16 is not divisible by 5"
    # Luhn does not rescue a La Poste establishment whose digit sum is wrong.
    luhn_only = luhn_complete("3560000000012")
    assert luhn_valid(luhn_only) and sum(map(int, luhn_only)) % 5 != 0
    assert not is_siret(luhn_only)


@given(st.text(alphabet=DIGITS, min_size=8, max_size=8), st.text(alphabet=DIGITS, min_size=4, max_size=4))
def test_siret_parse_of_str_round_trips(siren_prefix: str, nic: str) -> None:
    siren = luhn_complete(siren_prefix)
    assume(siren != "356000000")
    siret = Siret.parse(luhn_complete(siren + nic))
    assert Siret.parse(str(siret)) == siret
    assert Siret.parse(f"{siret.value[:3]} {siret.value[3:6]} {siret.value[6:9]} {siret.nic}") == siret
    assert siret.siren == Siren.parse(siren)


@given(st.text(alphabet=DIGITS, min_size=5, max_size=5))
def test_la_poste_siret_validity_is_the_digit_sum_rule(nic: str) -> None:
    value = "356000000" + nic
    expected = value == LA_POSTE_HEAD_OFFICE_SIRET or sum(map(int, value)) % 5 == 0
    assert is_siret(value) is expected


# --- Structure national ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("1250000700", StructureIdKind.FINESS),
        ("349940088500020", StructureIdKind.SIRET),
        ("385131528300016", StructureIdKind.SIRET),
        ("075912415900", StructureIdKind.ADELI_CABINET),
        ("410005929293016", StructureIdKind.RPPS_CABINET),
        ("410100375103005", StructureIdKind.RPPS_CABINET),
    ],
)
def test_structure_ids_of_the_open_data_files_tell_their_register(
    value: str, kind: StructureIdKind
) -> None:
    structure = StructureId.parse(value)
    assert structure.kind is kind
    assert str(structure) == value and structure.warnings == ()
    assert str(structure.identifier) == value[1:]
    assert (structure.finess is not None) is (kind is StructureIdKind.FINESS)
    assert (structure.siret is not None) is (kind is StructureIdKind.SIRET)
    assert is_structure_id(value)


def test_structure_id_of_builds_the_national_id() -> None:
    assert StructureId.of(Finess("250000700")) == StructureId("1250000700")
    assert StructureId.of(Siret("49940088500020")).siret == Siret("49940088500020")


def test_structure_id_carries_the_warning_of_a_corsican_finess() -> None:
    body = "2B000001"
    wrong = body + str((int(luhn_complete("11" + body[2:])[-1]) + 1) % 10)
    structure = StructureId.parse("1" + wrong.lower())
    assert structure.finess == Finess(wrong)
    assert structure.warnings == Finess(wrong).warnings != ()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("1120459876", "FINESS after type digit 1: key 6 fails the Luhn check (expected 0)"),
        ("373282932000079", "SIRET after type digit 3: key 9 fails the Luhn check"),
        ("2732829320", "unknown type digit '2'"),  # SIREN is not an idNat_Struct
        ("5250000700", "unknown type digit '5'"),
        ("07591241590", "ADELI practice id after type digit 0 must be 11 characters"),
        ("0ABCDEFGHIJK", "ADELI practice id after type digit 0 must be 11 characters"),
        ("41000592929301", "RPPS practice id after type digit 4 must be 14 digits"),
        ("41000592929301X", "RPPS practice id after type digit 4 must be 14 digits"),
    ],
)
def test_invalid_structure_ids_are_refused_with_the_reason(value: str, reason: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        StructureId.parse(value)
    assert caught.value.kind is IdentifierKind.STRUCTURE_ID
    assert reason in caught.value.reason
    assert not is_structure_id(value)


def test_legacy_prefix_helpers_and_constants() -> None:
    assert person_national_id_from_rpps("10100271385") == PERSON_RPPS_PREFIX + "10100271385" == "810100271385"
    assert structure_national_id_from_finess("250000700") == STRUCTURE_FINESS_PREFIX + "250000700"
    assert (PERSON_ADELI_PREFIX, STRUCTURE_SIRET_PREFIX) == ("0", "3")
    assert (OID_PERSON_ID, OID_STRUCTURE_ID) == ("1.2.250.1.71.4.2.1", "1.2.250.1.71.4.2.2")
    assert {kind.value for kind in PrincipalKind} == {"person", "organisation"}


# --- INS -------------------------------------------------------------------------------------------------

# Valid INS values of ANS examples: REFERENCE.md §3 and the patient address of the ANS HL7 IG.
ANS_VALID_INS = [("279035121518989", "F"), ("277076322082910", "F"), ("146026322000196", "M")]
# INS values of ANS CDA examples whose key is wrong (formats.md §2).
ANS_WRONG_KEY_INS = [
    "223042545611404",
    "221042545611404",
    "276059205062865",
    "224027511583555",
    "222127505611201",
]


@pytest.mark.parametrize(("value", "sex"), ANS_VALID_INS)
def test_ans_test_ins_values_parse(value: str, sex: str) -> None:
    ins = Ins.parse(value)
    assert ins.value == value
    assert ins.kind is InsKind.NIR and ins.sex == sex
    assert ins.warnings == ()
    assert nir_key(value[:13]) == value[13:]
    assert is_ins(value)


@pytest.mark.parametrize("value", ANS_WRONG_KEY_INS)
def test_ins_with_a_wrong_key_is_refused_without_revealing_it(value: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        Ins.parse(value)
    error = caught.value
    assert error.kind is IdentifierKind.INS
    assert error.reason == "key does not match the first 13 characters"
    assert error.value == mask_ins(value) == value[0] + "*" * 12 + value[-2:]
    for rendering in (str(error), repr(error), repr(error.args), repr(pickle.loads(pickle.dumps(error)))):
        assert value not in rendering and value[:13] not in rendering and value[1:13] not in rendering
    assert not is_ins(value)


def test_ins_is_masked_in_str_and_repr() -> None:
    ins = Ins.parse("279035121518989")
    assert str(ins) == ins.masked == "2************89"
    assert f"{ins}" == "2************89"
    assert repr(ins) == "Ins('2************89', kind=NIR)"
    assert "279035121518989" not in repr([ins]) + str({"ins": ins})


def test_ins_parse_strips_whitespace() -> None:
    assert Ins.parse(" 2 79 03 51 215 189 89 ") == Ins("279035121518989")


def test_ins_of_sixteen_characters_is_refused() -> None:
    # The ANS HL7 example's patient address has one extra digit (formats.md §2).
    with pytest.raises(IdentifierError) as caught:
        Ins.parse("2770763220829106")
    assert caught.value.reason == "expected 15 characters (13 + 2-digit key), got 16"
    assert "2770763220829106" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("27903512151898", "expected 15 characters (13 + 2-digit key), got 14"),
        ("27903512151898X", "expected digits only, except 2A/2B (Corsica) at positions 6-7"),
        ("279035121A18989", "expected digits only, except 2A/2B (Corsica) at positions 6-7"),
        ("253072C07300443", "expected digits only, except 2A/2B (Corsica) at positions 6-7"),
        ("379035121518989", "first character (sex) 3 is not 1 or 2 (NIR) nor 7 or 8"),
        ("479035121518989", "first character (sex) 4 is not 1 or 2 (NIR) nor 7 or 8"),
        ("079035121518989", "first character (sex) 0 is not 1 or 2 (NIR) nor 7 or 8"),
        ("279035121518900", "key out of range 01-97"),
        ("279035121518998", "key out of range 01-97"),
    ],
)
def test_malformed_ins_are_refused_with_the_reason(value: str, reason: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        Ins.parse(value)
    assert reason in caught.value.reason
    assert value not in str(caught.value)


def test_corsica_departments_count_as_19_and_18_in_the_key() -> None:
    # python-stdnum: 2B -> 18 and 2A -> 19 at positions 6-7, not 20 nor 0 nor a replacement elsewhere.
    assert nir_key("253072B073004") == nir_key("2530718073004") == "70"
    assert nir_key("253072A073004") == nir_key("2530719073004") == "43"
    assert nir_key("253072B073004") != f"{97 - 2530720073004 % 97:02d}"
    assert Ins.parse("253072b07300470").value == "253072B07300470"
    with pytest.raises(IdentifierError):
        Ins.parse("253072B07300443")  # the 2A key on the 2B number


def test_nir_key_refuses_a_malformed_body_without_revealing_it() -> None:
    for body in ("253072C073004", "25307207300", "25307207300412", "2530720A73004"):
        with pytest.raises(IdentifierError) as caught:
            nir_key(body)
        assert body not in str(caught.value)
        assert caught.value.kind is IdentifierKind.INS


def _stdnum_nir_cases() -> list[tuple[str, str | None]]:
    """(input, canonical value or None when invalid) from the python-stdnum doctest fixture."""
    lines = (FIXTURES / "python-stdnum_fr_nir_doctest.txt").read_text(encoding="utf-8").splitlines()
    cases: list[tuple[str, str | None]] = []
    for index, line in enumerate(lines):
        call = re.fullmatch(r">>> (validate|format)\('([^']*)'\)(?:\s+#.*)?", line)
        if call is None:
            continue
        answer = lines[index + 1]
        if call.group(1) == "format":
            cases.append((answer.strip("'"), call.group(2)))
        elif answer.startswith("Traceback"):
            cases.append((call.group(2), None))
        else:
            cases.append((call.group(2), answer.strip("'")))
    return cases


def test_stdnum_fixture_yields_valid_and_invalid_cases() -> None:
    cases = _stdnum_nir_cases()
    assert len(cases) == 7
    assert sum(expected is None for _, expected in cases) == 3
    assert ("253072B07300470", "253072B07300470") in cases


@pytest.mark.parametrize(("text", "expected"), _stdnum_nir_cases())
def test_python_stdnum_nir_doctests_agree(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(IdentifierError):
            Ins.parse(text)
        assert not is_ins("".join(text.split()))
    else:
        assert Ins.parse(text).value == expected


def _nia(body: str) -> Ins:
    return Ins(body + nir_key(body))


def test_temporary_numbers_are_nia() -> None:
    male = _nia("7850399123456")
    female = _nia("8850399123456")
    assert (male.kind, male.sex) == (InsKind.NIA, "M")
    assert (female.kind, female.sex) == (InsKind.NIA, "F")
    assert ins_oid(male) == OID_INS_NIA


def test_ins_oid_tells_which_authority_applies() -> None:
    nir = Ins.parse("279035121518989")
    nia = _nia("8850399123456")
    assert ins_oid(nir) == OID_INS_NIR == "1.2.250.1.213.1.4.8"
    assert ins_oid(nia) == OID_INS_NIA == "1.2.250.1.213.1.4.9"
    assert ins_oid(nir, InsUsage.TEST) == ins_oid(nia, InsUsage.TEST) == OID_INS_NIR_TEST
    assert OID_INS_NIR_TEST == "1.2.250.1.213.1.4.10"
    assert ins_oid(nir, InsUsage.DEMO) == OID_INS_NIR_DEMO == "1.2.250.1.213.1.4.11"


@pytest.mark.parametrize(
    ("oid", "meaning"),
    [
        ("1.2.250.1.213.1.4.8", (InsKind.NIR, InsUsage.PRODUCTION)),
        ("urn:oid:1.2.250.1.213.1.4.9", (InsKind.NIA, InsUsage.PRODUCTION)),
        (" URN:OID:1.2.250.1.213.1.4.10 ", (InsKind.NIR, InsUsage.TEST)),
        ("1.2.250.1.213.1.4.11", (InsKind.NIR, InsUsage.DEMO)),
        ("1.2.250.1.213.1.4.1", None),
        ("1.2.250.1.71.4.2.1", None),
        ("", None),
    ],
)
def test_describe_ins_oid(oid: str, meaning: tuple[InsKind, InsUsage] | None) -> None:
    assert describe_ins_oid(oid) == meaning


def test_mask_ins_hides_short_texts_entirely() -> None:
    assert mask_ins("") == ""
    assert mask_ins("12345") == "*****"
    assert mask_ins("123456") == "1***56"


def test_identifier_error_is_a_value_error_that_survives_pickling() -> None:
    with pytest.raises(ValueError) as caught:
        Siret.parse("73282932000079")
    error = caught.value
    assert isinstance(error, IdentifierError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.value, copy.reason) == (error.kind, error.value, error.reason)
    assert str(copy) == str(error)


def test_error_messages_quote_and_bound_the_value() -> None:
    with pytest.raises(IdentifierError) as caught:
        Rpps.parse("1\x1b[31m" + "9" * 100)
    message = str(caught.value)
    assert "\x1b" not in message and "\\x1b" in message
    assert len(message) < 150


_SEX_DIGITS = st.sampled_from("1278")
_DEPARTMENTS = st.one_of(st.text(alphabet=DIGITS, min_size=2, max_size=2), st.sampled_from(["2A", "2B"]))


@st.composite
def _nir_bodies(draw: st.DrawFn) -> str:
    return (
        draw(_SEX_DIGITS)
        + draw(st.text(alphabet=DIGITS, min_size=4, max_size=4))
        + draw(_DEPARTMENTS)
        + draw(st.text(alphabet=DIGITS, min_size=6, max_size=6))
    )


@given(_nir_bodies())
def test_nir_key_validates_and_detects_substitutions_and_transpositions(body: str) -> None:
    value = body + nir_key(body)
    ins = Ins.parse(value)
    assert ins.value == value and is_ins(value)
    assert Ins.parse(" ".join(value.lower())) == ins
    for position, original in enumerate(value):
        if not original.isdigit():
            continue
        for digit in DIGITS:
            if digit != original:
                assert not is_ins(value[:position] + digit + value[position + 1 :])
    for position in range(len(value) - 1):
        first, second = value[position], value[position + 1]
        if first.isdigit() and second.isdigit() and first != second:
            swapped = value[:position] + second + first + value[position + 2 :]
            assert not is_ins(swapped)


# --- Names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("Hélène", "HELENE"),
        ("Jean-Pierre", "JEAN PIERRE"),
        ("D'Artagnan", "d’artagnan"),
        ("L’Haÿ-les-Roses", "L'HAY LES ROSES"),
        ("BRICE'HENRY'ALAIN", "Brice Henry Alain"),  # first names in the RPPS files (formats.md §1.6)
        ("Cœur", "COEUR"),
        ("Lætitia", "LAETITIA"),
        ("Straße", "STRASSE"),
        ("  Marie \t  Claire\u00a0 ", "marie claire"),
        ("Jean\u2013Marc", "jean-marc"),
        ("Ｅｍｉｌｅ", "emile"),  # full-width letters
    ],
)
def test_normalise_name_matches_spellings_of_the_same_name(one: str, other: str) -> None:
    assert normalise_name(one) == normalise_name(other)


def test_normalise_name_output() -> None:
    assert normalise_name("  Hélène  DUPONT-Aïssa ") == "helene dupont aissa"
    assert normalise_name("BRICE'HENRY'ALAIN") == "brice henry alain"
    assert normalise_name("Œuvre") == "oeuvre"
    assert normalise_name("- ' -") == ""
    assert normalise_name("Hélène") != normalise_name("Helena")


@given(st.text())
def test_normalise_name_is_idempotent(text: str) -> None:
    once = normalise_name(text)
    assert normalise_name(once) == once
    assert once == once.strip() and "  " not in once


_FRENCH_LETTERS = "abcdefghijklmnopqrstuvwxyzàâäçéèêëîïôöùûüÿ"
_PLAIN = str.maketrans("àâäçéèêëîïôöùûüÿ", "aaaceeeeiioouuuy")


@given(st.text(alphabet=_FRENCH_LETTERS + " -'’", max_size=40))
def test_normalise_name_ignores_accents_and_case(text: str) -> None:
    expected = normalise_name(text)
    assert normalise_name(text.upper()) == expected
    assert normalise_name(text.translate(_PLAIN)) == expected
    assert normalise_name(text.translate(_PLAIN).upper().replace("-", " ")) == expected
