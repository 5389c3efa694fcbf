"""No token fragment and no control character in what people read (issue 18, items 4
and 7): the relay's log, `check`'s output and the metrics, whatever a producer sends.

The property tests drive the relay's own code in this process (the outbox, the parser,
the log formatter, the metrics writer, `check`'s main); tests/test_hostile_input.py does
the same through a relay process. Tokens are made up."""

import contextlib
import io
import json
import logging
import random
import re
from urllib.parse import quote

import pytest
from hypothesis import given, strategies as st

from notifier import config, envelope, logs, redaction, sexp
from notifier.__main__ import main
from notifier.admission import preview
from notifier.logs import Throttle
from notifier.relay import Relay

LOCAL = "127.0.0.1:8099"
TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
CONTROLS = [chr(code) for code in (*range(0x20), *range(0x7f, 0xa0))]
"""Every C0 and C1 control character (and DEL)."""
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def token_from(rng: random.Random, length: int = 68) -> str:
    """A made-up token shaped like Discord's: 68 characters of base64url."""
    return "".join(rng.choice(TOKEN_ALPHABET) for _ in range(length))


def leaked(token: str, text: str) -> str | None:
    """The first 6 characters in a row of `token` that appear in `text`, if any."""
    return next((token[i:i + 6] for i in range(len(token) - 5) if token[i:i + 6] in text), None)


# ---------------------------------------------------------------- malformed URLs

SCHEMES = ["https://", "http://", "https:/", "https:///", "HTTPS://", "", "//"]
HOSTS = ["discord.com", "discordapp.com", "canary.discord.com", LOCAL, "evil.example",
         "discord.com.evil.example"]
APIS = ["/api", "/api/v10", "", "/API", "/api/"]
WORDS = ["webhooks", "webhook", "Webhooks", "WEBHOOK", "webhoks", "web-hooks", "hooks", ""]
SLASHES = ["/", "//", "///", "\\", "%2F", "\\/", "/ ", "", "/./", "/../"]
IDS = ["", "123456", "1234567890123456789", "abc", "12x"]
TAILS = ["", "/", "//", "?wait=true", "?thread_id=1", "#x", "/messages/1", " ", "\n", "\t",
         '"', "..", "/..", "%20"]
ENCODINGS = {
    "plain": lambda url: url,
    "escaped slashes": lambda url: url.replace("/", "\\/"),
    "percent-encoded": lambda url: quote(url, safe=""),
}


def malformed_url(choose, token: str, hosts=HOSTS) -> str:
    """A webhook URL around `token`, broken in one or more of the ways people break them
    (scheme, host, path, the word webhooks, the slashes, the id, what follows), each
    part picked by `choose` (hypothesis, or a seeded random)."""
    url = (choose(SCHEMES) + choose(hosts) + choose(APIS) + choose(SLASHES) + choose(WORDS)
           + choose(SLASHES) + choose(IDS) + choose(SLASHES) + token + choose(TAILS))
    return ENCODINGS[choose(sorted(ENCODINGS))](url)


@st.composite
def malformed_urls(draw):
    """(token, a malformed webhook URL around it)."""
    token = token_from(draw(st.randoms(use_true_random=False)))
    return token, malformed_url(lambda options: draw(st.sampled_from(options)), token)


def lisp_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


PLACES = {
    "json webhook": lambda url: json.dumps(
        {"type": "NOTIFIER", "webhook": url, "payload": {"content": "x"}}),
    "lisp webhook": lambda url: f'((type . "NOTIFIER") (webhook . {lisp_string(url)}) '
                                f'(payload_json . "{{\\"content\\":\\"x\\"}}"))',
    "lisp webhook, unquoted": lambda url: f'((type . "NOTIFIER") (webhook . {url}) '
                                          f'(payload_json . "{{}}"))',
    "json, payload first": lambda url: '{"payload":{"content":"x"},"type":"NOTIFIER",'
                                       f'"webhook":{json.dumps(url)}}}',
    "type": lambda url: json.dumps({"type": url, "webhook": "x", "payload": {}}),
    "payload key": lambda url: f'((type . "NOTIFIER") (webhook . "https://discord.com/api/'
                               f'webhooks/1/x") (payload . (({lisp_string(url)} . sym))))',
    "alone": lambda url: url,
    "bad json": lambda url: '{"webhook": ' + json.dumps(url) + ", oops",
}


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """A relay, not started: its outbox, parser, rejection log and metrics writer, with
    every rejection line written (not throttled) to `relay.lines`."""
    home = tmp_path_factory.mktemp("relay")
    (home / "data").mkdir()
    relay = Relay(config.load({"SWIMMY_HOME": str(home),
                               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": LOCAL}))
    relay.admission._reject_log = Throttle(burst=10 ** 9)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.ScrubbingFormatter())
    logger = logging.getLogger("notifier")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    relay.log = stream
    yield relay
    logger.removeHandler(handler)
    logger.setLevel(level)


def through_relay(relay, data: bytes) -> tuple[str, str]:
    """(the log lines, the metrics file) after the relay took and parsed `data`."""
    relay.log.seek(0)
    relay.log.truncate()
    relay.outbox.accept([data])
    relay.admission.parse(1)
    relay.reporter.write()
    return relay.log.getvalue(), relay.settings.metrics_file.read_text()


def through_check(tmp_path, data: bytes) -> str:
    """Standard output and standard error of `notifier check` on `data`."""
    path = tmp_path / "envelope"
    path.write_bytes(data)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(["check", "--allowed-hosts", LOCAL, str(path)])
    return out.getvalue() + err.getvalue()


@given(malformed_urls(), st.sampled_from(sorted(PLACES)))
def test_no_fragment_of_a_token_in_the_log_check_or_the_metrics(relay, tmp_path_factory,
                                                                generated, place):
    token, url = generated
    data = PLACES[place](url).encode("utf-8")
    log, metrics = through_relay(relay, data)
    shown = through_check(tmp_path_factory.getbasetemp(), data)
    for where, text in (("log", log), ("metrics", metrics), ("check", shown)):
        assert not leaked(token, text), (where, leaked(token, text), text)


@pytest.mark.parametrize("url, shown", [
    ("https://discord.com/api/webhooks/123456//{t}", "/webhooks/123456//<redacted>"),
    ("https://discord.com/api/webhook/123456/{t}", "/webhook/123456/<redacted>"),
    ("https://discord.com/api//WEBHOOKS///123456/{t}?wait=true", "//WEBHOOKS///123456/<redacted>"),
    ("https:\\/\\/discord.com\\/api\\/webhooks\\/1\\/{t}", "\\/webhooks\\/1\\/<redacted>"),
    ("https%3A%2F%2Fdiscord.com%2Fapi%2Fwebhook%2F1%2F{t}", "%2Fwebhook%2F1%2F<redacted>"),
    ("https://discord.com/api/webhooks/123{t}", "/webhooks/<redacted>"),  # no slash after the id
    ("https://discord.com/api/wbhks/1/{t}", "/api/wbhks/1/<redacted>"),  # a run of 68
])
def test_the_issue_s_urls_show_no_token(url, shown):
    token = token_from(random.Random(7))
    text = redaction.hide_tokens(url.format(t=token))
    assert text.endswith(shown) and not leaked(token, text), text


def test_a_run_cut_off_by_an_ellipsis_is_hidden_whatever_its_length():
    assert redaction.hide_tokens("'http://x/1/abc12…' at line 1") == "'http://x/1/<redacted>…' at line 1"
    assert redaction.shorten("word " * 20, 12) == "word word w…"
    assert redaction.hide_tokens("SWIMMY_NOTIFIER_ALLOWED_HOST") == "<redacted>"  # 28 in a row


def test_a_preview_hides_the_head_of_a_token_the_byte_cut_left():
    token = token_from(random.Random(3))
    data = ("x " * 150 + token).encode()  # the token starts 20 bytes before the cut
    assert not leaked(token, preview(data)) and preview(data).startswith("'x x x")


# ---------------------------------------------------------------- control characters

def test_every_control_character_is_escaped():
    text = "".join(CONTROLS) + "\u2028\u2029"
    escaped = redaction.escape_controls(text)
    assert not RAW_CONTROL.search(escaped)
    assert json.loads(f'"{escaped}"') == text  # JSON-style escapes: they read back
    assert redaction.escape_controls("a\nb\x1b", keep_newlines=True) == "a\nb\\u001b"
    assert redaction.escape_controls("plain") == "plain"


def control_cases(char: str) -> dict[str, bytes]:
    """Envelopes with `char` where each kind of reason or preview quotes input."""
    hook = f"http://{LOCAL}/api/webhooks/7/tok"
    return {
        "after #": f'((type . "NOTIFIER") (webhook . "{hook}") #{char})'.encode(),
        "json key in the payload": ('((type . "NOTIFIER") (webhook . "%s") (payload . '
                                    '((|a%sb| . sym))))' % (hook, char)).encode(),
        "type": json.dumps({"type": f"X{char}", "webhook": hook,
                            "payload": {"content": "x"}}).encode(),
        "raw in a json string": ('{"type":"N%sX","webhook":"%s"}' % (char, hook)).encode(),
        "webhook": json.dumps({"type": "NOTIFIER", "webhook": hook + char,
                               "payload": {"content": "x"}}).encode(),
        "content (accepted)": json.dumps({"type": "NOTIFIER", "webhook": hook,
                                          "payload": {"content": f"a{char}b"}}).encode(),
        "username": json.dumps({"type": "NOTIFIER", "webhook": hook,
                                "payload": {"content": "x", "username": f"Discord{char}"}}
                               ).encode(),
    }


@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_no_control_character_reaches_a_reason_a_log_line_or_check(relay, tmp_path, char):
    for name, data in control_cases(char).items():
        try:
            envelope.parse(data, (("127.0.0.1", 8099),))
        except envelope.EnvelopeError as exc:
            assert not RAW_CONTROL.search(exc.reason), (name, exc.reason)
        log, metrics = through_relay(relay, data)
        assert not RAW_CONTROL.search(log.rstrip("\n")), (name, log)
        assert log.count("\n") <= 1, (name, log)  # one line per event
        shown = through_check(tmp_path, data)
        assert not RAW_CONTROL.search(shown.replace("\n", "")), (name, shown)
        assert sexp.read_entries(metrics)  # the metrics file still reads


def test_the_json_log_escapes_control_characters_too():
    record = logging.LogRecord("notifier.relay", logging.WARNING, __file__, 1,
                               "rejected reason=%s", ("a\x1b[31m\x9bb\u2028c",), None)
    line = logs.JsonFormatter().format(record)
    assert not RAW_CONTROL.search(line)
    assert json.loads(line)["message"] == "rejected reason=a\\u001b[31m\\u009bb\\u2028c"
