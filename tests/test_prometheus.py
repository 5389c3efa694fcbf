"""Prometheus exposition: parsed with prometheus_client's own parser, checked against the
S-expression snapshot, from the relay as a real process."""

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from notifier import prometheus
from notifier.demo import free_port
from notifier.standin import DiscordStandIn
from tests.harness import assert_balanced, envelope_text, wait_until
from tests.test_status import NOW, snapshot

OUTCOMES = {"delivered": "delivered", "dropped": "drops", "rejected": "rejected",
            "deduplicated": "deduplicated", "failed": "failed", "lost": "lost"}


def samples(text):
    """{(name, (label pairs...)): value} of an exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def check_against(series, entries):
    """The series say what the snapshot says, and add up like it."""
    def one(name, **labels):
        return series[(name, tuple(sorted(labels.items())))]
    assert one("notifier_received_total") == entries["received"]
    for outcome, key in OUTCOMES.items():
        assert one("notifier_messages_total", outcome=outcome) == entries[key]
    assert one("notifier_queue_messages") == entries["pending"]
    assert one("notifier_queue_capacity_messages") == entries["queue_max"]
    assert one("notifier_received_total") == one("notifier_queue_messages") + sum(
        one("notifier_messages_total", outcome=outcome) for outcome in OUTCOMES)
    assert sum(one("notifier_requests_total", result=result)
               for result in ("ok", "error", "rate_limited")) == entries["requests"]
    assert one("notifier_snapshot_timestamp_seconds") == entries["timestamp"]
    assert one("notifier_delivered_unconfirmed_total") == entries.get("delivered_unconfirmed", 0)
    for hook in entries["webhooks"]:
        assert one("notifier_webhook_messages_total", webhook=str(hook["id"]),
                   outcome="delivered") == hook["delivered"]
    return one


def exposition(entries):
    exporter = prometheus.Exporter(None, None)
    exporter.update(entries)
    return generate_latest(exporter.registry).decode()


def test_the_series_follow_the_snapshot_and_its_identity():
    entries = dict(snapshot(received=22, delivered=12, drops=3, rejected=2, deduplicated=1,
                            failed=1, lost=2, pending=1, queue_len=1, requests=15, errors=2,
                            rate_limited=1, state="running", delivered_unconfirmed=1),
                   rate_limited_by_scope={"route": 1, "shared": 0, "global": 0, "ban": 0})
    entries["webhooks"][0]["failing_since"] = None
    one = check_against(samples(exposition(entries)), entries)
    assert one("notifier_requests_total", result="ok") == 12
    assert one("notifier_rate_limited_total", scope="route") == 1
    assert one("notifier_running") == 1
    assert one("notifier_last_delivery_timestamp_seconds") == NOW - 30


def test_files_the_relay_writes_and_messages_lost_have_series():
    entries = dict(snapshot(state="running", received=12, lost=2, journal_state="off",
                            dead_letters_state="failed", dead_letters_reason="disk full",
                            store_state="ok", store_reason=None),
                   rate_limited_by_scope={"route": 0, "shared": 0, "global": 0, "ban": 0})
    entries["webhooks"][0]["failing_since"] = None
    series = samples(exposition(entries))
    files = {dict(labels)["file"]: value for (name, labels), value in series.items()
             if name == "notifier_file_ok"}
    assert files == {"dead_letters": 0, "store": 1}  # the journal is off: no series
    assert series[("notifier_messages_total", (("outcome", "lost"),))] == 2


def test_per_webhook_series_are_bounded():
    hooks = [{"id": str(n), "state": "ok", "pending": 0, "delivered": n, "dropped": 0,
              "failed": 0, "last_success_at": None, "failing_since": None} for n in range(150)]
    entries = dict(snapshot(state="running"), webhooks=hooks,
                   rate_limited_by_scope={"route": 0, "shared": 0, "global": 0, "ban": 0})
    text = exposition(entries)
    webhooks = {labels for (name, labels) in samples(text)
                if name == "notifier_webhook_queue_messages"}
    assert len(webhooks) == prometheus.MAX_WEBHOOKS


def test_the_relay_serves_metrics_and_writes_the_textfile_with_the_snapshots_numbers(
        tmp_path, relays, pushers):
    textfile = tmp_path / "notifier.prom"
    port = free_port()
    with DiscordStandIn() as discord:
        relay = relays(allowed=f"127.0.0.1:{discord.port}", prometheus_file=str(textfile),
                       metrics_listen=f"127.0.0.1:{port}")
        pusher = pushers(relay.endpoint)
        for content in ("one", "two", "three"):
            pusher.send(envelope_text(discord.webhook_url(1), content))
        pusher.send(b"((type . ")

        def served():
            series = samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            delivered = series.get(("notifier_messages_total", (("outcome", "delivered"),)))
            return series if delivered == 3 else None
        series = wait_until(served, 30, what="3 delivered on /metrics")
        assert series[("notifier_messages_total", (("outcome", "rejected"),))] == 1
        assert relay.stop() == 0
    final = relay.metrics()
    assert_balanced(final)
    one = check_against(samples(textfile.read_text()), final)
    assert one("notifier_running") == 0 and "tok" not in textfile.read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
