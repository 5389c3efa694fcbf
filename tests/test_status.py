"""`python -m notifier status`: healthy only when messages are being delivered."""

import subprocess
import sys

import pytest

from notifier import sexp, status

NOW = 1_800_000_000


def snapshot(**overrides):
    base = {"schema_version": 1, "timestamp": NOW - 2, "pid": 4242, "started_at": NOW - 3600,
            "uptime_sec": 3600, "metrics_interval_sec": 5.0, "queue_len": 0, "queue_max": 1000,
            "received": 10, "delivered": 10, "drops": 0, "rejected": 0, "deduplicated": 0,
            "failed": 0, "pending": 0, "errors": 0, "retries": 0, "rate_limited": 0,
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
    assert text.startswith("notifier: OK")
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
])
def test_drops_failures_staleness_and_stalls_are_never_reported_healthy(overrides, level, words):
    report = status.judge(snapshot(**overrides), NOW)
    assert report.level == level
    assert any(words in problem for problem in report.problems), report.problems


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
