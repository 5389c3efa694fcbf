"""Hostile envelopes through every door a user meets: the relay as a process, `check`,
`send --file`. Each costs only itself: refused with its own reason, counted, no traceback,
and the good envelopes around it are delivered."""

import json
import logging
import os
import random
import re
import subprocess
import sys

import pytest

from notifier import config, envelope, sexp
from notifier.admission import preview
from notifier.relay import Relay
from notifier.standin import DiscordStandIn
from tests.harness import assert_balanced, contents, envelope_text
from tests.test_redaction import (CONTROLS, PLACES, RAW_CONTROL, control_cases, leaked,
                                  malformed_url, token_from)

TOKEN = "hostileTOKEN123"


def hostile_cases(webhook: str) -> dict[str, tuple[bytes, str]]:
    """name: (envelope, the reason it is refused for)."""
    def json_envelope(payload_text: str, hook: str = webhook) -> bytes:
        return ('{"type":"NOTIFIER","webhook":%s,"payload":%s}'
                % (json.dumps(hook), payload_text)).encode()

    def lisp_envelope(hook: str = webhook, **fields) -> bytes:
        return sexp.dumps({"type": "NOTIFIER", "webhook": hook, **fields}).encode()

    def lisp_payload(payload: str) -> bytes:
        return f'((type . "NOTIFIER") (webhook . "{webhook}") (payload . {payload}))'.encode()

    too_deep = f"nesting deeper than {envelope.MAX_NESTING} levels"
    surrogate = "not valid Unicode (an unpaired surrogate, U+D83D)"
    bad_url = "webhook URL holds whitespace, a control character"
    return {
        "json nested 1000 deep": (json_envelope("[" * 1000 + "]" * 1000), too_deep),
        "payload_json nested 1000 deep": (
            lisp_envelope(payload_json="[" * 1000 + "]" * 1000), too_deep),
        "payload nested 100 deep": (
            json_envelope('{"content":"x","a":' + "[" * 100 + "]" * 100 + "}"), too_deep),
        "alist payload nested 40 deep": (
            lisp_payload('((content . "x") (a . ' + "(" * 40 + ")" * 40 + "))"), too_deep),
        "S-expression nested 1000 deep": (
            lisp_payload("(" * 1000 + ")" * 1000), f"nesting deeper than {sexp.MAX_DEPTH}"),
        "unpaired surrogate": (json_envelope('{"content":"cut \\ud83d"}'), surrogate),
        "unpaired surrogate in payload_json": (
            lisp_envelope(payload_json='{"content":"cut \\ud83d"}'), surrogate),
        "NaN": (json_envelope('{"content":"x","embeds":[{"title":"t","color":NaN}]}'),
                "a number JSON cannot carry"),
        "webhook with a trailing newline": (
            lisp_envelope(webhook + "\n", payload_json='{"content":"x"}'), bad_url),
        "webhook with a tab in the host": (
            lisp_envelope(webhook.replace("127.0.0.1", "127.0.\t0.1"),
                          payload_json='{"content":"x"}'), bad_url),
        "webhook with a space": (
            lisp_envelope(webhook.replace("/api/", "/api /"), payload_json='{"content":"x"}'),
            bad_url),
    }


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


def test_the_relay_refuses_each_hostile_envelope_and_delivers_the_good_ones(discord, relays,
                                                                            pushers):
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    good = discord.webhook_url(1)
    cases = hostile_cases(discord.webhook_url(2).replace("/tok", f"/{TOKEN}"))
    pusher = pushers(relay.endpoint)
    pusher.send(envelope_text(good, "before"))
    for i, (data, _) in enumerate(cases.values()):
        pusher.send(data)
        pusher.send(envelope_text(good, f"after{i}"))
    snapshot = relay.wait_metrics(
        lambda m: m["delivered"] == 1 + len(cases) and m["rejected"] == len(cases),
        what="the good delivered and the hostile rejected")

    assert contents(discord, 1) == ["before"] + [f"after{i}" for i in range(len(cases))]
    assert discord.messages("2") == [] and snapshot["failed"] == snapshot["errors"] == 0
    assert_balanced(snapshot)
    log = relay.log()
    for _, reason in cases.values():
        assert any(reason in line for line in log.splitlines() if " reason=" in line)
    assert "Traceback" not in log and TOKEN not in log
    assert relay.stop() == 0


@pytest.mark.parametrize("name", list(hostile_cases("http://127.0.0.1:8099/api/webhooks/7/tok")))
def test_check_gives_the_reason_without_a_traceback(name):
    data, reason = hostile_cases(f"http://127.0.0.1:8099/api/webhooks/7/{TOKEN}")[name]
    result = subprocess.run([sys.executable, "-m", "notifier", "check", "--allowed-hosts",
                             "127.0.0.1:8099"], input=data, capture_output=True, timeout=60)
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.startswith(b"rejected: ") and reason in result.stderr.decode()
    assert b"Traceback" not in result.stderr and TOKEN.encode() not in result.stderr


def test_send_file_refuses_a_hostile_envelope_without_a_traceback(tmp_path):
    data, reason = hostile_cases("http://127.0.0.1:8099/api/webhooks/7/tok")["unpaired surrogate"]
    (tmp_path / "envelope.json").write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-m", "notifier", "send", "--allowed-hosts", "127.0.0.1:8099",
         "--file", str(tmp_path / "envelope.json")], capture_output=True, timeout=60)
    assert result.returncode == 2 and reason in result.stderr.decode()
    result = subprocess.run(
        [sys.executable, "-m", "notifier", "send", "--webhook",
         "http://127.0.0.1:8099/api/webhooks/7/tok", "--allowed-hosts", "127.0.0.1:8099",
         "--json", "[" * 5000], capture_output=True, timeout=60)
    assert result.returncode == 2 and b"nesting deeper than" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("written", [
    "https://discord.com/api/webhooks/1/{token}",
    "https:\\/\\/discord.com\\/api\\/webhooks\\/1\\/{token}",  # JSON with escaped slashes
    "https:\\\\/\\\\/discord.com\\\\/api\\\\/webhooks\\\\/1\\\\/{token}",  # ... printed by Lisp
    "https:\\u002f\\u002fdiscord.com\\u002fapi\\u002fwebhooks\\u002f1\\u002f{token}",
    "https%3A%2F%2Fdiscord.com%2Fapi%2Fwebhooks%2F1%2F{token}",  # percent-encoded
    "https%253A%252F%252Fdiscord.com%252Fapi%252Fwebhooks%252F1%252F{token}",  # ... twice
])
def test_a_rejection_preview_never_shows_the_token_however_it_was_escaped(written):
    data = ('{"type":"NOPE","webhook":"%s","payload":{"content":"x"}}'
            % written.format(token=TOKEN)).encode()
    for shown in (preview(data), envelope.scrub(data.decode())):
        assert "webhooks" in shown and TOKEN[:3] not in shown, shown


def test_an_unexpected_parser_exception_rejects_only_that_envelope(tmp_path, monkeypatch,
                                                                   caplog):
    settings = config.load({"SWIMMY_HOME": str(tmp_path),
                            "SWIMMY_NOTIFIER_ALLOWED_HOSTS": "127.0.0.1:8099"})
    relay = Relay(settings)
    real_parse = envelope.parse

    def parse(data, allowed_hosts=()):
        if b"boom" in data:
            raise KeyError("a bug")
        return real_parse(data, allowed_hosts)
    monkeypatch.setattr(envelope, "parse", parse)
    hook = "http://127.0.0.1:8099/api/webhooks/7/tok"
    relay.outbox.accept([envelope_text(hook, text) for text in ("a", "boom", "c", "boom")])
    with caplog.at_level(logging.WARNING, "notifier.relay"):
        relay.admission.parse(10)
    snapshot = relay.outbox.snapshot()
    assert (snapshot["rejected"], snapshot["pending"], snapshot["unparsed"]) == (2, 2, 0)
    assert [record.exc_info is not None for record in caplog.records
            if "bug in the parser" in record.getMessage()] == [True]
    assert "reason=internal error while parsing: KeyError" in caplog.text


@pytest.mark.parametrize("make", [
    lambda path: path.write_bytes(b"\x00\xff((( not lisp"),
    lambda path: path.write_text("(" * 100_000),
    lambda path: os.mkfifo(path),
], ids=["garbage", "nesting bomb", "fifo"])
def test_a_hostile_legacy_pending_file_is_set_aside_and_the_relay_starts(tmp_path, discord,
                                                                         relays, make):
    pending = tmp_path / "data" / "notifier_pending.sexp"
    pending.parent.mkdir()
    make(pending)
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    assert "notifier_pending.sexp unreadable" in relay.log() and "Traceback" not in relay.log()
    assert not pending.exists() and list(pending.parent.glob("notifier_pending.sexp.unreadable-*"))
    relay.wait_metrics(lambda m: m["received"] == 0 and m["state"] == "running")
    assert relay.stop() == 0


def test_malformed_webhook_urls_leave_no_token_fragment_in_the_log_metrics_or_check(
        discord, relays, pushers):
    """Issue 18: `…/webhooks/123456//TOKEN` and `…/webhook/123456/TOKEN` showed 26 and 28
    of the token's characters in the rejection line. Sixty malformed URLs around made-up
    tokens, in every place an envelope can quote them: no 6 characters of a token in a
    row anywhere a person reads."""
    rng = random.Random(18)
    hosts = [f"127.0.0.1:{discord.port}", "evil.example", "discord.com.evil.example"]
    sent = []
    for i in range(60):
        token = token_from(rng)
        place = sorted(PLACES)[i % len(PLACES)]
        sent.append((token, PLACES[place](malformed_url(rng.choice, token, hosts)).encode()))
    relay = relays(allowed=f"127.0.0.1:{discord.port}", log_level="info")
    pusher = pushers(relay.endpoint)
    for _, data in sent:
        pusher.send(data)
    snapshot = relay.wait_metrics(lambda m: m["received"] == len(sent) and m["pending"] == 0,
                                  what="every envelope handled")
    assert relay.stop() == 0
    log, metrics = relay.log(), relay.metrics_file.read_text()
    shown = [subprocess.run([sys.executable, "-m", "notifier", "check", "--allowed-hosts",
                             f"127.0.0.1:{discord.port}"], input=data, capture_output=True,
                            timeout=60) for _, data in sent[:12]]
    assert snapshot["rejected"] > 40 and " rejected " in log
    for token, _ in sent:
        for where, text in (("log", log), ("metrics", metrics),
                            *((f"check {i}", (result.stdout + result.stderr).decode())
                              for i, result in enumerate(shown))):
            assert not leaked(token, text), (where, leaked(token, text))


def test_control_characters_never_split_or_color_a_log_line(discord, relays, pushers):
    """Issue 18: a newline or CR after `#` split the rejection line, ESC reached the log.
    Every C0 and C1 character, in each place a reason or preview quotes: each event one
    line, no raw control character in the text log."""
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    pusher = pushers(relay.endpoint)
    cases = [data for char in CONTROLS for data in control_cases(char).values()]
    hook = f"http://127.0.0.1:{discord.port}/api/webhooks/7/tok"
    for data in cases:
        pusher.send(data.replace(b"http://127.0.0.1:8099/api/webhooks/7/tok", hook.encode()))
    relay.wait_metrics(lambda m: m["received"] == len(cases) and m["pending"] == 0,
                       what="every envelope handled")
    assert relay.stop() == 0
    lines = relay.log().split("\n")
    assert lines[-1] == "" and len(lines) > 40
    for line in lines[:-1]:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ",
                        line), line
        assert not RAW_CONTROL.search(line), line


@pytest.mark.parametrize("char", ["\x1b", "\r", "\n", "\x9b", "\x00", "\x7f"],
                         ids=["ESC", "CR", "LF", "CSI", "NUL", "DEL"])
def test_check_escapes_control_characters_on_its_output(char):
    """Issue 18: ESC reached `check`'s standard error. `check` as a process, each place a
    reason or a shown value quotes input (tests/test_redaction.py feeds every C0 and C1
    character to the same code in-process): one line on standard error, no raw control
    character; the JSON on standard output keeps its own line breaks only."""
    for name, data in control_cases(char).items():
        shown = subprocess.run([sys.executable, "-m", "notifier", "check", "--allowed-hosts",
                                "127.0.0.1:8099"], input=data, capture_output=True, timeout=60)
        err, out = shown.stderr.decode(), shown.stdout.decode()
        assert not RAW_CONTROL.search(err.rstrip("\n")) and err.count("\n") <= 1, (name, err)
        assert not RAW_CONTROL.search(out.replace("\n", "")), (name, out)
        assert (shown.returncode == 0) == bool(out), (name, shown.returncode)
