#!/usr/bin/env python3
"""Fault-injection soak: the relay as a real process, killed, stopped and restarted at
random while the Discord stand-in misbehaves at random; then the stand-in's ground truth
is compared with the relay's counters. Everything runs on 127.0.0.1.

A producer pushes tagged messages (``soak-<n>``; about 2% go to a webhook the relay does
not allow, so they must be rejected) to three webhooks. A weather thread switches the
stand-in between ok, HTTP 500, hang (at most 3 s, under the relay's 15 s read timeout,
so a hang never turns into a timeout's duplicate), global and per-channel 429s, and
down (stopped, then started again on the same port). The main thread sends bursts,
pauses, and ends relay runs with SIGKILL or SIGTERM; with ``--sighup`` it also moves
the log aside and sends SIGHUP, which must not stop the relay and must make it write a
new log.

Each relay run gets its own PUSH socket, so every tag belongs to exactly one run, which
takes a prefix of its tags in order. Before a SIGTERM or a SIGKILL the producer waits
until the run's metrics show it took every tag; half the SIGKILLs then come 0-50 ms
after one more burst, which may still be in transit or half journaled. A run's last snapshot
(`received` minus `restored`) is then a lower bound on what it took: only the tags past
that count, of runs ended by a crash, may be lost for "not taken". At the end the
stand-in is healthy, the relay restarted (which also ends any retry backoff), drained,
and stopped with SIGTERM. Checks:

- every tag a run took was delivered or counted as failed or dropped, and every refused
  one it took counted as rejected (per run the higher of the log's count and the last
  snapshot's, so an outcome after a SIGKILLed run's last snapshot still counts if it
  was logged; the reasons from the log). In durable mode none may be missing beyond
  those counts; without it, the messages held at a SIGKILL are lost as documented, and
  reported as such, up to the `pending` of the run's last snapshot;
- no refused tag reached the stand-in;
- duplicates are at most the sum of `restored_in_flight` over runs;
- every snapshot balances, a SIGTERM exits 0, and the next run restores exactly what
  the stopped one held.

A run is reproducible in its decisions (``--seed``), not in its timing.

Usage: .venv/bin/python scripts/soak.py [--seconds 600] [--messages N] [--cycles N]
       [--seed 1] [--no-durable] [--sighup] [--home DIR]
Exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from notifier import metrics
from notifier.client import build_envelope
from notifier.demo import free_port
from notifier.standin import DiscordStandIn

WEBHOOKS = ("1", "2", "3")
REFUSED_SHARE = 0.02  # tags sent to a webhook the relay does not allow
WEATHER = {"ok": 4, "status": 1, "hang": 1, "global_429": 1, "channel_429": 1, "down": 1}
MODE_PARAMS = {"status": {"status": 500}, "global_429": {"retry_after": 1.0},
               "channel_429": {"retry_after": 2.0}}
ACTIONS = {"send": 5, "pause": 3, "SIGKILL": 1, "SIGTERM": 0.7, "SIGHUP": 0.5}
START_SEC = 60  # a relay's first snapshot, a SIGTERM's exit, the producer's settling
DRAIN_SEC = 120  # the end: everything held delivered
TAG = re.compile(r"\bsoak-(\d+)\b")
BALANCE = ("delivered", "drops", "rejected", "deduplicated", "failed", "lost", "pending")
FAILED_LINE = re.compile(r" failed webhook=\S+ messages=(\d+) reason=(.*)$", re.M)
REJECTED_LINE = re.compile(r" rejected (?:\w+=\S+ )*reason=(.*?) preview=.*?"
                           r"(?: \((\d+) rejection lines left out\))?$", re.M)
DROPPED_LINE = re.compile(r" dropped (\d+) oldest messages", re.M)


class SoakError(Exception):
    """The soak cannot go on (a relay that does not start)."""


def wait(condition, timeout: float, interval: float = 0.02):
    """Poll `condition` until it returns something truthy; None after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)
    return value


@dataclass
class Run:
    """One relay process and the PUSH socket its tags went to (opened before it starts,
    so tags sent while the relay is down belong to it too)."""

    number: int
    socket: zmq.Socket
    sent: list[int] = field(default_factory=list)
    process: subprocess.Popen | None = None
    end: str = ""  # SIGKILL, SIGTERM, SIGHUP (it stopped the relay), exit (by itself)
    last: dict | None = None  # its last snapshot
    log: str = ""  # all of it, the pieces a SIGHUP rotated too
    rotated: int = 0

    @property
    def taken(self) -> int:
        """Tags this run took at least: its last snapshot's new envelopes."""
        return self.last["received"] - self.last["restored"] if self.last else 0


@dataclass
class Result:
    """What a soak reports; `failures` is empty when every check passed."""

    cycles: int = 0
    messages: int = 0
    refused_sent: int = 0
    kills: Counter = field(default_factory=Counter)
    kills_in_transit: int = 0  # SIGKILLs right after a burst, without settling
    hups_survived: int = 0  # the relay went on and wrote a new log
    delivered: int = 0
    duplicates: int = 0
    in_flight: int = 0  # sum of restored_in_flight: the bound on duplicates
    not_taken: int = 0  # tags past a crashed run's count, missing: allowed losses
    lost: int = 0  # taken, not delivered, not counted as failed, dropped or rejected
    failed: int = 0
    drops: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    weather: Counter = field(default_factory=Counter)
    corrupt_records: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


class Weather(threading.Thread):
    """Switches the stand-in between behaviours at random until stopped."""

    def __init__(self, standin: DiscordStandIn, rng: random.Random, counts: Counter):
        super().__init__(name="weather", daemon=True)
        self.standin, self.rng, self.counts = standin, rng, counts
        self.stopping = threading.Event()
        self.down = False

    def run(self) -> None:
        while not self.stopping.is_set():
            mode = self.rng.choices(list(WEATHER), list(WEATHER.values()))[0]
            target = self.rng.choice(WEBHOOKS) if self.rng.random() < 0.3 else None
            self.counts[mode] += 1
            self.calm()
            if mode == "down":
                self.down = True
                self.standin.stop()
            else:
                self.standin.set_mode(target, mode, **MODE_PARAMS.get(mode, {}))
            self.stopping.wait(self.rng.uniform(0.2, 3.0))

    def calm(self) -> None:
        """Back to normal: up, every webhook ok, hung requests answered."""
        if self.down:
            self.standin.start()
            self.down = False
        self.standin.set_mode(None, "ok")
        self.standin.release_hangs()

    def finish(self) -> None:
        self.stopping.set()
        self.join()
        self.calm()


class Soak:
    """The stand-in, the producer's sockets and the relay runs of a soak, and its check."""

    def __init__(self, home: Path, durable: bool, seed: int, out):
        self.home, self.durable, self.out = home, durable, out
        home.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.result = Result()
        self.standin = DiscordStandIn(rate_limit=(5, 2.0)).start()
        self.refused_webhook = "http://127.0.0.1:1/api/webhooks/9/tok"  # port not allowed
        self.port = free_port()
        self.context = zmq.Context()
        self.runs: list[Run] = []
        self.refused: set[int] = set()
        self.next_tag = 0

    # ------------------------------------------------------------------ producer

    def new_run(self) -> Run:
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)  # no limit: a send never drops or blocks
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{self.port}")
        self.runs.append(Run(len(self.runs) + 1, sock))
        return self.runs[-1]

    def send_burst(self, run: Run) -> None:
        for _ in range(self.rng.randint(1, 30)):
            tag = self.next_tag
            self.next_tag += 1
            if self.rng.random() < REFUSED_SHARE:
                webhook = self.refused_webhook
                self.refused.add(tag)
            else:
                webhook = self.standin.webhook_url(self.rng.choice(WEBHOOKS))
            envelope = build_envelope(webhook, {"content": f"soak-{tag}"})
            run.socket.send(envelope, zmq.NOBLOCK)
            run.sent.append(tag)

    # ------------------------------------------------------------------ relay

    def snapshot(self, run: Run) -> dict | None:
        try:
            snapshot = metrics.read(self.home / "data" / "notifier_metrics.sexp")
        except (OSError, ValueError):
            return None
        return snapshot if snapshot["pid"] == run.process.pid else None

    def start(self, run: Run) -> None:
        """Start the relay; SoakError if it does not come up (nothing after could run)."""
        env = {**os.environ, "SWIMMY_HOME": str(self.home),
               "SWIMMY_PORT_NOTIFIER": str(self.port),
               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": f"127.0.0.1:{self.standin.port}",
               "SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC": "0.1",
               "SWIMMY_NOTIFIER_DRAIN_SEC": "1",
               "SWIMMY_NOTIFIER_QUEUE_MAX": "5000",
               "SWIMMY_NOTIFIER_DURABLE": "1" if self.durable else "0",
               "SWIMMY_NOTIFIER_LOG_FILE": str(self.home / f"relay-{run.number}.log")}
        with open(self.home / f"relay-{run.number}.log", "ab") as log:  # a traceback too
            run.process = subprocess.Popen([sys.executable, "-m", "notifier"], env=env,
                                           stdout=subprocess.DEVNULL, stderr=log)
        self.result.cycles += 1
        wait(lambda: run.process.poll() is not None or self.snapshot(run), START_SEC)
        if self.snapshot(run) is None:
            self.end(run, "exit")
            raise SoakError(f"run {run.number}: no metrics within {START_SEC} s")

    def settle(self, run: Run) -> None:
        """Wait until the run's metrics show it took every tag sent to it."""
        def took_all():
            snapshot = self.snapshot(run)
            return snapshot and snapshot["received"] - snapshot["restored"] == len(run.sent)
        if not wait(took_all, START_SEC):
            self.fail(f"run {run.number}: took fewer than its {len(run.sent)} tags "
                      f"within {START_SEC} s")

    def end(self, run: Run, how: str) -> None:
        """Signal the run (or note that it exited), then read its last snapshot and log."""
        if how in ("SIGKILL", "SIGTERM"):  # a SIGHUP that stopped it was sent already
            run.process.send_signal(getattr(signal, how))
        try:
            code = run.process.wait(START_SEC)
        except subprocess.TimeoutExpired:
            self.fail(f"run {run.number}: still running {START_SEC} s after {how}")
            run.process.kill()
            code = run.process.wait()
        run.end = how
        self.result.kills[how] += 1
        run.socket.close()
        run.last = self.snapshot(run)
        run.log = "".join(path.read_text(encoding="utf-8", errors="replace")
                          for path in self.home.glob(f"relay-{run.number}.log*"))
        if how == "SIGTERM" and code != 0:
            self.fail(f"run {run.number}: SIGTERM exited {code}: {run.log[-500:]}")
        if how == "exit":
            self.fail(f"run {run.number}: the relay exited by itself ({code}): "
                      f"{run.log[-500:]}")
        if run.last is None:
            self.fail(f"run {run.number}: no snapshot of its own")
            return
        parts = {key: run.last[key] for key in BALANCE}
        if run.last["received"] != sum(parts.values()):
            self.fail(f"run {run.number}: received {run.last['received']} != {parts}")
        if run.taken > len(run.sent):
            self.fail(f"run {run.number}: received {run.taken} new envelopes, "
                      f"{len(run.sent)} were sent")
        if how == "SIGTERM" and run.taken != len(run.sent):
            self.fail(f"run {run.number}: final received {run.taken}, sent {len(run.sent)}")

    def hup(self, run: Run) -> bool:
        """SIGHUP must reopen the log and not stop the relay. The log is moved aside
        first, as logrotate does, and the relay must write a new one; False if it
        stopped."""
        log = self.home / f"relay-{run.number}.log"
        log.rename(log.with_name(f"{log.name}.{run.rotated}"))
        run.rotated += 1
        run.process.send_signal(signal.SIGHUP)
        answer = wait(lambda: run.process.poll() is not None and "exited"
                      or log.exists() and "reopened", START_SEC)
        if answer == "exited":
            code = run.process.poll()
            self.fail(f"run {run.number}: SIGHUP stopped the relay ("
                      + (f"killed by signal {-code})" if code < 0 else f"exit {code})"))
            return False
        if answer is None:
            self.fail(f"run {run.number}: no new log {START_SEC} s after SIGHUP")
        else:
            self.result.hups_survived += 1
        return True

    def fail(self, text: str) -> None:
        self.result.failures.append(text)
        self.out(f"FAIL {text}")

    # ------------------------------------------------------------------ the soak

    def chaos(self, seconds: float, messages: int, cycles: int | None, sighup: bool) -> Run:
        """Random actions until a budget is spent; returns the current run."""
        actions = {name: w for name, w in ACTIONS.items() if sighup or name != "SIGHUP"}
        deadline = time.monotonic() + seconds
        run = self.new_run()
        while (time.monotonic() < deadline and self.next_tag < messages
               and (cycles is None or sum(self.result.kills.values()) < cycles)):
            if run.process is None:
                if self.rng.random() < 0.3:
                    self.send_burst(run)  # while the relay is down
                else:
                    self.start(run)
                continue
            action = self.rng.choices(list(actions), list(actions.values()))[0]
            if run.process.poll() is not None:
                action = "exit"
            if action == "send":
                self.send_burst(run)
            elif action == "pause":
                time.sleep(self.rng.uniform(0, 0.5))
            elif action == "SIGHUP" and self.hup(run):
                pass
            else:
                if action in ("SIGKILL", "SIGTERM"):
                    self.settle(run)
                if action == "SIGKILL" and self.rng.random() < 0.5:
                    self.send_burst(run)  # killed while taking it in, or before
                    self.result.kills_in_transit += 1
                    time.sleep(self.rng.uniform(0, 0.05))
                self.end(run, action)
                run = self.new_run()
        return run

    def drain(self, run: Run) -> None:
        """With the stand-in healthy: a restart (it ends every retry backoff), every
        message held delivered, then SIGTERM."""
        if run.process is not None:
            self.settle(run)
            self.end(run, "SIGTERM")
            run = self.new_run()
        self.start(run)
        self.settle(run)
        if not wait(lambda: (self.snapshot(run) or {}).get("pending") == 0, DRAIN_SEC, 0.1):
            self.fail(f"not drained within {DRAIN_SEC} s: {self.snapshot(run)}")
        self.end(run, "SIGTERM")

    def check(self) -> None:
        result, runs = self.result, self.runs
        arrived = Counter(int(tag) for message in self.standin.messages()
                          for tag in TAG.findall(message.get("content") or ""))
        taken, not_taken = set(), set()
        for run in runs:
            taken.update(run.sent[:run.taken])
            not_taken.update(run.sent[run.taken:])
            result.failed += max(run.last["failed"] if run.last else 0,
                                 sum(int(n) for n, _ in FAILED_LINE.findall(run.log)))
            result.drops += max(run.last["drops"] if run.last else 0,
                                sum(int(n) for n in DROPPED_LINE.findall(run.log)))
            rejected = REJECTED_LINE.findall(run.log)
            result.rejected += max(run.last["rejected"] if run.last else 0,
                                   sum(1 + int(n or 0) for _, n in rejected))
            result.reasons.update(f"failed: {reason}"
                                  for _, reason in FAILED_LINE.findall(run.log))
            result.reasons.update(f"rejected: {reason}" for reason, _ in rejected)
            if run.last:
                result.in_flight += run.last["restored_in_flight"]
                result.corrupt_records += run.last.get("store_skipped", 0)
                if run.last.get("store_state", "ok") != "ok":
                    self.fail(f"run {run.number}: store_state {run.last['store_state']}")
        for before, after in zip(runs, runs[1:]):
            if before.end == "SIGTERM" and before.last and after.last and \
                    after.last["restored"] != before.last["pending"]:
                self.fail(f"run {after.number} restored {after.last['restored']}, run "
                          f"{before.number} held {before.last['pending']} at its SIGTERM")
        result.messages, result.refused_sent = self.next_tag, len(self.refused)
        result.delivered = sum(1 for tag in arrived if tag not in self.refused)
        result.duplicates = sum(count - 1 for count in arrived.values())
        result.not_taken = len(not_taken - self.refused - set(arrived))
        missing = len(taken - self.refused - set(arrived))
        result.lost = (max(0, missing - result.failed - result.drops)
                       + max(0, len(taken & self.refused) - result.rejected))
        posted = self.refused & set(arrived)
        if posted:
            self.fail(f"{len(posted)} refused tags reached the stand-in, "
                      f"e.g. soak-{min(posted)}")
        if result.duplicates > result.in_flight:
            self.fail(f"{result.duplicates} duplicates, only {result.in_flight} were in "
                      f"flight at the kills")
        if self.durable and result.lost:
            self.fail(f"{result.lost} tags the relay took were lost")
        if not self.durable:
            held = sum(run.last["pending"] for run in runs
                       if run.last and run.end != "SIGTERM")
            if result.lost > held:
                self.fail(f"{result.lost} tags lost, more than the {held} held at the "
                          f"kills")

    def close(self) -> None:
        for run in self.runs:
            if run.process and run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        self.context.destroy(linger=0)
        self.standin.stop()


def run(seconds: float = 60, messages: int = 1_000_000, cycles: int | None = None,
        seed: int = 1, durable: bool = True, sighup: bool = False,
        home: Path | None = None, out=print) -> Result:
    """Run the soak and report on `out`; the Result's `failures` is empty if it passed."""
    home = home or Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(home, durable, seed, out)
    weather = Weather(soak.standin, random.Random(seed + 1), soak.result.weather)
    started = time.monotonic()
    try:
        weather.start()
        try:
            last = soak.chaos(seconds, messages, cycles, sighup)
        finally:
            weather.finish()
        soak.drain(last)
        soak.check()
    except SoakError as exc:
        soak.fail(f"{exc}; soak abandoned")
    finally:
        soak.close()
    result = soak.result
    result.seconds = time.monotonic() - started
    report(result, durable=durable, sighup=sighup, seed=seed, out=out)
    return result


def report(r: Result, *, durable: bool, sighup: bool, seed: int, out) -> None:
    ends = ("SIGKILL", "SIGTERM", "SIGHUP", "exit")
    kills = ", ".join(f"{how} {r.kills[how]}" for how in ends if r.kills[how])
    out(f"soak: durable {'on' if durable else 'off'}, SIGHUP {'on' if sighup else 'off'}, "
        f"seed {seed}, {r.seconds:.0f} s")
    out(f"cycles {r.cycles}; messages {r.messages} ({r.refused_sent} to a refused "
        f"webhook); "
        f"runs ended by {kills} ({r.kills_in_transit} SIGKILLs right after a burst); "
        f"SIGHUPs survived (log reopened) {r.hups_survived}")
    out(f"delivered {r.delivered}; failed {r.failed}, dropped {r.drops}, "
        f"rejected {r.rejected}")
    out(f"not taken when a run was killed (allowed): {r.not_taken}; "
        f"lost {r.lost}"
        + ("" if durable else " (held at a SIGKILL: expected without durable mode)"))
    out(f"duplicates {r.duplicates} (in flight at the kills: {r.in_flight}); "
        f"journal corrupt records {r.corrupt_records}")
    out("stand-in: " + ", ".join(f"{mode} {n}" for mode, n in sorted(r.weather.items())))
    for reason, n in r.reasons.most_common():
        out(f"  {n} x {reason}")
    out("checks: " + ("OK" if not r.failures else f"{len(r.failures)} FAILED"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="chaos time budget")
    parser.add_argument("--messages", type=int, default=1_000_000,
                        help="at most this many tags")
    parser.add_argument("--cycles", type=int, help="end the chaos after this many runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-durable", dest="durable", action="store_false",
                        help="durable mode off: SIGKILL losses are expected and reported")
    parser.add_argument("--sighup", action="store_true",
                        help="also send SIGHUP, which must not stop the relay")
    parser.add_argument("--home", type=Path,
                        help="the relay's home (default: a new temp dir)")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.messages, args.cycles, args.seed, args.durable,
                 args.sighup, args.home)
    return 1 if result.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
