#!/usr/bin/env python3
"""Write notifier/sbcl_chars.py: the character tables SBCL's reader uses, taken from SBCL.

    python3 scripts/gen_sbcl_chars.py [--sbcl PATH] [--check]

SBCL's reader upcases a symbol's characters with `char-upcase` (which changes only
characters with a one-to-one case pair, `both-case-p`), reads digits with `digit-char-p`
and normalizes symbol names to NFKC with its own Unicode tables (Unicode 10.0 in SBCL
2.2.9; Python's are newer). The tables are asked of SBCL for every code point, so that
the Python reader follows SBCL's answers, not Python's Unicode database.

Before writing, the script checks what the reader relies on: `char-downcase` is the
inverse of `char-upcase` (but for the four titlecase letters such as U+01C5, which both
change); digits come in runs of ten with values 0 to 9; and for every character SBCL has
assigned, SBCL's NFKC of the character and its combining class equal Python's (so
Python's `unicodedata` normalizes like SBCL wherever SBCL knows the character;
characters SBCL has not assigned never change and block composition).
--check compares the module in the repository with what SBCL says now, writing nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "notifier" / "sbcl_chars.py"

# One line per fact, for every code point: U code upcase, L code downcase, D code digit,
# N code (unassigned), K code nfkc... (when NFKC changes it), C code class (when not 0).
_DUMP = r"""
(let ((out (sb-sys:make-fd-stream 1 :output t :external-format :utf-8 :buffering :full)))
  (format out "V ~A~%" (lisp-implementation-version))
  (dotimes (i char-code-limit)
    (let ((c (code-char i)))
      (unless (char= (char-upcase c) c) (format out "U ~X ~X~%" i (char-code (char-upcase c))))
      (unless (char= (char-downcase c) c) (format out "L ~X ~X~%" i (char-code (char-downcase c))))
      (when (digit-char-p c) (format out "D ~X ~D~%" i (digit-char-p c)))
      (when (eq (sb-unicode:general-category c) :cn) (format out "N ~X~%" i))
      (unless (<= #xD800 i #xDFFF)
        (let ((n (sb-unicode:normalize-string (string c) :nfkc)))
          (unless (string= n (string c))
            (format out "K ~X ~{~X~^,~}~%" i (map 'list #'char-code n)))))
      (let ((cc (sb-unicode:combining-class c)))
        (unless (zerop cc) (format out "C ~X ~D~%" i cc)))))
  (finish-output out))
"""


def ask_sbcl(executable: str) -> dict:
    output = subprocess.run(
        [executable, "--noinform", "--non-interactive", "--no-sysinit", "--no-userinit",
         "--eval", _DUMP], capture_output=True, text=True, check=True, timeout=600).stdout
    facts = {"U": {}, "L": {}, "D": {}, "N": set(), "K": {}, "C": {}}
    for line in output.splitlines():
        kind, code, *rest = line.split(" ", 2)
        if kind == "V":
            facts["V"] = " ".join([code, *rest])
            continue
        code = int(code, 16)
        if kind == "N":
            facts["N"].add(code)
        elif kind == "K":
            facts["K"][code] = "".join(chr(int(c, 16)) for c in rest[0].split(","))
        else:
            facts[kind][code] = int(rest[0], 16 if kind in "UL" else 10)
    return facts


def check_assumptions(facts: dict) -> None:
    upcase, downcase, digits, unassigned = facts["U"], facts["L"], facts["D"], facts["N"]
    inverse = {upper: lower for lower, upper in upcase.items()}
    assert all(downcase.get(upper) == lower for upper, lower in inverse.items()) and all(
        code in upcase for code in downcase.keys() - inverse.keys()), \
        "char-downcase is not the inverse of char-upcase (titlecase letters aside)"
    zeros = [code for code, value in digits.items() if value == 0]
    assert all(digits.get(zero + i) == i for zero in zeros for i in range(10)) \
        and len(digits) == 10 * len(zeros), "digits do not come in runs of ten"
    for code in range(0x110000):
        if code in unassigned or 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        assert unicodedata.normalize("NFKC", char) == facts["K"].get(code, char), \
            f"NFKC of U+{code:04X}: SBCL and Python differ"
        assert unicodedata.combining(char) == facts["C"].get(code, 0), \
            f"combining class of U+{code:04X}: SBCL and Python differ"


def case_runs(upcase: dict) -> list[tuple[int, int, int, int]]:
    """Runs (first, last, step, delta): c + delta is the upper case of each c in
    range(first, last + 1, step)."""
    runs: list[list[int]] = []
    for code in sorted(upcase):
        delta = upcase[code] - code
        if runs:
            first, last, step, run_delta = runs[-1]
            gap = code - last
            if run_delta == delta and (gap == step or (first == last and gap in (1, 2))):
                runs[-1][1:3] = [code, gap]
                continue
        runs.append([code, code, 1, delta])
    return [tuple(run) for run in runs]


def ranges(codes: set) -> list[tuple[int, int]]:
    found: list[list[int]] = []
    for code in sorted(codes):
        if found and found[-1][1] == code - 1:
            found[-1][1] = code
        else:
            found.append([code, code])
    return [tuple(r) for r in found]


def hexed(item) -> str:
    """Code points in hex, the rest (steps, deltas) in decimal."""
    if isinstance(item, int):
        return f"0x{item:04X}"
    first, last, *rest = item
    return "(" + ", ".join([hexed(first), hexed(last), *map(str, rest)]) + ")"


def rows(items, per_line: int) -> str:
    text = [hexed(item) for item in items]
    return "\n".join("    " + ", ".join(text[i:i + per_line]) + ","
                     for i in range(0, len(text), per_line))


def module_text(facts: dict) -> str:
    zeros = sorted(code for code, value in facts["D"].items() if value == 0)
    version = facts["V"]
    return f'''"""Character tables of SBCL {version}'s reader. Generated by
scripts/gen_sbcl_chars.py from SBCL itself: do not edit; run the script again for
another SBCL.

`UPCASE`: `char-upcase` as runs ``(first, last, step, delta)``: each code point c in
``range(first, last + 1, step)`` upcases to ``c + delta``; every other character is left
as it is. (`char-downcase` is its inverse, but for the four titlecase letters such as
U+01C5, which both functions change.) `DIGIT_ZEROS`: `digit-char-p` under base 10:
each entry is the 0 of ten consecutive digits 0 to 9. `UNASSIGNED`:
``(first, last)`` ranges that SBCL's Unicode tables leave unassigned (general category
Cn); SBCL's NFKC leaves them as they are, and for every other character Python's
`unicodedata` normalizes exactly as SBCL does (the script checks this).
"""

SBCL_VERSION = {version!r}

UPCASE = (
{rows(case_runs(facts["U"]), 3)}
)

DIGIT_ZEROS = (
{rows(zeros, 8)}
)

UNASSIGNED = (
{rows(ranges(facts["N"]), 4)}
)
'''


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sbcl", default=shutil.which("sbcl"), help="the SBCL to ask")
    parser.add_argument("--check", action="store_true",
                        help="compare the module with SBCL's answers, write nothing")
    args = parser.parse_args(argv)
    if not args.sbcl:
        sys.exit("gen_sbcl_chars: sbcl is not installed (apt-get install sbcl)")
    facts = ask_sbcl(args.sbcl)
    check_assumptions(facts)
    text = module_text(facts)
    if args.check:
        same = MODULE.read_text(encoding="utf-8") == text
        print(f"{MODULE.relative_to(ROOT)}: {'up to date' if same else 'DIFFERS from SBCL'}")
        return 0 if same else 1
    MODULE.write_text(text, encoding="utf-8")
    print(f"wrote {MODULE.relative_to(ROOT)} from SBCL {facts['V']}: "
          f"{len(facts['U'])} case pairs, {len(facts['D'])} digits, "
          f"{len(ranges(facts['N']))} unassigned ranges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
