"""`python -m telemetry show`: system_metrics.sexp for a person, with times as dates."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from notifier import sexp
from telemetry.show import UNIVERSAL_TO_UNIX, render
from tests.test_sexp import METRICS
from tests.test_telemetry import LISP_TEXT, settings
from tests.test_telemetry_cli import run_merge, snapshot_text


def show(home, *flags):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SWIMMY_")}
    return subprocess.run([sys.executable, "-m", "telemetry", "show", "--home", str(home),
                           *flags], env=environ, capture_output=True, text=True, timeout=60)


def test_universal_time_is_shown_as_its_date_and_the_notifier_keys_with_their_age(tmp_path):
    cfg = settings(tmp_path)
    cfg.system_metrics.write_text(LISP_TEXT, encoding="utf-8")
    cfg.notifier_metrics.write_text(snapshot_text(), encoding="utf-8")
    assert run_merge(tmp_path).returncode == 0
    result = show(cfg.home)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    universal = sexp.loads(cfg.system_metrics.read_bytes())["timestamp"]
    assert universal > UNIVERSAL_TO_UNIX  # the Lisp side's own clock, not Unix time
    assert f"universal time {universal}" in out
    lisp_side, notifier = out.split("\nnotifier (", 1)
    assert "notifier_" not in lisp_side
    assert notifier.startswith("merged by python -m telemetry merge; its numbers are ")
    assert "notifier_status" in notifier and '"ok"' in notifier
    assert " UTC (" in notifier.split("notifier_snapshot_unix", 1)[1].splitlines()[0]


def test_a_lisp_timestamp_converts_exactly_and_an_unmerged_file_says_so(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "system_metrics.sexp").write_text(
        "((swimmy.school::schema_version . 1) (swimmy.school::timestamp . 3913056000))")
    out = show(tmp_path).stdout
    assert "timestamp       2024-01-01 00:00:00 UTC (" in out
    assert "no notifier_* keys yet" in out


def test_an_unreadable_file_is_exit_8_without_a_traceback(tmp_path):
    (tmp_path / "data").mkdir()
    os.mkfifo(tmp_path / "data" / "system_metrics.sexp")
    result = show(tmp_path)
    assert result.returncode == 8 and "not a regular file" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_merge(tmp_path).returncode == 8  # the merge says the same of it


def test_a_timestamp_ahead_of_this_clock_says_how_far_in_the_future(tmp_path):
    (tmp_path / "data").mkdir()
    universal = int(time.time()) + UNIVERSAL_TO_UNIX + 3 * 3600  # the Lisp host is ahead
    (tmp_path / "data" / "system_metrics.sexp").write_text(
        f"((swimmy.school::schema_version . 1) (swimmy.school::timestamp . {universal}))")
    result = show(tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines()
                if line.strip().startswith("timestamp"))
    assert "(in the future by 3.0 h)" in line and "ago" not in line, line
    assert line.endswith(f"universal time {universal}")


def test_a_merge_dated_in_the_future_says_so():
    metrics = sexp.loads("((timestamp . 3913056000) (notifier_snapshot_unix . 1000300.0d0)"
                         " (notifier_status . \"ok\"))", written_floats=True)
    out = render(metrics, Path("system_metrics.sexp"), now=1_000_000.0)
    assert "its numbers are dated 5 min in the future" in out
    assert "(in the future by 5 min), Unix time 1000300.0d0" in out


@pytest.mark.parametrize("fixture", METRICS, ids=[p.name for p in METRICS])
def test_floats_are_shown_as_sbcl_printed_them(tmp_path, fixture):
    text = (fixture / "system_metrics.sexp").read_text(encoding="utf-8")
    written = re.search(r"heap_used_mb \. ([^)]+)\)", text)[1]  # 117.73757, 1.5...d0, 9.5e-7
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "system_metrics.sexp").write_text(
        text[:-1] + " (swimmy.school::loads 0.5 1.0e-4 2.5d-3 1.0e7))", encoding="utf-8")
    out = show(tmp_path).stdout
    assert re.search(rf"\bheap_used_mb +{re.escape(written)}$", out, re.MULTILINE), out
    assert re.search(r"\bloads +\(0\.5 1\.0e-4 2\.5d-3 1\.0e7\)$", out, re.MULTILINE), out
