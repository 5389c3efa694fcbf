#!/usr/bin/env python3
"""Coverage-guided fuzzing of the doors hostile input comes through (atheris, libFuzzer).

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python scripts/fuzz.py TARGET --seconds 600   # sexp, envelope, fit, snapshot, sbcl
    .venv/bin/python scripts/fuzz.py TARGET --run FILE...   # replay inputs (a crash file)

Each target runs one input and raises only for a finding: an exception other than the
documented refusal (`SexpError`, `EnvelopeError`; the merge's reader refuses by returning
a status, so for it any exception), or a result that breaks the contract:

- sexp: `sexp.loads` (`read`, then `to_python`); `read_alist`, with its fast path, agrees
  with the general reader; error messages stay short.
- envelope: `envelope.parse` (the stand-in's host allowed); an accepted message can be
  posted: every request `fit` makes of it encodes as strict UTF-8 JSON, is within
  Discord's limits and passes the stand-in's validator, and its URL is one `requests`
  takes.
- fit: `payload.fit` on JSON payloads the relay accepts (the fuzz bytes are the payload),
  the same checks, and a payload within the limits comes back unchanged.
- snapshot: the telemetry merge reading the bytes as notifier_metrics.sexp, then merging
  into a system_metrics.sexp: the result reads back and its reason stays capped.
- sbcl: the bytes as a token (UTF-8 without quote, dispatch, string or list characters),
  read by `sexp.read` and by a running SBCL (tests/sbcl.py): both refuse it or both read
  the same datum, SBCL's float bits, symbol name and package included. Needs sbcl.

The seed corpus is scripts/fuzz_corpus/TARGET/ (small, in the repository). What libFuzzer
adds during a run, and any crash file, goes to a work directory (a new temporary one
unless --work is given), never to the repository. The last line sums up the run:
executions per second, coverage (libFuzzer's edges "cov" and features "ft") and findings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import atheris
except ImportError:
    sys.exit("scripts/fuzz.py needs atheris: .venv/bin/pip install -e '.[fuzz]'")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the SBCL helpers live with the tests

# Coverage feedback is needed only where libFuzzer runs, the child process.
with (atheris.instrument_imports(include=["notifier", "telemetry"]) if "--child" in sys.argv
      else contextlib.nullcontext()):
    import requests
    from notifier import envelope, payload, sexp
    from notifier.standin import validate
    from telemetry import merge
    from telemetry.config import Config
from tests import sbcl  # noqa: E402  (not instrumented: the judge, not the judged)

CORPUS = HERE / "fuzz_corpus"
LOCAL = (("127.0.0.1", None),)
HOOK = "http://127.0.0.1:8099/api/webhooks/1/tok"  # a made-up token
MAX_MESSAGE_CHARS = 300
"""Error messages quote at most a short prefix of the input (issue 8)."""

MAX_LEN = {"sexp": 4096, "envelope": 8192, "fit": 16384, "snapshot": 4096, "sbcl": 64}
"""Longest input per target: fit needs room for 2000-character content and 6000
characters of embeds to reach its splitting."""

DICTIONARY = {
    "sexp": ['(', ')', ' . ', '"', '\\', '|', '#A((3) base-char . "abc")', '#t', '#f', '#.', 'nil',
             ':key', 'swimmy.core::', '1.0d0', '1.5e7', '1/3', ';', '\n'],
    "envelope": ['(type . "NOTIFIER")', '(schema_version . 1)', '(action . "SEND")', '(payload ',
                 '(payload_json . "', '"type":"NOTIFIER"', '"webhook":', '"payload":', '"data":',
                 '"payload_json":', '"content":', '"embeds":', '\\u', '\\/', '%2F', HOOK],
    "fit": ['"content":', '"embeds":', '"title":', '"description":', '"fields":', '"name":',
            '"value":', '"footer":', '"author":', '"text":', '"poll":', '"username":', '```',
            '\\n', ' ', '\\u200d', '\\ud83c\\udde6', '\\u0301', '>>> ', '[', '{', '],', '},'],
    "snapshot": ['(schema_version . 1)', '(timestamp . ', '(queue_len . ', '(drops . ',
                 '(errors . ', '(delivered . ', '(webhooks ', ' . ', '(', ')', 'nil', '1.5d0', '"',
                 '#.'],
    "sbcl": ['1', '.', '+', '-', '/', ':', '::', '|', '||', '\\', 'e', 'd', 'f', 's', 'l', 'r', 'E',
             'D', '1.5', 'e+', 'd-', '+.', '٣', '١', '٠', '５', '𝟘', '𐴳', 'ı', 'ς', 'ß', 'ǅ', 'İ',
             'ﬁ', 'ა', '\u0301', '\u0345', '\x0b', '\x08', ' ', 'nil', 'keyword:'],
}
"""Tokens libFuzzer splices into inputs, so that mutations reach past the syntax."""


def short(text):
    assert len(text) <= MAX_MESSAGE_CHARS, f"message of {len(text)} characters"


def postable(url, parts):
    """What the relay will do with an accepted message must work."""
    assert not re.search(r"[\s\x00-\x1f\x7f]", url), repr(url)
    requests.Request("POST", url + ("&" if "?" in url else "?") + "wait=true").prepare()
    assert parts
    for part in parts:
        json.dumps(part, ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert payload.fits(part), part
        assert validate(part) == {}, (validate(part), part)


def fuzz_sexp(data):
    try:
        value = sexp.read(data)
    except sexp.SexpError as exc:
        short(str(exc))
        try:
            sexp.read_alist(data)
        except sexp.SexpError:
            return
        raise AssertionError("read_alist accepts what read refuses")
    assert sexp.read_alist(data) == sexp.alist_entries(value)
    sexp.to_python(value)


def fuzz_envelope(data):
    try:
        message = envelope.parse(data, LOCAL)
    except envelope.EnvelopeError as exc:
        short(exc.reason)
        return
    postable(message.webhook, payload.fit(message.payload))


def fuzz_fit(data):
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # not JSON: parse's business, not fit's
        return
    wrapped = json.dumps({"type": "NOTIFIER", "webhook": HOOK, "payload": body})
    try:
        message = envelope.parse(wrapped, LOCAL)
    except envelope.EnvelopeError:
        return
    parts = payload.fit(message.payload)
    postable(message.webhook, parts)
    if payload.fits(message.payload):
        assert parts == [message.payload]


SYSTEM_METRICS = (b"((swimmy.school::schema_version . 1) (swimmy.school::timestamp . 3913056000)"
                  b" (swimmy.school::heap_used_mb . 117.73757))")
NOW = 1_780_000_000.0


NOT_IN_A_TOKEN = re.compile("[#'`,\"();]")
"""Characters that start data other than a token (or a form this reader refuses)."""


def targets(work):
    """The targets by name; the snapshot's reader reads a file, written in `work`; the
    SBCL differential starts SBCL on its first input."""
    config = Config(work, work / "notifier_metrics.sexp", work / "system_metrics.sexp")
    judge = []

    def fuzz_snapshot(data):
        config.notifier_metrics.write_bytes(data)
        reading = merge.read_notifier(config, NOW)
        short(reading.reason or "")
        merged = merge.merged_text(SYSTEM_METRICS, reading, NOW)
        entries = sexp.read_entries(merged)  # the next merge (and the Lisp side) can read it
        assert entries[:3] == sexp.read_entries(SYSTEM_METRICS)

    def fuzz_sbcl(data):
        try:
            token = data.decode("utf-8")
        except UnicodeDecodeError:
            return
        if not token or NOT_IN_A_TOKEN.search(token) or token.startswith("\ufeff"):
            return  # a byte-order mark opening the input is dropped on purpose
        if not judge:
            executable = sbcl.find_sbcl()
            if executable is None:
                sys.exit("the sbcl target needs sbcl (apt-get install sbcl)")
            judge.append(sbcl.SbclTokens(executable))
        ours, theirs = judge[0].same(token)
        assert ours == theirs or sbcl.refused_on_purpose(token, ours, theirs), \
            (token, ours, theirs)

    return {"sexp": fuzz_sexp, "envelope": fuzz_envelope, "fit": fuzz_fit,
            "snapshot": fuzz_snapshot, "sbcl": fuzz_sbcl}


def child(target, work, libfuzzer_args):
    """Run libFuzzer in this process; it exits the process when done."""
    atheris.Setup([sys.argv[0], *libfuzzer_args], targets(work)[target])
    atheris.Fuzz()


def campaign(target, seconds, work):
    """Fuzz `target` for `seconds` in a child process, echo its output, sum it up."""
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    dictionary = work / "tokens.dict"
    dictionary.write_text("".join('"' + "".join(f"\\x{byte:02x}" for byte in token.encode()) + '"\n'
                                  for token in DICTIONARY[target]))
    args = [f"-max_total_time={seconds}", f"-max_len={MAX_LEN[target]}", "-timeout=10",
            "-print_final_stats=1", f"-dict={dictionary}", f"-artifact_prefix={work}/",
            str(corpus), str(CORPUS / target)]
    process = subprocess.Popen([sys.executable, __file__, target, "--child", "--work", str(work),
                                "--", *args],
                               stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True,
                               errors="replace")
    output, started = [], time.monotonic()
    for line in process.stdout:
        sys.stdout.write(line)
        output.append(line)
    code = process.wait()
    elapsed = time.monotonic() - started
    text = "".join(output)
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", text)
    execs = re.search(r"stat::number_of_executed_units:\s+(\d+)", text)
    rate = re.search(r"stat::average_exec_per_sec:\s+(\d+)", text)
    findings = re.findall(r"Test unit written to (\S+)", text)
    edges, features = coverage[-1] if coverage else ("?", "?")
    print(f"\nfuzz {target}: {execs[1] if execs else '?'} executions in {elapsed:.0f} s, "
          f"{rate[1] if rate else '?'} exec/s, coverage {edges} edges / {features} features, "
          f"corpus of {len(list(corpus.iterdir()))} inputs in {corpus}")
    if findings or code:
        print(f"FINDING (exit {code}): {' '.join(findings) or 'see the output above'}\n"
              f"replay: {sys.executable} {__file__} {target} --run {' '.join(findings)}")
        return 1
    print("no findings")
    return 0


def replay(target, paths):
    with tempfile.TemporaryDirectory() as work:
        check = targets(Path(work))[target]
        for path in paths:
            print(f"{path}: ", end="", flush=True)
            check(Path(path).read_bytes())
            print("ok")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(targets(Path())))
    parser.add_argument("--seconds", type=int, default=60, help="time budget (default 60)")
    parser.add_argument("--work", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--run", nargs="+", metavar="FILE", help="replay these inputs and stop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # what follows is libFuzzer's
    args, libfuzzer = parser.parse_args(argv[:split]), argv[split + 1:]
    if args.run:
        return replay(args.target, args.run)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.target}-"))
    if args.child:
        child(args.target, work, libfuzzer)
    return campaign(args.target, args.seconds, work)


if __name__ == "__main__":
    sys.exit(main())
