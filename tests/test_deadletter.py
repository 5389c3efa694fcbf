"""The dead-letter file on its own: real files, no relay."""

import json
import stat

from notifier import deadletter
from notifier.deadletter import DeadLetters, Letter

HOOK = "https://discord.com/api/webhooks/42/secret-token"
ENVELOPE = json.dumps({"type": "NOTIFIER", "webhook": HOOK, "payload": {"content": "hi"}})


def letter(part=0, remaining=({"content": "hi"},)):
    return Letter(HOOK, remaining, ENVELOPE.encode(), part, "HTTP 400: Invalid Form Body",
                  400, 1_764_201_597.5)


def test_entries_say_why_and_hold_what_sends_the_message_again(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    DeadLetters(path).append([letter(), letter(part=1, remaining=({"content": "b"},))])
    whole, rest = deadletter.entries(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (whole["webhook_id"], whole["status"], whole["failed_at"]) == ("42", 400, 1764201597)
    assert whole["envelopes"] == [ENVELOPE] and whole["id"] != rest["id"]
    assert [json.loads(text)["payload"] for text in rest["envelopes"]] == [{"content": "b"}]


def test_past_its_size_the_file_is_rotated_and_what_rotation_removes_is_counted(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    letters = DeadLetters(path, max_bytes=1000)
    for _ in range(12):
        letters.append([letter()])
    kept = list(deadletter.entries(path))
    assert letters.written == 12 and letters.rotated_out == 12 - len(kept) > 0
    assert deadletter.rotated(path).exists() and path.stat().st_size <= 1000


def test_entries_replayed_are_not_replayed_again(tmp_path):
    path = tmp_path / "notifier_failed.sexp"
    letters = DeadLetters(path)
    letters.append([letter()])
    first = deadletter.unreplayed(path)
    deadletter.mark_replayed(path, [entry["id"] for entry in first])
    letters.append([letter()])
    (later,) = deadletter.unreplayed(path)
    assert len(first) == 1 and later["id"] != first[0]["id"]
