"""`python -m notifier status`: healthy only when messages are being delivered."""

import os
import subprocess
import sys

import pytest

from notifier import sexp, status

NOW = 1_800_000_000


def snapshot(**overrides):
    base = {"schema_version": 1, "timestamp": NOW - 2, "pid": 4242, "started_at": NOW - 3600,
            "uptime_sec": 3600, "metrics_interval_sec": 5.0, "queue_len": 0, "queue_max": 1000,
            "received": 10, "delivered": 10, "drops": 0, "rejected": 0, "deduplicated": 0,
            "failed": 0, "lost": 0, "pending": 0, "errors": 0, "retries": 0, "rate_limited": 0,
            "requests": 10, "invalid_requests_10m": 0, "last_delivery_at": NOW - 30,
            "last_error_at": None, "last_error": None,
            "webhooks": [{"id": "42", "state": "ok", "pending": 0, "delivered": 10,
                          "dropped": 0, "failed": 0, "last_success_at": NOW - 30}]}
    base.update(overrides)
    return sexp.loads(sexp.dumps(base))


def test_a_delivering_relay_is_ok():
    report = status.judge(snapshot(), NOW)
    assert report.level == status.OK and report.problems == []
    text = status.render(report)
    assert text.startswith("NOTIFIER OK - delivering: 10 delivered, 0 pending | pending=0;;;0;1000 ")
    assert "received 10, delivered 10, pending 0, dropped 0" in text
    assert "webhook 42: ok" in text


@pytest.mark.parametrize("overrides, level, words", [
    ({"timestamp": NOW - 60}, status.CRITICAL, "dead or stuck"),
    ({"pending": 40, "queue_len": 40, "received": 50, "last_delivery_at": NOW - 600},
     status.CRITICAL, "40 messages pending and nothing delivered for 10 min"),
    ({"pending": 3, "received": 13, "last_delivery_at": None, "started_at": NOW - 300},
     status.CRITICAL, "nothing delivered"),
    ({"drops": 37, "received": 47}, status.WARNING, "37 messages dropped"),
    ({"failed": 2, "received": 12}, status.WARNING, "2 messages failed"),
    ({"webhooks": [{"id": "7", "state": "quarantined", "pending": 0, "delivered": 0,
                    "dropped": 0, "failed": 5, "last_success_at": None}]},
     status.WARNING, "webhook 7 is quarantined"),
    ({"invalid_requests_10m": 250}, status.WARNING, "250 invalid requests"),
    ({"state": "stopped", "saved": 3, "timestamp": NOW - 600}, status.CRITICAL,
     "stopped at 2027-01-15 07:50:00 UTC (10 min ago), 3 saved"),
    ({"webhooks": [{"id": "7", "state": "waiting", "pending": 2, "delivered": 0, "dropped": 0,
                    "failed": 0, "last_success_at": None, "failing_since": NOW - 90}]},
     status.CRITICAL, "webhook 7: every request failed for 90 s"),
    ({"rejected": 5, "received": 15, "last_rejected_at": NOW - 10,
      "last_delivery_at": NOW - 600}, status.WARNING,
     "5 envelopes rejected and nothing delivered for 10 min; the last 10 s ago"),
    ({"timestamp": NOW + 3600}, status.CRITICAL, "not Unix time"),
    ({"store_state": "failed", "store_reason": "disk full"}, status.WARNING,
     "the message store cannot be written: disk full"),
    ({"store_skipped": 2}, status.WARNING, "2 unreadable entries in the store"),
    ({"store_moved_aside": "notifier_store.sqlite3 moved aside as x: it is a FIFO"},
     status.WARNING, "moved aside: notifier_store.sqlite3 moved aside as x"),
    ({"last_stop_lost": 30, "last_stop_at": NOW - 60}, status.WARNING,
     "30 messages LOST at the last stop"),
])
def test_drops_failures_staleness_and_stalls_are_never_reported_healthy(overrides, level, words):
    report = status.judge(snapshot(**overrides), NOW)
    assert report.level == level
    assert any(words in problem for problem in report.problems), report.problems


def test_rejections_with_nothing_ever_delivered_are_a_warning_with_the_count_and_why():
    """A producer whose format broke: everything it sends is refused, nothing gets
    through. Not OK, however recent the start and however old the last rejection."""
    broken = snapshot(received=21, delivered=0, rejected=21, last_delivery_at=None,
                      started_at=NOW - 30, last_rejected_at=NOW - 3,
                      last_rejected_reason="bad S-expression: unterminated string at line 1",
                      webhooks=[])
    report = status.judge(broken, NOW)
    assert report.level == status.WARNING
    assert status.render(report).splitlines()[0] == (
        "NOTIFIER WARNING - 21 envelopes rejected and nothing delivered since the start; "
        "the last 3 s ago: bad S-expression: unterminated string at line 1 (producers send "
        "what the relay refuses: grep 'rejected')")
    later = snapshot(rejected=21, received=31, last_rejected_at=NOW - 10,
                     last_delivery_at=NOW - 600, last_rejected_reason="no webhook")
    assert "21 envelopes rejected and nothing delivered for 10 min; the last 10 s ago: " \
           "no webhook" in status.judge(later, NOW).problems[-1]


@pytest.mark.parametrize("name, words", [
    ("store", "the message store cannot be written: database or disk is full"),
    ("log", "the log file cannot be written: database or disk is full"),
    ("prometheus", "the Prometheus text file cannot be written"),
    ("dead_letters", "the dead-letter file cannot be written: database or disk is full; "
                     "messages that fail are not kept for replay"),
    ("some_new_file", "some_new_file cannot be written"),
])
def test_any_file_the_relay_cannot_write_is_named(name, words):
    report = status.judge(snapshot(**{f"{name}_state": "failed",
                                      f"{name}_reason": "database or disk is full"}), NOW)
    assert report.level == status.WARNING
    assert any(problem.startswith(words) for problem in report.problems), report.problems
    ok = snapshot(**{f"{name}_state": "ok", f"{name}_reason": None})
    assert status.judge(ok, NOW).level == status.OK


def test_messages_lost_at_the_last_stop_are_named():
    stopped = status.judge(snapshot(state="stopped", saved=0, lost=7, timestamp=NOW - 5,
                                    store_reason="disk full"), NOW)
    assert stopped.worst.endswith("7 messages LOST (the store could not take them: disk "
                                  "full), 0 saved for the next start")
    assert "deduplicated 0, lost 7" in status.render(stopped)
    running = status.judge(snapshot(last_stop_lost=7, last_stop_at=NOW - 60), NOW)
    assert running.level == status.WARNING
    assert running.worst.startswith("7 messages LOST at the last stop")
    assert status.judge(snapshot(lost=0), NOW).level == status.OK


def test_the_first_line_says_the_worst_problem_and_the_others_follow():
    report = status.judge(snapshot(drops=2, received=12, timestamp=NOW - 60), NOW)
    lines = status.render(report).splitlines()
    assert lines[0].startswith("NOTIFIER CRITICAL - the snapshot is 60 s old")
    assert lines[1].startswith("  ! 2 messages dropped") and not lines[2].startswith("  !")


def test_a_stopped_relay_says_when_and_how_many_were_saved():
    text = status.render(status.judge(snapshot(state="stopped", saved=1, timestamp=NOW - 5), NOW))
    assert text.splitlines()[0] == ("NOTIFIER CRITICAL - stopped at 2027-01-15 07:59:55 UTC "
                                    "(5 s ago), 1 saved for the next start")
    assert "queue:     1 saved for the next start" in text


def test_a_relay_that_lost_messages_at_its_stop_says_how_many_on_the_first_line():
    stopped = snapshot(state="stopped", saved=0, lost=30, received=40, timestamp=NOW - 5,
                       store_state="failed", store_reason="disk full")
    first = status.render(status.judge(stopped, NOW)).splitlines()[0]
    assert first == ("NOTIFIER CRITICAL - stopped at 2027-01-15 07:59:55 UTC (5 s ago): 30 "
                     "messages LOST (the store could not take them: disk full), 0 saved for "
                     "the next start")
    restarted = status.render(status.judge(snapshot(last_stop_lost=30, last_stop_at=NOW - 60),
                                           NOW))
    assert restarted.splitlines()[0] == ("NOTIFIER WARNING - 30 messages LOST at the last stop "
                                         "(2027-01-15 07:59:00 UTC (60 s ago)): the store "
                                         "could not take them (see the log)")


def test_a_webhook_failing_briefly_or_old_rejections_with_deliveries_are_fine():
    briefly = [{"id": "7", "state": "waiting", "pending": 1, "delivered": 3, "dropped": 0,
                "failed": 0, "last_success_at": NOW - 100, "failing_since": NOW - 20}]
    assert status.judge(snapshot(webhooks=briefly), NOW).level == status.OK
    delivering = snapshot(rejected=4, received=14, last_rejected_at=NOW - 5)
    assert status.judge(delivering, NOW).level == status.OK
    assert status.judge(snapshot(rejected=4, received=14, last_rejected_at=NOW - 500,
                                 last_delivery_at=NOW - 900), NOW).level == status.OK


def test_a_recent_backlog_that_is_moving_is_fine():
    assert status.judge(snapshot(pending=5, received=15, last_delivery_at=NOW - 3), NOW).level == status.OK


def test_the_command_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "notifier", "status", *args],
                              capture_output=True, text=True, timeout=60)
    missing = run("--home", str(tmp_path))
    assert missing.returncode == 2 and "no metrics file" in missing.stdout
    path = tmp_path / "metrics.sexp"
    path.write_text("((schema_version . 1) #.(evil))")
    unreadable = run("--metrics-file", str(path))
    assert unreadable.returncode == 2 and "read-time evaluation" in unreadable.stdout
    path.write_text(sexp.dumps(snapshot(timestamp=0)))
    stale = run("--metrics-file", str(path))
    assert stale.returncode == 2 and "dead or stuck" in stale.stdout


def status_of(path):
    return subprocess.run([sys.executable, "-m", "notifier", "status", "--metrics-file",
                           str(path)], capture_output=True, text=True, timeout=60)


def test_status_never_hangs_on_a_fifo_or_other_files_it_cannot_read(tmp_path):
    fifo = tmp_path / "fifo.sexp"
    os.mkfifo(fifo)
    for path, words in ((fifo, "not a regular file"), (tmp_path, "is a directory")):
        result = status_of(path)
        assert result.returncode == 2 and words in result.stdout, result
        assert result.stdout.startswith("NOTIFIER CRITICAL - cannot read") and not result.stderr
    big = tmp_path / "big.sexp"
    big.write_bytes(b"((schema_version . 1) (timestamp . 1) (x . \"" + b"y" * (1 << 20) + b"\"))")
    result = status_of(big)
    assert result.returncode == 2 and len(result.stdout) < 1000 and not result.stderr


@pytest.mark.parametrize("text, words", [
    ('((schema_version . 1) (timestamp . "yesterday"))', "timestamp is 'yesterday', not a number"),
    ("((schema_version . 1) (timestamp . 99999999999999999999999))", "timestamp is"),
    ("((schema_version . 1) (timestamp . 1800000000) (pending . t))", "pending is"),
    ("((schema_version . 1) (timestamp . 1800000000) (metrics_interval_sec . \"5\"))",
     "metrics_interval_sec is '5'"),
    ("((schema_version . 1) (timestamp . 1800000000) (webhooks . 5))", "webhooks is not a list"),
    ("((schema_version . 1) (timestamp . 1800000000) (webhooks 1 2))", "not an alist"),
    ("((schema_version . 1) (timestamp . 1800000000) (webhooks ((id . 1) (failing_since . x))))",
     "failing_since is not a number"),
    ("((schema_version . 2) (timestamp . 1800000000))", "schema_version 2 is not 1"),
    ("((schema_version . 1))", "no timestamp"),
    ("(1 2 3)", "not an alist"),
])
def test_a_snapshot_of_the_wrong_types_is_critical_with_a_reason(tmp_path, text, words):
    path = tmp_path / "metrics.sexp"
    path.write_text(text)
    result = status_of(path)
    assert result.returncode == 2 and not result.stderr, result
    assert result.stdout.startswith("NOTIFIER CRITICAL - ") and words in result.stdout


def test_a_relay_that_only_rejects_is_not_ok(tmp_path, relays, pushers):
    """The relay as a real process: a producer whose format broke sends 21 envelopes,
    every one refused, nothing delivered. `status` says WARNING on its first line, with
    the count and the last reason, and exits 1."""
    relay = relays(allowed="")
    push = pushers(relay.endpoint)
    for number in range(21):
        push.send(b'((type . "NOTIFIER") (schema_version . 1) (action . "SEND") (webhook . "x'
                  + str(number).encode())
    relay.wait_metrics(lambda m: m["rejected"] == 21, what="21 rejections")
    result = status_of(relay.metrics_file)
    assert result.returncode == 1, result.stdout
    first = result.stdout.splitlines()[0]
    assert first.startswith("NOTIFIER WARNING - 21 envelopes rejected and nothing delivered "
                            "since the start; the last "), first
    assert "bad S-expression: unterminated string" in first
    assert relay.stop() == 0


def test_queue_full_says_what_fills_the_queue_not_discord():
    """Issue 18: junk and a flood to one webhook had status say "queue full: Discord too
    slow or unreachable" with Discord healthy. The reason names what fills the queue
    (the webhooks holding most and their state, envelopes not parsed yet) and whose
    messages were dropped, a drop no webhook could be charged with included."""
    report = status.judge(snapshot(
        drops=2843, received=3853, pending=1000, queue_len=1000, unparsed=12,
        drops_webhook_unknown=3, webhooks=[
            {"id": "1", "state": "waiting", "pending": 988, "delivered": 0, "dropped": 2840,
             "failed": 0, "last_success_at": None},
            {"id": "2", "state": "ok", "pending": 0, "delivered": 10, "dropped": 0,
             "failed": 0, "last_success_at": NOW - 30}]), NOW)
    [problem] = [text for text in report.problems if "dropped" in text]
    assert problem == (
        "2843 messages dropped since the relay started (queue full at queue_max=1000; "
        "holding 1000 now: 988 for webhook 1 (held back by Discord's limits or a backoff), "
        "12 not parsed yet; dropped from webhook 1 2840, webhook unknown 3)")
    assert "Discord too slow" not in status.render(report)


def test_a_time_ahead_of_this_clock_says_how_far_in_the_future():
    assert status.when(NOW + 3 * 3600, NOW).endswith("(in the future by 3.0 h)")
    assert status.when(NOW - 5, NOW).endswith("(5 s ago)")


def test_the_threads_are_shown_and_a_dead_sender_or_a_caught_error_judged():
    healthy = status.judge(snapshot(senders=8, senders_alive=8, thread_errors=0), NOW)
    assert healthy.level == status.OK
    assert "threads:   8 of 8 senders alive, 0 errors carried on" in status.render(healthy)
    dead = status.judge(snapshot(senders=8, senders_alive=7, thread_errors=0), NOW)
    assert (dead.level, dead.worst) == (status.CRITICAL, "only 7 of 8 sender threads alive "
                                        "(see the log: the relay stops itself for a restart "
                                        "when one dies)")
    caught = status.judge(snapshot(senders=8, senders_alive=8, thread_errors=3), NOW)
    assert caught.level == status.WARNING and caught.worst.startswith(
        "3 unexpected errors in the relay's threads")
    older = status.judge(snapshot(), NOW)  # a snapshot from before threads were reported
    assert older.level == status.OK and "threads:   ? of ? senders alive" in status.render(older)
