"""Prometheus exposition: parsed with prometheus_client's own parser, checked against the
S-expression snapshot, from the relay as a real process."""

import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from notifier import metrics, prometheus
from notifier.demo import free_port
from notifier.standin import DiscordStandIn
from tests.harness import Clock, assert_balanced, envelope_text, wait_until
from tests.test_metrics import outbox_snapshot
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
    exporter = prometheus.Exporter(None)
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


def test_per_webhook_series_are_those_of_the_snapshot_with_a_count_of_the_rest():
    entries = metrics.entries(outbox_snapshot(150), now=NOW, started_at=NOW - 60, pid=1,
                              interval=5.0)
    series = samples(exposition(entries))
    webhooks = {labels for (name, labels) in series
                if name == "notifier_webhook_queue_messages"}
    assert len(webhooks) == metrics.MAX_WEBHOOKS
    assert series[("notifier_webhooks_left_out", ())] == 50


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


# ---------------------------------------------------------------------- the /metrics listener


@pytest.fixture
def listener():
    """A Listener on a free loopback port serving b"body", a fake clock for its
    deadlines, and a thread stepping it until the test ends."""
    clock = Clock()
    served = prometheus.Listener(("127.0.0.1", 0), lambda: b"notifier_up 1\n",
                                 max_connections=4, timeout=3.0, clock=clock)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [served.loop(0.05) for _ in iter(stop.is_set, True)])
    thread.start()
    yield served, clock
    stop.set()
    thread.join()
    served.close()


def exchange(address, request: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("::1", False),
                                           ("0.0.0.0", True)])
def test_a_listener_reachable_from_other_hosts_is_said_at_warning(caplog, host, warned):
    with caplog.at_level("WARNING", "notifier"):
        try:
            prometheus.Listener((host, 0), lambda: b"").close()
        except OSError as exc:
            pytest.skip(f"cannot listen on {host} here: {exc}")
    said = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert bool(said) == warned
    if warned:
        assert said[0].startswith("/metrics on 0.0.0.0:0 is reachable from other hosts")
        assert said[0].endswith("keep it on loopback or behind a firewall")


def test_a_scrape_is_answered_and_anything_else_refused(listener):
    served, _ = listener
    answer = exchange(served.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nnotifier_up 1\n")
    assert b"Content-Length: 14\r\n" in answer and b"Connection: close" in answer
    assert exchange(served.address, b"HEAD /metrics HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n")
    assert exchange(served.address, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert exchange(served.address, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert exchange(served.address, b"GET /" + b"x" * 9000).startswith(b"HTTP/1.1 431")


def test_idle_and_half_sent_connections_are_capped_and_cut_at_their_deadline(listener):
    served, clock = listener
    held = [socket.create_connection(served.address, timeout=10) for _ in range(4)]
    held[0].sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request, then nothing
    wait_until(lambda: len(served._connections) == 4, 10, what="4 accepted")
    beyond = socket.create_connection(served.address, timeout=10)
    assert closed_by_peer(beyond)  # over the cap: closed at once
    assert served.refused == 1
    clock.now += 3.0  # their deadline
    try:
        for sock in held:
            assert closed_by_peer(sock)
    finally:
        for sock in held + [beyond]:
            sock.close()
    wait_until(lambda: served.cut == 4, 10, what="4 cut")
    answer = exchange(served.address, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert answer.endswith(b"notifier_up 1\n")


def test_a_listener_holds_a_bounded_number_of_descriptors_whatever_connects(listener):
    served, _ = listener
    before = len(os.listdir("/proc/self/fd"))
    clients = []
    try:
        for _ in range(100):
            clients.append(socket.create_connection(served.address, timeout=10))
        wait_until(lambda: served.refused == 96, 10, what="96 refused")
        assert len(os.listdir("/proc/self/fd")) - before - len(clients) <= 4
    finally:
        for sock in clients:
            sock.close()


# ---------------------------------------------------------------------- the text file

def test_the_textfile_in_a_missing_directory_is_written_and_a_failed_one_reported(
        tmp_path, relays):
    """Its directory used to be left missing: never written, an ERROR every interval,
    status and validate OK."""
    textfile = tmp_path / "textfile_collector" / "sub" / "notifier.prom"
    with DiscordStandIn() as discord:
        relay = relays(allowed=f"127.0.0.1:{discord.port}", prometheus_file=str(textfile),
                       log_level="info")
        relay.wait_metrics(lambda m: m["prometheus_state"] == "ok")
        wait_until(textfile.exists, 10, what="the text file")
        textfile.unlink()
        textfile.mkdir()  # a directory in its place: the rename cannot replace it
        (textfile / "in the way").touch()
        first = relay.wait_metrics(lambda m: m["prometheus_state"] == "failed")
        relay.wait_metrics(lambda m: m["timestamp"] >= first["timestamp"] + 1, what="a while")
        told = subprocess.run([sys.executable, "-m", "notifier", "status", "--home",
                               str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert told.returncode == 1
        assert "the Prometheus text file cannot be written: Is a directory" in told.stdout
        assert relay.log().count("cannot write the Prometheus text file") == 1
        shutil.rmtree(textfile)
        relay.wait_metrics(lambda m: m["prometheus_state"] == "ok", what="written again")
        assert "Prometheus text file" in relay.log().split("written again")[0].splitlines()[-1]
        assert relay.stop() == 0
    assert samples(textfile.read_text())[("notifier_running", ())] == 0
