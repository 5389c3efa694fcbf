"""The metrics file stays readable whatever the number of webhooks: the most relevant
100 listed, the rest counted, the whole under 512 KiB; status and the merge read it."""

import subprocess
import sys

from notifier import metrics, sexp, status
from tests.harness import envelope_text, free_port

NOW = 1_800_000_000


def outbox_snapshot(webhooks: int, **hook_overrides) -> dict:
    """What `Outbox.snapshot` gives with `webhooks` webhooks, webhook n last active at
    NOW - n (the newest first), holding nothing."""
    hooks = [{"id": str(n), "state": "ok", "pending": 0, "delivered": 1, "dropped": 0,
              "failed": 0, "last_success_at": NOW - n, "failing_since": None, **hook_overrides}
             for n in range(webhooks)]
    counters = dict.fromkeys(metrics.COUNTERS, 0)
    return {**counters, "queue_len": 0, "queue_max": 1000, "unparsed": 0,
            "last_delivery_at": None, "last_error_at": None, "last_error": None,
            "last_rejected_at": None, "last_rejected_reason": None,
            "rate_limited_by_scope": {}, "webhooks": hooks, "producers": []}


def test_failing_then_holding_then_the_most_recent_webhooks_are_listed():
    snapshot = outbox_snapshot(300)
    hooks = snapshot["webhooks"]
    hooks[250].update(failing_since=NOW - 5000, state="waiting", pending=3)
    hooks[280].update(state="quarantined")
    hooks[299]["pending"] = 1
    entries = metrics.entries(snapshot, now=NOW, started_at=NOW - 60, pid=1, interval=5.0)
    ids = [hook["id"] for hook in entries["webhooks"]]
    assert ids[:3] == ["250", "280", "299"]
    assert ids[3:] == [str(n) for n in range(97)]
    assert entries["webhooks_left_out"] == 200


def test_the_worst_case_stays_under_512_kib():
    """5,000 webhooks with the longest ids Discord URLs may hold, 256 producers with the
    longest names a file system allows (every one escaped), and long reasons."""
    snapshot = outbox_snapshot(5000, failing_since=NOW - 10, pending=5)
    for n, hook in enumerate(snapshot["webhooks"]):
        hook["id"] = f"{n:025d}"
    snapshot["producers"] = [{"name": f"{n:03d}" + '"' * 252, "received": 10**12,
                              "rejected": 10**12, "drops": 10**12} for n in range(256)]
    snapshot.update(last_error="webhook 1: " + "x" * 65536,
                    last_rejected_reason="y" * 65536)
    text = metrics.render(metrics.entries(snapshot, now=NOW, started_at=NOW - 60, pid=1,
                                          interval=5.0, saved=0))
    assert len(text.encode()) < metrics.MAX_BYTES
    assert status.unusable(sexp.loads(text)) is None


def test_5000_webhooks_in_the_relay_make_a_file_status_and_the_merge_read(tmp_path, relays,
                                                                           pushers):
    down = free_port()  # nothing listens: every webhook holds its message
    relay = relays(allowed=f"127.0.0.1:{down}", queue_max="6000", metrics_interval_sec="0.5",
                   log_level="info")
    pusher = pushers(relay.endpoint)
    for n in range(5000):
        pusher.send(envelope_text(f"http://127.0.0.1:{down}/api/webhooks/{n + 1}/tok", "held"))
    relay.wait_metrics(lambda m: m["received"] == 5000 and m["unparsed"] == 0, timeout=120,
                       what="5,000 held")
    size = relay.metrics_file.stat().st_size
    snapshot = relay.metrics()
    assert size < metrics.MAX_BYTES and len(snapshot["webhooks"]) == 100
    assert snapshot["webhooks_left_out"] == 4900
    told = subprocess.run([sys.executable, "-m", "notifier", "status", "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert "over the" not in told.stdout and "cannot read" not in told.stdout, told.stdout
    assert "4900 more webhooks not listed" in told.stdout
    merged = subprocess.run([sys.executable, "-m", "telemetry", "merge", "--home",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert merged.returncode == 0, merged.stderr
    assert relay.stop() == 0
