"""Differential tests: what our writer prints, real SBCL reads back as the same data."""

from hypothesis import HealthCheck, given, settings

from notifier import sexp
from tests.test_sexp import ENVELOPES, METRICS, nested_data, python_equal

# SBCL 2.2.9 truncates subnormal doubles when it reads them (2.225073858507203d-309 comes
# back as 2.2250738585071984d-309); the writer prints digits that read back exactly, so
# the differential data has subnormals too.
any_nested = nested_data()


def sbcl_round_trip(sbcl, value):
    return sexp.loads(sbcl.echo(sexp.dumps(value)))


def test_tricky_values_survive_sbcl(sbcl):
    values = [
        {"quote": 'say "hi"', "backslash": "C:\\temp\\", "newline": "a\nb\r\n",
         "japanese": "日次レポート", "emoji": "👨‍👩‍👧 🇯🇵", "empty": ""},
        {"tenth": 0.1, "big": 1e39, "tiny": 5e-324, "neg_zero": -0.0, "max": 1.7976931348623157e308,
         "subnormal": 2.225073858507203e-309, "subnormal_neg": -2.2250738585e-313,
         "third": 1 / 3, "int_float": 100.0},
        {"bignum": 2**200, "neg": -(2**70), "zero": 0},
        {"With Space": 1, "camelCase": 2, "": 3, "1x": 4, "nil": 5, "t": 6, "a|b": 7,
         "back\\slash": 8, "dot.ted": 9, "日本": 10, "straße": 11},
        {"flag": True, "none": None, "nested": {"list": [1, [2, [3, {"k": "v"}]]]}},
    ]
    for value in values:
        assert python_equal(sbcl_round_trip(sbcl, value), value), value


@given(any_nested)
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_anything_the_writer_prints_sbcl_reads_back_the_same(sbcl, value):
    assert python_equal(sbcl_round_trip(sbcl, value), value)


def test_what_sbcl_prints_of_the_fixtures_reads_as_the_fixture(sbcl):
    for case in ENVELOPES:
        assert sexp.read(sbcl.echo(case["wire"])) == sexp.read(case["wire"]), case["name"]
    for path in METRICS:
        text = (path / "system_metrics.sexp").read_text(encoding="utf-8")
        assert sexp.read(sbcl.echo(text)) == sexp.read(text)
        assert sbcl.echo(text) == text, "SBCL prints the metrics files exactly as stored"


def test_sbcl_base_strings_read_as_strings(sbcl):
    printed = sbcl.echo('((action . #A((4) base-char . "SEND")))')
    assert "#A((4) base-char" in printed
    assert sexp.loads(printed) == {"action": "SEND"}
