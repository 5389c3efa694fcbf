#!/usr/bin/env python3
"""Relay benchmarks against the local Discord stand-in, the relay as a real process.

1. latency: push-to-delivery time of single notifications on an idle relay (p50, p95),
   measured from the client's send to the stand-in receiving the request;
2. idle CPU: CPU seconds the relay uses in 30 s with nothing to do;
3. absorb rate: envelopes per second the relay takes off the socket while Discord is
   down (the webhook's port refuses connections), for a flood of 1,000,000 envelopes,
   and the same producer against a bare pyzmq PULL loop in the same run, for the ratio;
4. memory: the relay's RSS growth (peak minus before) during that flood.

5. restore: how long a start takes to read a store holding 100,000 messages and hand
   them to the outbox (what the relay does before it binds), in this process.

Latency, idle CPU and absorb rate are measured in the same run for each configuration:
durable (the default: every envelope committed to the store before it may be posted);
memory (SWIMMY_NOTIFIER_DURABLE=0: written to the store only at SIGTERM); with CURVE
(durable, keys made by zmq.auth, the producer's key allowed). `--synchronous FULL`
runs the durable relay with SQLite's synchronous=FULL (an fsync in every commit)
instead of the store's own NORMAL (with its -wal fsynced within 10 ms), to compare.

Usage: python scripts/bench_relay.py [--messages 1000000] [--idle-seconds 30]
                                    [--configs durable,memory,curve] [--restore 100000]
                                    [--synchronous NORMAL]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from notifier import curve, metrics
from notifier.client import NotifierClient, build_envelope
from notifier.demo import free_port
from notifier.held import Raw
from notifier.outbox import Outbox
from notifier.standin import DiscordStandIn
from notifier.store import SYNCHRONOUS, Store

TICKS = os.sysconf("SC_CLK_TCK")


def wait_for(condition, timeout: float, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(interval)
    return value


class Relay:
    def __init__(self, home: Path, allowed: str, **settings: str):
        self.port = free_port()
        self.metrics_file = home / "data" / "notifier_metrics.sexp"
        env = {**os.environ, "SWIMMY_HOME": str(home), "SWIMMY_PORT_NOTIFIER": str(self.port),
               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": allowed,
               "SWIMMY_NOTIFIER_LOG_FILE": str(home / "relay.log"),
               "SWIMMY_NOTIFIER_DRAIN_SEC": "0", **settings}
        self.process = subprocess.Popen([sys.executable, "-m", "notifier"], env=env)
        wait_for(lambda: self.snapshot().get("pid") == self.process.pid, 30)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def snapshot(self) -> dict:
        try:
            return metrics.read(self.metrics_file)
        except (OSError, ValueError):
            return {}

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def memory_kib(self, key: str) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(l.split()[1] for l in status.splitlines() if l.startswith(key + ":")))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


class Keys:
    """A relay and a producer key pair, the producer allowed: `settings` for the relay,
    `client` for NotifierClient, `socket` for a bare PUSH socket."""

    def __init__(self, directory: Path):
        for name in ("relay", "producer"):
            curve.keygen(directory, name)
        self.clients = directory / "clients"
        self.clients.mkdir()
        (self.clients / "producer.key").write_bytes((directory / "producer.key").read_bytes())
        self.settings = {"SWIMMY_NOTIFIER_CURVE_SECRET_KEY": str(directory / "relay.key_secret"),
                         "SWIMMY_NOTIFIER_CURVE_CLIENTS": str(self.clients)}
        self.client = {"server_key": directory / "relay.key",
                       "client_key": directory / "producer.key_secret"}
        self.server = curve.load_secret(directory / "relay.key_secret")
        self.socket = (self.server[0], *curve.load_secret(directory / "producer.key_secret"))


def latency(samples: int, keys: Keys | None, settings: dict) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as home, DiscordStandIn() as discord:
        relay = Relay(Path(home), f"127.0.0.1:{discord.port}", **settings)
        webhook = discord.webhook_url(1)
        times = []
        with NotifierClient(relay.endpoint, webhook=webhook,
                            allowed_hosts=(("127.0.0.1", discord.port),),
                            **(keys.client if keys else {})) as client:
            for i in range(samples + 20):
                time.sleep(0.03)  # idle: the last one is done, and below the 45/s global pace
                sent = time.monotonic()
                client.send({"content": f"latency probe {i}"})
                if not discord.wait_for(i + 1, timeout=10):
                    raise TimeoutError("a latency probe was not delivered")
                if i >= 20:  # the first ones warm up connections and caches
                    times.append(discord.requests[i].time - sent)
        relay.stop()
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.95)] * 1000


def idle_cpu(seconds: float, settings: dict) -> float:
    with tempfile.TemporaryDirectory() as home, DiscordStandIn() as discord:
        relay = Relay(Path(home), f"127.0.0.1:{discord.port}", **settings)
        time.sleep(1)  # let start-up work finish
        before = relay.cpu_seconds()
        time.sleep(seconds)
        used = relay.cpu_seconds() - before
        relay.stop()
    return used


def produce(endpoint: str, count: int, data: bytes, keys: tuple | None) -> None:
    """The producer: as fast as pyzmq sends, blocking when the socket's queue is full,
    so that every envelope reaches the receiver and the receiver sets the pace."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 10_000)
    if keys:
        curve.set_client(push, *keys)
    push.connect(endpoint)
    send = push.send
    for _ in range(count):
        send(data)
    push.close(linger=-1)
    context.term()


def raw_pull_rate(count: int, data: bytes, keys: Keys | None) -> float:
    """Envelopes per second a bare PULL loop takes from the same producer."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    if keys:
        clients = curve.Clients(context, keys.clients)
        curve.set_server(pull, *keys.server)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    producer = multiprocessing.Process(target=produce, args=(
        f"tcp://127.0.0.1:{port}", count, data, keys.socket if keys else None))
    producer.start()
    pull.recv()
    started = time.perf_counter()
    receive = pull.recv
    for _ in range(count - 1):
        receive()
    rate = (count - 1) / (time.perf_counter() - started)
    producer.join()
    if keys:
        clients.stop()
    context.destroy(linger=0)
    return rate


def flood(count: int, data_for, keys: Keys | None, settings: dict) -> tuple[float, float, float]:
    """Absorb rate (envelopes/s), RSS growth (MiB) and CPU per envelope (µs) of the relay
    while Discord is down."""
    down = free_port()  # nothing listens there: every request is refused
    with tempfile.TemporaryDirectory() as home:
        relay = Relay(Path(home), f"127.0.0.1:{down}",
                      SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC="0.05",
                      **settings)
        data = data_for(f"http://127.0.0.1:{down}/api/webhooks/1/made-up-token")
        rss_before = relay.memory_kib("VmRSS")
        producer = multiprocessing.Process(target=produce, args=(
            relay.endpoint, count, data, keys.socket if keys else None))
        producer.start()
        wait_for(lambda: relay.snapshot().get("received", 0) > 0, 30, interval=0.001)
        started, cpu_before = time.perf_counter(), relay.cpu_seconds()
        first = relay.snapshot()["received"]
        last = wait_for(lambda: (s := relay.snapshot()).get("received") == count and s,
                        600, interval=0.005)
        elapsed = time.perf_counter() - started
        cpu = relay.cpu_seconds() - cpu_before
        rss_growth = (relay.memory_kib("VmHWM") - rss_before) / 1024
        producer.join()
        relay.stop()
    assert last["received"] == count
    return (count - first) / elapsed, rss_growth, cpu / (count - first) * 1e6


def restore_time(count: int) -> tuple[float, float]:
    """Seconds to open a store of `count` messages and restore them into an outbox with
    that queue_max, and the store's size in MiB."""
    envelope = build_envelope("https://discord.com/api/webhooks/1/tok",
                              {"content": "disk usage 91% on trading-host-3"})
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "notifier_store.sqlite3"
        writer = Store(path)
        writer.open(count)
        for start in range(0, count, 512):  # as the receiver writes them
            writer.add([Raw(envelope, 0.0) for _ in range(min(512, count - start))],
                       time.time())
        writer.close()
        size = path.stat().st_size / 2 ** 20
        started = time.perf_counter()
        reader = Store(path)
        contents = reader.open(count)
        outbox = Outbox(count, 0.0, store=reader)
        outbox.restore(contents)
        elapsed = time.perf_counter() - started
        reader.close()
    assert outbox.snapshot()["pending"] == count
    return elapsed, size


def sync_settings(synchronous: str, directory: Path) -> dict:
    """The environment that makes a relay use `synchronous` (a sitecustomize in the
    relay's PYTHONPATH, unless it is the store's own)."""
    if synchronous == SYNCHRONOUS:
        return {}
    (directory / "sitecustomize.py").write_text(
        f"import notifier.store\nnotifier.store.SYNCHRONOUS = {synchronous!r}\n")
    return {"PYTHONPATH": str(directory)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--configs", default="durable,memory,curve",
                        help="which configurations to measure, comma-separated")
    parser.add_argument("--restore", type=int, default=100_000,
                        help="messages in the store whose restore is timed (0: skip)")
    parser.add_argument("--synchronous", default=SYNCHRONOUS, choices=("FULL", "NORMAL"),
                        help="SQLite's synchronous setting for the durable relay")
    args = parser.parse_args()

    def data_for(webhook: str) -> bytes:
        return build_envelope(webhook, {"embeds": [{
            "title": "Swimmy Notification", "color": 3447003,
            "description": "Trade opened: USDJPY buy 0.10 lots at 151.234"}]})

    data = data_for("http://127.0.0.1:9/api/webhooks/1/made-up-token")
    with tempfile.TemporaryDirectory() as directory:
        keys = Keys(Path(directory))
        durable = sync_settings(args.synchronous, Path(directory))
        configs = {"durable": (None, durable),
                   "memory": (None, {"SWIMMY_NOTIFIER_DURABLE": "0"}),
                   "curve": (keys, {**keys.settings, **durable})}
        absorbed = {}
        if args.restore:
            elapsed, size = restore_time(args.restore)
            print(f"restore: {args.restore:,} messages ({size:.1f} MiB store) read and "
                  f"restored in {elapsed * 1000:.0f} ms", flush=True)
        for label in args.configs.split(","):
            with_keys, settings = configs[label]
            print(f"--- {label}" + (f" (synchronous={args.synchronous})"
                                     if label != "memory" else ""), flush=True)
            p50, p95 = latency(args.latency_samples, with_keys, settings)
            print(f"latency, idle relay:  p50 {p50:.2f} ms   p95 {p95:.2f} ms "
                  f"({args.latency_samples} notifications)", flush=True)
            cpu = idle_cpu(args.idle_seconds, settings)
            print(f"idle CPU:             {cpu:.3f} s in {args.idle_seconds:g} s", flush=True)
            raw = raw_pull_rate(args.messages, data, with_keys)
            absorbed[label], growth, cpu = flood(args.messages, data_for, with_keys, settings)
            print(f"absorb, Discord down: {absorbed[label]:,.0f} envelopes/s  "
                  f"(bare pyzmq PULL loop: {raw:,.0f}/s; ratio {absorbed[label] / raw:.2f}), "
                  f"{len(data)}-byte envelopes, {args.messages:,} pushed", flush=True)
            print(f"relay CPU in flood:   {cpu:.2f} µs per envelope (all its threads)",
                  flush=True)
            print(f"RSS growth in flood:  {growth:.1f} MiB (peak minus before)", flush=True)
    for label in absorbed.keys() - {"memory"}:
        if "memory" in absorbed:
            print(f"absorb {label} / memory: {absorbed[label] / absorbed['memory']:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
