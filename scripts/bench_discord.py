#!/usr/bin/env python3
"""Discord as it really behaves, against the local stand-in, the relay as a real process.

- many: 200 webhooks with 25 embed notifications each, pushed at once; the stand-in
  limits each webhook to 5 requests per 2 s and all of them to 50 per second. The time
  until all are delivered, against the physical limit: the requests needed after
  batching (10 embeds a request) divided by the relay's global rate (45 per second).
- outage: 50 notifications (5 webhooks, 10 each) pushed while every request is answered
  500, for --seconds; then Discord is back. The time from recovery to the last
  delivery, and how many failed.
- channel: 300 notifications over 5 minutes, one a second, to 3 webhooks in one channel
  with a hidden limit of 30 messages per 60 s. The shared 429s per webhook, and the
  time to deliver all.
- shared: a channel with the hidden limit of 30 per 60 s, 28 of it just used by another
  poster; 40 messages that cannot be combined (each its own request) pushed at once to
  one webhook in it. The time until all are delivered, against the physical limit (2
  fit at once, 30 more once the other poster's messages leave the window, 60 s later,
  the last 8 another 60 s on: 120 s), and the shared 429s.
- threads: one webhook limited to 5 requests per 2 s, addressed through 10 thread URLs
  (``?thread_id=``), 20 messages each that cannot be combined, pushed at once, thread
  after thread. The time until all are delivered, against the physical limit (200
  requests at 5 per 2 s: 5 at once, then 5 every 2 s, 78 s), and the 429s.

Usage: python scripts/bench_discord.py many | outage [--seconds 10] | channel | shared | threads
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from notifier import metrics
from notifier.client import NotifierClient
from notifier.demo import free_port
from notifier.standin import DiscordStandIn

GLOBAL_RATE = 45  # the relay's default


def embeds(discord: DiscordStandIn) -> int:
    return sum(len(message.get("embeds") or []) for message in discord.messages())


def settled(metrics_file: Path, held: int, timeout: float = 30.0):
    """The relay's snapshot once nothing of `held` messages is pending any more."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = metrics.read(metrics_file)
        if snapshot["received"] == held and snapshot["pending"] == 0:
            return snapshot
        if time.monotonic() > deadline:
            raise TimeoutError(f"still pending: {dict(snapshot)}")
        time.sleep(0.1)


@contextmanager
def relay(discord: DiscordStandIn, **settings: str):
    """The relay as a process beside `discord`; yields (client, metrics file)."""
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        env = {**os.environ, "SWIMMY_HOME": home, "SWIMMY_PORT_NOTIFIER": str(port),
               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": f"127.0.0.1:{discord.port}",
               "SWIMMY_NOTIFIER_LOG_FILE": str(Path(home) / "relay.log"),
               "SWIMMY_NOTIFIER_QUEUE_MAX": "10000",
               "SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC": "0.2",
               **{f"SWIMMY_NOTIFIER_{key.upper()}": value for key, value in settings.items()}}
        process = subprocess.Popen([sys.executable, "-m", "notifier"], env=env)
        metrics_file = Path(home) / "data" / "notifier_metrics.sexp"
        deadline = time.monotonic() + 30
        while not metrics_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the relay did not start")
            time.sleep(0.05)
        try:
            with NotifierClient(f"tcp://127.0.0.1:{port}",
                                allowed_hosts=(("127.0.0.1", discord.port),),
                                sndhwm=10_000) as client:
                yield client, metrics_file
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def notify(client: NotifierClient, discord: DiscordStandIn, hook: int, i: int) -> None:
    client.notify(title=f"Alert {i + 1}", color=0xE74C3C, webhook=discord.webhook_url(hook),
                  description=f"webhook {hook}: USDJPY crossed {150 + i / 100:.2f}")


def many(hooks: int = 200, each: int = 25) -> None:
    with DiscordStandIn(rate_limit=(5, 2.0), global_limit=50) as discord, \
            relay(discord) as (client, metrics_file):
        started = time.monotonic()
        for i in range(each):
            for hook in range(1, hooks + 1):
                notify(client, discord, hook, i)
        if not discord.wait_for(lambda d: embeds(d) >= hooks * each, timeout=900):
            raise TimeoutError("not all delivered")
        elapsed = discord.requests[-1].time - started
        needed = hooks * math.ceil(each / 10)
        made = len(discord.requests)
        print(f"many: {hooks} webhooks x {each}: all delivered in {elapsed:.2f} s; "
              f"{made} requests (at least {needed} needed: {needed / GLOBAL_RATE:.2f} s at "
              f"{GLOBAL_RATE}/s; the requests made need {made / GLOBAL_RATE:.2f} s); "
              f"{elapsed / (needed / GLOBAL_RATE):.2f} x the limit; "
              f"{discord.count_status(429)} 429s", flush=True)


def outage(seconds: float, hooks: int = 5, each: int = 10) -> None:
    with DiscordStandIn(rate_limit=(5, 2.0), global_limit=50) as discord, \
            relay(discord) as (client, metrics_file):
        discord.set_mode(None, "status", status=500)
        for i in range(each):
            for hook in range(1, hooks + 1):
                notify(client, discord, hook, i)
        time.sleep(seconds)  # the outage
        discord.set_mode(None, "ok")
        recovered = time.monotonic()
        if not discord.wait_for(lambda d: embeds(d) >= hooks * each, timeout=600):
            raise TimeoutError("not all delivered")
        last = max(r.time for r in discord.requests if r.status == 200)
        snapshot = settled(metrics_file, hooks * each)
        errors = sum(1 for r in discord.requests if r.status == 500)
        print(f"outage of {seconds:g} s: {hooks * each} held, last delivered "
              f"{last - recovered:.2f} s after recovery; failed {snapshot['failed']}; "
              f"{errors} requests answered 500 during the outage", flush=True)


def channel(messages: int = 300, seconds: float = 300.0) -> None:
    hooks = ("1", "2", "3")
    with DiscordStandIn(rate_limit=(5, 2.0), global_limit=50, channel_limit=(30, 60.0),
                        channels={"900": hooks}) as discord, \
            relay(discord) as (client, metrics_file):
        started = time.monotonic()
        for i in range(messages):
            notify(client, discord, int(hooks[i % 3]), i)
            time.sleep(max(0.0, started + (i + 1) * seconds / messages - time.monotonic()))
        if not discord.wait_for(lambda d: embeds(d) >= messages, timeout=900):
            raise TimeoutError("not all delivered")
        elapsed = discord.requests[-1].time - started
        made = sum(1 for r in discord.requests if r.status == 200)
        limited = [discord.count_status(429, hook) for hook in hooks]
        print(f"channel: {messages} over {seconds:g} s to 3 webhooks in one channel limited "
              f"to 30/60 s: all delivered {elapsed:.1f} s after the first push; {made} "
              f"requests ({made / (elapsed / 60):.1f} per 60 s); 429s per webhook {limited}",
              flush=True)


def shared(used: int = 28, messages: int = 40) -> None:
    with DiscordStandIn(rate_limit=(5, 2.0), global_limit=50, channel_limit=(30, 60.0),
                        channels={"900": ["1"]}) as discord, \
            relay(discord) as (client, metrics_file):
        discord.use_channel("900", used)
        started = time.monotonic()
        for i in range(messages):
            client.send({"content": f"alert {i + 1}", "username": f"desk {i + 1}"},
                        webhook=discord.webhook_url(1))
        if not discord.wait_for(messages, timeout=1800):
            raise TimeoutError("not all delivered")
        elapsed = max(r.time for r in discord.requests if r.status == 200) - started
        snapshot = settled(metrics_file, messages)
        bound = 120.0  # see the docstring
        print(f"shared: {messages} messages to a channel limited to 30/60 s, {used} of it "
              f"used by another poster: all delivered in {elapsed:.1f} s "
              f"({elapsed / bound:.2f} x the physical limit of {bound:g} s); "
              f"{snapshot['rate_limited_by_scope']['shared']} shared 429s, "
              f"{discord.count_status(429)} 429s in all", flush=True)


def threads(count: int = 10, each: int = 20) -> None:
    messages = count * each
    with DiscordStandIn(rate_limit=(5, 2.0), global_limit=50) as discord, \
            relay(discord) as (client, metrics_file):
        started = time.monotonic()
        for i in range(each):
            for thread in range(count):
                client.send({"content": f"alert {i + 1}", "username": f"desk {i * count + thread}"},
                            webhook=discord.webhook_url(1, thread=1000 + thread))
        if not discord.wait_for(messages, timeout=900):
            raise TimeoutError("not all delivered")
        elapsed = max(r.time for r in discord.requests if r.status == 200) - started
        snapshot = settled(metrics_file, messages)
        bound = (messages / 5 - 1) * 2.0  # see the docstring
        print(f"threads: {count} thread URLs x {each} messages of one webhook limited to "
              f"5/2 s: all delivered in {elapsed:.1f} s ({elapsed / bound:.2f} x the "
              f"physical limit of {bound:g} s); {discord.count_status(429)} 429s, "
              f"{snapshot['invalid_requests_10m']} invalid requests", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("many", "outage", "channel", "shared", "threads"))
    parser.add_argument("--seconds", type=float, default=10.0, help="outage length")
    args = parser.parse_args()
    if args.scenario == "many":
        many()
    elif args.scenario == "outage":
        outage(args.seconds)
    elif args.scenario == "channel":
        channel()
    elif args.scenario == "shared":
        shared()
    else:
        threads()


if __name__ == "__main__":
    main()
