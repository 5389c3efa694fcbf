"""Differential: the reader reads every token of the fixture's shapes as SBCL does.

tests/fixtures/lisp/sbcl_tokens.txt.xz is SBCL 2.2.9's own reading of 1,622,016 tokens:
the 8 shapes of `tests.sbcl.SHAPES` with each code point below U+32000 (surrogates
excepted) in place of X (see `tests.sbcl` for the line format). It is made by
scripts/gen_sbcl_tokens.py; when SBCL is installed, a test has it make the fixture again
and compares, so the committed file is SBCL's reading, not a record of ours.
"""

import functools
import lzma
from fractions import Fraction
from itertools import islice

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from notifier import envelope, sexp
from notifier.sexp import Symbol
from tests import sbcl
from tests.test_sexp import FIXTURES

FIXTURE = FIXTURES / "sbcl_tokens.txt.xz"

REFUSED_ON_PURPOSE = {"'1", "`1"}
"""The fixture's tokens SBCL reads and we refuse by design (`sbcl.refused_on_purpose`)."""

BATCH = 2000


def fixture_text() -> str:
    return lzma.decompress(FIXTURE.read_bytes()).decode("utf-8")


def fixture_lines(text: str):
    """(shape, code point, SBCL's line with names relative to the code point)."""
    shape, codes = None, None
    for row in text.splitlines():
        if row.startswith("@ "):
            if codes is not None:
                assert next(codes, None) is None, f"shape {shape}: too few code points"
            shape, codes = row[2:], sbcl.code_points()
            continue
        count, line = row.split(" ", 1)
        for code in islice(codes, int(count)):
            yield shape, code, line
    assert next(codes, None) is None, f"shape {shape}: too few code points"


def read_tokens(tokens: list[str]) -> list:
    """Our datum (or "E") for each token. Tokens that can only be one atom each are read
    as one list, which is many times faster; any error sends the batch one by one."""
    try:
        values = sexp.read("(" + " ".join(tokens) + ")", written_floats=True)
        if values is not None and len(values) == len(tokens):
            return values
    except sexp.SexpError:
        pass
    return [sbcl.read_or_error(token) for token in tokens]


@functools.lru_cache(maxsize=None)
def plain_symbol(line: str):
    """For SBCL's line of an unqualified symbol, the parts of its name (a character, or
    an offset from X); else None. Lets the common case skip `sbcl.describe`."""
    if not line.startswith("Y - "):
        return None
    parts = []
    for item in line[4:].split(","):
        if item.startswith("x"):
            parts.append(int(item[1:] or "0", 16))
        else:
            parts.append(chr(int(item, 16)))
    return parts


def agrees(value, code: int, line: str) -> bool:
    parts = plain_symbol(line)
    if parts is not None and type(value) is sexp.Symbol and value.package is None:
        name = "".join(part if type(part) is str else chr(code + part) for part in parts)
        if value.name == name:
            return True
    return ("E" if value == "E" else sbcl.describe(value, code)) == line


def differences(lines) -> tuple[int, list, set]:
    """Compare our reading of each fixture token with SBCL's line: (tokens, differences,
    tokens refused on purpose)."""
    checked, wrong, refused, batch = 0, [], set(), []

    def compare(items, values):
        nonlocal checked
        checked += len(items)
        for (token, code, line), value in zip(items, values, strict=True):
            if not agrees(value, code, line):
                ours = "E" if value == "E" else sbcl.describe(value, code)
                if sbcl.refused_on_purpose(token, ours, line):
                    refused.add(token)
                else:
                    wrong.append((token, f"U+{code:04X}", ours, line))

    for shape, code, line in lines:
        item = (shape.replace("X", chr(code)), code, line)
        if code < 128:  # perhaps a delimiter, a macro character or whitespace: alone
            compare([item], [sbcl.read_or_error(item[0])])
            continue
        batch.append(item)
        if len(batch) == BATCH:
            compare(batch, read_tokens([token for token, _, _ in batch]))
            batch = []
    compare(batch, read_tokens([token for token, _, _ in batch]))
    return checked, wrong, refused


def test_the_reader_reads_every_token_of_the_fixture_as_sbcl_does():
    checked, wrong, refused = differences(fixture_lines(fixture_text()))
    assert checked == len(sbcl.SHAPES) * sum(1 for _ in sbcl.code_points()) == 1_622_016
    assert not wrong, f"{len(wrong)} tokens read differently, first ones: {wrong[:20]}"
    assert refused == REFUSED_ON_PURPOSE


def test_sbcl_reads_the_fixture_tokens_as_the_fixture_says():
    executable = sbcl.find_sbcl()
    if executable is None:
        pytest.skip("sbcl is not installed (apt-get install sbcl)")
    assert sbcl.sbcl_fixture(executable) == fixture_text(), \
        "SBCL reads the tokens otherwise: run scripts/gen_sbcl_tokens.py"


# ----------------------------------------------------------------- the cases

ALLOWED = (("127.0.0.1", None),)
WEBHOOK = "http://127.0.0.1:9/api/webhooks/1/tok"


CASES = [
    ("ı", Symbol("ı")), ("ς", Symbol("ς")), ("ა", Symbol("ა")),  # no one-to-one upper case
    ("σ", Symbol("Σ")), ("ß", Symbol("ß")),
    ("ﬁ", Symbol("FI")), ("ǆ", Symbol("DŽ")), ("a\u0301", Symbol("Á")),  # NFKC, then upcase
    ("a\\b", Symbol("Ab")), ("|ı|", Symbol("ı")), ("|NIL|", None), ("cl:t", True),
    ("::a", Symbol("A", "KEYWORD")), ("a\x0bb", Symbol("A\x0bB")),  # VT is no whitespace
    ("+.:a", Symbol("+.:A")), ("-.::a", Symbol("A", "-.:")),       # no marker after "+."
    ("gc", Symbol("GC")), ("sb-ext:gc", Symbol("GC", "SB-EXT")),    # no package resolution
    ("a||\u0301", Symbol("Á")),  # NFKC goes on across empty bars (found by fuzz.py sbcl)
    ("u|||\x7f|r||||||\u0301||||s", Symbol("U\x7fŔS")),
    ("٣", 3), ("٣1", 31), ("1٣", 13), ("+٣", 3), ("٣.", 3), ("٣.5", 3.5),
    ("1.٥", Symbol("1.٥")), (".٥", Symbol(".٥")), ("1e٥", Symbol("1E٥")),
    ("1𐴳", Symbol("1𐴳")), ("+𐴳", Symbol("+𐴳")),                 # Unicode 11: not in SBCL's
    ("1/١", 1), ("4/2", 2), ("-6/4", Fraction(-3, 2)), ("1/2/3", Symbol("1/2/3")),
    ("1r5", 100000), ("1.5r0", Fraction(3, 2)), ("1.e5", 100000.0),
    ("117.73757", 117.73757), ("1e-45", 0.0), ("1.4012985e-45", 1.4012985e-45),
    ("2.225073858507203d-309", 2.2250738585071984e-309),          # SBCL truncates subnormals
]
REFUSED = ["1/0", "1/٠", "1e39", "1d309", "..", "a:", "a:b:c", "a\x08b", "a\x7fb", ":"]


@pytest.mark.parametrize("token, value", CASES)
def test_tokens_read_as_sbcl_reads_them(token, value):
    got = sexp.read(token)
    assert type(got) is type(value) and got == value, got


@pytest.mark.parametrize("token", REFUSED)
def test_tokens_sbcl_refuses_are_refused(token):
    with pytest.raises(sexp.SexpError):
        sexp.read(token)


def envelope_with_payload(payload: str) -> bytes:
    return (f'((type . "NOTIFIER") (schema_version . 1) (action . "SEND") '
            f'(webhook . "{WEBHOOK}") (payload {payload}))').encode("utf-8")


def test_a_payload_key_is_posted_as_sbcl_holds_it():
    message = envelope.parse(envelope_with_payload('(content . "x") (ς . "y") (ı . "z")'),
                             ALLOWED)
    assert message.payload == {"content": "x", "ς": "y", "ı": "z"}


def test_a_value_sbcl_reads_as_a_symbol_is_refused_not_posted_as_a_number():
    with pytest.raises(envelope.EnvelopeError, match="color is a symbol"):
        envelope.parse(envelope_with_payload('(embeds ((title . "t") (color . 1.٥)))'),
                       ALLOWED)
    message = envelope.parse(envelope_with_payload('(embeds ((title . "t") (color . ٣1)))'),
                             ALLOWED)
    assert message.payload["embeds"][0]["color"] == 31


# ------------------------------------------------------- live, over generated tokens

PIECES = (list("0123456789+-./:|\\eEsSfFdDlLrRaAzx")
          + ["٣", "١", "٠", "５", "𝟘", "߀", "𐴳", "\U0001FBF5",        # digits, some not SBCL's
             "ı", "ς", "σ", "ß", "ǅ", "İ", "ა", "ᲀ", "ﬁ", "\u0301", "\u0345", "ẞ",
             "\x0b", "\x08", "\x7f", "\xa0", " ", "\n",
             "1.5", "e+", "d-3", "1/", "::", "|a b|", "||", "\\:", "nil", "cl:", "keyword:"])


@st.composite
def tokens(draw):
    pieces = st.one_of(st.sampled_from(PIECES),
                       st.characters(blacklist_categories=("Cs",),
                                     blacklist_characters="#'`,\"();"))
    return "".join(draw(st.lists(pieces, min_size=1, max_size=10)))


@pytest.fixture(scope="module")
def sbcl_tokens():
    executable = sbcl.find_sbcl()
    if executable is None:
        pytest.skip("sbcl is not installed (apt-get install sbcl)")
    process = sbcl.SbclTokens(executable)
    yield process
    process.close()


def test_the_cases_above_are_what_sbcl_reads(sbcl_tokens):
    for token in [token for token, _ in CASES] + REFUSED:
        ours, theirs = sbcl_tokens.same(token)
        assert ours == theirs, token


@given(tokens())
@settings(max_examples=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_generated_tokens_read_as_sbcl_reads_them(sbcl_tokens, token):
    # A byte-order mark opening the input is dropped (an editor's, in a file); SBCL
    # would read it as a symbol. Anywhere else it is a constituent, as for SBCL.
    assume(not token.startswith("\ufeff"))
    ours, theirs = sbcl_tokens.same(token)
    assert ours == theirs or sbcl.refused_on_purpose(token, ours, theirs), token
