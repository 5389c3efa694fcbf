"""Every command the README shows, run as the README shows it, as a real process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from notifier import __version__
from notifier.demo import free_port
from tests.harness import wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN = str(ROOT / "scripts" / "run.sh")
BIN = Path(sys.executable).parent  # the venv's console scripts


def run(*command, env=None, timeout=120):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


class Background:
    """A long-running command with its output in a file, stopped by SIGTERM."""

    def __init__(self, tmp_path, *command, env=None):
        self.out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.txt"
        with open(self.out, "wb") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})}, cwd=ROOT)

    def text(self):
        return self.out.read_text(errors="replace")

    def wait_for(self, words, timeout=60):
        return wait_until(lambda: self.process.poll() is None and words in self.text(), timeout,
                          what=f"{words!r} in the output of {self.process.args}")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def test_run_sh_passes_its_arguments_to_the_notifier(tmp_path):
    helped = run(RUN, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m notifier")
    assert "Traceback" not in helped.stderr
    version = run(RUN, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"swimmy-notifier {__version__}"
    status = run(RUN, "status", "--home", str(tmp_path))
    assert status.returncode == 2 and "no metrics file" in status.stdout
    assert "extra" not in status.stderr


def test_run_sh_with_a_port_is_the_relay(tmp_path):
    port = free_port()
    relay = Background(tmp_path, RUN, "--port", str(port), env={"SWIMMY_HOME": str(tmp_path)})
    try:
        relay.wait_for(f"relay started endpoint=tcp://127.0.0.1:{port}")
        assert relay.stop() == 0
    finally:
        relay.kill()
    assert "stopped: all delivered" in relay.text()


def test_standin_takes_its_flags_and_prints_what_the_relay_needs(tmp_path):
    port = free_port()
    for command in ((RUN, "standin", "--port", str(port)),
                    (sys.executable, "-m", "notifier", "standin", "--port", str(port),
                     "--rate-limit", "5/2")):
        standin = Background(tmp_path, *command)
        try:
            standin.wait_for("SWIMMY_NOTIFIER_ALLOWED_HOSTS")
            url = f"http://127.0.0.1:{port}/api/webhooks/1/tok"
            assert f"webhook URL: {url}" in standin.text()
            assert f"SWIMMY_NOTIFIER_ALLOWED_HOSTS=127.0.0.1:{port}" in standin.text()
            answer = requests.post(url + "?wait=true", json={"content": "hello"}, timeout=10)
            assert answer.status_code == 200
            standin.wait_for("1 hello")
            assert standin.stop() == 0
        finally:
            standin.kill()
    helped = run(sys.executable, "-m", "notifier", "standin", "--help")
    assert helped.returncode == 0 and "--rate-limit" in helped.stdout


def test_installed_commands_name_themselves_and_tell_their_version():
    notifier_help = run(str(BIN / "swimmy-notifier"), "--help")
    assert notifier_help.returncode == 0
    assert notifier_help.stdout.startswith("usage: swimmy-notifier")
    for name in ("swimmy-notifier", "swimmy-telemetry"):
        version = run(str(BIN / name), "--version")
        assert version.returncode == 0 and version.stdout.strip() == f"{name} {__version__}"
    module = run(sys.executable, "-m", "telemetry", "--version")
    assert module.stdout.strip() == f"swimmy-telemetry {__version__}"
    telemetry_help = run(sys.executable, "-m", "telemetry", "--help")
    assert telemetry_help.stdout.startswith("usage: python -m telemetry")
