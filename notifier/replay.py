"""``python -m notifier replay``: the dead letters, through the running relay, each once.

Every line of the dead-letter file (its rotated ``.1`` first) is checked
(`deadletter.read`): one of the wrong shape is refused with its line number and why,
left in place, counted, and never recorded as replayed. The others that are not recorded
as replayed yet go to the relay in order, a chunk at a time:

* room: a chunk goes only while the relay's own snapshot (its metrics file) shows room
  for it within half its queue, so the relay never drops a replayed message to make room
  (dropping the oldest is how it survives a producer's flood, not an operator's replay);
* taken: each envelope is handed to ZeroMQ with a blocking send, bounded by
  ``--wait-sec``: it is taken, or the run stops; nothing is dropped at a high-water mark;
* recorded: once a snapshot shows that the relay received the whole chunk, the chunk's
  ids are appended to ``notifier_failed.sexp.replayed`` and fsynced, before the next.

So a rerun after an interruption (Ctrl-C, SIGTERM, a relay that stopped) sends only
what the relay did not take. Interrupted, it stops sending, waits (bounded) for the
relay to take what was sent, records it, and reports replayed, refused and left.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from notifier import config, deadletter, metrics, sexp
from notifier.client import NotifierClient, relay_endpoint, wait_seconds

CHUNK = 200
"""Most envelopes handed over before waiting for the relay to confirm them."""

POLL_SEC = 0.05  # how often the relay's snapshot is read while waiting on it


class Stop(Exception):
    """The run cannot go on (the relay stopped taking, restarted, or was never there)."""


@dataclass
class Tally:
    replayed: int = 0
    refused: int = 0
    left: int = 0
    before: int = 0  # recorded as replayed by an earlier run
    problems: list[str] = field(default_factory=list)


class RelayView:
    """The relay's snapshot, read from its metrics file: is it there, how much room is
    in its queue, how much it has received."""

    def __init__(self, path: Path, wait_sec: float, clock: Callable[[], float] = time.time):
        self.path, self.wait_sec, self.clock = path, wait_sec, clock
        self.pid: int | None = None

    def read(self) -> sexp.Alist:
        """The current snapshot of a running relay (the one seen first); Stop if none."""
        try:
            snapshot = metrics.read(self.path)
        except FileNotFoundError:
            raise Stop(f"no metrics file at {self.path}: is the relay running?") from None
        except (OSError, ValueError) as exc:
            raise Stop(f"cannot read the relay's metrics {self.path}: {exc}") from None
        numbers = [snapshot.get(key) for key in ("timestamp", "pid", "received",
                                                 "queue_len", "queue_max")]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise Stop(f"{self.path} is not a snapshot of the relay")
        interval = snapshot.get("metrics_interval_sec") or 5
        if snapshot.get("state") == "stopped" or \
                self.clock() - snapshot["timestamp"] > max(3 * interval, 15):
            raise Stop(f"the relay is not running (its last snapshot, {self.path}, is "
                       f"{'final' if snapshot.get('state') == 'stopped' else 'stale'})")
        if self.pid is None:
            self.pid = snapshot["pid"]
        elif snapshot["pid"] != self.pid:
            raise Stop("the relay restarted meanwhile")
        return snapshot

    def wait(self, condition: Callable[[sexp.Alist], bool], what: str) -> sexp.Alist:
        """The first snapshot that satisfies `condition`; Stop after `wait_sec` in which
        the relay made no progress (received nothing more and freed no room)."""
        snapshot = self.read()
        progress, deadline = None, time.monotonic() + self.wait_sec
        while not condition(snapshot):
            mark = (snapshot["received"], -snapshot["queue_len"])
            if progress is None or mark > progress:
                progress, deadline = mark, time.monotonic() + self.wait_sec
            elif time.monotonic() > deadline:
                raise Stop(f"the relay made no progress for {self.wait_sec:g} s while "
                           f"waiting for {what} ({snapshot['queue_len']} of "
                           f"{snapshot['queue_max']} held)")
            time.sleep(POLL_SEC)
            snapshot = self.read()
        return snapshot


def todo(path: Path, tally: Tally) -> list[deadletter.Entry]:
    """The entries to send, in order; refused lines are reported and counted."""
    done = deadletter.replayed_ids(path)
    seen: dict[str, str] = {}
    entries = []
    for item in deadletter.read(path):
        if isinstance(item, deadletter.Entry) and item.id in seen:
            item = deadletter.Refused(item.where, f"its id {item.id} is also at {seen[item.id]}")
        if isinstance(item, deadletter.Refused):
            tally.refused += 1
            tally.problems.append(f"{item.where}: refused, left in place: {item.reason}")
            continue
        seen[item.id] = item.where
        if item.id in done:
            tally.before += 1
        else:
            entries.append(item)
    return entries


class Interrupted:
    """SIGINT and SIGTERM only raise a flag while installed: the run stops between
    envelopes, after recording what the relay took."""

    def __init__(self):
        self.flag = False

    def __enter__(self) -> "Interrupted":
        self._previous = {sig: signal.signal(sig, self._set)
                          for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def replay(entries: list[deadletter.Entry], path: Path, client: NotifierClient,
           relay: RelayView, wait_sec: float, interrupted: Interrupted, tally: Tally) -> None:
    """Hand `entries` to the relay chunk by chunk, recording each chunk once taken."""
    snapshot = relay.read()
    base = snapshot["received"]  # the relay's count before our first envelope
    sent = 0
    index = 0
    while index < len(entries) and not interrupted.flag:
        half = max(1, snapshot["queue_max"] // 2)
        first = len(entries[index].envelopes)
        snapshot = relay.wait(lambda s: interrupted.flag or s["queue_len"] == 0
                              or s["queue_len"] + min(first, half) <= half, "room in its queue")
        if interrupted.flag:
            break
        room = max(half - snapshot["queue_len"], first)
        chunk: list[deadletter.Entry] = []
        size = 0
        while index < len(entries) and not interrupted.flag:
            count = len(entries[index].envelopes)
            if chunk and (size + count > min(room, CHUNK)):
                break
            for data in entries[index].envelopes:
                if not client.send_envelope_waiting(data, wait_sec):
                    raise Stop(f"ZeroMQ did not take an envelope within {wait_sec:g} s")
                sent += 1
            chunk.append(entries[index])
            size += count
            index += 1
        if chunk:
            snapshot = relay.wait(lambda s: s["received"] >= base + sent, "it to take them")
            deadletter.mark_replayed(path, [entry.id for entry in chunk])
            tally.replayed += len(chunk)


def command(args: argparse.Namespace) -> int:
    """Replay the dead-letter file; exit 0 all replayed, 1 some left (run again), 2 a
    usage error or lines refused (fix or remove them, then run again)."""
    try:
        settings = config.load(os.environ, vars(args))
    except config.ConfigError as exc:
        print(f"notifier replay: {exc}", file=sys.stderr)
        return 2
    path = Path(args.file) if args.file else settings.dead_letter_file
    tally = Tally()
    try:
        entries = todo(path, tally)
    except (OSError, ValueError) as exc:
        print(f"notifier replay: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    for problem in tally.problems:
        print(f"notifier replay: {problem}", file=sys.stderr)
    if not entries and not tally.refused:
        print(f"nothing to replay in {path} ({tally.before} replayed before)")
        return 0
    endpoint = args.endpoint or relay_endpoint(settings)
    stopped = None
    if entries:
        # Queued only on a connection to the relay; no linger: what the relay confirmed
        # has left, and what it did not is sent again by the next run, so it must not
        # trickle in after this one gave up on it.
        client = NotifierClient(endpoint, linger_ms=0, immediate=True)
        try:
            with Interrupted() as interrupted:
                replay(entries, path, client, RelayView(settings.metrics_file, args.wait_sec),
                       args.wait_sec, interrupted, tally)
            if interrupted.flag:
                stopped = "interrupted"
        except Stop as exc:
            stopped = str(exc)
        except OSError as exc:
            stopped = f"cannot record progress in {deadletter.replayed_file(path)}: {exc}"
        finally:
            client.close()
    tally.left = len(entries) - tally.replayed
    if stopped:
        print(f"notifier replay: stopped: {stopped}; the {tally.left} left are sent by the "
              "next run", file=sys.stderr)
    print(f"replayed {tally.replayed}, refused {tally.refused}, left {tally.left} "
          f"({tally.before} replayed before) from {path} through the relay at {endpoint}")
    return 1 if tally.left else 2 if tally.refused else 0


def add_replay_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on `commands` (the object ``add_subparsers()`` returns)."""
    parser = commands.add_parser(
        "replay", help="send the failed messages of the dead-letter file again",
        description="Send the messages of the dead-letter file (its rotated .1 first) "
                    "that were not replayed yet through the running relay, in order, "
                    "each exactly once: as fast as the relay has room for them, recording "
                    "each chunk once the relay has taken it, so a rerun after an "
                    "interruption resumes. Lines of the wrong shape are refused with "
                    "their line number, left in place and counted. Exit 0 all replayed, "
                    "1 some left (the relay stopped taking them, or an interruption: run "
                    "it again), 2 a usage error or lines refused.")
    parser.add_argument("--file", metavar="FILE",
                        help="the dead-letter file (default: $SWIMMY_HOME/data/"
                             "notifier_failed.sexp)")
    parser.add_argument("--endpoint", metavar="tcp://HOST:PORT",
                        help="the relay's endpoint (default: from --bind-addr and --port)")
    config.add_arguments(parser, ("home", "port", "bind_addr", "metrics_file"))
    parser.add_argument("--wait-sec", type=wait_seconds, default=30.0, metavar="S",
                        help="how long to wait for the relay to make progress before "
                             "stopping (default: 30)")
    parser.set_defaults(run=command)
    return parser
