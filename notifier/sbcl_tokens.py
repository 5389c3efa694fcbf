"""What SBCL's reader makes of one token: a number with SBCL's value, or a symbol name.

SBCL 2.2.9 reads tokens under standard syntax (``*read-base*`` 10, readtable case
``:upcase``, ``*read-default-float-format*`` single-float) by a state machine
(``read-token`` in SBCL's reader.lisp) that this module follows rule for rule:

* Digits are those of ``digit-char-p``, any script's decimal digits in SBCL's Unicode
  10 tables (``٣`` is 3), but only where SBCL asks ``digit-char-p``: in an integer, in a
  ratio and before a float's decimal point. After the point and in an exponent only
  ASCII digits count, so ``٣1`` is 31 and ``٣.5`` is 3.5, while ``1.٥`` is a symbol.
* An exponent marker is one of ``esfdlr`` in either case: ``e``, ``s``, ``f`` and none
  make a single float, ``d`` and ``l`` a double, ``r`` (an SBCL extension) a rational.
* Values are built as SBCL builds them: integers and ratios exactly (a ratio with
  denominator 1 is an integer, a zero denominator is an error); a float from the exact
  rational with SBCL's own rounding, which truncates subnormals (``1e-45`` is 0.0 and
  ``2.225073858507203d-309`` one ulp below Python's) and refuses what overflows, after
  clamping huge exponents as SBCL's ``truncate-exponent`` does.
* Symbol names are NFKC-normalized (``ﬁ`` is ``FI``), then upcased with ``char-upcase``,
  which changes only characters with a one-to-one case pair: ``ı``, ``ς`` and Georgian
  ``ა`` stay as they are.

A single float has no Python type: it is read as the number written (the nearest Python
float to it) when that number rounds to SBCL's single float, so a single float SBCL
printed (``117.73757``) reads as 117.73757; otherwise, where SBCL holds something other
than the rounding of what is written (it truncates subnormals: ``1e-45`` is 0.0), as
SBCL's single float written with the fewest digits. Either way the value rounds to
exactly SBCL's single float. A double float is read as SBCL's double itself.

The character tables come from SBCL (`notifier.sbcl_chars`, made by
scripts/gen_sbcl_chars.py); a differential test compares this module with SBCL itself.
"""

from __future__ import annotations

import math
import re
import struct
import unicodedata
from fractions import Fraction

from notifier import sbcl_chars

__all__ = ["NOT_A_NUMBER", "number", "name_case", "printed_case"]

NOT_A_NUMBER = object()
"""What `number` returns for a token that SBCL reads as a symbol."""

_UPCASE = {code: code + delta for first, last, step, delta in sbcl_chars.UPCASE
           for code in range(first, last + 1, step)}
_DOWNCASE = {upper: lower for lower, upper in _UPCASE.items()}
_ASCII_DIGITS = {zero + value: ord("0") + value for zero in sbcl_chars.DIGIT_ZEROS
                 for value in range(10)}
_UNASSIGNED = re.compile("([" + "".join(f"{chr(first)}-{chr(last)}"
                                        for first, last in sbcl_chars.UNASSIGNED) + "])")

# The number syntax of SBCL's reader, with any script's digits already made ASCII.
_NUMBER_START = frozenset("0123456789+-.")
_EXPONENT_AS_E = str.maketrans("sfdlSFDL", "eeeeeeee")
_INTEGER = re.compile(r"[+-]?[0-9]+\.?\Z")
_RATIO = re.compile(r"([+-]?[0-9]+)/([0-9]+)\Z")
_FLOAT = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?(?:([esfdlrESFDLR])([+-]?[0-9]+))?\Z")

MAX_DIGITS = 4300
"""Longest run of digits converted (Python's own limit for int(), against quadratic
time); SBCL would read a longer number, the reader refuses it."""


class _Format:
    """An IEEE binary format as SBCL's float code sees it.

    `fast_digits` and `fast_scale`: for a decimal of fewer digits (as an integer) times
    a power of ten in that range, SBCL rounds correctly, as Python's float() does, and
    nothing overflows or is subnormal: the integer stays below 2**(digits + 64), where
    ``bignum-to-float`` judges ties right, and ``float-ratio`` shifts no set bit out of
    the numerator."""

    def __init__(self, digits: int, bias: int, max_field: int, fast_digits: int,
                 fast_scale: range):
        self.digits = digits        # significand bits, hidden bit included
        self.bias = bias            # SBCL's bias: a significand read as [0.5, 1)
        self.max_field = max_field  # the largest exponent field of a finite number
        self.fast_digits = fast_digits
        self.fast_scale = fast_scale


_SINGLE = _Format(24, 126, 254, 1 << 25, range(-22, 11))
_DOUBLE = _Format(53, 1022, 2046, 1 << 53, range(-22, 20))
_FORMATS = {"e": _SINGLE, "s": _SINGLE, "f": _SINGLE, "d": _DOUBLE, "l": _DOUBLE, "r": None}
_MOST_POSITIVE_FIXNUM = (1 << 62) - 1
_WORD = 64  # SBCL's bignum digit size on x86-64


# --------------------------------------------------------------------------- symbols

def _nfkc(run: str) -> str:
    """SBCL's NFKC: Python's, except that a character SBCL has not assigned stays as it
    is and normalization does not reach across it (as for any character that never
    changes and never composes). Python's quick check comes first: a run that is NFKC for
    Python is so for SBCL too, as every part of it is."""
    if unicodedata.is_normalized("NFKC", run):
        return run
    if _UNASSIGNED.search(run) is None:
        return unicodedata.normalize("NFKC", run)
    parts = _UNASSIGNED.split(run)  # text, unassigned character, text, ...
    parts[::2] = [unicodedata.normalize("NFKC", part) for part in parts[::2]]
    return "".join(parts)


def name_case(run: str) -> str:
    """A run of unescaped characters of a symbol token as SBCL holds it: normalized to
    NFKC, then upcased by ``char-upcase``."""
    if run.isascii():
        return run.upper()
    return _nfkc(run).translate(_UPCASE)


def printed_case(name: str) -> str:
    """A symbol name as SBCL prints it with ``*print-case* :downcase``, bars aside: in
    lowercase if reading would not change it, else as it is."""
    if name.isascii():
        return name.lower() if name == name.upper() else name
    if name.translate(_UPCASE) != name:
        return name
    return name.translate(_DOWNCASE)


# --------------------------------------------------------------------------- numbers

def _digits(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise ValueError(f"number of {len(text)} digits is too long")
    return int(text)


def number(token: str):
    """The number SBCL reads from `token` (no escapes, no package marker), or
    NOT_A_NUMBER. Raises ValueError where SBCL's reader signals an error."""
    if token[0] not in _NUMBER_START and token[0].isascii():
        return NOT_A_NUMBER  # the common case: a symbol such as a key
    ascii_token = token
    if not token.isascii():
        ascii_token = token.translate(_ASCII_DIGITS)
        if not ascii_token.isascii():
            return NOT_A_NUMBER
    if _INTEGER.match(ascii_token):
        return _digits(ascii_token.rstrip("."))
    ratio = _RATIO.match(ascii_token)
    if ratio:
        numerator, denominator = map(_digits, ratio.groups())
        if denominator == 0:
            raise ValueError("ratio divides by zero")
        value = Fraction(numerator, denominator)
        return value.numerator if value.denominator == 1 else value
    parts = _FLOAT.match(ascii_token)
    if parts is None:
        return NOT_A_NUMBER
    sign, whole, fraction, marker, exponent = parts.groups()
    fraction = fraction or ""
    if not (fraction or (whole and marker)):
        return NOT_A_NUMBER
    if ascii_token is not token and not token[len(sign) + len(whole):].isascii():
        return NOT_A_NUMBER  # a digit of another script after the point or in the exponent
    digits, marker = _digits(whole + fraction), (marker or "e").lower()
    scale = (_digits(exponent) if exponent else 0) - len(fraction)
    form = _FORMATS[marker]
    if form is not None and digits < form.fast_digits and scale in form.fast_scale:
        value = float(ascii_token.translate(_EXPONENT_AS_E))
        if form is _DOUBLE or not _between_singles(value):
            return value
    value = _float(digits, 10 ** len(fraction), _digits(exponent) if exponent else None,
                   marker, ascii_token[len(sign):])
    return -value if sign == "-" else value


def _between_singles(value: float) -> bool:
    """Whether double `value` lies exactly halfway between two single floats (normal
    ones): rounding it again may then not be what rounding the decimal once gives."""
    return struct.unpack("<Q", struct.pack("<d", value))[0] & 0x1FFFFFFF == 0x10000000


def _truncate_exponent(exponent: int, number: int, divisor: int) -> int:
    """SBCL's clamp of a huge decimal exponent (it keeps the arithmetic small)."""
    max_exponent = _DOUBLE.digits + _DOUBLE.bias
    magnitude = number.bit_length() - (divisor.bit_length() - 1)
    if exponent < 0:
        return max(exponent, -((max_exponent + magnitude) // 3))
    return min(exponent, (max_exponent - magnitude) // 3)


def _float(number: int, divisor: int, exponent: int | None, marker: str, written: str):
    """SBCL's ``make-float`` (of an unsigned `written` token): the exact rational, then
    ``coerce`` to the format."""
    if exponent is not None:
        exponent = _truncate_exponent(exponent, number, divisor)
        if exponent >= 0:
            number *= 10 ** exponent
        else:
            divisor *= 10 ** -exponent
    value = Fraction(number, divisor)
    form = _FORMATS[marker]
    if form is None:  # the r marker: a rational
        value = value.numerator if value.denominator == 1 else value
    elif value.denominator != 1:
        value = _float_ratio(value.numerator, value.denominator, form)
    elif value.numerator > _MOST_POSITIVE_FIXNUM:
        value = _bignum_to_float(value.numerator, form)
    else:
        value = _round_integer(value.numerator, form)
    if form is _SINGLE:
        value = _single_as_written(value, float(written.translate(_EXPONENT_AS_E)))
    return value


def _round_integer(integer: int, form: _Format) -> float:
    """A fixnum converted by the processor: rounded to nearest, ties to even."""
    extra = integer.bit_length() - form.digits
    if extra <= 0:
        return float(integer)
    kept, rest = integer >> extra, integer & ((1 << extra) - 1)
    half = 1 << (extra - 1)
    if rest > half or (rest == half and kept & 1):
        kept += 1
    return math.ldexp(kept, extra)


def _bignum_to_float(integer: int, form: _Format) -> float:
    """SBCL's ``bignum-to-float``: round to nearest, where an exact tie is judged by the
    bits kept in 64-bit words, as SBCL judges it."""
    length = integer.bit_length()
    keep = form.digits + _WORD
    shift = keep - length
    bits = integer << shift if shift >= 0 else integer >> -shift
    low = bits & ((1 << _WORD) - 1)
    round_bit = 1 << (_WORD - 1)
    if low & round_bit:
        words_below = (length // _WORD + 1) - -(-keep // _WORD)
        tie = low == round_bit and (
            words_below <= 0 or integer & ((1 << (_WORD * words_below)) - 1) == 0)
        if not tie or (bits >> _WORD) & 1:
            bits += round_bit
            if bits.bit_length() > keep:
                bits >>= 1
                length += 1
    if length + form.bias > form.max_field:
        raise ValueError("float is out of range")
    return math.ldexp((bits >> _WORD) & ((1 << _WORD) - 1), length - form.digits)


def _float_ratio(numerator: int, denominator: int, form: _Format) -> float:
    """SBCL's ``float-ratio``: `digits` bits and a guard bit by division (the remainder
    breaks ties, but bits the numerator lost to a right shift do not), then
    ``scale-float``."""
    digits = form.digits
    twos = (denominator & -denominator).bit_length() - 1
    scale = -twos
    denominator >>= twos
    delta = denominator.bit_length() - numerator.bit_length()
    shift = 1 + delta + digits
    shifted = numerator << shift if shift >= 0 else numerator >> -shift
    scale -= delta
    while True:
        quotient, remainder = divmod(shifted, denominator)
        extra = quotient.bit_length() - digits
        if extra == 1:
            break
        shifted >>= 1
        scale += 1
    if quotient & 1:
        quotient += 1 if remainder or quotient & 2 else 0
    bits = quotient >> 1
    if bits.bit_length() > digits:
        bits >>= 1
        scale += 1
    return _scale(bits, scale, form)


def _scale(bits: int, scale: int, form: _Format) -> float:
    """``scale-float`` of the float with significand `bits` in [0.5, 1): exact while
    normal, an error past the largest, truncated (not rounded) when subnormal."""
    field = form.bias + scale
    if field > form.max_field:
        raise ValueError("float is out of range")
    if field >= 1:
        return math.ldexp(bits, scale - form.digits)
    shift = field - 1
    if shift < -(form.digits - 1):
        return 0.0
    return math.ldexp(bits >> -shift, 1 - form.bias - form.digits)


def _single_as_written(value: float, written: float) -> float:
    """Single float `value` as the `written` number if that rounds to it, else as the
    Python float with the fewest digits that rounds to it."""
    single = struct.pack("<f", value)
    try:
        if struct.pack("<f", written) == single:
            return written
    except OverflowError:  # written past the largest single float (SBCL clamps or refuses)
        pass
    if value == 0:
        return value
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack("<f", candidate) == single:
                return candidate
        except OverflowError:  # rounded past the largest single float
            continue
    return value  # not reached: 17 digits give `value` itself back
