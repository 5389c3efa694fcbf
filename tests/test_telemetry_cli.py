"""`python -m telemetry merge` as cron runs it: a real process, real files, its exit codes."""

import os
import re
import subprocess
import sys
import time

import pytest

from notifier import sexp
from telemetry import merge
from telemetry.merge import Exit
from tests.test_telemetry import LISP_TEXT, SNAPSHOT, leftovers, settings


def run_merge(home, *flags, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SWIMMY_")}
    environ.update(env if env is not None else {"SWIMMY_HOME": str(home)})
    return subprocess.run([sys.executable, "-m", "telemetry", "merge", *flags], cwd=home,
                          env=environ, capture_output=True, text=True, timeout=60)


def snapshot_text(**changes):
    return sexp.dumps({**SNAPSHOT, "timestamp": int(time.time()), **changes})


@pytest.fixture
def merged_once(tmp_path):
    """A home whose system_metrics.sexp is the Lisp side's file after one good merge."""
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    cfg.notifier_metrics.write_text(snapshot_text(), encoding="utf-8")
    assert merge.run(cfg, now=time.time()) == Exit.OK
    return cfg


def test_a_fresh_snapshot_merges_and_exits_0(merged_once):
    cfg = merged_once
    cfg.notifier_metrics.write_text(snapshot_text(drops=11), encoding="utf-8")
    result = run_merge(cfg.home)
    assert result.returncode == Exit.OK, result.stderr
    view = sexp.loads(cfg.system_metrics.read_bytes())
    assert (view["notifier_status"], view["notifier_drops"]) == ("ok", 11)
    assert result.stderr.count("\n") == 1  # one line, in the relay's format:
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO telemetry\.merge merged into ",
                    result.stderr), result.stderr


def test_a_stale_snapshot_merges_and_exits_3(merged_once):
    cfg = merged_once
    cfg.notifier_metrics.write_text(snapshot_text(timestamp=int(time.time()) - 3600, drops=11),
                                    encoding="utf-8")
    result = run_merge(cfg.home, "--stale-after", "600")
    assert result.returncode == Exit.STALE, result.stderr
    view = sexp.loads(cfg.system_metrics.read_bytes())
    assert (view["notifier_status"], view["notifier_drops"]) == ("stale", 11)
    assert view["notifier_age_sec"] >= 3600 and "stale after 600 s" in result.stderr


def prepare_directory(path):
    path.mkdir()


def prepare_fifo(path):
    os.mkfifo(path)  # nobody writes it: reading it would hang


def prepare_permission(path):
    path.write_text(snapshot_text(), encoding="utf-8")
    path.chmod(0)


def content(data):
    return lambda path: path.write_bytes(data if isinstance(data, bytes) else data.encode())


BAD_SNAPSHOTS = {
    "missing": (lambda path: None, Exit.MISSING, "does not exist"),
    "directory": (prepare_directory, Exit.UNREADABLE, "is a directory"),
    "fifo": (prepare_fifo, Exit.UNREADABLE, "not a regular file"),
    "permission": (prepare_permission, Exit.UNREADABLE, "Permission denied"),
    "read_eval": (content('((schema_version . 1) (x . #.(sb-ext:run-program "/bin/sh" nil)))'),
                  Exit.UNREADABLE, "read-time evaluation (#.) is refused"),
    "nesting_bomb": (content("(" * 100_000 + ")" * 100_000), Exit.UNREADABLE, "deeper than 64"),
    "binary_garbage": (content(bytes(range(256)) * 64), Exit.UNREADABLE, "invalid UTF-8"),
    "over_1_mib": (content('((schema_version . 1) (x . "' + "x" * (1 << 20) + '"))'),
                   Exit.UNREADABLE, "over the 1048576 limit"),
    "truncated": (lambda path: path.write_text(snapshot_text()[:40]), Exit.UNREADABLE,
                  "never closed"),
    "not_an_alist": (content("(1 2 3)"), Exit.INVALID, "is not an alist"),
    "universal_time": (lambda path: path.write_text(snapshot_text(
        timestamp=int(time.time()) + 2_208_988_800)), Exit.INVALID, "must be Unix time"),
    "unknown_schema": (lambda path: path.write_text(snapshot_text(schema_version=2)),
                       Exit.UNSUPPORTED_SCHEMA, "schema_version 2; only 1 is known"),
}


@pytest.mark.parametrize("case", BAD_SNAPSHOTS)
def test_a_bad_snapshot_changes_only_the_status_and_has_its_exit_code(merged_once, case):
    prepare, exit, reason = BAD_SNAPSHOTS[case]
    if case == "permission" and os.geteuid() == 0:
        pytest.skip("root reads any file; the directory and fifo cases cover the same path")
    cfg = merged_once
    cfg.notifier_metrics.unlink()
    prepare(cfg.notifier_metrics)
    before = sexp.read_entries(cfg.system_metrics.read_bytes())

    result = run_merge(cfg.home)

    assert result.returncode == exit, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"status={exit.name.lower()}" in lines[0] and reason in lines[0]
    after = sexp.read_entries(cfg.system_metrics.read_bytes())
    status_keys = {"notifier_status", "notifier_status_reason", "notifier_age_sec"}
    assert [(e.key, e.source) for e in after if e.key.text not in status_keys] == [
        (e.key, e.source) for e in before if e.key.text not in status_keys]
    assert [e.key for e in after] == [e.key for e in before]
    view = sexp.loads(cfg.system_metrics.read_bytes())
    assert view["notifier_status"] == exit.name.lower() and reason in view["notifier_status_reason"]
    assert leftovers(cfg.system_metrics.parent) == []


@pytest.mark.parametrize("make", [lambda p: p.write_bytes(b"\x00\x9f not lisp"),
                                  lambda p: p.mkdir()], ids=["garbage", "directory"])
def test_an_unreadable_system_file_is_left_alone_with_exit_8(tmp_path, make):
    cfg = settings(tmp_path)
    cfg.notifier_metrics.write_text(snapshot_text(), encoding="utf-8")
    make(cfg.system_metrics)
    before = cfg.system_metrics.read_bytes() if cfg.system_metrics.is_file() else None
    result = run_merge(tmp_path)
    assert result.returncode == Exit.SYSTEM_UNREADABLE, result.stderr
    assert "is unreadable, left untouched" in result.stderr
    if before is not None:
        assert cfg.system_metrics.read_bytes() == before
    assert leftovers(cfg.system_metrics.parent) == []


def test_a_system_file_that_cannot_be_written_exits_10(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_merge(tmp_path, "--system-metrics", str(tmp_path / "gone" / "system.sexp"))
    assert result.returncode == Exit.WRITE_FAILED and "cannot write" in result.stderr


def test_settings_come_from_the_environment_and_flags(tmp_path):
    (tmp_path / "data").mkdir()
    snapshot = tmp_path / "elsewhere.sexp"
    snapshot.write_text(snapshot_text(), encoding="utf-8")
    result = run_merge(tmp_path, env={"SWIMMY_HOME": str(tmp_path),
                                      "SWIMMY_NOTIFIER_METRICS_FILE": str(snapshot)})
    assert result.returncode == Exit.OK, result.stderr
    target = tmp_path / "custom.sexp"
    result = run_merge(tmp_path, "--notifier-metrics", str(snapshot), "--system-metrics",
                       str(target), env={})
    assert result.returncode == Exit.OK, result.stderr
    assert sexp.loads(target.read_bytes())["notifier_status"] == "ok"


@pytest.mark.parametrize("flags, env, message", [
    ((), {"SWIMMY_HOME": "/nonexistent"}, "SWIMMY_HOME: '/nonexistent' is not a directory"),
    (("--stale-after", "soon"), None, "--stale-after: must be a positive number of seconds"),
    ((), {"SWIMMY_NOTIFIER_METRICS_FILE": ""}, "SWIMMY_NOTIFIER_METRICS_FILE: must not be empty"),
])
def test_a_bad_setting_exits_2_and_names_it(tmp_path, flags, env, message):
    result = run_merge(tmp_path, *flags, env=env)
    assert result.returncode == Exit.CONFIG and message in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [(), ("merj",), ("merge", "--bogus")])
def test_a_bad_command_line_exits_2(args):
    result = subprocess.run([sys.executable, "-m", "telemetry", *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr and "merge" in result.stderr


def test_after_a_hostile_snapshot_the_next_good_one_merges_with_exit_0(merged_once):
    cfg = merged_once
    cfg.notifier_metrics.write_text("(" + "a:b:" + "t" * (sexp.MAX_BYTES - 10) + ")",
                                    encoding="utf-8")
    hostile = run_merge(cfg.home)
    assert hostile.returncode == Exit.UNREADABLE, hostile.stderr
    assert len(hostile.stderr) < 1000 and "Traceback" not in hostile.stderr

    cfg.notifier_metrics.write_text(snapshot_text(drops=12), encoding="utf-8")
    good = run_merge(cfg.home)
    assert good.returncode == Exit.OK, good.stderr
    assert sexp.loads(cfg.system_metrics.read_bytes())["notifier_drops"] == 12
