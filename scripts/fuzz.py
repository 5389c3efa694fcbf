#!/usr/bin/env python3
"""Coverage-guided fuzzing of the doors hostile input comes through (atheris, libFuzzer).

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python scripts/fuzz.py TARGET --seconds 600   # sexp, envelope, fit, snapshot, sbcl, flood, urls
    .venv/bin/python scripts/fuzz.py TARGET --run FILE...   # replay inputs (a crash file)

Each target runs one input and raises only for a finding: an exception other than the
documented refusal (`SexpError`, `EnvelopeError`; the merge's reader refuses by returning
a status, so for it any exception), or a result that breaks the contract:

- sexp: `sexp.loads` (`read`, then `to_python`); `read_alist`, with its fast path, agrees
  with the general reader; error messages stay short.
- envelope: `envelope.parse` (the stand-in's host allowed); an accepted message can be
  posted: every request `fit` makes of it encodes as strict UTF-8 JSON, is within
  Discord's limits (its other fields too) and passes the stand-in's validator, and its
  URL is one `requests` takes; a refused one's reason and log preview hold no control
  character and no 6 characters in a row of a made-up token the input holds whole
  (however malformed the URL around it).
- fit: `payload.fit` on JSON payloads the relay accepts (the fuzz bytes are the payload),
  the same checks, and a payload within the limits comes back unchanged.
- snapshot: the telemetry merge reading the bytes as notifier_metrics.sexp, then merging
  into a system_metrics.sexp: the result reads back and its reason stays capped.
- flood: the bytes as what producers send (valid envelopes to two webhooks, frames of
  fuzz bytes, frames over the envelope cap, in batches, with parsing in between as the
  receiver does when the socket is idle) into the relay's intake with a small bound:
  every frame `envelope.parse` refuses is rejected, never dropped; the accounting
  identity holds; the messages held are exactly the newest valid ones (a valid message
  is dropped only for newer valid ones).
- urls: the bytes choose a malformed webhook URL around a made-up random token (the
  ways people break one: scheme, host, the word webhooks, slashes, id, dot segments,
  what follows, escaped or percent-encoded; tests/test_redaction.py's pieces) plus a
  free piece of fuzz text, and the place an envelope quotes it: the relay takes and
  parses it, `check` shows it; no 6 characters in a row of the token in the log line,
  the metrics file or `check`'s output (unless the input holds them elsewhere too), no
  control character there; an accepted URL is posted to exactly its own path.
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
import io
import json
import logging
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

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
    from notifier import config as relay_config, envelope, logs, payload, sexp
    from notifier.__main__ import main as notifier_main
    from notifier.admission import preview
    from notifier.logs import Throttle
    from notifier.outbox import Outbox
    from notifier.relay import Relay
    from notifier.standin import validate
    from telemetry import merge
    from telemetry.config import Config
from tests import sbcl  # noqa: E402  (not instrumented: the judge, not the judged)
from tests import test_redaction as broken  # noqa: E402  (how people break webhook URLs)

CORPUS = HERE / "fuzz_corpus"
LOCAL = (("127.0.0.1", None),)
HOOK = "http://127.0.0.1:8099/api/webhooks/1/tok"  # a made-up token
TOKEN = "mAdE-uP_t0kEn-Xq7Lr2Vw9Zk4Hs8Jd3Nf6Bp1Cy5Gt0Mv7Ql2Wr9Ek4Ux8Io3Sa6Dz1Fh5Yj0"
"""A made-up token of Discord's length and alphabet, in the envelope target's dictionary
in malformed URLs: no 6 characters of it in a row may reach a reason or a preview."""
MAX_MESSAGE_CHARS = 300
"""Error messages quote at most a short prefix of the input (issue 8)."""

MAX_LEN = {"sexp": 4096, "envelope": 8192, "fit": 16384, "snapshot": 4096, "sbcl": 64,
           "flood": 4096, "urls": 256}
"""Longest input per target: fit needs room for 2000-character content and 6000
characters of embeds to reach its splitting."""

DICTIONARY = {
    "sexp": ['(', ')', ' . ', '"', '\\', '|', '#A((3) base-char . "abc")', '#t', '#f', '#.', 'nil',
             ':key', 'swimmy.core::', '1.0d0', '1.5e7', '1/3', ';', '\n'],
    "envelope": ['(type . "NOTIFIER")', '(schema_version . 1)', '(action . "SEND")', '(payload ',
                 '(payload_json . "', '"type":"NOTIFIER"', '"webhook":', '"payload":', '"data":',
                 '"payload_json":', '"content":', '"embeds":', '\\u', '\\/', '%2F', HOOK,
                 TOKEN, '/webhook/', '//', '/webhooks//', '/api/webhook/1/', '"username":',
                 '"thread_name":', '"poll":', '"allowed_mentions":', '"flags":'],
    "fit": ['"content":', '"embeds":', '"title":', '"description":', '"fields":', '"name":',
            '"value":', '"footer":', '"author":', '"text":', '"poll":', '"username":', '```',
            '\\n', ' ', '\\u200d', '\\ud83c\\udde6', '\\u0301', '>>> ', '[', '{', '],', '},'],
    "snapshot": ['(schema_version . 1)', '(timestamp . ', '(queue_len . ', '(drops . ',
                 '(errors . ', '(delivered . ', '(webhooks ', ' . ', '(', ')', 'nil', '1.5d0', '"',
                 '#.'],
    "flood": ['((type . "NOTIFIER") (webhook . "' + HOOK + '") (payload_json . "{\\"content',
              '{"type":"NOTIFIER","webhook":"' + HOOK + '","payload":{"content":"x"}}', '\x00',
              '\x01', '\x02', '\x03'],
    "urls": ['/', '//', '\\/', '%2F', '%252F', '..', '.', 'webhooks', 'webhook', '?wait=true',
             '?thread_id=', '\\u002f', '#', '@', ':', '%', '\x00', '\n'],
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


def no_fragment(data, *shown, token=TOKEN):
    """No 6 characters in a row of `token`, where the input holds it whole, in what is
    shown, unless the input holds them elsewhere too; no control character either."""
    text = data.decode("utf-8", "replace")
    if token in text:
        elsewhere = text.replace(token, "\0")
        for part in shown:
            for i in range(len(token) - 5):
                fragment = token[i:i + 6]
                assert fragment not in part or fragment in elsewhere, (fragment, part)
    for part in shown:
        assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", part), part


def fuzz_envelope(data):
    try:
        message = envelope.parse(data, LOCAL)
    except envelope.EnvelopeError as exc:
        short(exc.reason)
        no_fragment(data, exc.reason, preview(data))
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

    home = work / "relay"
    (home / "data").mkdir(parents=True, exist_ok=True)
    logging.getLogger("notifier").setLevel(logging.ERROR)  # its rejection lines: not shown
    relay = Relay(relay_config.load({"SWIMMY_HOME": str(home), "SWIMMY_NOTIFIER_DURABLE": "0",
                                     "SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC": "0",
                                     "SWIMMY_NOTIFIER_ALLOWED_HOSTS": "127.0.0.1:8099"}))

    def fuzz_flood(data):
        """Byte 0: the bound (1 to 16); then per operation a byte: 0 a valid envelope,
        1 a frame of the next n bytes (n: the byte after), 2 a frame over the cap, 3 end
        the batch and parse n (the byte after) as the idle receiver does."""
        if not data:
            return
        queue_max, data = data[0] % 16 + 1, data[1:]
        relay.outbox = relay.admission.outbox = Outbox(queue_max, 0.0)
        valid, refused, batch, at, made = [], 0, [], 0, 0

        def take(frames):
            nonlocal refused
            for frame in frames:
                try:
                    envelope.parse(frame, LOCAL)
                    valid.append(frame)
                except envelope.EnvelopeError:
                    refused += 1
            relay.admission.take_in(frames, None)

        while at < len(data):
            op, size = data[at] % 4, data[at + 1] if at + 1 < len(data) else 0
            at += 1
            if op == 0:
                made += 1
                batch.append(sexp.dumps({"type": "NOTIFIER", "webhook": HOOK, "payload_json":
                                         json.dumps({"content": f"m{made}"})}).encode())
            elif op == 1:
                batch.append(data[at + 1:at + 1 + size])
                at += 1 + size
            elif op == 2:
                batch.append(b"(" * (envelope.MAX_ENVELOPE_BYTES + 1 + size))
                at += 1
            else:
                take(batch)
                batch = []
                relay.admission.parse(size)
                at += 1
        take(batch)
        relay.admission.digest_all()
        snapshot = relay.outbox.snapshot()
        held = [item.raw.data for item, _ in relay.outbox._lanes.held()]
        assert snapshot["received"] == sum(snapshot[key] for key in (
            "delivered", "drops", "rejected", "deduplicated", "failed", "lost", "pending"))
        assert (snapshot["rejected"], snapshot["drops"]) == (refused, max(0, len(valid) - queue_max)), \
            (snapshot["rejected"], refused, snapshot["drops"], len(valid), queue_max)
        assert held == valid[len(valid) - len(held):]

    seen = io.StringIO()

    def fuzz_urls(data):
        """The bytes pick each piece of a malformed URL (`broken.malformed_url`), a free
        piece of text put at a picked place in it, the token's seed and the place in an
        envelope; the relay and `check` then meet it as they meet any envelope."""
        if not seen.tell() and not logging.getLogger("notifier").handlers:
            handler = logging.StreamHandler(seen)
            handler.setFormatter(logs.ScrubbingFormatter())
            logger = logging.getLogger("notifier")
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
            relay.admission._reject_log = Throttle(burst=10 ** 9)
        provider = atheris.FuzzedDataProvider(data)
        token = broken.token_from(random.Random(provider.ConsumeUInt(4)),
                                  provider.ConsumeIntInRange(60, 80))  # Discord: 68
        url = broken.malformed_url(provider.PickValueInList, token, [*broken.HOSTS, "127.0.0.1"])
        free, at = provider.ConsumeUnicodeNoSurrogates(12), provider.ConsumeIntInRange(0, 200)
        url = url[:at] + free + url[at:] if provider.ConsumeBool() else url
        text = broken.PLACES[provider.PickValueInList(sorted(broken.PLACES))](url)
        envelope_bytes = text.encode("utf-8", "surrogatepass")
        seen.seek(0)
        seen.truncate()
        relay.outbox = relay.admission.outbox = relay.reporter.outbox = Outbox(4, 0.0)
        relay.outbox.accept([envelope_bytes])
        relay.admission.parse(1)
        relay.reporter.write()
        shown = io.StringIO()
        source = work / "envelope"
        source.write_bytes(envelope_bytes)
        with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown):
            notifier_main(["check", "--allowed-hosts", "127.0.0.1:8099", str(source)])
        log_line, metrics_text = seen.getvalue(), relay.settings.metrics_file.read_text()
        no_fragment(envelope_bytes, *log_line.splitlines(), metrics_text.replace("\n", " "),
                    shown.getvalue().replace("\n", " "), token=token)
        try:
            message = envelope.parse(envelope_bytes, LOCAL)
        except envelope.EnvelopeError:
            return
        posted = envelope.post_url(message.webhook)
        assert urlsplit(posted).path == urlsplit(message.webhook).path, (message.webhook, posted)

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
            "snapshot": fuzz_snapshot, "sbcl": fuzz_sbcl, "flood": fuzz_flood,
            "urls": fuzz_urls}


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
