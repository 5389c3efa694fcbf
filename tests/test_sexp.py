"""The S-expression reader and writer against real SBCL output, properties and hostile input."""

import json
import re
import math
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from notifier import sbcl_tokens, sexp
from notifier.sexp import Alist, DottedList, SexpError, Symbol

# A copy of ../shared/fixtures/lisp (real SBCL output), kept here so a bare clone tests.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lisp"
ENVELOPES = json.loads((FIXTURES / "envelopes.json").read_text(encoding="utf-8"))
METRICS = sorted((FIXTURES / "metrics").iterdir())


def as_expect(value):
    """Describe a Lisp-view datum in the fixtures' `expect` notation (symbols as objects)."""
    if isinstance(value, Symbol):
        return {"symbol": value}
    if isinstance(value, (list, DottedList)):
        entries = sexp.alist_entries(value)
        if entries is not None:
            return {"alist": [[key, as_expect(val)] for key, val in entries]}
        assert isinstance(value, list), f"no expect form for {value!r}"
        return [as_expect(item) for item in value]
    return value


def expected(value):
    """The fixture's `expect`, with each printed symbol token read back as a Symbol."""
    if isinstance(value, dict) and set(value) == {"symbol"}:
        return {"symbol": sexp.read(value["symbol"])}
    if isinstance(value, dict) and set(value) == {"alist"}:
        return {"alist": [[sexp.read(key), expected(val)] for key, val in value["alist"]]}
    if isinstance(value, list):
        return [expected(item) for item in value]
    return value


@pytest.mark.parametrize("case", ENVELOPES, ids=[c["name"] for c in ENVELOPES])
def test_sbcl_printed_envelopes_read_as_expected(case):
    got = as_expect(sexp.read(case["wire"]))
    assert got == expected(case["expect"])
    assert json.dumps(got, default=repr) == json.dumps(expected(case["expect"]), default=repr)


@pytest.mark.parametrize("case", ENVELOPES, ids=[c["name"] for c in ENVELOPES])
def test_sbcl_printed_envelopes_read_from_utf8_bytes(case):
    assert sexp.read(case["wire"].encode("utf-8")) == sexp.read(case["wire"])


def test_float_types_are_exact():
    floats = {case["name"]: case for case in ENVELOPES}["single_floats"]
    value = sexp.loads(floats["wire"])
    assert value["tiny_heap_mb"] == 9.536743e-7
    assert math.copysign(1.0, value["neg_zero"]) == -1.0
    assert sexp.read("1.0E3") == sexp.read("1.0s3") == sexp.read("1.0f3") == 1000.0
    assert sexp.read("1.5L0") == sexp.read("15d-1") == 1.5
    assert sexp.read(".5") == 0.5 and sexp.read("-1.") == -1


@pytest.mark.parametrize("path", METRICS, ids=[p.name for p in METRICS])
def test_lisp_system_metrics_files_read_with_plain_key_lookup(path):
    text = (path / "system_metrics.sexp").read_text(encoding="utf-8")
    expect = json.loads((path / "expect.json").read_text(encoding="utf-8"))["expect"]
    assert as_expect(sexp.read(text)) == expected(expect)
    metrics = sexp.loads(text)
    by_token = dict(expect["alist"])
    assert metrics["timestamp"] == by_token["swimmy.school::timestamp"] == 3913056000
    assert metrics["heap_used_mb"] == by_token["swimmy.school::heap_used_mb"]
    assert metrics.get("HEAP-USED-MB") == metrics["swimmy.school::heap_used_mb"]
    assert ":schema-version" in metrics and "missing" not in metrics


def test_alist_view_follows_the_cdr_rule():
    value = sexp.loads('((payload (embeds ((title . "x") (color . 1)))) (tags "a") (none)'
                       ' (flag . t) (pair 1 . 2))')
    assert value == {"payload": {"embeds": [{"title": "x", "color": 1}]},
                     "tags": ["a"], "none": None, "flag": True,
                     "pair": DottedList([1], 2)}
    assert isinstance(value, Alist) and isinstance(value["payload"], Alist)
    assert list(value) == ["payload", "tags", "none", "flag", "pair"]


def test_alist_lookup_ignores_package_case_colon_and_dash():
    value = sexp.loads("((swimmy.core::Schema-Version . 1) (:ACTION . 2) (|camelCase| . 3))")
    assert list(value) == ["schema-version", "action", "camelCase"]
    for key in ("schema_version", "schema-version", ":schema-version", "SCHEMA_VERSION",
                "pkg::schema-version"):
        assert value[key] == 1
    assert value["action"] == 2 and value["camelcase"] == 3


def test_first_of_duplicate_keys_wins_like_assoc():
    assert sexp.loads("((a . 1) (A . 2) (:a . 3))") == {"a": 1}


def test_symbols_keywords_bars_and_packages():
    assert sexp.read("foo") == Symbol("FOO")
    assert sexp.read(":foo") == Symbol("FOO", "KEYWORD")
    assert sexp.read("pkg:foo") == sexp.read("PKG::FOO") == Symbol("FOO", "PKG")
    assert sexp.read("|camelCase|") == Symbol("camelCase")
    assert sexp.read("|FOO\\|BAR|") == Symbol("FOO|BAR")
    assert sexp.read("||") == Symbol("")
    assert sexp.read("a\\bc") == Symbol("AbC")
    assert sexp.read("|nil|") == Symbol("nil") and sexp.read("NIL") is None
    assert sexp.read("()") is None and sexp.read("T") is True
    assert sexp.read("#t") is True and sexp.read("#F") is False
    assert sexp.read("1/3") == Fraction(1, 3) and sexp.read("-1/2") == Fraction(-1, 2)
    assert sexp.read("1+") == Symbol("1+")


def test_base_strings_comments_and_bom():
    assert sexp.read('#A((4) base-char . "SEND")') == "SEND"
    assert sexp.read("\ufeff; a comment\n(a ; inside\n b)") == [Symbol("A"), Symbol("B")]
    with pytest.raises(SexpError, match="base strings"):
        sexp.read('#A((5) base-char . "SEND")')


def test_strings_unescape_any_character_and_keep_raw_newlines():
    assert sexp.read('"a\\nb"') == "anb"
    assert sexp.read('"line1\nline2\\\\ \\"q\\""') == 'line1\nline2\\ "q"'


@pytest.mark.parametrize("text, line, column, reason", [
    ("(a (b)", 1, 1, "never closed"),
    ("(a))", 1, 4, "unbalanced ')'"),
    ('(a . "x', 1, 6, "unterminated string"),
    ("(a |bc)", 1, 4, "unterminated |symbol|"),
    ("(a\n #.(run-program \"rm\"))", 2, 2, "read-time evaluation"),
    ("#(1 2)", 1, 1, "unsupported '#('"),
    ("(#\\a)", 1, 2, "unsupported '#\\'"),
    ("#:foo", 1, 1, "unsupported '#:'"),
    ("(a) (b)", 1, 5, "text after the datum"),
    ("(a) b", 1, 5, "text after the datum"),
    ("(a . b c)", 1, 8, "more than one datum after the dot"),
    ("(. a)", 1, 2, "misplaced dot"),
    ("(a .)", 1, 5, "nothing after the dot"),
    ("..", 1, 1, "only dots"),
    ("'a", 1, 1, "not data"),
    ("1/0", 1, 1, "divides by zero"),
    ("1d400", 1, 1, "out of range"),
    ("a:b:c", 1, 1, "bad package marker"),
    ("#A abc", 1, 1, "unsupported '#A'"),
    ("", 0, 0, "empty"),
    ("  ; only a comment", 0, 0, "empty"),
])
def test_bad_input_is_one_error_type_with_position(text, line, column, reason):
    with pytest.raises(SexpError, match=re.escape(reason)) as error:
        sexp.read(text)
    assert (error.value.line, error.value.column) == (line, column)


def test_invalid_utf8_reports_the_byte_position():
    with pytest.raises(SexpError, match="invalid UTF-8") as error:
        sexp.read(b'((a . "ok")\n (b . "\xc3\x28"))')
    assert (error.value.line, error.value.column) == (2, 8)


HOSTILE = {
    "deep_nesting": "(" * 100_000 + ")" * 100_000,
    "ten_megabyte_string": '"' + "x" * 10_000_000 + '"',
    "read_eval": '((type . "NOTIFIER") (x . #.(sb-ext:run-program "/bin/sh" nil)))',
    "unterminated_string": '((type . "NOTIFIER") (x . "' + "y" * 500_000,
    "invalid_utf8": b'((type . "\xff\xfe"))',
    "trailing_text": '((type . "NOTIFIER")) (extra)',
    "huge_integer": "1" * 100_000,
    "many_backslashes": '"' + "\\" * 500_001,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_is_rejected_quickly_with_the_readers_error(name):
    started = time.monotonic()
    with pytest.raises(SexpError):
        sexp.read(HOSTILE[name])
    # A generous bound, only to catch quadratic or runaway behaviour, not a benchmark.
    assert time.monotonic() - started < 1.0


def test_limits_are_parameters():
    assert sexp.read("((((a))))", max_depth=4) == [[[[Symbol("A")]]]]
    with pytest.raises(SexpError, match="deeper than 3"):
        sexp.read("((((a))))", max_depth=3)
    with pytest.raises(SexpError, match="over the 8 limit"):
        sexp.read(b'"123456789"', max_bytes=8)


SEXP_ALPHABET = st.sampled_from('()"\\|#.:; \n\'abt01-+/dA')


@given(st.text(max_size=300) | st.binary(max_size=300) | st.text(SEXP_ALPHABET, max_size=60))
@settings(max_examples=1200)
def test_reader_raises_only_its_own_error_on_any_input(data):
    """Arbitrary text, arbitrary bytes, and noise made of S-expression syntax."""
    try:
        sexp.loads(data)
    except SexpError:
        pass


# ----------------------------------------------------------------------------- writer

def key_strategy():
    """Keys that Lisp keeps apart: a name without lowercase letters (as SBCL's
    `char-upcase` sees them: ``Aß`` has none) is read back lowercased (Lisp upcases plain
    names), so such keys are left out."""
    return st.text(min_size=0, max_size=12).filter(lambda k: sbcl_tokens.printed_case(k) == k)


def nested_data():
    """Nested dicts and lists of what the writer prints and the reader gives back."""
    scalars = (st.none() | st.just(True) | st.integers() | st.text(max_size=40)
               | st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, min_size=1, max_size=5)
            | st.dictionaries(key_strategy(), children, min_size=1, max_size=5)
            .filter(lambda d: len({sexp.normalize_key(k) for k in d}) == len(d))),
        max_leaves=25)


def python_equal(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(python_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(python_equal, a, b))
    return type(a) is type(b) and a == b


@given(nested_data())
@settings(max_examples=400)
def test_write_then_read_gives_the_data_back(value):
    text = sexp.dumps(value)
    assert python_equal(sexp.loads(text), value), text


def test_writer_prints_what_lisp_reads():
    assert sexp.dumps({"schema_version": 1, "ratio": 0.1, "big": 1e39, "ok": True,
                       "off": False, "none": None, "s": 'say "hi" \\ \n日本'}) == (
        '((schema_version . 1) (ratio . 0.1d0) (big . 1.0d39) (ok . t) (off . nil)'
        ' (none . nil) (s . "say \\"hi\\" \\\\ \n日本"))')
    assert sexp.dumps({"WITH SPACE": 1, "camelCase": 2, "": 3, "1x": 4, "nil": 5}) == (
        "((|WITH SPACE| . 1) (|camelCase| . 2) (|| . 3) (|1x| . 4) (|nil| . 5))")
    assert sexp.dumps([Symbol("TIMESTAMP", "SWIMMY.SCHOOL"), Symbol("FOO", "KEYWORD"),
                       Symbol("a|b"), Fraction(-1, 3), DottedList([1, 2], 3)]) == (
        "(swimmy.school::timestamp :foo |a\\|b| -1/3 (1 2 . 3))")
    assert sexp.dumps([]) == sexp.dumps({}) == "nil"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, object(), {1: 2}])
def test_writer_refuses_what_lisp_cannot_read_back(bad):
    with pytest.raises(SexpError):
        sexp.dumps({"x": bad})


def test_read_entries_keeps_each_entry_as_printed():
    text = (METRICS[0] / "system_metrics.sexp").read_text(encoding="utf-8")
    entries = sexp.read_entries(text)
    assert "(" + " ".join(e.source for e in entries) + ")" == text
    assert [e.key.text for e in entries][:2] == ["schema_version", "timestamp"]
    assert entries[1].value == 3913056000
    assert sexp.read_entries("nil") == []
    with pytest.raises(SexpError, match="not an alist"):
        sexp.read_entries("(1 2)")


# --------------------------------------------------------------- fast paths = general reader

def general_alist(text):
    return sexp.alist_entries(sexp.read(text))


@pytest.mark.parametrize("case", ENVELOPES, ids=[c["name"] for c in ENVELOPES])
def test_read_alist_agrees_with_the_general_reader_on_sbcl_output(case):
    assert sexp.read_alist(case["wire"]) == general_alist(case["wire"])


flat_values = (st.text(max_size=30) | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
               | st.none() | st.just(True))


@given(st.lists(st.tuples(key_strategy().filter(bool), flat_values), min_size=1, max_size=6),
       st.sampled_from([" ", "\n", "  \t"]))
@settings(max_examples=300)
def test_read_alist_agrees_with_the_general_reader_on_flat_alists(entries, space):
    text = space + "(" + space.join(
        f"({sexp._key_token(k)}{space}.{space}{sexp.dumps(v)})" for k, v in entries) + ")"
    assert sexp.read_alist(text) == general_alist(text)


@given(st.text(SEXP_ALPHABET, max_size=60).map(lambda s: "((a . " + s))
@settings(max_examples=400)
def test_read_alist_fails_like_the_general_reader(text):
    try:
        expected = general_alist(text)
    except SexpError as error:
        with pytest.raises(SexpError) as fast_error:
            sexp.read_alist(text)
        assert str(fast_error.value) == str(error)
    else:
        assert sexp.read_alist(text) == expected


@given(st.text(st.sampled_from('ab"\\\n\0'), max_size=30))
@settings(max_examples=400)
def test_string_unescaping_fast_path_matches_the_general_rule(raw):
    body = sexp.dumps(raw)[1:-1] + "".join("\\" + c for c in raw[:3])
    assert sexp._unescape(body) == "".join(sexp._ESCAPED.split(body))
