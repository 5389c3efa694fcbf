"""`python -m notifier check`: what the relay would post, or why it refuses, as a process."""

import json
import subprocess
import sys

import requests

from notifier import envelope, payload

from tests.test_envelope import HOOK, PAYLOAD, TOKEN, lisp


def check(*args, stdin=b""):
    return subprocess.run([sys.executable, "-m", "notifier", "check", *args], input=stdin,
                          capture_output=True, timeout=60)


def test_a_good_envelope_prints_the_post_with_the_token_redacted(tmp_path):
    path = tmp_path / "envelope.sexp"
    path.write_text(lisp(type="NOTIFIER", webhook=HOOK, payload=PAYLOAD), encoding="utf-8")
    for result in (check(str(path)), check(stdin=path.read_bytes()), check("-", stdin=path.read_bytes())):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "webhook": "https://discord.com/api/webhooks/42/<token>?wait=true", "payload": PAYLOAD,
            "requests": [PAYLOAD]}
        assert TOKEN.encode() not in result.stdout + result.stderr


def test_a_long_message_shows_every_request_as_the_relay_would_post_it():
    long = {"content": "word " * 900, "embeds": [{"description": "x" * 5000}]}
    result = check(stdin=lisp(type="NOTIFIER", webhook=HOOK, payload_json=json.dumps(long)).encode())
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["payload"] == shown["requests"][0] and len(shown["requests"]) == 3
    assert shown["requests"] == payload.fit(long)
    description = shown["requests"][-1]["embeds"][0]["description"]
    assert len(description) == 4096 and description.endswith(payload.ELLIPSIS)


def test_the_url_shown_is_exactly_the_one_posted():
    """What `check` shows is the request's URL as requests prepares it, token aside."""
    for url, shown in [
            (f"HTTPS://PTB.Discord.com:443/api/v10/webhooks/42/{TOKEN}?thread_id=9",
             "https://ptb.discord.com/api/v10/webhooks/42/<token>?thread_id=9&wait=true"),
            (f"https://discordapp.com/api/webhooks/42/{TOKEN}?",
             "https://discordapp.com/api/webhooks/42/<token>?wait=true")]:
        result = check(stdin=lisp(type="NOTIFIER", webhook=url, payload=PAYLOAD).encode())
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["webhook"] == shown
        posted = requests.Request("POST", envelope.post_url(envelope.check_webhook(url))).prepare()
        assert envelope.redact(posted.url) == shown


def test_dot_segment_tokens_are_refused_not_posted_elsewhere():
    for token in ("..", ".", "%2e%2e", "../7", f"{TOKEN}/.."):
        url = f"https://discord.com/api/webhooks/42/{token}"
        result = check(stdin=lisp(type="NOTIFIER", webhook=url, payload=PAYLOAD).encode())
        assert result.returncode == 1 and not result.stdout, token
        assert b"rejected: webhook " in result.stderr and TOKEN.encode() not in result.stderr


def test_empty_input_says_so():
    for stdin in (b"", b"  \n"):
        result = check(stdin=stdin)
        assert (result.returncode, result.stderr) == (1, b"rejected: empty input\n")


def test_a_refused_envelope_prints_the_reason_and_exits_1():
    result = check(stdin=lisp(type="NOTIFIER", webhook=HOOK.replace("discord.com", "evil.example"),
                              payload=PAYLOAD).encode())
    assert result.returncode == 1
    assert b"rejected: webhook host 'evil.example' is not Discord's" in result.stderr
    assert TOKEN.encode() not in result.stdout + result.stderr


def test_allowed_hosts_come_from_the_flag_or_the_environment(tmp_path):
    local = "http://127.0.0.1:8099/api/webhooks/7/tok"
    data = lisp(type="NOTIFIER", webhook=local, payload=PAYLOAD).encode()
    assert check(stdin=data).returncode == 1
    assert check("--allowed-hosts", "127.0.0.1:8099", stdin=data).returncode == 0
    bad = check("--allowed-hosts", "127.0.0.1:http", stdin=data)
    assert bad.returncode == 2 and b"--allowed-hosts: '127.0.0.1:http' is not host[:port]" in bad.stderr


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    result = check(str(tmp_path / "missing.sexp"))
    assert result.returncode == 2 and b"cannot read" in result.stderr and not result.stdout
