"""Inputs scripts/fuzz.py found, each cut down by hand to what makes it fail, kept as
plain tests at the level of the target that found it. The first four came from one
minute per target on the code issue 8 was filed against (commit fe8f754)."""

import json

from notifier import envelope, sexp
from telemetry import merge
from telemetry.config import Config

LOCAL = (("127.0.0.1", None),)
MAX_MESSAGE_CHARS = 300  # as scripts/fuzz.py: an error quotes a short prefix of the input


def refusal(function, data, error):
    try:
        function(data)
    except error as exc:
        return str(exc)
    raise AssertionError(f"{data!r} was accepted")


def test_sexp_a_long_symbol_with_a_bad_package_marker_is_quoted_short():
    """fuzz sexp: the message quoted all 500 characters of the symbol."""
    message = refusal(sexp.read, b"((a::b::" + b"\x15" * 500 + b" . 1))", sexp.SexpError)
    assert "package marker" in message and len(message) <= MAX_MESSAGE_CHARS


def test_envelope_quoting_a_bad_symbol_stays_short():
    """fuzz envelope: the same, inside an envelope with an escaped URL, gave a reason of
    592 characters."""
    data = b'((type . "NOTIFY") (webhook . http:\\/\\/127.0.' + b"\x00" * 300 + b"0.1:8099))"
    reason = refusal(lambda d: envelope.parse(d, LOCAL), data, envelope.EnvelopeError)
    assert len(reason) <= MAX_MESSAGE_CHARS


def test_fit_a_lone_surrogate_in_content_long_enough_to_split_is_refused_at_the_door():
    """fuzz fit: accepted, then fit() made requests that cannot be encoded."""
    body = json.dumps({"content": "👨\u200d👩\u200d👧🇯🇵é" * 50 + "\udde6" + "é" * 2200})
    data = json.dumps({"type": "NOTIFIER", "webhook": "http://127.0.0.1/api/webhooks/1/tok",
                       "payload_json": body})
    reason = refusal(lambda d: envelope.parse(d, LOCAL), data, envelope.EnvelopeError)
    assert "surrogate" in reason


def test_snapshot_a_long_schema_version_value_gives_a_capped_reason(tmp_path):
    """fuzz snapshot: the reason quoted the whole value, 366 characters, into
    system_metrics.sexp."""
    config = Config(tmp_path, tmp_path / "notifier_metrics.sexp", tmp_path / "system_metrics.sexp")
    config.notifier_metrics.write_bytes(b"((schema_version T" + b"\x00" * 300 + b"rors . 0))")
    reading = merge.read_notifier(config, 1_780_000_000.0)
    assert reading.exit is merge.Exit.UNSUPPORTED_SCHEMA
    assert len(reading.reason) <= MAX_MESSAGE_CHARS
    sexp.read_entries(merge.merged_text(None, reading, 1_780_000_000.0))


def test_envelope_a_symbol_of_control_characters_is_quoted_short_once_escaped():
    """fuzz envelope (issue 18, a minute after control characters were escaped): a symbol
    of 35 control characters, quoted within 40 characters, then escaped to six characters
    each, gave a reason of 311 characters. Now the quote is escaped before it is cut."""
    data = (b'((type . "NOTIFIER") (webhook . "https://discord.com/api/webhooks/1/tok") '
            b'(payload (content . "x") (footer (text ' + b"\x12" * 35 + b'. "s"))))')
    reason = refusal(lambda d: envelope.parse(d, LOCAL), data, envelope.EnvelopeError)
    assert "is a symbol" in reason and len(reason) <= MAX_MESSAGE_CHARS
    assert "\x12" not in reason and "\\u0012" in reason


def test_sbcl_normalization_goes_on_across_empty_bars():
    """fuzz sbcl (issue 18): SBCL read ``u|||\\x7f|r||||||\\u0301||||s`` as ``U\\x7fŔS``,
    composing r and the accent across the empty bars; we normalized each piece apart."""
    assert sexp.read("r||\u0301") == sexp.Symbol("Ŕ")
    assert sexp.read("u|||\x7f|r||||||\u0301||||s") == sexp.Symbol("U\x7fŔS")
