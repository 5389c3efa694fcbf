"""The fault-injection soak (scripts/soak.py), short: a few dozen relay runs ended by
SIGKILL or SIGTERM, and SIGHUPs that must not end them, while the stand-in misbehaves
and (with storage faults) the store is attacked; bounded by run count rather than time so
that the same decisions are taken on a loaded machine."""

import os
import threading
import time

import requests

from scripts import soak


def test_a_short_durable_soak_loses_nothing_taken(tmp_path):
    lines = []
    result = soak.run(seconds=600, cycles=25, seed=3, durable=True, sighup=True,
                      home=tmp_path, out=lines.append)
    assert result.failures == [], "\n".join(lines)
    assert result.kills["SIGKILL"] and result.kills["SIGTERM"] and result.kills_in_transit
    assert result.hups_survived and result.delivered


def test_a_short_soak_without_durable_mode_loses_only_what_a_sigkill_held(tmp_path):
    lines = []
    result = soak.run(seconds=600, cycles=8, seed=5, durable=False, home=tmp_path,
                      out=lines.append)
    assert result.failures == [], "\n".join(lines)
    assert result.kills["SIGKILL"] and result.kills["SIGTERM"]


def test_a_short_soak_with_storage_faults_loses_nothing_it_does_not_count(tmp_path):
    """A full disk (a real tmpfs: root only, otherwise the soak says it leaves it out), the
    store removed or replaced while the relay runs, a second relay on the same data, the
    store damaged between runs, durable mode and queue_max changed between runs."""
    lines = []
    result = soak.run(seconds=600, cycles=15, seed=3, storage=True, sighup=True,
                      home=tmp_path, out=lines.append)
    assert result.failures == [], "\n".join(lines)
    faults = result.storage
    while_running = sum(n for fault, n in faults.items() if fault in soak.Storage.HARMS)
    between_runs = sum(n for fault, n in faults.items() if fault in soak.Storage.DAMAGES)
    assert faults["second relay"] and while_running and between_runs, "\n".join(lines)
    assert result.kills["SIGKILL"] and result.kills["SIGTERM"]
    if os.geteuid() == 0:
        assert faults["disk full"], "\n".join(lines)
    else:
        assert any("mounting a tmpfs needs root" in line for line in lines)


def test_the_check_fails_when_a_tag_the_relay_took_never_arrives(tmp_path):
    checker = soak.Soak(tmp_path, durable=True, seed=0, out=lambda line: None)
    try:
        run = checker.new_run()
        checker.send_burst(run)  # nothing listens: no tag arrives
        run.end = "SIGKILL"
        run.last = {"received": len(run.sent), "restored": 0, "failed": 0, "drops": 0,
                    "rejected": 0, "pending": len(run.sent), "restored_in_flight": 0}
        checker.check()
    finally:
        checker.close()
    assert checker.result.lost == len(run.sent)
    assert [f for f in checker.result.failures if "the relay took were lost" in f]


def test_a_short_soak_with_process_faults_keeps_every_thread_and_every_sigterm(tmp_path):
    """The log directory removed and restored, SIGHUP and SIGTERM from the first
    millisecond, idle and half-open /metrics connections held throughout (issue 16)."""
    lines = []
    result = soak.run(seconds=600, cycles=15, seed=4, sighup=True, process=True,
                      home=tmp_path, out=lines.append)
    assert result.failures == [], "\n".join(lines)
    faults = result.process
    assert faults["log directory removed"] and faults["half-closed /metrics connections"]
    assert any(fault.endswith("ms after start") for fault in faults), "\n".join(lines)
    assert result.kills["SIGTERM"] and result.hups_survived and result.delivered


def test_the_webhook_check_fails_on_two_in_flight_on_disorder_and_on_another_url(tmp_path):
    """What the soak checks per webhook, whatever URL named it, shown failing: two
    requests to webhook 1 in flight at once (through two of its threads), webhook 2's
    tags saved out of order, and a tag posted to another URL than it asked for."""
    checker = soak.Soak(tmp_path, durable=True, seed=0, out=lambda line: None)
    discord = checker.standin
    try:
        run = checker.new_run()
        run.started_at = time.monotonic()
        with requests.Session() as http, requests.Session() as other:
            http.trust_env = other.trust_env = False

            def post(session, url, tag):
                checker.sent_to.setdefault(tag, url)
                return session.post(url, params={"wait": "true"},
                                    json={"content": f"soak-{tag}"}, timeout=30)

            discord.set_mode("1", "hang", times=1)
            hung = threading.Thread(target=post, args=(other, discord.webhook_url(1, thread=501), 1))
            hung.start()
            assert discord.wait_for(lambda d: d.hanging == 1, 30)
            post(http, discord.webhook_url(1, version=10), 2)
            discord.release_hangs()
            hung.join(30)
            post(http, discord.webhook_url(2), 4)
            post(http, discord.webhook_url(2, thread=502), 3)
            checker.sent_to[5] = discord.webhook_url(3, thread=503)
            post(http, discord.webhook_url(3), 5)
        run.ended_at = time.monotonic()
        checker.check_webhooks()
    finally:
        checker.close()
    failures = checker.result.failures
    assert [f for f in failures if f.startswith("run 1: 2 requests to webhook 1 in flight")]
    assert [f for f in failures if f.startswith("webhook 2: 1 tags saved before an older one")]
    assert [f for f in failures if f.startswith("1 tags posted to another URL")]
    assert len(failures) == 3, failures
