#!/usr/bin/env python3
"""Durable mode's journal: how long a start takes to replay a full one.

A journal holding `--messages` live envelopes (default 100,000, the relay's `queue_max`
for the measurement) is written as the receiver writes it, in batches of 512; with
`--done-fraction F`, that fraction of every batch is done already (more written, their D
records replayed too). Then, timed: the replay
(`Journal.open`) and handing the messages to a fresh `Outbox` with that `queue_max`
(`Outbox.restore`), which is what the relay does before it binds. For reference, the same
run reads the segment files' bytes alone (the disk's share of the replay).

Usage: python scripts/bench_journal.py [--messages 100000] [--done-fraction 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from notifier.client import build_envelope
from notifier.journal import Journal
from notifier.outbox import Outbox

BATCH = 512


def write_journal(directory: Path, messages: int, done_fraction: float) -> int:
    """Write the journal; returns how many messages are live in it."""
    journal = Journal(directory)
    journal.open()
    envelope = build_envelope("https://discord.com/api/webhooks/1/tok",
                              {"content": "disk usage 91% on trading-host-3"})
    live = 0
    for start in range(0, messages, BATCH):
        jids = journal.append([envelope] * min(BATCH, messages - start))
        done = jids[:int(len(jids) * done_fraction)]
        if done:
            journal.done(done)
        live += len(jids) - len(done)
    journal.close()
    return live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--done-fraction", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "journal"
        written = round(args.messages / (1 - args.done_fraction))
        live = write_journal(directory, written, args.done_fraction)
        size = sum(path.stat().st_size for path in directory.glob("seg-*.log"))

        started = time.perf_counter()
        for path in directory.glob("seg-*.log"):
            path.read_bytes()
        read_sec = time.perf_counter() - started

        started = time.perf_counter()
        journal = Journal(directory)
        replay = journal.open()
        outbox = Outbox(max(live, 1), 0.0, journal=journal)
        outbox.restore(list(replay.messages.values()), list(replay.messages), replay.notices)
        replay_sec = time.perf_counter() - started
        journal.close()
    assert len(replay.messages) == live == outbox.snapshot()["pending"]
    print(f"journal: {live:,} live messages, {size / 2**20:.1f} MiB on disk")
    print(f"reading the segment files alone   {read_sec * 1000:8.1f} ms")
    print(f"replay and restore into the outbox {replay_sec * 1000:8.1f} ms "
          f"({live / replay_sec:,.0f} messages/s)")


if __name__ == "__main__":
    main()
