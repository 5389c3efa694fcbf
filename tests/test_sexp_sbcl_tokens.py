"""Differential: the reader reads every token of the fixture's shapes as SBCL does.

tests/fixtures/lisp/sbcl_tokens.txt.xz is SBCL 2.2.9's own reading of 1,622,016 tokens:
the 8 shapes of `tests.sbcl.SHAPES` with each code point below U+32000 (surrogates
excepted) in place of X (see `tests.sbcl` for the line format). It is made by
scripts/gen_sbcl_tokens.py; when SBCL is installed, a test has it make the fixture again
and compares, so the committed file is SBCL's reading, not a record of ours.
"""

import functools
import lzma
from itertools import islice

import pytest

from notifier import sexp
from tests import sbcl
from tests.test_sexp import FIXTURES

FIXTURE = FIXTURES / "sbcl_tokens.txt.xz"

REFUSED_ON_PURPOSE = {"'1": "O", "`1": "O"}
"""Tokens SBCL reads as data outside ours: quote forms, refused as not data."""

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


def differences(lines) -> tuple[int, list]:
    """Compare our reading of each fixture token with SBCL's line: (tokens, differences)."""
    checked, wrong, batch = 0, [], []

    def compare(items, values):
        nonlocal checked
        checked += len(items)
        for (token, code, line), value in zip(items, values, strict=True):
            if token in REFUSED_ON_PURPOSE:
                assert line == REFUSED_ON_PURPOSE[token], (token, line)
                line = "E"
            if not agrees(value, code, line):
                ours = "E" if value == "E" else sbcl.describe(value, code)
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
    return checked, wrong


def test_the_reader_reads_every_token_of_the_fixture_as_sbcl_does():
    checked, wrong = differences(fixture_lines(fixture_text()))
    assert checked == len(sbcl.SHAPES) * sum(1 for _ in sbcl.code_points()) == 1_622_016
    assert not wrong, f"{len(wrong)} tokens read differently, first ones: {wrong[:20]}"


def test_sbcl_reads_the_fixture_tokens_as_the_fixture_says():
    executable = sbcl.find_sbcl()
    if executable is None:
        pytest.skip("sbcl is not installed (apt-get install sbcl)")
    assert sbcl.sbcl_fixture(executable) == fixture_text(), \
        "SBCL reads the tokens otherwise: run scripts/gen_sbcl_tokens.py"
