"""The dead-letter file: whole entries or none, one line each, never in a sender's way.
Real files, a real FIFO, a real tmpfs that fills up, and the relay as a real process."""

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from notifier import deadletter, sexp
from notifier.deadletter import DeadLetters, Entry, Letter, Refused
from notifier.standin import DiscordStandIn
from tests.harness import RelayProcess, envelope_text

HOOK = "https://discord.com/api/webhooks/42/secret-token"
ENVELOPE = json.dumps({"type": "NOTIFIER", "webhook": HOOK, "payload": {"content": "hi"}})
PRETTY = ('((type . "NOTIFIER")\n (schema_version . 1)\n (action . "SEND")\n'
          f' (webhook . "{HOOK}")\n (payload_json . "{{\\"content\\":\\"line one\nline two\\"}}"))')


def letter(part=0, remaining=({"content": "hi"},), envelope=ENVELOPE, reason="HTTP 400: bad"):
    return Letter(HOOK, remaining, envelope.encode(), part, reason, 400, 1_764_201_597.5)


def written(path):
    """The entries `replay` would read, all of them whole."""
    found = list(deadletter.read(path))
    assert all(isinstance(item, Entry) for item in found), found
    return found


def test_entries_say_why_and_hold_what_sends_the_message_again(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    letters = DeadLetters(path)
    letters.append([letter(), letter(part=1, remaining=({"content": "b"},))])
    assert letters.flush(10)
    whole, rest = written(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (line, _) = path.read_bytes().splitlines()
    fields = sexp.loads(line)
    assert (fields["webhook_id"], fields["status"], fields["failed_at"]) == ("42", 400, 1764201597)
    assert whole.envelopes == (ENVELOPE.encode(),) and whole.id != rest.id
    assert [json.loads(text)["payload"] for text in rest.envelopes] == [{"content": "b"}]
    assert (letters.written, letters.state, letters.reason) == (2, "ok", None)


def test_line_breaks_and_control_characters_never_split_an_entry(tmp_path):
    """Lisp's pretty printer writes envelopes over several lines, and a Lisp string holds
    a raw newline: each entry is still one line, and reads back exactly."""
    path = tmp_path / "notifier_failed.sexp"
    letters = DeadLetters(path)
    odd = ENVELOPE.replace("hi", "tab\there\rcr\x00nul\u2028ls\x85nel é")
    letters.append([letter(envelope=PRETTY), letter(envelope=odd, reason="HTTP 400:\nsecond"),
                    letter()])
    assert letters.flush(10)
    assert len(path.read_bytes().split(b"\n")) == 4  # three lines and the final newline
    entries = written(path)
    assert [entry.envelopes for entry in entries] == [
        (PRETTY.encode(),), (odd.encode(),), (ENVELOPE.encode(),)]
    assert "envelopes_json" in path.read_text().splitlines()[0]
    assert sexp.loads(path.read_text().splitlines()[1])["reason"] == "HTTP 400:\\nsecond"
    assert "envelopes_json" not in path.read_text().splitlines()[2]  # plain stays plain


def test_past_its_size_the_file_is_rotated_and_what_rotation_removes_is_counted(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    letters = DeadLetters(path, max_bytes=1000)
    for _ in range(12):
        letters.append([letter()])
        assert letters.flush(10)
    kept = written(path)  # .1 then the file
    assert letters.written == 12 and letters.rotated_out == 12 - len(kept) > 0
    assert deadletter.rotated(path).exists() and path.stat().st_size <= 1000


@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling symlink"])
def test_rotation_never_opens_what_is_not_a_regular_file_at_its_target(tmp_path, kind):
    """A FIFO at notifier_failed.sexp.1 (nobody reading it) used to hang the sender
    that rotated; it is moved aside instead, and rotation goes on."""
    path = tmp_path / "notifier_failed.sexp"
    target = deadletter.rotated(path)
    {"fifo": os.mkfifo, "directory": os.mkdir,
     "dangling symlink": lambda p: os.symlink(tmp_path / "nowhere", p)}[kind](target)
    letters = DeadLetters(path, max_bytes=len(deadletter.format_entry("0-0-0", letter())) + 40)
    letters.append([letter()])
    letters.append([letter()])  # past max_bytes: rotates
    assert letters.flush(10), "the writer is stuck"
    (aside,) = tmp_path.glob("notifier_failed.sexp.1.not-a-file-*")
    assert {"fifo": stat.S_ISFIFO, "directory": stat.S_ISDIR,
            "dangling symlink": stat.S_ISLNK}[kind](os.lstat(aside).st_mode)
    assert target.is_file() and not target.is_symlink()
    assert letters.written == 2 and len(written(path)) == 2 and letters.state == "ok"


def test_a_fifo_in_place_of_the_file_fails_at_once_and_says_so(tmp_path, caplog):
    path = tmp_path / "notifier_failed.sexp"
    os.mkfifo(path)
    letters = DeadLetters(path)
    letters.append([letter()])
    assert letters.flush(10)
    assert (letters.written, letters.state) == (0, "failed")
    assert letters.reason.startswith("1 not written since the start, the last: ")
    assert "cannot write 1 failed messages to the dead-letter file" in caplog.text


def test_a_torn_tail_is_cut_back_to_the_last_whole_entry_at_the_next_open(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    first = DeadLetters(path)
    first.append([letter()])
    assert first.flush(10)
    whole = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(whole[:37])  # a crash in the middle of the next entry
    (only, torn) = deadletter.read(path)
    assert isinstance(torn, Refused) and torn.where == f"{path}:2"
    assert "cut off" in torn.reason
    second = DeadLetters(path)
    second.append([letter()])
    assert second.flush(10)
    assert len(written(path)) == 2 and path.read_bytes().startswith(whole)


def test_a_sender_is_never_held_up_by_a_slow_disk(tmp_path, monkeypatch):
    """The writer thread does the I/O: while its fsync hangs, appending still returns."""
    path = tmp_path / "notifier_failed.sexp"
    stuck, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        stuck.set()
        release.wait(30)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    letters = DeadLetters(path)
    letters.append([letter()])
    assert stuck.wait(10)
    returned = threading.Event()
    threading.Thread(target=lambda: (letters.append([letter()] * 50), returned.set())).start()
    assert returned.wait(10), "append waited for the disk"
    release.set()
    assert letters.flush(10) and letters.written == 51


def test_lines_of_the_wrong_shape_are_refused_with_their_line_and_why(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    good = deadletter.format_entry("1-1-1", letter()).decode()
    lines = [
        good,
        '((id . "2") (envelopes . "((type . \\"NOTIFIER\\"))"))',  # a string, not a list
        '((id . "3") (envelopes . ("ok" 7)))',
        '((id . "4"))',
        '((envelopes . ("x")))',
        '(id . "5"',
        '((id . "6") (envelopes_json . "not json"))',
        '((id . "7") (envelopes . ("   ")))',
        "",  # blank lines are skipped
        good.replace("1-1-1", "1-1-2"),
    ]
    path.write_text("\n".join(line.rstrip("\n") for line in lines) + "\n")
    found = list(deadletter.read(path))
    assert [type(item).__name__ for item in found] == [
        "Entry", "Refused", "Refused", "Refused", "Refused", "Refused", "Refused", "Refused",
        "Entry"]
    reasons = {item.where.rsplit(":", 1)[1]: item.reason for item in found
               if isinstance(item, Refused)}
    assert reasons == {
        "2": "envelopes is a string, not a list of envelopes",
        "3": "envelopes item 2 is a number, not a string",
        "4": "it needs envelopes or envelopes_json, exactly one of them",
        "5": "its id is nil, not a string without spaces",
        "6": reasons["6"], "7": "envelopes_json is not JSON",
        "8": "envelopes item 1 is blank"}
    assert reasons["6"].startswith("not an S-expression: ")
    assert found[-1].where == f"{path}:10"


def test_entries_replayed_are_recorded(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    deadletter.mark_replayed(path, ["a", "b"])
    deadletter.mark_replayed(path, ["c"])
    assert deadletter.replayed_ids(path) == {"a", "b", "c"}
    assert stat.S_IMODE(deadletter.replayed_file(path).stat().st_mode) == 0o600


# ---------------------------------------------------------------------- the relay, a full disk

def _mount_tmpfs(directory: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a real full disk)")
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


@pytest.fixture
def tiny_data_dir(tmp_path):
    """$SWIMMY_HOME/data on a 64 KiB tmpfs: it fills up after a few dozen dead letters."""
    data = tmp_path / "data"
    _mount_tmpfs(data, "64k")
    yield data
    subprocess.run(["umount", "-l", str(data)], check=False)


@pytest.fixture
def started():
    """Relay processes a test starts itself; killed if still running at the end."""
    relays = []
    yield relays
    for relay in relays:
        relay.kill()


def test_on_a_full_disk_every_entry_is_whole_and_the_counter_counts_only_those(
        tmp_path, tiny_data_dir, started, pushers):
    """A webhook Discord has deleted (404): every message to it fails and is written to
    the dead-letter file on a tmpfs of 64 KiB, in sizes from 200 bytes to 6 KB, until the
    disk is full and past it. Every entry in the file is whole, the counter equals the
    entries, the failure is logged at ERROR and shown in the metrics."""
    with DiscordStandIn() as discord:
        discord.set_mode("1", "status", status=404)
        relay = RelayProcess(tmp_path, f"127.0.0.1:{discord.port}",
                             metrics_file=str(tmp_path / "notifier_metrics.sexp"),
                             store=str(tmp_path / "notifier_store.sqlite3"))
        started.append(relay.start())
        push = pushers(relay.endpoint)
        for number in range(150):
            push.send(envelope_text(discord.webhook_url(1),
                                    f"message {number} " + "x" * (200 + 97 * number % 6000)))
        snapshot = relay.wait_metrics(lambda m: m["failed"] == 150
                                      and m["dead_letters_state"] == "failed", timeout=60,
                                      what="every message failed, the disk full")
        assert relay.stop() == 0
    final = relay.metrics()
    entries = written(tiny_data_dir / "notifier_failed.sexp")
    assert 0 < len(entries) < 150
    assert final["dead_letters"] == len(entries), (final["dead_letters"], len(entries))
    assert all(b"message" in entry.envelopes[0] for entry in entries)
    assert snapshot["dead_letters_reason"].endswith("No space left on device")
    assert "ERROR notifier.deadletter cannot write" in relay.log()


def test_a_fifo_at_the_rotation_target_blocks_no_sender(tmp_path, relays, pushers):
    """The file is due for rotation and its .1 is a FIFO: a failing message rotates it
    (the FIFO moved aside, never opened) while a healthy webhook keeps delivering."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "notifier_failed.sexp"
    line = deadletter.format_entry("0-0-0", letter())
    with open(path, "wb") as handle:
        handle.write(line * (deadletter.MAX_BYTES // len(line)))
    path.chmod(0o600)
    os.mkfifo(deadletter.rotated(path))
    with DiscordStandIn() as discord:
        discord.set_mode("1", "status", status=404)
        relay = relays(allowed=f"127.0.0.1:{discord.port}")
        push = pushers(relay.endpoint)
        push.send(envelope_text(discord.webhook_url(1), "to a deleted webhook"))
        relay.wait_metrics(lambda m: m["dead_letters"] == 1, what="the dead letter")
        for number in range(20):
            push.send(envelope_text(discord.webhook_url(2), f"healthy {number}"))
        relay.wait_metrics(lambda m: m["delivered"] == 20, what="the healthy webhook")
        assert relay.stop() == 0
    (aside,) = data.glob("notifier_failed.sexp.1.not-a-file-*")
    assert stat.S_ISFIFO(os.lstat(aside).st_mode)
    assert [entry.envelopes for entry in written(path)][-1] == (
        envelope_text(discord.webhook_url(1), "to a deleted webhook"),)
    assert relay.metrics()["dead_letters_state"] == "ok"
