"""SBCL as the judge. `Sbcl`: a long-lived SBCL process that reads S-expressions the way
the Lisp side does and prints them back with the Lisp side's printer settings: the judge
of what our writer prints. `SbclTokens` and `sbcl_fixture`: SBCL's own reading of tokens,
one line each, the judge of our reader (tests/test_sexp_sbcl_tokens.py, scripts/fuzz.py,
scripts/gen_sbcl_tokens.py)."""

import io
import re
import shutil
import struct
import subprocess
from fractions import Fraction

from notifier import sexp

# Reads forms from stdin with *read-eval* off, as the Lisp side's safe reader does, and
# prints each back readably and downcased, prefixed by its length in characters.
_ECHO_LOOP = r"""
(progn
  (defpackage :swimmy.school (:use :cl))
  (defpackage :swimmy.core (:use :cl))
  (defpackage :pkg (:use :cl))
  (let ((in (sb-sys:make-fd-stream 0 :input t :external-format :utf-8 :buffering :full))
        (out (sb-sys:make-fd-stream 1 :output t :external-format :utf-8 :buffering :full)))
    (loop
      (let* ((form (with-standard-io-syntax
                     (let ((*read-eval* nil))
                       (handler-case (read in nil :eof)
                         (error (e) (list :sbcl-read-error (princ-to-string e)))))))
             (printed (if (eq form :eof)
                          (sb-ext:exit :code 0)
                          (with-standard-io-syntax
                            (let ((*print-case* :downcase))
                              (prin1-to-string form))))))
        (format out "~D~%~A" (length printed) printed)
        (finish-output out)))))
"""


class Sbcl:
    """`echo(text)` returns what SBCL prints after reading `text`."""

    def __init__(self, executable: str):
        self._process = subprocess.Popen(
            [executable, "--noinform", "--non-interactive", "--no-sysinit", "--no-userinit",
             "--eval", _ECHO_LOOP],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        # newline="" so that a CR inside a string reaches SBCL and comes back untouched.
        self._stdin = io.TextIOWrapper(self._process.stdin, encoding="utf-8", newline="")
        self._stdout = io.TextIOWrapper(self._process.stdout, encoding="utf-8", newline="")

    def echo(self, text: str) -> str:
        self._stdin.write(text + "\n")
        self._stdin.flush()
        length = int(self._stdout.readline())
        printed = self._stdout.read(length)
        assert not printed.startswith("(:sbcl-read-error"), printed
        return printed

    def close(self) -> None:
        self._stdin.close()
        self._process.wait(timeout=10)


def find_sbcl() -> str | None:
    return shutil.which("sbcl")


# --------------------------------------------------------------------------- tokens

# What SBCL's reader makes of a token, as one line: E (an error), I n, R n d, S bits (a
# single float), D bits (a double), Y package name (a symbol: package - for one an
# unqualified token reads, such as CL-USER::X, CL:NIL or SB-EXT:GC, : for a keyword, else
# p and its home package's name as code points; the name as hex code points), O (any
# other datum, such as (quote 1)). The reader's judgement of a token alone: a package
# the token names is made when missing, a symbol not external is taken anyway, and
# package locks (CL's) are off, so that cl:x is read, not refused by a lock.
_TOKEN_LISP = r"""
(defun read-whole (text)
  (loop
    (handler-case
        (return
          (handler-bind ((sb-int:simple-reader-package-error
                           (lambda (e) (when (packagep (package-error-package e)) (continue e)))))
            (with-standard-io-syntax
              (let ((*read-eval* nil))
                (sb-ext:without-package-locks
                  (with-input-from-string (in text)
                    (let ((datum (read in)))
                      (if (eq (read in nil in) in) datum :error))))))))
      (sb-int:simple-reader-package-error (e)
        (let ((name (package-error-package e)))
          (if (and (stringp name) (not (find-package name)))
              (make-package name :use nil)
              (return :error))))
      (error () (return :error)))))

(defun codes (string x)
  (format nil "~{~A~^,~}"
          (map 'list (lambda (c)
                       (let ((code (char-code c)))
                         (cond ((null x) (format nil "~X" code))
                               ((= code x) "x")
                               ((and (>= code 128) (>= x 128))
                                (format nil "x~:[-~;+~]~X" (> code x) (abs (- code x))))
                               (t (format nil "~X" code)))))
               string)))

(defun describe-datum (datum &optional x)
  (typecase datum
    ((eql :error) "E")
    (integer (format nil "I ~D" datum))
    (ratio (format nil "R ~D ~D" (numerator datum) (denominator datum)))
    (single-float (format nil "S ~8,'0X" (ldb (byte 32 0) (sb-kernel:single-float-bits datum))))
    (double-float
     (format nil "D ~16,'0X"
             (ldb (byte 64 0) (logior (ash (sb-kernel:double-float-high-bits datum) 32)
                                      (sb-kernel:double-float-low-bits datum)))))
    (symbol
     (let ((home (symbol-package datum)))
       (format nil "Y ~A ~A"
               (cond ((eq home (find-package "KEYWORD")) ":")
                     ((eq (find-symbol (symbol-name datum) "CL-USER") datum) "-")
                     (t (format nil "p~A" (codes (package-name home) nil))))
               (codes (symbol-name datum) x))))
    (t "O")))

(defvar *in* (sb-sys:make-fd-stream 0 :input t :external-format :utf-8 :buffering :full))
(defvar *out* (sb-sys:make-fd-stream 1 :output t :external-format :utf-8 :buffering :full))
"""

# Reads tokens framed as "LENGTH\nTOKEN" and answers each with its line. The first line
# names every package SBCL has before any token is read, nicknames included.
_TOKEN_LOOP = _TOKEN_LISP + r"""
(format *out* "~{~A~^ ~}~%"
        (loop for package in (list-all-packages)
              append (mapcar (lambda (name) (codes name nil))
                             (cons (package-name package) (package-nicknames package)))))
(finish-output *out*)
(loop (let ((line (read-line *in* nil)))
        (unless line (sb-ext:exit :code 0))
        (let ((token (make-string (parse-integer line))))
          (read-sequence token *in*)
          (write-line (describe-datum (read-whole token)) *out*)
          (finish-output *out*))))
"""

SHAPES = ("X", "aX", "+X", "X1", "1X5", ".X", "1.X", "1/X")
"""The token shapes of the differential fixture, X standing for each code point: case
(X, aX: composition with a letter), integers and signs (X, +X, X1), digits of other
scripts among ASCII ones (X1, 1X5), exponent markers (1X5), decimals and leading dots
(.X, 1.X, and 1X5 with X a dot), ratios (1/X, 1X5 with X a slash)."""

CODE_LIMIT = 0x32000
"""Code points below this one, surrogates excepted (202,752 of them), fill each shape."""

# Prints, shape by shape, "@ SHAPE" then runs "COUNT LINE" of consecutive code points
# with the same line, where the name's code points are written relative to X (x, x+N,
# x-N), so that a block of letters SBCL leaves alone is one run.
_FIXTURE = _TOKEN_LISP + r"""
(dolist (shape '(%s))
  (format *out* "@ ~A~%%" shape)
  (let ((previous nil) (count 0))
    (dotimes (code %d)
      (unless (<= #xD800 code #xDFFF)
        (let ((line (describe-datum (read-whole (substitute (code-char code) #\X shape)) code)))
          (cond ((equal line previous) (incf count))
                (t (when previous (format *out* "~D ~A~%%" count previous))
                   (setf previous line count 1))))))
    (format *out* "~D ~A~%%" count previous)))
(finish-output *out*)
"""


def code_points():
    """The code points of the fixture, in order."""
    return (code for code in range(CODE_LIMIT) if not 0xD800 <= code <= 0xDFFF)


def _sbcl_command(executable: str, program: str) -> list[str]:
    return [executable, "--noinform", "--non-interactive", "--no-sysinit", "--no-userinit",
            "--eval", f"(progn {program})"]


def sbcl_fixture(executable: str) -> str:
    """The fixture's text as SBCL writes it now."""
    shapes = " ".join('"' + shape + '"' for shape in SHAPES)
    return subprocess.run(_sbcl_command(executable, _FIXTURE % (shapes, CODE_LIMIT)),
                          capture_output=True, check=True, timeout=600,
                          encoding="utf-8").stdout


def codes(text: str, x: int | None = None) -> str:
    """Code points as the Lisp side writes them (see `codes` above)."""
    out = []
    for char in text:
        code = ord(char)
        if x is None:
            out.append(f"{code:X}")
        elif code == x:
            out.append("x")
        elif code >= 128 and x >= 128:
            out.append(f"x{'+' if code > x else '-'}{abs(code - x):X}")
        else:
            out.append(f"{code:X}")
    return ",".join(out)


def describe(value, x: int | None = None) -> str:
    """The line SBCL's `describe-datum` writes, for a datum our reader read with
    ``written_floats=True`` (so that a float says whether it is single)."""
    if value is None or value is True:
        return f"Y - {codes('NIL' if value is None else 'T', x)}"
    if type(value) is int:
        return f"I {value}"
    if type(value) is Fraction:
        return f"R {value.numerator} {value.denominator}"
    if type(value) is sexp.WrittenFloat:
        if value.single:
            return "S %08X" % struct.unpack("<I", struct.pack("<f", value))[0]
        return "D %016X" % struct.unpack("<Q", struct.pack("<d", value))[0]
    if type(value) is sexp.Symbol:
        package = ("-" if value.package is None else ":" if value.is_keyword
                   else "p" + codes(value.package))
        return f"Y {package} {codes(value.name, x)}"
    return "O"


def refused_on_purpose(token: str, ours: str, theirs: str) -> bool:
    """Data SBCL reads that our reader refuses by design: quote and backquote forms
    (``'x``), and a package prefix before a separate datum (``pkg:: x``, read by SBCL in
    that package)."""
    return ours == "E" and theirs != "E" and (
        token[:1] in ("'", "`") or re.search(r"::[ \t\n\r\f]", token) is not None)


def read_or_error(text: str):
    """Our reader's datum for `text`, floats with their token, or "E" for an error."""
    try:
        return sexp.read(text, written_floats=True)
    except sexp.SexpError:
        return "E"


class SbclTokens:
    """A running SBCL that reads one token at a time: `line(token)` is SBCL's line for
    it; `same(token)` compares it with ours."""

    def __init__(self, executable: str):
        self._process = subprocess.Popen(_sbcl_command(executable, _TOKEN_LOOP),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._stdin = io.TextIOWrapper(self._process.stdin, encoding="utf-8", newline="")
        self._stdout = io.TextIOWrapper(self._process.stdout, encoding="utf-8", newline="")
        self.packages = set(self._stdout.readline().split())  # as code points

    def line(self, token: str) -> str:
        self._stdin.write(f"{len(token)}\n{token}")
        self._stdin.flush()
        return self._stdout.readline().rstrip("\n")

    def same(self, token: str) -> tuple[str, str]:
        """(ours, SBCL's) lines for `token`, ours with the package SBCL reports where the
        token names a package SBCL had already (it may find the symbol elsewhere)."""
        value = read_or_error(token)
        theirs = self.line(token)
        ours = "E" if value == "E" else describe(value)
        if (type(value) is sexp.Symbol and value.package is not None
                and codes(value.package) in self.packages and theirs.startswith("Y ")):
            ours = " ".join([*theirs.split(" ")[:2], codes(value.name)])
        return ours, theirs

    def close(self) -> None:
        self._stdin.close()
        self._process.wait(timeout=10)
