"""Running the relay as a real process for tests: start, wait on its metrics, signal it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import zmq

from notifier import metrics, sexp
from notifier.demo import free_port
from notifier.sexp import Alist
from notifier.store import Contents, Store

BALANCE = ("delivered", "drops", "rejected", "deduplicated", "failed", "lost", "pending")


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.02,
               what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Clock:
    """A clock a test moves by hand: ``clock.now += 5``."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def assert_balanced(snapshot: Alist) -> None:
    """Every message the relay received is in exactly one place."""
    parts = {key: snapshot[key] for key in BALANCE}
    assert snapshot["received"] == sum(parts.values()), (snapshot["received"], parts)


def envelope_text(webhook: str, content: str) -> bytes:
    return sexp.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                       "webhook": webhook, "payload_json": f'{{"content": "{content}"}}'}
                      ).encode("utf-8")


def stored(store_file: Path) -> Contents:
    """What a stopped relay left in its store (read as the next start reads it)."""
    store = Store(store_file)
    try:
        return store.open(limit=10_000_000)
    finally:
        store.close()


def saved_envelopes(store_file: Path) -> list[str]:
    """The envelopes a stopped relay saved in its store, oldest first."""
    return [item.envelope.decode("utf-8") for item in stored(store_file).messages]


def contents(standin, webhook_id) -> list[str]:
    """Every content line a stand-in webhook received, in arrival order (a combined
    request holds several)."""
    return [line for message in standin.messages(str(webhook_id))
            for line in (message.get("content") or "").split("\n") if line]


class RelayProcess:
    """``python -m notifier`` in `home`, posting to the stand-in at `allowed`."""

    def __init__(self, home: Path, allowed: str, port: int | None = None, **settings: str):
        self.home = home
        self.port = port or free_port()
        self.log_file = home / "relay.log"
        self.metrics_file = home / "data" / "notifier_metrics.sexp"
        self.store_file = home / "data" / "notifier_store.sqlite3"
        self.env = {**os.environ, "SWIMMY_HOME": str(home),
                    "SWIMMY_PORT_NOTIFIER": str(self.port),
                    "SWIMMY_NOTIFIER_ALLOWED_HOSTS": allowed,
                    "SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC": "0.1",
                    "SWIMMY_NOTIFIER_DRAIN_SEC": "1",
                    "SWIMMY_NOTIFIER_LOG_FILE": str(self.log_file),
                    "SWIMMY_NOTIFIER_LOG_LEVEL": "debug",  # tests read per-message lines
                    **{f"SWIMMY_NOTIFIER_{key.upper()}": value for key, value in settings.items()}}
        if "metrics_file" in settings:
            self.metrics_file = Path(settings["metrics_file"])
        if "store" in settings:
            self.store_file = Path(settings["store"])
        self.command = [sys.executable, "-m", "notifier"]  # tests may prefix it
        self.preexec_fn: Callable[[], None] | None = None  # in the child: resource limits
        self.process: subprocess.Popen | None = None

    def patch(self, code: str) -> "RelayProcess":
        """Run `code` in the relay before its own (a ``sitecustomize`` module in its home):
        a fault injected where no setting reaches."""
        (self.home / "sitecustomize.py").write_text(code)
        self.env["PYTHONPATH"] = str(self.home)
        return self

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def launch(self) -> "RelayProcess":
        """Start the process and return at once (`start` waits for its first metrics)."""
        self.process = subprocess.Popen(self.command, env=self.env, preexec_fn=self.preexec_fn,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def start(self, timeout: float = 30) -> "RelayProcess":
        return self.launch().wait_started(timeout)

    def wait_started(self, timeout: float = 30) -> "RelayProcess":
        """Wait for the launched process's first metrics (failing if it exits)."""
        pid = self.process.pid
        wait_until(lambda: self._alive_or_fail() and (self.metrics() or {}).get("pid") == pid,
                   timeout, what="the relay's first metrics")
        return self

    def _alive_or_fail(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"relay exited with {self.process.returncode}: "
                                 f"{self.process.stderr.read().decode(errors='replace')}"
                                 f"{self.log()}")
        return True

    def metrics(self) -> Alist | None:
        try:
            return metrics.read(self.metrics_file)
        except FileNotFoundError:
            return None

    def wait_metrics(self, condition: Callable[[Alist], bool], timeout: float = 30,
                     what: str = "metrics") -> Alist:
        """Wait for a snapshot written by this process that satisfies `condition`."""
        pid = self.process.pid

        def current():
            snapshot = self.metrics()
            return snapshot if snapshot and snapshot["pid"] == pid and condition(snapshot) else None
        return wait_until(current, timeout, interval=0.05, what=what)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process.stderr.close()
        return code

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
            self.process.stderr.close()

    def status(self) -> subprocess.CompletedProcess:
        """``python -m notifier status`` with this relay's settings."""
        return subprocess.run([sys.executable, "-m", "notifier", "status"], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def log(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def rss_kib(self, key: str = "VmRSS") -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith(key + ":")))

    def peak_rss_kib(self) -> int:
        """The highest RSS the process has had (VmHWM)."""
        return self.rss_kib("VmHWM")


class Pusher:
    """A plain PUSH socket for tests that need to push exactly what they choose."""

    def __init__(self, endpoint: str, hwm: int = 1000):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.connect(endpoint)

    def send(self, data: bytes) -> None:
        """Blocking send: tests want every envelope to reach the relay."""
        self.socket.send(data)

    def close(self) -> None:
        """Discard anything unsent: tests wait on the relay's metrics, not on linger."""
        self.context.destroy(linger=0)

    def __enter__(self) -> "Pusher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
