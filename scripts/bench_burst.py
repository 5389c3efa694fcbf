#!/usr/bin/env python3
"""Bursts to one webhook that Discord limits to 5 requests per 2 s (the usual webhook
limit), against the local stand-in, the relay as a real process.

For bursts of 60 and 600 embed notifications pushed at once: the time from the first
push until the last one arrived, the requests used and the 429s received. Without
batching, Discord's limit alone allows no better than 22 s for 60 messages.

Usage: python scripts/bench_burst.py [--bursts 60 600]
"""

from __future__ import annotations

import argparse
import time

from bench_discord import embeds, relay, settled
from notifier.standin import DiscordStandIn


def burst(size: int) -> tuple[float, int, int]:
    with DiscordStandIn(rate_limit=(5, 2.0)) as discord, \
            relay(discord) as (client, metrics_file):
        started = time.monotonic()
        for i in range(size):
            client.notify(title=f"Alert {i + 1}", color=0xE74C3C, webhook=discord.webhook_url(1),
                          description=f"USDJPY crossed level {150 + i / 100:.2f}")
        if not discord.wait_for(lambda d: embeds(d) >= size, timeout=600):
            raise TimeoutError("the burst was not delivered")
        elapsed = discord.requests[-1].time - started
        snapshot = settled(metrics_file, size)
        assert snapshot["delivered"] == size and snapshot["failed"] == 0, dict(snapshot)
        return elapsed, len(discord.requests), discord.count_status(429)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, nargs="+", default=[60, 600])
    args = parser.parse_args()
    for size in args.bursts:
        elapsed, requests, limited = burst(size)
        print(f"burst of {size:4d}: all delivered in {elapsed:6.2f} s, "
              f"{requests} requests, {limited} 429s", flush=True)


if __name__ == "__main__":
    main()
