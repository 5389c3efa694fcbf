#!/usr/bin/env python3
"""Write tests/fixtures/lisp/sbcl_tokens.txt.xz: SBCL's own reading of the differential's
tokens (the shapes of tests/sbcl.py with every code point below U+32000).

    .venv/bin/python scripts/gen_sbcl_tokens.py [--sbcl PATH] [--check]

SBCL writes one line per run of code points it reads alike (tests/sbcl.py says how);
the file is that text, compressed (about 50 KB for 1.6 million tokens). The test suite
compares the reader with it everywhere and, when SBCL is installed, checks that SBCL
still writes the same text. --check does only that comparison, writing nothing.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the SBCL helpers live with the tests

from tests import sbcl  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "lisp" / "sbcl_tokens.txt.xz"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sbcl", default=sbcl.find_sbcl(), help="the SBCL to ask")
    parser.add_argument("--check", action="store_true",
                        help="compare the fixture with SBCL's reading, write nothing")
    args = parser.parse_args(argv)
    if not args.sbcl:
        sys.exit("gen_sbcl_tokens: sbcl is not installed (apt-get install sbcl)")
    started = time.monotonic()
    text = sbcl.sbcl_fixture(args.sbcl)
    elapsed = time.monotonic() - started
    if args.check:
        same = lzma.decompress(FIXTURE.read_bytes()).decode("utf-8") == text
        print(f"{FIXTURE.relative_to(ROOT)}: {'up to date' if same else 'DIFFERS from SBCL'}")
        return 0 if same else 1
    FIXTURE.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    tokens = len(sbcl.SHAPES) * sum(1 for _ in sbcl.code_points())
    print(f"wrote {FIXTURE.relative_to(ROOT)}: {tokens:,} tokens read by SBCL in "
          f"{elapsed:.1f} s, {text.count(chr(10)):,} lines, {FIXTURE.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
