"""`python -m notifier replay` as an operator runs it: the relay as a real process, the
stand-in, real dead-letter files; each dead letter delivered exactly once, whatever the
count, interrupted or not; lines of the wrong shape refused and left in place."""

import collections
import json
import signal
import subprocess
import sys

import pytest

from notifier import deadletter, envelope, sexp
from notifier.deadletter import DeadLetters, Letter
from notifier.demo import free_port
from notifier.standin import DiscordStandIn
from tests.harness import RelayProcess, contents, wait_until

DEADLINE = 60.0


def replay_command(relay, *args):
    env = {key: value for key, value in relay.env.items() if key != "SWIMMY_NOTIFIER_LOG_FILE"}
    return [sys.executable, "-m", "notifier", "replay", *args], env


def replay(relay, *args, timeout=120):
    command, env = replay_command(relay, *args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def dead_letter_file(home, letters):
    """The relay's dead-letter file holding `letters`, as the relay writes them."""
    path = home / "data" / "notifier_failed.sexp"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = DeadLetters(path)
    writer.append(letters)
    assert writer.close(30) and writer.written == len(letters)
    return path


def letter(data: bytes, webhook: str) -> Letter:
    return Letter(webhook, (), data, 0, "HTTP 502, still failing", 502, 1_764_201_597.0)


def sexp_envelope(webhook, content):
    return sexp.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                       "webhook": webhook, "payload_json": json.dumps({"content": content})}
                      ).encode()


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


def test_multi_line_envelopes_fail_and_are_replayed_each_once(discord, relays, pushers):
    """What Lisp's pretty printer writes (an envelope over several lines), a raw newline
    inside a Lisp string, and one in payload_json: three messages fail (502 past their
    maximum age), three entries are written, and replay delivers all three."""
    url = discord.webhook_url(1)
    pretty = (f'((type . "NOTIFIER")\n (schema_version . 1)\n (action . "SEND")\n'
              f' (webhook . "{url}")\n (payload_json . "{{\\"content\\": \\"pretty\\", '
              f'\\"username\\": \\"a\\"}}"))')
    raw_newline = (f'((type . "NOTIFIER") (schema_version . 1) (action . "SEND") '
                   f'(webhook . "{url}") (payload . ((content . "two\nlines") (username . "b"))))')
    json_newline = (f'((type . "NOTIFIER") (schema_version . 1) (action . "SEND") '
                    f'(webhook . "{url}") (payload_json . "{{\n\\"content\\": \\"json\\",'
                    f'\\"username\\": \\"c\\"}}"))')
    sent = [pretty, raw_newline, json_newline]
    allowed = (("127.0.0.1", discord.port),)
    assert all(envelope.parse(text.encode(), allowed) for text in sent)
    discord.set_mode(None, "status", status=502)
    relay = relays(allowed=f"127.0.0.1:{discord.port}", max_age_sec="1")
    push = pushers(relay.endpoint)
    for text in sent:
        push.send(text.encode())
    relay.wait_metrics(lambda m: m["failed"] == 3 and m["dead_letters"] == 3, timeout=DEADLINE,
                       what="three dead letters")
    path = relay.home / "data" / "notifier_failed.sexp"
    assert len(path.read_bytes().splitlines()) == 3
    discord.set_mode(None, "ok")
    first = replay(relay)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("replayed 3, refused 0, left 0 (0 replayed before)")
    relay.wait_metrics(lambda m: m["delivered"] == 3, timeout=DEADLINE, what="replayed")
    assert sorted((m["username"], m["content"]) for m in discord.messages("1")
                  if "username" in m) == [("a", "pretty"), ("b", "two\nlines"), ("c", "json")]
    again = replay(relay)
    assert again.returncode == 0 and "nothing to replay" in again.stdout
    assert relay.stop() == 0


def test_2500_dead_letters_interrupted_and_resumed_are_each_delivered_exactly_once(
        tmp_path, discord, relays):
    """More than the relay's queue (1000) and the client's high-water mark (1000). While
    Discord answers 502 the relay cannot make room: replay fills half the queue, then
    waits, and is interrupted (Ctrl-C) there. Discord recovers; the second run sends the
    rest. Every message arrives exactly once; nothing is dropped."""
    hooks = [discord.webhook_url(n) for n in range(1, 6)]
    letters = [letter(sexp_envelope(hooks[n % 5], f"dead letter {n:04d}"), hooks[n % 5])
               for n in range(2500)]
    path = dead_letter_file(tmp_path, letters)
    discord.set_mode(None, "status", status=502)
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    command, env = replay_command(relay)
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_until(lambda: len(deadletter.replayed_ids(path)) >= 1000 // 2, DEADLINE,
                   what="half the relay's queue replayed")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=DEADLINE)
    finally:
        first.kill()
    assert first.returncode == 1, err
    done = len(deadletter.replayed_ids(path))
    assert 0 < done < 2500
    assert out.startswith(f"replayed {done}, refused 0, left {2500 - done} ")
    assert "stopped: interrupted" in err
    snapshot = relay.wait_metrics(lambda m: m["received"] == done, what="what was taken")
    assert snapshot["drops"] == 0
    discord.set_mode(None, "ok")
    second = replay(relay)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith(f"replayed {2500 - done}, refused 0, left 0 ({done} "
                                    "replayed before)")
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == 2500, timeout=120,
                                  what="all 2,500 delivered")
    assert (snapshot["received"], snapshot["drops"], snapshot["deduplicated"]) == (2500, 0, 0)
    arrived = collections.Counter(line for n in range(1, 6) for line in contents(discord, n))
    assert arrived == collections.Counter(f"dead letter {n:04d}" for n in range(2500))
    assert replay(relay).stdout.startswith("nothing to replay")
    assert relay.stop() == 0


def test_lines_of_the_wrong_shape_are_refused_left_in_place_and_never_marked(
        tmp_path, discord, relays):
    """`envelopes` given as a string (it used to be sent a character at a time), a number
    inside `envelopes` after good entries (it used to end replay with a traceback), a
    line cut off: refused with their line numbers; the good ones are delivered once."""
    hook = discord.webhook_url(1)
    good = [deadletter.format_entry(f"good-{n}", letter(sexp_envelope(hook, f"good {n}"), hook))
            for n in range(3)]
    as_string = sexp.dumps({"id": "bad-1", "envelopes": sexp_envelope(hook, "x").decode()})
    number_inside = sexp.dumps({"id": "bad-2", "envelopes": [
        sexp_envelope(hook, "never sent").decode(), 42]})
    path = tmp_path / "data" / "notifier_failed.sexp"
    path.parent.mkdir()
    text = (good[0] + as_string.encode() + b"\n" + good[1] + number_inside.encode() + b"\n"
            + good[2] + b'((id . "torn") (envel')
    path.write_bytes(text)
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    first = replay(relay)
    assert first.returncode == 2, first.stderr
    assert first.stderr.splitlines() == [
        f"notifier replay: {path}:2: refused, left in place: envelopes is a string, not a "
        "list of envelopes",
        f"notifier replay: {path}:4: refused, left in place: envelopes item 2 is a number, "
        "not a string",
        f"notifier replay: {path}:6: refused, left in place: cut off (no end of line): a "
        "write torn by a full disk or a crash; the relay cuts it off when it next writes a "
        "dead letter"]
    assert first.stdout.startswith("replayed 3, refused 3, left 0")
    relay.wait_metrics(lambda m: m["delivered"] == 3, timeout=DEADLINE, what="the good ones")
    assert sorted(contents(discord, 1)) == ["good 0", "good 1", "good 2"]
    assert path.read_bytes() == text  # left in place
    assert deadletter.replayed_ids(path) == {"good-0", "good-1", "good-2"}
    again = replay(relay)
    assert again.returncode == 2 and again.stdout.startswith("replayed 0, refused 3, left 0")
    assert relay.wait_metrics(lambda m: True)["received"] == 3  # nothing sent again
    assert relay.stop() == 0


def test_without_a_running_relay_nothing_is_sent_or_recorded(tmp_path, discord):
    hook = discord.webhook_url(1)
    path = dead_letter_file(tmp_path, [letter(sexp_envelope(hook, "kept"), hook)])
    relay = RelayProcess(tmp_path, f"127.0.0.1:{discord.port}")  # never started
    result = replay(relay)
    assert result.returncode == 1
    assert "is the relay running?" in result.stderr
    assert result.stdout.startswith("replayed 0, refused 0, left 1")
    assert deadletter.replayed_ids(path) == set()


def test_a_wrong_endpoint_takes_nothing_and_records_nothing(tmp_path, discord, relays):
    """The relay runs (its metrics are fresh) but replay is pointed elsewhere: nothing
    is queued for a relay that is not there, and nothing is recorded."""
    hook = discord.webhook_url(1)
    path = dead_letter_file(tmp_path, [letter(sexp_envelope(hook, "kept"), hook)])
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    result = replay(relay, "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--wait-sec", "1")
    assert result.returncode == 1
    assert "ZeroMQ did not take an envelope within 1 s" in result.stderr
    assert deadletter.replayed_ids(path) == set()
    assert relay.stop() == 0
