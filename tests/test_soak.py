"""The fault-injection soak (scripts/soak.py), short: a few dozen relay runs ended by
SIGKILL or SIGTERM, and SIGHUPs that must not end them, while the stand-in misbehaves
and (with storage faults) the store is attacked; bounded by run count rather than time so
that the same decisions are taken on a loaded machine."""

import os

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
