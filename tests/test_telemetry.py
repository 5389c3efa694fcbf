"""The telemetry merge in-process: real files in tmp_path, a fixed clock, the Lisp side's
own files, and a concurrent writer that renames over the file the way Lisp does."""

import os
import random
import stat
import threading
from pathlib import Path

import pytest

from notifier import sexp
from telemetry import config, files, merge
from telemetry.merge import Exit
from tests.test_sexp import METRICS

NOW = 1_764_201_600.0  # Unix time; the fixtures' own timestamp is universal time
UNIVERSAL_OFFSET = 2_208_988_800

SNAPSHOT = {
    "schema_version": 1, "timestamp": int(NOW) - 3, "pid": 1234, "uptime_sec": 3600,
    "queue_len": 5, "queue_max": 1000, "received": 1200, "delivered": 1150, "drops": 2,
    "rejected": 3, "deduplicated": 4, "failed": 1, "lost": 0, "pending": 40, "errors": 7,
    "retries": 9, "rate_limited": 0, "requests": 1160, "last_delivery_at": int(NOW) - 10,
    "last_error_at": None, "last_error": "HTTP 500 from webhook 42",
    "webhooks": [{"id": "42", "delivered": 1150}],
}

MERGED_TEXT = (  # what a merge of SNAPSHOT at NOW appends, exactly
    '(notifier_status . "ok") (notifier_status_reason . nil) (notifier_age_sec . 3)'
    ' (notifier_queue_len . 5) (notifier_queue_max . 1000) (notifier_drops . 2)'
    ' (notifier_errors . 7) (notifier_delivered . 1150) (notifier_failed . 1)'
    ' (notifier_rejected . 3) (notifier_deduplicated . 4) (notifier_pending . 40)'
    ' (notifier_received . 1200) (notifier_lost . 0) (notifier_snapshot_unix . 1764201597)')

LISP_TEXT = (METRICS[0] / "system_metrics.sexp").read_text(encoding="utf-8")


def settings(home: Path, **changes) -> config.Config:
    (home / "data").mkdir(exist_ok=True)
    return config.load({}, changes, home)


def write_snapshot(cfg, **changes):
    cfg.notifier_metrics.write_text(sexp.dumps({**SNAPSHOT, **changes}), encoding="utf-8")


def entries(path: Path):
    return sexp.read_entries(path.read_bytes())


def lisp_entries(path: Path):
    """The entries the merge does not own."""
    return [e for e in entries(path) if not e.key.text.startswith("notifier_")]


def notifier_view(path: Path):
    return {k: v for k, v in sexp.loads(path.read_bytes()).items() if k.startswith("notifier_")}


def write_like_lisp(path: Path, text: str):
    """As the Lisp side writes: a temp file beside it, then a rename."""
    temp = path.with_name("system_metrics.sexp.lisp-tmp")
    temp.write_text(text, encoding="utf-8")
    os.rename(temp, path)


def leftovers(directory: Path):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------- fixtures merged

@pytest.mark.parametrize("fixture", METRICS, ids=[p.name for p in METRICS])
def test_each_lisp_file_gets_the_notifier_keys_and_keeps_every_entry_as_printed(tmp_path, fixture):
    cfg = settings(tmp_path)
    original = (fixture / "system_metrics.sexp").read_text(encoding="utf-8")
    cfg.system_metrics.write_text(original, encoding="utf-8")
    write_snapshot(cfg)

    assert merge.run(cfg, now=NOW) == Exit.OK

    merged = cfg.system_metrics.read_text(encoding="utf-8")
    # The Lisp side's style: one line, one space between entries, no trailing newline.
    assert merged == original[:-1] + " " + MERGED_TEXT + ")"
    before, after = sexp.read_entries(original), sexp.read_entries(merged)
    assert [(e.key, e.value, e.source) for e in after[:len(before)]] == [
        (e.key, e.value, e.source) for e in before]
    assert after[1].source == "(swimmy.school::timestamp . 3913056000)"
    assert sexp.read(merged)[:len(before)] == sexp.read(original)
    view = sexp.loads(merged)
    assert view["timestamp"] == 3913056000  # universal time, untouched
    assert notifier_view(cfg.system_metrics) == {
        "notifier_status": "ok", "notifier_status_reason": None, "notifier_age_sec": 3,
        "notifier_queue_len": 5, "notifier_queue_max": 1000, "notifier_drops": 2,
        "notifier_errors": 7, "notifier_delivered": 1150, "notifier_failed": 1,
        "notifier_rejected": 3, "notifier_deduplicated": 4, "notifier_pending": 40,
        "notifier_received": 1200, "notifier_lost": 0, "notifier_snapshot_unix": int(NOW) - 3}


def test_a_later_merge_replaces_the_keys_in_place(tmp_path):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    write_snapshot(cfg)
    merge.run(cfg, now=NOW)
    first = entries(cfg.system_metrics)

    write_snapshot(cfg, timestamp=int(NOW) + 55, queue_len=0, drops=9, delivered=1200)
    assert merge.run(cfg, now=NOW + 60) == Exit.OK

    second = entries(cfg.system_metrics)
    assert [e.key for e in second] == [e.key for e in first]
    assert [e.source for e in second[:6]] == [e.source for e in first[:6]]
    view = notifier_view(cfg.system_metrics)
    assert (view["notifier_queue_len"], view["notifier_drops"], view["notifier_delivered"],
            view["notifier_age_sec"]) == (0, 9, 1200, 5)


def test_notifier_keys_the_lisp_side_wrote_itself_are_replaced_not_repeated(tmp_path):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(
        "((swimmy.school::timestamp . 3913056000) (swimmy.school::notifier_drops . 99)"
        " (swimmy.school::heap_used_mb . 117.73757))", encoding="utf-8")
    write_snapshot(cfg)
    merge.run(cfg, now=NOW)
    text = cfg.system_metrics.read_text(encoding="utf-8")
    assert text.startswith("((swimmy.school::timestamp . 3913056000) (notifier_drops . 2)"
                           " (swimmy.school::heap_used_mb . 117.73757) (notifier_status . ")
    assert text.count("notifier_drops") == 1


def test_the_file_mode_is_kept_and_no_temp_file_is_left(tmp_path):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    cfg.system_metrics.chmod(0o640)
    write_snapshot(cfg)
    assert merge.run(cfg, now=NOW) == Exit.OK
    assert stat.S_IMODE(cfg.system_metrics.stat().st_mode) == 0o640
    assert leftovers(cfg.system_metrics.parent) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_merge_run_as_root_keeps_the_owner(tmp_path):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    cfg.system_metrics.chmod(0o600)
    os.chown(cfg.system_metrics, 65534, 65534)
    write_snapshot(cfg)
    assert merge.run(cfg, now=NOW) == Exit.OK
    status = cfg.system_metrics.stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (65534, 65534, 0o600)


# ------------------------------------------------------------------ statuses

def test_a_missing_system_file_is_created_with_what_the_merge_knows(tmp_path):
    cfg = settings(tmp_path)
    write_snapshot(cfg)
    assert merge.run(cfg, now=NOW) == Exit.OK
    assert cfg.system_metrics.read_text(encoding="utf-8") == "(" + MERGED_TEXT + ")"

    cfg.system_metrics.unlink()
    cfg.notifier_metrics.unlink()
    assert merge.run(cfg, now=NOW) == Exit.MISSING
    assert notifier_view(cfg.system_metrics) == {
        "notifier_status": "missing", "notifier_age_sec": None,
        "notifier_status_reason": f"{cfg.notifier_metrics} does not exist (is the relay running?)"}


def test_when_the_snapshot_goes_missing_the_numbers_stay_and_their_age_grows(tmp_path):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    write_snapshot(cfg)
    merge.run(cfg, now=NOW)
    good = notifier_view(cfg.system_metrics)
    cfg.notifier_metrics.unlink()

    assert merge.run(cfg, now=NOW + 600) == Exit.MISSING

    view = notifier_view(cfg.system_metrics)
    assert view == {**good, "notifier_status": "missing", "notifier_age_sec": 603,
                    "notifier_status_reason": view["notifier_status_reason"]}
    assert "does not exist" in view["notifier_status_reason"]
    assert [e.source for e in lisp_entries(cfg.system_metrics)] == [
        e.source for e in sexp.read_entries(LISP_TEXT)]


def test_an_old_snapshot_is_merged_as_stale(tmp_path):
    cfg = settings(tmp_path, stale_after="60")
    write_snapshot(cfg, timestamp=int(NOW) - 61)
    assert merge.run(cfg, now=NOW) == Exit.STALE
    view = notifier_view(cfg.system_metrics)
    assert (view["notifier_status"], view["notifier_age_sec"], view["notifier_drops"]) == (
        "stale", 61, 2)
    assert "61 s old (stale after 60 s)" in view["notifier_status_reason"]
    write_snapshot(cfg, timestamp=int(NOW) - 60)
    assert merge.run(cfg, now=NOW) == Exit.OK


@pytest.mark.parametrize("changes, exit, reason", [
    ({"timestamp": int(NOW) + UNIVERSAL_OFFSET}, Exit.INVALID,
     "in the future; it must be Unix time"),
    ({"timestamp": "yesterday"}, Exit.INVALID, "timestamp 'yesterday' is not Unix time"),
    ({"timestamp": None}, Exit.INVALID, "timestamp None is not Unix time"),
    ({"drops": -1, "errors": True}, Exit.INVALID, "drops, errors missing or not a whole number"),
    ({"pending": "many"}, Exit.INVALID, "pending missing or not a whole number"),
    ({"schema_version": 2}, Exit.UNSUPPORTED_SCHEMA, "has schema_version 2; only 1 is known"),
    ({"schema_version": True}, Exit.UNSUPPORTED_SCHEMA, "schema_version True"),
    ({"schema_version": None}, Exit.UNSUPPORTED_SCHEMA, "has no schema_version"),
])
def test_a_snapshot_that_is_not_schema_1_only_changes_the_status(tmp_path, changes, exit, reason):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    write_snapshot(cfg)
    merge.run(cfg, now=NOW)
    good = notifier_view(cfg.system_metrics)
    write_snapshot(cfg, **changes)

    assert merge.run(cfg, now=NOW + 1) == exit

    view = notifier_view(cfg.system_metrics)
    assert view["notifier_status"] == exit.name.lower()
    assert reason in view["notifier_status_reason"]
    assert view == {**good, "notifier_status": view["notifier_status"], "notifier_age_sec": 4,
                    "notifier_status_reason": view["notifier_status_reason"]}


def test_a_floating_point_timestamp_is_accepted(tmp_path):
    cfg = settings(tmp_path)
    write_snapshot(cfg, timestamp=NOW - 2.5)
    assert merge.run(cfg, now=NOW) == Exit.OK
    view = notifier_view(cfg.system_metrics)
    assert (view["notifier_age_sec"], view["notifier_snapshot_unix"]) == (3, int(NOW) - 3)


@pytest.mark.parametrize("content", [b"\x00\x01garbage", b"((a . 1)", b"(1 2 3)",
                                     b"((a . #.(run)))", b""])
def test_an_unreadable_system_file_is_never_overwritten(tmp_path, content, caplog):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_bytes(content)
    write_snapshot(cfg)
    assert merge.run(cfg, now=NOW) == Exit.SYSTEM_UNREADABLE
    assert cfg.system_metrics.read_bytes() == content
    assert leftovers(cfg.system_metrics.parent) == []
    assert "is unreadable, left untouched" in caplog.text


def test_a_system_file_in_a_missing_directory_is_a_write_failure(tmp_path):
    cfg = settings(tmp_path, system_metrics=str(tmp_path / "nowhere" / "system_metrics.sexp"))
    write_snapshot(cfg)
    assert merge.run(cfg, now=NOW) == Exit.WRITE_FAILED
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------- configuration

def test_flags_win_over_the_environment_which_wins_over_the_defaults(tmp_path):
    (tmp_path / "other").mkdir()
    cfg = config.load({"SWIMMY_HOME": str(tmp_path)}, {}, Path("/"))
    assert (cfg.home, cfg.notifier_metrics, cfg.system_metrics, cfg.stale_after) == (
        tmp_path, tmp_path / "data" / "notifier_metrics.sexp",
        tmp_path / "data" / "system_metrics.sexp", 60.0)
    cfg = config.load({"SWIMMY_HOME": "/nonexistent",
                       "SWIMMY_NOTIFIER_METRICS_FILE": str(tmp_path / "n.sexp")},
                      {"home": str(tmp_path / "other"), "stale_after": "90"}, Path("/"))
    assert (cfg.home, cfg.notifier_metrics, cfg.system_metrics, cfg.stale_after) == (
        tmp_path / "other", tmp_path / "n.sexp",
        tmp_path / "other" / "data" / "system_metrics.sexp", 90.0)
    relative = config.load({}, {"notifier_metrics": "x.sexp"}, tmp_path)
    assert relative.notifier_metrics == Path("x.sexp")
    assert config.load({}, {}, tmp_path).home == tmp_path


@pytest.mark.parametrize("environ, flags, message", [
    ({"SWIMMY_HOME": "/nonexistent"}, {}, "SWIMMY_HOME: '/nonexistent' is not a directory"),
    ({"SWIMMY_HOME": ""}, {}, "SWIMMY_HOME: must not be empty"),
    ({"SWIMMY_NOTIFIER_METRICS_FILE": " "}, {}, "SWIMMY_NOTIFIER_METRICS_FILE: must not be empty"),
    ({}, {"stale_after": "soon"},
     "--stale-after: must be a positive number of seconds, got 'soon'"),
    ({}, {"stale_after": "0"}, "--stale-after: must be a positive"),
    ({}, {"stale_after": "nan"}, "--stale-after: must be a positive"),
    ({}, {"system_metrics": "data/notifier_metrics.sexp"}, "are the same file"),
])
def test_a_bad_setting_is_an_error_naming_it(tmp_path, monkeypatch, environ, flags, message):
    monkeypatch.chdir(tmp_path)  # relative paths in the cases are relative to here
    with pytest.raises(config.ConfigError, match=message):
        config.load(environ, flags, tmp_path)


# ------------------------------------------------- no lost update: the rewrite itself

def lisp_file(n: int) -> str:
    return (f"((swimmy.school::timestamp . {3913056000 + n}) (swimmy.school::counter . {n})"
            f" (swimmy.school::heap_used_mb . {n}.5))")


def counter(data: bytes) -> int:
    return sexp.loads(data)["counter"]


def lisp_writes(path: Path, *values: int):
    """A step for `build_with`: the Lisp side writes the next of `values`, if any is left."""
    pending = list(values)
    return lambda: pending and write_like_lisp(path, lisp_file(pending.pop(0)))


def build_with(step=lambda: None):
    """A build step as the merge's: appends one key; runs `step` while "building" and
    records the counter of each version it was given."""
    seen = []

    def build(current):
        seen.append(counter(current))
        step()
        return current.decode()[:-1] + ' (notifier_status . "ok"))'
    return build, seen


def test_a_write_during_the_merge_makes_it_start_over_from_the_new_contents(tmp_path):
    path = tmp_path / "system_metrics.sexp"
    write_like_lisp(path, lisp_file(1))
    build, seen = build_with(lisp_writes(path, 2))

    assert files.rewrite(path, build, limit=sexp.MAX_BYTES) == 2

    assert seen == [1, 2]
    assert path.read_text() == lisp_file(2)[:-1] + ' (notifier_status . "ok"))'
    assert leftovers(tmp_path) == []


def test_writes_between_the_swaps_are_swapped_back_until_the_newest_is_in_place(tmp_path):
    """The Lisp side writes just before the exchange and again just before the swap back:
    each newer file must end up in place, and the merge redone on the newest."""
    path = tmp_path / "system_metrics.sexp"
    write_like_lisp(path, lisp_file(1))
    writes_before_swap = {1: 2, 2: 3}  # swap number -> the Lisp write just before it
    swaps = []

    def swap(first, second):
        swaps.append(1)
        if len(swaps) in writes_before_swap:
            write_like_lisp(path, lisp_file(writes_before_swap[len(swaps)]))
        files.exchange(first, second)

    build, seen = build_with()
    assert files.rewrite(path, build, limit=sexp.MAX_BYTES, swap=swap) == 2
    assert seen == [1, 3] and len(swaps) == 4
    assert path.read_text() == lisp_file(3)[:-1] + ' (notifier_status . "ok"))'
    assert leftovers(tmp_path) == []


def test_a_file_changing_under_every_try_is_left_to_the_lisp_side(tmp_path):
    path = tmp_path / "system_metrics.sexp"
    write_like_lisp(path, lisp_file(0))
    build, seen = build_with(lisp_writes(path, *range(1, 100)))
    with pytest.raises(files.Busy):
        files.rewrite(path, build, limit=sexp.MAX_BYTES)
    assert len(seen) == files.TRIES
    assert path.read_text() == lisp_file(files.TRIES)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("swap", [None, "unsupported"])
def test_without_the_atomic_exchange_a_check_before_the_rename_stands_in(tmp_path, swap):
    def unsupported(first, second):
        raise OSError(22, "Invalid argument")

    swap = unsupported if swap else None
    path = tmp_path / "system_metrics.sexp"
    write_like_lisp(path, lisp_file(1))
    path.chmod(0o600)
    build, seen = build_with(lisp_writes(path, 2))
    assert files.rewrite(path, build, limit=sexp.MAX_BYTES, swap=swap) == 2
    assert seen == [1, 2]
    assert path.read_text() == lisp_file(2)[:-1] + ' (notifier_status . "ok"))'
    assert leftovers(tmp_path) == []


def test_a_file_created_during_the_merge_is_not_replaced_blindly(tmp_path):
    path = tmp_path / "system_metrics.sexp"
    calls = []

    def build(current):
        calls.append(current)
        if current is None:
            write_like_lisp(path, lisp_file(7))
            return '((notifier_status . "ok"))'
        return current.decode()[:-1] + ' (notifier_status . "ok"))'

    assert files.rewrite(path, build, limit=sexp.MAX_BYTES) == 2
    assert calls[0] is None and counter(path.read_bytes()) == 7


def test_a_failed_write_removes_its_temp_file(tmp_path):
    path = tmp_path / "system_metrics.sexp"
    write_like_lisp(path, lisp_file(1))
    with pytest.raises(UnicodeEncodeError):
        files.rewrite(path, lambda current: "(\udc80)", limit=sexp.MAX_BYTES)
    assert path.read_text() == lisp_file(1) and leftovers(tmp_path) == []


def test_a_concurrent_lisp_writer_is_never_rolled_back(tmp_path):
    """A thread rewrites the file (temp, rename) with increasing values while the merge runs
    hundreds of times and another thread reads it: it always parses, and after each merge
    it holds the writer's latest values or newer ones, never older."""
    cfg = settings(tmp_path)
    write_snapshot(cfg)
    path = cfg.system_metrics
    write_like_lisp(path, lisp_file(0))
    stop = threading.Event()
    latest = [0]
    problems = []

    def writer():
        pace = random.Random(5)
        n = 0
        while not stop.is_set():
            n += 1
            write_like_lisp(path, lisp_file(n))
            latest[0] = n
            stop.wait(pace.uniform(0, 0.002))  # the Lisp side's schedule, sped up

    def reader():
        while not stop.is_set():
            try:
                sexp.read_entries(path.read_bytes())
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                problems.append(repr(exc))

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    outcomes = []
    try:
        for _ in range(300):
            outcomes.append(merge.run(cfg, now=NOW))
            written = latest[0]
            value = counter(path.read_bytes())
            if value < written:
                problems.append(f"merge put back {value} after the writer wrote {written}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert problems == []
    assert set(outcomes) <= {Exit.OK, Exit.BUSY} and Exit.OK in outcomes
    assert merge.run(cfg, now=NOW) == Exit.OK
    assert counter(path.read_bytes()) == latest[0] and notifier_view(path)["notifier_drops"] == 2
    assert leftovers(tmp_path / "data") == []


def test_the_plans_minimal_snapshot_merges_and_the_counters_it_lacks_are_nil(tmp_path):
    cfg = settings(tmp_path)
    write_snapshot(cfg)
    merge.run(cfg, now=NOW)  # numbers from a full snapshot first: none may linger
    minimal = {"schema_version": 1, "timestamp": int(NOW) - 3, "queue_len": 2, "drops": 1,
               "errors": 0}
    cfg.notifier_metrics.write_text(sexp.dumps(minimal), encoding="utf-8")

    assert merge.run(cfg, now=NOW) == Exit.OK

    view = notifier_view(cfg.system_metrics)
    assert (view["notifier_status"], view["notifier_queue_len"], view["notifier_drops"],
            view["notifier_errors"]) == ("ok", 2, 1, 0)
    assert all(view[f"notifier_{name}"] is None for name in merge.COUNTERS
               if name not in merge.REQUIRED_COUNTERS)


@pytest.mark.parametrize("hostile", [
    "(" + "a:b:" + "t" * (sexp.MAX_BYTES - 10) + ")",  # a 1 MiB token in the reader's error
    sexp.dumps({**SNAPSHOT, "schema_version": "v" * 500_000}),
    sexp.dumps({**SNAPSHOT, "timestamp": "t" * 500_000}),
])
def test_a_hostile_snapshot_never_makes_the_system_file_unmergeable(tmp_path, hostile):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    cfg.notifier_metrics.write_text(hostile, encoding="utf-8")

    assert merge.run(cfg, now=NOW) in (Exit.UNREADABLE, Exit.INVALID, Exit.UNSUPPORTED_SCHEMA)
    reason = notifier_view(cfg.system_metrics)["notifier_status_reason"]
    assert len(reason) <= merge.MAX_REASON_CHARS
    assert cfg.system_metrics.stat().st_size < len(LISP_TEXT) + 2 * merge.MAX_REASON_CHARS

    write_snapshot(cfg)
    assert merge.run(cfg, now=NOW) == Exit.OK
    assert notifier_view(cfg.system_metrics)["notifier_status"] == "ok"
