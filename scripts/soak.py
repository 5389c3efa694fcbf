#!/usr/bin/env python3
"""Fault-injection soak: the relay as a real process, killed, stopped and restarted at
random while the Discord stand-in misbehaves at random; then the stand-in's ground truth
is compared with the relay's counters. Everything runs on 127.0.0.1.

A producer pushes tagged messages (``soak-<n>``; about 2% go to a webhook the relay does
not allow, so they must be rejected) to three webhooks, each named by any of its URLs
(for a few bursts, then another): as written, with an API version, or one of its threads
(``?thread_id=``). A weather thread switches the stand-in between ok, HTTP 500, hang
(at most 3 s, under the relay's deadline, so a hang never turns into a timeout's
duplicate), global and per-channel 429s, and down (stopped, then started again on the
same port). The main thread sends bursts, pauses, and ends relay runs with SIGKILL or
SIGTERM; with ``--sighup`` it also moves the log aside and sends SIGHUP, which must not
stop the relay and must make it write a new log.

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
- per webhook, whatever URLs named it: within a run, never two requests in flight at
  once (the stand-in's record, a request given up at the relay's deadline no longer in
  flight), and the tags it saved first appear in the order they were sent (a duplicate
  after a kill aside);
- every snapshot balances, a SIGTERM exits 0, and the next run restores exactly what
  the stopped one held.

With ``--storage`` the store is attacked too (`Storage`): the data directory is a small
tmpfs the soak fills and frees at random (root only: elsewhere it says so and goes on
without); the store file, its -wal or the whole directory is removed, or the store
replaced by a FIFO or by a copy, while the relay runs (the relay must notice and write
what it holds again before the next kill); a second relay is started on the same data
directory (it must exit 2 within seconds, the first untouched); between runs the store
is truncated, overwritten with junk or replaced by a FIFO (its messages are then moved
aside: counted as destroyed, up to what the last run held); and each run gets its own
durable mode and queue_max. Then a SIGKILL while the store had failed may lose what was
held (checked against the last snapshot's `pending`), a SIGTERM may exit 1 when the
store could not take what was held (checked against `lost`), and nothing else is
allowed to go missing: received = delivered + drops + rejected + deduplicated + failed
+ lost + pending, against the stand-in's record.

With ``--process`` the relay's own process is attacked too (`ProcessFaults`): its log
directory is removed (moved aside, so the soak can still read what was written) and
restored at random while it runs, so that its lines go to standard error meanwhile; a
quarter of the starts get a SIGHUP or a SIGTERM 0-100 ms after the process was started
(SIGHUP blocked across the exec, as the unit does); and idle, half-sent and half-closed
connections to its ``/metrics`` listener are held open throughout, more than it serves.
Then every SIGTERM must end the relay within its drain time plus the grace (and a margin
for this machine's load; a SIGTERM before the relay's first snapshot also includes its
start), no thread may die or give up (the log is searched for it, and ``senders_alive``
must equal ``senders`` in every run's snapshots while it runs), a SIGHUP never stops it,
and the ledger must still match the stand-in's ground truth.

A run is reproducible in its decisions (``--seed``), not in its timing.

Usage: .venv/bin/python scripts/soak.py [--seconds 600] [--messages N] [--cycles N]
       [--seed 1] [--no-durable] [--sighup] [--storage] [--process] [--home DIR]
Exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import socket
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too
from scripts import soak_checks  # noqa: E402

WEBHOOKS = ("1", "2", "3")
SPELLINGS = ("plain", "plain", "v10", "v6", "thread", "v10 thread")
THREADS = 3  # threads per webhook the producer posts into, besides its channel
URL_CHANGE_SHARE = 0.25  # bursts after which the producer names a webhook by another URL
REFUSED_SHARE = 0.02  # tags sent to a webhook the relay does not allow
WEATHER = {"ok": 4, "status": 1, "hang": 1, "global_429": 1, "channel_429": 1, "down": 1}
MODE_PARAMS = {"status": {"status": 500}, "global_429": {"retry_after": 1.0},
               "channel_429": {"retry_after": 2.0}}
ACTIONS = {"send": 5, "pause": 3, "SIGKILL": 1, "SIGTERM": 0.7, "SIGHUP": 0.5}
STORAGE_ACTIONS = {"disk": 0.6, "harm": 0.4, "second": 0.2}
DAMAGE_SHARE = 0.15  # starts after which the store is damaged first
DURABLE_SHARE = 0.75  # runs in durable mode, with --storage
QUEUE_MAXES = (5000, 5000, 300, 30)
TMPFS = "size=48m"
START_SEC = 60  # a relay's first snapshot, a SIGTERM's exit, the producer's settling
DRAIN_SEC = 120  # the end: everything held delivered
BALANCE = ("delivered", "drops", "rejected", "deduplicated", "failed", "lost", "pending")

# The relay's own process (issue 16): its log directory, signals from its first moments,
# connections to /metrics that send nothing or half a request.
PROCESS_ACTIONS = {"log directory": 0.6}
EARLY_SHARE = 0.25  # starts that get a SIGHUP or a SIGTERM in their first 100 ms
EARLY_MS = (0, 100)
RELAY_DRAIN_SEC = 1.0  # SWIMMY_NOTIFIER_DRAIN_SEC of every run
GRACE_SEC = 3.0  # notifier.relay.GRACE_SEC
STOP_MARGIN_SEC = 10.0  # this machine's load on top of drain + grace
SCRAPERS = 24  # connections held to /metrics, more than the 16 it serves
THREAD_DIED = re.compile(r".*(?:thread died|cannot go on|failed at every step|"
                         r"Exception in thread).*", re.M)
BUG = re.compile(r".*\n(?=Traceback \(most recent call last\))", re.M)  # the line before

# Discord's answers read for what they mean (issue 19): a 200 whose body is reset, or
# trickled past the relay's deadline (saved once: the run that posted it never posts it
# again), a route 429 whose retry_after is missing, negative or NaN beside valid headers
# (its webhook waits, no run ever counts a ban), and a hidden channel limit that another
# poster fills now and then (its pace learned, probed and forgotten under the chaos).
# Windows are ten times shorter than Discord's, for the stand-in and the relay alike.
ANSWER_WEATHER = {"reset": 1, "trickle": 1, "route_429": 1, "neighbour": 1}
ANSWER_PARAMS = {"trickle": {"interval": 0.5, "framing": "close"}}
BAD_RETRY_AFTERS = (None, -1.0, float("nan"))  # a route 429's body: missing, negative, NaN
ANSWER_HOLD_SEC = (0.2, 8.0)  # a trickle held past 4 s outlasts the relay's deadline
DEADLINE_SEC = 4.0
GIVEN_UP_SLACK_SEC = 0.25  # the relay's deadline starts before the stand-in sees the request
ANSWER_SETTINGS = {"SWIMMY_NOTIFIER_REQUEST_DEADLINE_SEC": f"{DEADLINE_SEC:g}",  # over the longest hang
                   "SWIMMY_NOTIFIER_CHANNEL_PERIOD_SEC": "6"}
CHANNEL = {"channel_limit": (30, 6.0), "channels": {"900": WEBHOOKS}}
NEIGHBOUR_POSTS = 25  # another poster's share of the channel, posted at once


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
    durable: bool = True
    queue_max: int = 5000
    sent: list[int] = field(default_factory=list)
    process: subprocess.Popen | None = None
    started_at: float | None = None  # time.monotonic() when it was started
    end: str = ""  # SIGKILL, SIGTERM, SIGHUP (it stopped the relay), exit (by itself)
    last: dict | None = None  # its last snapshot
    ended_at: float | None = None  # time.monotonic() when it was seen to end
    log: str = ""  # all of it, the pieces a SIGHUP rotated too
    rotated: int = 0
    signalled_at: float | None = None  # time.monotonic() when SIGTERM was sent
    started: bool = False  # it wrote a snapshot of its own

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
    spellings: Counter = field(default_factory=Counter)  # URLs the producer named webhooks by
    most_in_flight: int = 0  # the most requests to one webhook in flight at once, in a run
    not_taken: int = 0  # tags past a crashed run's count, missing: allowed losses
    lost: int = 0  # taken, not delivered, not counted as failed, dropped or rejected
    failed: int = 0
    drops: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    weather: Counter = field(default_factory=Counter)
    corrupt_records: int = 0
    lost_counted: int = 0  # the relay's `lost`: held at a stop the store could not take
    kill_losses: int = 0  # may be lost: held at SIGKILLs without durable mode or a store
    unseen_drops: int = 0  # may be dropped after a SIGKILLed run's last snapshot, uncounted
    storage: Counter = field(default_factory=Counter)  # storage faults injected
    destroyed: int = 0  # held by stores damaged between runs: moved aside, not delivered
    process: Counter = field(default_factory=Counter)  # process faults injected
    slowest_stop: float = 0.0  # the longest a SIGTERM took to end a started relay
    thread_errors: int = 0  # errors the relay's threads caught and carried on from
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
        weathers = {**WEATHER, **ANSWER_WEATHER}
        while not self.stopping.is_set():
            mode = self.rng.choices(list(weathers), list(weathers.values()))[0]
            target = self.rng.choice(WEBHOOKS) if self.rng.random() < 0.3 else None
            self.counts[mode] += 1
            self.calm()
            if mode == "down":
                self.down = True
                self.standin.stop()
            elif mode == "neighbour":
                self.standin.use_channel("900", NEIGHBOUR_POSTS)
            else:
                params = MODE_PARAMS.get(mode) or ANSWER_PARAMS.get(mode, {})
                if mode == "route_429":
                    params = {"retry_after": self.rng.choice(BAD_RETRY_AFTERS)}
                self.standin.set_mode(target, mode, **params)
            hold = ANSWER_HOLD_SEC if mode in ANSWER_WEATHER else (0.2, 3.0)
            self.stopping.wait(self.rng.uniform(*hold))

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


class Storage:
    """The soak's storage faults (see the module docstring), on the data directory."""

    STORE = "notifier_store.sqlite3"
    HARMS = ("store removed", "-wal removed", "directory emptied", "store replaced by a FIFO",
             "store replaced by a copy")  # while the relay runs
    DAMAGES = ("store truncated", "store overwritten with junk",
               "store replaced by a FIFO between runs")

    def __init__(self, home: Path, rng: random.Random, counts: Counter, out):
        self.data, self.rng, self.counts = home / "data", rng, counts
        self.data.mkdir(parents=True, exist_ok=True)
        self.store = self.data / self.STORE
        self.filler = self.data / "filler"
        self.mounted = False
        if os.geteuid() != 0:
            out("storage: a full disk is not injected: mounting a tmpfs needs root")
            return
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", TMPFS, "tmpfs", str(self.data)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            out(f"storage: a full disk is not injected: {done.stderr.strip()}")
        self.mounted = done.returncode == 0

    @property
    def full(self) -> bool:
        return self.filler.exists()

    def settings(self) -> tuple[bool, int]:
        """A run's durable mode and queue_max."""
        return self.rng.random() < DURABLE_SHARE, self.rng.choice(QUEUE_MAXES)

    def toggle_disk(self) -> None:
        """Fill the tmpfs, or free it."""
        if not self.mounted:
            return
        if self.full:
            self.filler.unlink()
            return
        try:
            with open(self.filler, "wb") as handle:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
        except OSError:  # full
            self.counts["disk full"] += self.full

    def harm(self) -> str | None:
        """Remove or replace the store under the running relay; returns what was done
        (None: nothing, the store being away already)."""
        how = self.rng.choice(self.HARMS)
        wal = self.store.with_name(self.STORE + "-wal")
        if not (self.store.is_file() and wal.is_file()):
            return None
        self.counts[how] += 1
        if how == "store removed":
            self.store.unlink(missing_ok=True)
        elif how == "-wal removed":
            wal.unlink()
        elif how == "directory emptied":  # the mount point itself stays
            for path in self.data.iterdir():
                if path != self.filler:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif how == "store replaced by a FIFO":
            self.store.unlink(missing_ok=True)
            os.mkfifo(self.store)
        else:
            copy = self.data / "copy"
            shutil.copyfile(self.store, copy)
            os.replace(copy, self.store)
        return how

    def damage(self) -> bool:
        """Between runs, now and then: truncate the store, write junk over it or replace
        it by a FIFO. True if it was damaged (what it held will be moved aside)."""
        if self.rng.random() >= DAMAGE_SHARE or self.full or not self.store.is_file():
            return False
        how = self.rng.choice(self.DAMAGES)
        self.counts[how] += 1
        if how == "store truncated":
            os.truncate(self.store, os.path.getsize(self.store) // 2)
            self.store.with_name(self.STORE + "-wal").unlink(missing_ok=True)
        elif how == "store overwritten with junk":
            self.store.write_bytes(os.urandom(8192))
            self.store.with_name(self.STORE + "-wal").unlink(missing_ok=True)
        else:
            self.store.unlink()
            os.mkfifo(self.store)
        return True

    def tidy(self) -> None:
        """What an operator does after reading the log: stores moved aside are removed
        (else they fill the small tmpfs)."""
        for path in self.data.glob("*.unreadable-*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.data)], capture_output=True)


def block_sighup() -> None:
    """In the child, before the exec: what the unit's ``env --block-signal=HUP`` does, so
    that a SIGHUP sent while the interpreter itself starts waits for the relay's handler."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def hold_connections(port: int, stopping, counts_out) -> None:
    """In a process of its own (the soak's stand-in shares the soak's GIL: a busy loop
    here would slow its answers), hold `SCRAPERS` connections to the relay's /metrics: a
    third idle, a third that sent half a request line, a third that did the same and then
    half-closed (SHUT_WR). Each one the relay closes (after its read timeout, or at once
    past its cap) is opened again, whichever relay run is listening. Puts what it did on
    `counts_out` when `stopping` is set."""
    counts: Counter = Counter()
    held: list[socket.socket | None] = [None] * SCRAPERS
    while not stopping.wait(0.2):
        for n, sock in enumerate(held):
            if sock is not None and _closed(sock):
                sock.close()
                sock = held[n] = None
                counts["/metrics connections closed by the relay"] += 1
            if sock is None:
                held[n] = _open_scraper(port, n % 3, counts)
    for sock in held:
        if sock is not None:
            sock.close()
    counts_out.put(dict(counts))


def _open_scraper(port: int, kind: int, counts: Counter) -> socket.socket | None:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return None  # no relay listening now
    try:
        if kind:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        if kind == 2:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    counts[("idle", "half-sent", "half-closed")[kind] + " /metrics connections"] += 1
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Scrapers:
    """`hold_connections` in a child process, from `start` to `finish`."""

    def __init__(self, port: int, counts: Counter):
        context = multiprocessing.get_context("spawn")
        self.counts = counts
        self._stopping, self._out = context.Event(), context.Queue()
        self._process = context.Process(target=hold_connections, name="scrapers",
                                        args=(port, self._stopping, self._out), daemon=True)

    def start(self) -> None:
        self._process.start()

    def finish(self) -> None:
        self._stopping.set()
        try:
            self.counts.update(self._out.get(timeout=START_SEC))
        except queue.Empty:
            pass
        self._process.join(START_SEC)
        if self._process.is_alive():
            self._process.kill()


class ProcessFaults:
    """The soak's faults of the relay's own process (see the module docstring)."""

    def __init__(self, home: Path, rng: random.Random, counts: Counter):
        self.logs, self.rng, self.counts = home / "logs", rng, counts
        self.logs.mkdir(parents=True, exist_ok=True)
        self.removed = 0
        self.metrics_port = free_port()
        self.scrapers = Scrapers(self.metrics_port, counts)
        self.scrapers.start()

    def toggle_log_directory(self) -> None:
        """Remove the log directory (moved aside: the soak reads it at the end, the relay
        finds its path gone), or restore it."""
        if self.logs.exists():
            self.removed += 1
            self.logs.rename(self.logs.with_name(f"logs-removed-{self.removed}"))
            self.counts["log directory removed"] += 1
        else:
            self.logs.mkdir()
            self.counts["log directory restored"] += 1

    def early(self) -> tuple[str, float] | None:
        """For a start: a signal to send in its first 100 ms, and when, or None."""
        if self.rng.random() >= EARLY_SHARE:
            return None
        return self.rng.choice(("SIGHUP", "SIGTERM")), self.rng.uniform(*EARLY_MS) / 1000

    def close(self) -> None:
        self.scrapers.finish()


class Relays:
    """The relay as a real process, run after run: its settings, its start, the signals
    that end it, and what each run wrote (snapshots, log, standard error). Each run is
    judged as it ends (exit code, time to stop, threads, balance), while its process is
    still at hand."""

    def __init__(self, home: Path, port: int, standin_port: int, result: Result, fail,
                 storage: Storage | None = None, faults: ProcessFaults | None = None):
        self.home, self.port, self.standin_port = home, port, standin_port
        self.result, self.fail = result, fail
        self.storage, self.faults = storage, faults
        self.thread_deaths: set[int] = set()  # runs seen with fewer senders than asked

    def snapshot(self, run: Run) -> dict | None:
        try:
            snapshot = metrics.read(self.home / "metrics.sexp")
        except (OSError, ValueError):
            return None
        if snapshot["pid"] != run.process.pid:
            return None
        run.started = True
        if (snapshot["state"] == "running" and run.number not in self.thread_deaths
                and snapshot.get("senders_alive") != snapshot.get("senders")):
            self.thread_deaths.add(run.number)
            self.fail(f"run {run.number}: {snapshot.get('senders_alive')} of "
                      f"{snapshot.get('senders')} sender threads alive while it runs")
        return snapshot

    def env(self, run: Run, port: int, log: Path) -> dict:
        """The relay's settings; the metrics file is off the data directory, so it is
        written whatever the store goes through."""
        return {**os.environ, "SWIMMY_HOME": str(self.home), "SWIMMY_PORT_NOTIFIER": str(port),
                "SWIMMY_NOTIFIER_ALLOWED_HOSTS": f"127.0.0.1:{self.standin_port}",
                "SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC": "0.1",
                "SWIMMY_NOTIFIER_METRICS_FILE": str(self.home / "metrics.sexp"),
                "SWIMMY_NOTIFIER_DRAIN_SEC": f"{RELAY_DRAIN_SEC:g}",
                "SWIMMY_NOTIFIER_QUEUE_MAX": str(run.queue_max),
                "SWIMMY_NOTIFIER_DURABLE": "1" if run.durable else "0",
                "SWIMMY_NOTIFIER_LOG_FILE": str(log), **ANSWER_SETTINGS,
                **({"SWIMMY_NOTIFIER_METRICS_LISTEN": f"127.0.0.1:{self.faults.metrics_port}"}
                   if self.faults else {})}

    def log_path(self, run: Run) -> Path:
        return (self.faults.logs if self.faults else self.home) / f"relay-{run.number}.log"

    def read_log(self, run: Run) -> str:
        """All the run wrote: its log, the pieces SIGHUP rotated, those in log directories
        the soak removed, and its standard error (a traceback, lines while the log file
        could not be written)."""
        pieces = sorted(self.home.rglob(f"relay-{run.number}.log*"))
        pieces += [self.home / f"relay-{run.number}.stderr"]
        text = ""
        for path in pieces:
            try:
                text += path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                pass
        return text

    def start(self, run: Run, early: bool = True) -> bool:
        """Start the relay (a signal perhaps sent in its first 100 ms); False if an early
        SIGTERM ended it (a new run follows), SoakError if it does not come up (nothing
        after could run)."""
        log_path = self.log_path(run)
        signalled = self.faults.early() if self.faults and early else None
        stderr = self.home / f"relay-{run.number}.stderr" if self.faults else log_path
        with open(stderr, "ab") as log:  # a traceback too
            run.process = subprocess.Popen([sys.executable, "-m", "notifier"],
                                           env=self.env(run, self.port, log_path),
                                           stdout=subprocess.DEVNULL, stderr=log,
                                           preexec_fn=block_sighup if self.faults else None)
        self.result.cycles += 1
        run.started_at = time.monotonic()
        if signalled is not None:
            how, delay = signalled
            time.sleep(delay)  # the moment chosen, not a wait for something
            self.result.process[f"{how} {'0-10' if delay < 0.01 else '10-100'} ms after "
                                f"start"] += 1
            if how == "SIGTERM":
                self.end(run, "early SIGTERM")
                return False
            run.process.send_signal(signal.SIGHUP)
        wait(lambda: run.process.poll() is not None or self.snapshot(run), START_SEC)
        if self.storage:
            self.storage.tidy()
        if self.snapshot(run) is None:
            self.end(run, "exit")
            raise SoakError(f"run {run.number}: no metrics within {START_SEC} s")
        return True

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
        if how in ("SIGKILL", "SIGTERM", "early SIGTERM"):  # a SIGHUP: sent already
            run.process.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
            run.signalled_at = time.monotonic()
        try:
            code = run.process.wait(START_SEC)
        except subprocess.TimeoutExpired:
            self.fail(f"run {run.number}: still running {START_SEC} s after {how}")
            run.process.kill()
            code = run.process.wait()
        run.end, run.ended_at = how, time.monotonic()
        self.result.kills[how] += 1
        run.socket.close()
        run.last = self.snapshot(run)
        run.log = self.read_log(run)
        lost = run.last["lost"] if run.last else 0
        if how == "early SIGTERM" and code == -signal.SIGTERM and not run.started:
            self.result.process["SIGTERM before the handler (exit by the signal)"] += 1
            return  # the interpreter's own start: nothing was opened, nothing taken
        if how in ("SIGTERM", "early SIGTERM") and (code, bool(lost)) not in ((0, False),
                                                                             (1, True)):
            self.fail(f"run {run.number}: {how} exited {code}, {lost} lost: "
                      f"{run.log[-500:]}")
        if how == "SIGTERM":
            took = run.ended_at - run.signalled_at
            self.result.slowest_stop = max(self.result.slowest_stop, took)
            if took > RELAY_DRAIN_SEC + GRACE_SEC + STOP_MARGIN_SEC:
                self.fail(f"run {run.number}: SIGTERM took {took:.1f} s to end it, over "
                          f"drain {RELAY_DRAIN_SEC:g} s + grace {GRACE_SEC:g} s + "
                          f"{STOP_MARGIN_SEC:g} s")
        died = THREAD_DIED.search(run.log)
        if died:
            self.fail(f"run {run.number}: a thread died: {died.group()[:300]}")
        bug = BUG.search(run.log)
        if bug:
            self.fail(f"run {run.number}: an unexpected error (a traceback): "
                      f"{bug.group().strip()[:300]}")
        if run.last:
            self.result.thread_errors += run.last.get("thread_errors", 0)
        self.result.lost_counted += lost
        if how == "SIGKILL" and run.last and (not run.durable
                                              or run.last["store_state"] != "ok"):
            self.result.kill_losses += run.last["pending"]
        if how == "SIGKILL" and run.last:  # tags that arrived after its last snapshot
            # each dropped at most one older one once the queue was full, the drop counted
            # in no snapshot and not yet logged (drops are said once a second)
            late = len(run.sent) - run.taken
            self.result.unseen_drops += max(0, min(late, run.last["pending"] + late
                                                   - run.queue_max))
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
        if how == "SIGTERM" and run.taken != len(run.sent):  # an early one may not have
            self.fail(f"run {run.number}: final received {run.taken}, sent {len(run.sent)}")

    def hup(self, run: Run) -> bool:
        """SIGHUP must reopen the log and not stop the relay. The log is moved aside
        first, as logrotate does, and the relay must write a new one; False if it
        stopped."""
        log = self.log_path(run)
        handled = self.read_log(run).count("SIGHUP: ")
        if log.exists():  # else its directory was removed: the relay logs to stderr
            log.rename(log.with_name(f"{log.name}.{run.rotated}"))
            run.rotated += 1
        run.process.send_signal(signal.SIGHUP)
        answer = wait(lambda: run.process.poll() is not None and "exited"
                      or self.read_log(run).count("SIGHUP: ") > handled and "reopened",
                      START_SEC)
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


class Soak:
    """A soak's chaos: the stand-in, the producer's sockets, the relay's runs (`Relays`)
    and the faults injected between them; its checks are `soak_checks`."""

    def __init__(self, home: Path, durable: bool, seed: int, out, storage: bool = False,
                 process: bool = False):
        self.home, self.durable, self.out = home, durable, out
        home.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.result = Result()
        self.storage = (Storage(home, random.Random(seed + 2), self.result.storage, out)
                        if storage else None)
        self.faults = (ProcessFaults(home, random.Random(seed + 3), self.result.process)
                       if process else None)
        self.damaged: set[int] = set()  # runs whose store was damaged after they ended
        self.standin = DiscordStandIn(rate_limit=(5, 2.0), **CHANNEL).start()
        self.refused_webhook = "http://127.0.0.1:1/api/webhooks/9/tok"  # port not allowed
        self.port = free_port()
        self.relays = Relays(home, self.port, self.standin.port, self.result, self.fail,
                             self.storage, self.faults)
        self.context = zmq.Context()
        self.runs: list[Run] = []
        self.refused: set[int] = set()
        self.sent_to: dict[int, str] = {}  # tag -> the URL it was sent to
        self.urls: dict[str, str] = {}  # webhook -> the URL the producer names it by now
        self.url_rng = random.Random(seed + 3)  # apart: the other decisions stay as they were
        self.next_tag = 0

    # ------------------------------------------------------------------ producer

    def new_run(self) -> Run:
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)  # no limit: a send never drops or blocks
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{self.port}")
        durable, queue_max = self.storage.settings() if self.storage else (self.durable, 5000)
        self.runs.append(Run(len(self.runs) + 1, sock, durable, queue_max))
        return self.runs[-1]

    def send_burst(self, run: Run) -> None:
        """1-30 tags; each webhook is named by one of its URLs for a few bursts (as a
        producer names it for a purpose), then by another. (Messages are combined only
        with those asking for the same URL: a URL changed at every burst would leave
        little to combine, and the channel's hidden limit would outlast the drain.)"""
        for hook in WEBHOOKS:
            if hook not in self.urls or self.url_rng.random() < URL_CHANGE_SHARE:
                self.urls[hook] = self.url(hook)
        urls = self.urls
        for _ in range(self.rng.randint(1, 30)):
            tag = self.next_tag
            self.next_tag += 1
            if self.rng.random() < REFUSED_SHARE:
                webhook = self.refused_webhook
                self.refused.add(tag)
            else:
                webhook = urls[self.rng.choice(WEBHOOKS)]
                self.sent_to[tag] = webhook
            envelope = build_envelope(webhook, {"content": f"soak-{tag}"})
            run.socket.send(envelope, zmq.NOBLOCK)
            run.sent.append(tag)

    def url(self, hook: str) -> str:
        """One of the URLs of webhook `hook`, at random: one webhook whatever it says."""
        how = self.url_rng.choice(SPELLINGS)
        self.result.spellings[how] += 1
        thread = 500 + self.url_rng.randrange(THREADS) if "thread" in how else None
        version = int(how.split()[0][1:]) if how.startswith("v") else None
        return self.standin.webhook_url(hook, thread=thread, version=version)

    # ------------------------------------------------------------------ relay

    def start(self, run: Run, early: bool = True) -> bool:
        """Start the relay, the store perhaps damaged first (see `Relays.start`)."""
        if self.storage and len(self.runs) > 1 and self.storage.damage():
            before = self.runs[-2]
            self.damaged.add(before.number)
            if before.last:
                self.result.destroyed += before.last["pending"]
        return self.relays.start(run, early)

    def fail(self, text: str) -> None:
        self.result.failures.append(text)
        self.out(f"FAIL {text}")

    # ------------------------------------------------------------------ storage faults

    def disk(self) -> None:
        self.storage.toggle_disk()

    def harm(self, run: Run) -> None:
        """Remove or replace the store under the running relay: it must write what it
        holds again (before the next kill, which would otherwise lose it)."""
        if self.storage.full:
            return
        before = self.backs(run)
        how = self.storage.harm()
        if how is not None and not wait(
                lambda: self.backs(run) > before or run.process.poll() is not None, START_SEC):
            self.fail(f"run {run.number}: {how}, and the store not written again within "
                      f"{START_SEC} s")

    def backs(self, run: Run) -> int:
        return self.relays.read_log(run).count("store writable again")

    def second_relay(self, run: Run) -> None:
        """A second relay on the same data directory exits 2 within seconds and leaves
        the first (and its metrics) untouched."""
        self.result.storage["second relay"] += 1
        log = self.home / f"relay-{run.number}-second.log"
        second = subprocess.Popen([sys.executable, "-m", "notifier"],
                                  env=self.relays.env(run, free_port(), log),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            code = second.wait(START_SEC)
        except subprocess.TimeoutExpired:
            second.kill()
            code = second.wait()
        if code != 2 or "is in use by relay pid" not in log.read_text(errors="replace"):
            self.fail(f"run {run.number}: a second relay on its store exited {code}")
        if run.process.poll() is None and not wait(lambda: self.relays.snapshot(run), START_SEC):
            self.fail(f"run {run.number}: its metrics are no longer its own after a second "
                      f"relay started")

    # ------------------------------------------------------------------ the soak

    def chaos(self, seconds: float, messages: int, cycles: int | None, sighup: bool) -> Run:
        """Random actions until a budget is spent; returns the current run."""
        actions = {name: w for name, w in ACTIONS.items() if sighup or name != "SIGHUP"}
        if self.storage:
            actions.update(STORAGE_ACTIONS)
        if self.faults:
            actions.update(PROCESS_ACTIONS)
        deadline = time.monotonic() + seconds
        run = self.new_run()
        while (time.monotonic() < deadline and self.next_tag < messages
               and (cycles is None or sum(self.result.kills.values()) < cycles)):
            if run.process is None:
                if self.rng.random() < 0.3:
                    self.send_burst(run)  # while the relay is down
                elif not self.start(run):
                    run = self.new_run()  # an early SIGTERM ended it
                continue
            action = self.rng.choices(list(actions), list(actions.values()))[0]
            if run.process.poll() is not None:
                action = "exit"
            if action == "send":
                self.send_burst(run)
            elif action == "pause":
                time.sleep(self.rng.uniform(0, 0.5))
            elif action == "SIGHUP" and self.relays.hup(run):
                pass
            elif action == "disk":
                self.disk()
            elif action == "harm":
                self.harm(run)
            elif action == "second":
                self.second_relay(run)
            elif action == "log directory":
                self.faults.toggle_log_directory()
            else:
                if action in ("SIGKILL", "SIGTERM"):
                    self.relays.settle(run)
                if action == "SIGKILL" and self.rng.random() < 0.5:
                    self.send_burst(run)  # killed while taking it in, or before
                    self.result.kills_in_transit += 1
                    time.sleep(self.rng.uniform(0, 0.05))
                self.relays.end(run, action)
                run = self.new_run()
        return run

    def drain(self, run: Run) -> None:
        """With the stand-in healthy: a restart (it ends every retry backoff), every
        message held delivered, then SIGTERM."""
        if self.storage and self.storage.full:
            self.storage.toggle_disk()
        if run.process is not None:
            self.relays.settle(run)
            self.relays.end(run, "SIGTERM")
            run = self.new_run()
        run.durable, run.queue_max = True, 5000
        self.start(run, early=False)
        self.relays.settle(run)
        if not wait(lambda: (self.relays.snapshot(run) or {}).get("pending") == 0, DRAIN_SEC, 0.1):
            self.fail(f"not drained within {DRAIN_SEC} s: {self.relays.snapshot(run)}")
        self.relays.end(run, "SIGTERM")

    def check(self) -> None:
        """The ledger against the stand-in's record (`soak_checks.ledger`)."""
        self.result.messages, self.result.refused_sent = self.next_tag, len(self.refused)
        for failure in soak_checks.ledger(self.result, self.runs, self.standin, self.refused,
                                          self.damaged):
            self.fail(failure)

    def check_webhooks(self) -> None:
        """Each webhook's requests, whatever URL named it (`soak_checks.webhooks`)."""
        for failure in soak_checks.webhooks(self.result, self.runs, self.standin,
                                            self.sent_to, WEBHOOKS,
                                            DEADLINE_SEC - GIVEN_UP_SLACK_SEC,
                                            time.monotonic()):
            self.fail(failure)

    def check_answers(self) -> None:
        """Discord's broken and odd answers read for what they mean
        (`soak_checks.answers`)."""
        failures, counted = soak_checks.answers(self.runs, self.standin)
        for failure in failures:
            self.fail(failure)
        self.out(counted)

    def close(self) -> None:
        for run in self.runs:
            if run.process and run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        self.context.destroy(linger=0)
        self.standin.stop()
        if self.storage:
            self.storage.close()
        if self.faults:
            self.faults.close()

def run(seconds: float = 60, messages: int = 1_000_000, cycles: int | None = None,
        seed: int = 1, durable: bool = True, sighup: bool = False, storage: bool = False,
        home: Path | None = None, out=print, process: bool = False) -> Result:
    """Run the soak and report on `out`; the Result's `failures` is empty if it passed."""
    home = home or Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(home, durable, seed, out, storage, process)
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
        soak.check_webhooks()
        soak.check_answers()
    except SoakError as exc:
        soak.fail(f"{exc}; soak abandoned")
    finally:
        soak.close()
    result = soak.result
    result.seconds = time.monotonic() - started
    report(result, durable=durable, sighup=sighup, storage=storage, process=process,
           seed=seed, out=out)
    return result


def report(r: Result, *, durable: bool, sighup: bool, storage: bool, seed: int, out,
           process: bool = False) -> None:
    ends = ("SIGKILL", "SIGTERM", "early SIGTERM", "SIGHUP", "exit")
    kills = ", ".join(f"{how} {r.kills[how]}" for how in ends if r.kills[how])
    out(f"soak: durable {'varied per run' if storage else 'on' if durable else 'off'}, "
        f"SIGHUP {'on' if sighup else 'off'}, storage faults {'on' if storage else 'off'}, "
        f"process faults {'on' if process else 'off'}, seed {seed}, {r.seconds:.0f} s")
    out(f"cycles {r.cycles}; messages {r.messages} ({r.refused_sent} to a refused "
        f"webhook); "
        f"runs ended by {kills} ({r.kills_in_transit} SIGKILLs right after a burst); "
        f"SIGHUPs survived (log reopened) {r.hups_survived}")
    out(f"delivered {r.delivered}; failed {r.failed}, dropped {r.drops}, "
        f"rejected {r.rejected}")
    out(f"not taken when a run was killed (allowed): {r.not_taken}; counted lost (the "
        f"store could not take them at a stop): {r.lost_counted}")
    out(f"missing beyond the counters: {r.lost} (may be: {r.kill_losses} held at SIGKILLs "
        f"without durable mode or a store, {r.destroyed} held by stores the soak damaged, "
        f"{r.unseen_drops} dropped by arrivals after a killed run's last snapshot)")
    out(f"duplicates {r.duplicates} (in flight at the kills: {r.in_flight}); "
        f"store rows skipped {r.corrupt_records}")
    out("webhooks named by " + ", ".join(f"{how} {n}" for how, n in sorted(r.spellings.items()))
        + f"; most requests to one webhook in flight at once: {r.most_in_flight}")
    if storage:
        out("storage: " + ", ".join(f"{what} {n}" for what, n in sorted(r.storage.items())))
    if process:
        out("process: " + ", ".join(f"{what} {n}" for what, n in sorted(r.process.items())))
    out(f"slowest SIGTERM to exit {r.slowest_stop:.2f} s (limit: drain {RELAY_DRAIN_SEC:g} "
        f"+ grace {GRACE_SEC:g} + {STOP_MARGIN_SEC:g} s); errors the relay's threads "
        f"carried on from {r.thread_errors}")
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
    parser.add_argument("--storage", action="store_true",
                        help="also attack the store: a full disk (a tmpfs; root only), the "
                             "store removed or replaced, a second relay, damage between "
                             "runs, durable mode and queue_max changed between runs")
    parser.add_argument("--process", action="store_true",
                        help="also attack the relay's own process: its log directory "
                             "removed and restored, SIGHUP and SIGTERM in its first 100 ms, "
                             "idle and half-open /metrics connections held throughout")
    parser.add_argument("--home", type=Path,
                        help="the relay's home (default: a new temp dir)")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.messages, args.cycles, args.seed, args.durable,
                 args.sighup, args.storage, args.home, process=args.process)
    return 1 if result.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
