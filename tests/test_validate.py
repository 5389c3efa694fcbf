"""`python -m notifier validate`: every problem listed, nothing started."""

import os
import subprocess
import sys

import zmq

from notifier.demo import free_port


def validate(home, *args, **environ):
    return subprocess.run([sys.executable, "-m", "notifier", "validate", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SWIMMY_HOME": str(home), **environ})


def test_a_ready_environment_passes_and_nothing_is_left_behind(tmp_path):
    port = str(free_port())
    result = validate(tmp_path, "--port", port, "--log-file", str(tmp_path / "logs" / "n.log"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"notifier validate: OK: settings valid, tcp://127.0.0.1:{port}")
    assert list(tmp_path.iterdir()) == []  # checked, not created


def test_every_bad_setting_is_listed_and_exits_2(tmp_path):
    result = validate(tmp_path, "--queue-max", "0", SWIMMY_PORT_NOTIFIER="http",
                      SWIMMY_NOTIFIER_ALLOWED_HOSTS="http://x")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "SWIMMY_PORT_NOTIFIER", "--queue-max", "SWIMMY_NOTIFIER_ALLOWED_HOSTS"], lines


def test_a_taken_port_and_unwritable_paths_are_all_listed_and_exit_1(tmp_path):
    context = zmq.Context()
    taken = context.socket(zmq.PULL)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        (tmp_path / "log-dir").mkdir()
        result = validate(tmp_path, "--port", str(port), "--metrics-file",
                          str(blocker / "metrics.sexp"), "--log-file", str(tmp_path / "log-dir"),
                          "--metrics-listen", f"127.0.0.1:{port}")
    finally:
        context.destroy(linger=0)
    assert result.returncode == 1
    problems = result.stderr.splitlines()
    assert problems == [
        f"notifier validate: cannot bind tcp://127.0.0.1:{port}: Address already in use",
        f"notifier validate: metrics file {blocker}/metrics.sexp: {blocker} is not a directory",
        f"notifier validate: log file {tmp_path}/log-dir is not a regular file",
        f"notifier validate: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ], problems
