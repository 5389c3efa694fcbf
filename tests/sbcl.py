"""A long-lived SBCL process that reads S-expressions the way the Lisp side does and prints
them back with the Lisp side's printer settings: the judge of what our writer prints."""

import io
import shutil
import subprocess

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
