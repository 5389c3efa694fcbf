#!/usr/bin/env python3
"""Relay benchmarks against the local Discord stand-in, the relay as a real process.

1. latency: push-to-delivery time of single notifications on an idle relay (p50, p95),
   measured from the client's send to the stand-in receiving the request;
2. idle CPU: CPU seconds the relay uses in 30 s with nothing to do;
3. absorb rate: envelopes per second the relay takes off the socket while Discord is
   down (the webhook's port refuses connections), for a flood of 1,000,000 envelopes,
   and the same producer against a bare pyzmq PULL loop in the same run, for the ratio.
   Three floods: one envelope sent over and over (a runaway loop: all but the first are
   duplicates); distinct envelopes (a counter in each) with the default queue_max, so
   the queue is full and each is parsed before anything is dropped; and distinct
   envelopes with room for them all (queue_max above the flood: taken in unparsed);
4. memory: the relay's RSS growth (peak minus before) during each flood.

5. restore: how long a start takes to read a store holding 100,000 messages and hand
   them to the outbox (what the relay does before it binds), in this process.
6. hostile producers (issue 18, `--hostile`, durable relay): beside the normal flood
   and its bare pyzmq loop, the same flood with 3,000 junk frames spread among the valid
   envelopes (absorb rate, RSS, every junk frame rejected and none dropped for it), and
   the same flood while another producer sends frames over the cap (16 of 48 MiB and
   one of 400 MiB, each on a connection of its own): RSS peak, disconnects counted.
   `--baseline REF` runs the normal flood on REF's code too (`git archive`), in the same
   run, for the ratio of this code's absorb rate to REF's (parse-before-drop's cost).

Latency, idle CPU and absorb rate are measured in the same run for each configuration:
durable (the default: every envelope committed to the store before it may be posted);
memory (SWIMMY_NOTIFIER_DURABLE=0: written to the store only at SIGTERM); with CURVE
(durable, keys made by zmq.auth, the producer's key allowed). `--synchronous FULL`
runs the durable relay with SQLite's synchronous=FULL (an fsync in every commit)
instead of the store's own NORMAL (with its -wal fsynced within 10 ms), to compare.

Usage: python scripts/bench_relay.py [--messages 1000000] [--idle-seconds 30]
                                    [--configs durable,memory,curve] [--restore 100000]
                                    [--synchronous NORMAL] [--hostile] [--baseline main]
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
import threading
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
    def __init__(self, home: Path, allowed: str, cwd: Path | None = None, **settings: str):
        self.port = free_port()
        self.metrics_file = home / "data" / "notifier_metrics.sexp"
        env = {**os.environ, "SWIMMY_HOME": str(home), "SWIMMY_PORT_NOTIFIER": str(self.port),
               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": allowed,
               "SWIMMY_NOTIFIER_LOG_FILE": str(home / "relay.log"),
               "SWIMMY_NOTIFIER_DRAIN_SEC": "0", **settings}
        if cwd is not None:  # another checkout's code (python -m looks in cwd first)
            env["PYTHONPATH"] = str(cwd)
        self.process = subprocess.Popen([sys.executable, "-m", "notifier"], env=env, cwd=cwd)
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


JUNK = [b"not an envelope", b'{"type": "NOTIFIER"}', b'((type . "NOTIFIER") (webhook',
        b'{"type":"NOTIFIER","webhook":"https://evil.example/api/webhooks/2/x",'
        b'"payload":{"content":"x"}}']
"""Frames a broken producer sends: not an envelope, fields missing, cut off, refused."""


COUNTER = b"151.234"
"""In the benchmark's envelope: replaced by a counter of as many digits for distinct ones."""


def produce(endpoint: str, count: int, data: bytes, keys: tuple | None, junk: int = 0,
            distinct: bool = False) -> None:
    """The producer: as fast as pyzmq sends, blocking when the socket's queue is full,
    so that every envelope reaches the receiver and the receiver sets the pace. `junk`
    frames are spread evenly among the `count` envelopes; `distinct`: each envelope
    differs (made before the first is sent)."""
    frames = [data.replace(COUNTER, b"%07d" % i) for i in range(count)] if distinct \
        else [data] * count
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 10_000)
    if keys:
        curve.set_client(push, *keys)
    push.connect(endpoint)
    send = push.send
    every = count // junk if junk else count + 1
    for i, frame in enumerate(frames):
        send(frame)
        if i % every == every - 1 and i // every < junk:
            send(JUNK[i // every % len(JUNK)])
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


def flood(count: int, data_for, keys: Keys | None, settings: dict, *, junk: int = 0,
          during=None, cwd: Path | None = None, distinct: bool = False
          ) -> tuple[float, float, float]:
    """Absorb rate (envelopes/s, junk frames included), RSS growth (MiB) and CPU per
    envelope (µs) of the relay while Discord is down. `junk` frames are spread among
    the envelopes; `during(relay)` runs beside the producer (another producer); `cwd`
    runs another checkout's relay; `distinct` envelopes, else one sent over and over."""
    down = free_port()  # nothing listens there: every request is refused
    total = count + junk
    with tempfile.TemporaryDirectory() as home:
        relay = Relay(Path(home), f"127.0.0.1:{down}", cwd,
                      SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC="0.05",
                      **settings)
        data = data_for(f"http://127.0.0.1:{down}/api/webhooks/1/made-up-token")
        rss_before = relay.memory_kib("VmRSS")
        producer = multiprocessing.Process(target=produce, args=(
            relay.endpoint, count, data, keys.socket if keys else None, junk, distinct))
        producer.start()
        beside = threading.Thread(target=during, args=(relay,)) if during else None
        if beside:
            beside.start()
        wait_for(lambda: relay.snapshot().get("received", 0) > 0, 30, interval=0.001)
        started, cpu_before = time.perf_counter(), relay.cpu_seconds()
        first = relay.snapshot()["received"]
        last = wait_for(lambda: (s := relay.snapshot()).get("received") == total and s,
                        600, interval=0.005)
        elapsed = time.perf_counter() - started
        cpu = relay.cpu_seconds() - cpu_before
        if beside:
            beside.join()
        last = wait_for(lambda: (s := relay.snapshot()).get("unparsed", 0) == 0 and s, 60)
        rss_growth = (relay.memory_kib("VmHWM") - rss_before) / 1024
        producer.join()
        relay.stop()
    assert last["received"] == total
    assert last["rejected"] == junk, (last["rejected"], junk)  # every junk frame, no valid one
    return (total - first) / elapsed, rss_growth, cpu / (total - first) * 1e6, last


OVERSIZED = [48 << 20] * 16 + [400 << 20]
"""The frames over the cap the issue sent: eight of 48 MiB peaked at 365 MiB, one of
400 MiB took the relay from 36 to 835 MiB."""


def send_oversized(relay: Relay, sizes=OVERSIZED) -> int:
    """Send each frame over the cap on a connection of its own, as a producer that has
    been connected a moment does (a connection and its oversized frame within one read
    of the relay's monitor are not counted: the count is a floor), and wait until libzmq
    dropped it (the producer's monitor says so); return how many were sent."""
    context = zmq.Context()
    frames = {size: zmq.Frame(bytes(size)) for size in set(sizes)}
    for size in sizes:
        push = context.socket(zmq.PUSH)
        monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        push.connect(relay.endpoint)
        if not monitor.poll(60_000):
            raise TimeoutError("no connection to the relay")
        monitor.recv_multipart()
        time.sleep(0.05)  # a moment connected
        push.send(frames[size], copy=False)
        if not monitor.poll(60_000):
            raise TimeoutError("the relay did not drop a connection with an oversized frame")
        push.disable_monitor()
        monitor.close()
        push.close(linger=0)
    context.destroy(linger=0)
    return len(sizes)


def export(ref: str, directory: Path) -> Path:
    """REF's code, as `git archive` gives it, in `directory`."""
    archive = subprocess.run(["git", "archive", ref], capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def hostile(count: int, data, data_for, settings: dict, baseline: str | None) -> None:
    """Issue 18's floods, each beside the normal one, in the same run. Discord is down:
    with the default queue_max the queue is full, and each envelope is parsed before
    anything is dropped (parse-before-drop); with room for the whole flood it is not."""
    print(f"--- hostile producers (durable, {count:,} envelopes a flood)", flush=True)
    raw = raw_pull_rate(count, data, None)
    print(f"bare pyzmq PULL loop: {raw:,.0f}/s", flush=True)
    room = {**settings, "SWIMMY_NOTIFIER_QUEUE_MAX": str(count + 3000)}
    ours = {}
    with tempfile.TemporaryDirectory() as directory:
        code = {"this code": None}
        if baseline:
            code[baseline] = export(baseline, Path(directory))
        for label, how in (("queue full", settings), ("room for all", room)):
            for name, cwd in code.items():
                rate, growth, _, _ = flood(count, data_for, None, how, cwd=cwd)
                ours.setdefault(label, {})[name] = rate
                print(f"normal flood, {label}, {name}: {rate:,.0f}/s (ratio to the bare loop "
                      f"{rate / raw:.2f}), RSS growth {growth:.1f} MiB", flush=True)
            if baseline:
                print(f"  this code / {baseline}: "
                      f"{ours[label]['this code'] / ours[label][baseline]:.2f}", flush=True)
    normal = ours["queue full"]["this code"]
    rate, growth, _, last = flood(count, data_for, None, settings, junk=3000)
    print(f"3,000 junk among them, queue full: {rate:,.0f} frames/s (ratio to the bare loop "
          f"{rate / raw:.2f}, to the normal flood {rate / normal:.2f}), RSS growth "
          f"{growth:.1f} MiB; rejected {last['rejected']:,}, dropped {last['drops']:,}, "
          f"deduplicated {last['deduplicated']:,}", flush=True)
    sent = []
    rate, growth, _, last = flood(count, data_for, None, settings,
                                  during=lambda relay: sent.append(send_oversized(relay)))
    print(f"frames over the cap beside the normal flood: {sent[0]} ({sum(OVERSIZED) >> 20:,} "
          f"MiB: 16 of 48 MiB, one of 400 MiB): RSS growth {growth:.1f} MiB (peak minus "
          f"before), oversized_disconnects {last['oversized_disconnects']}, the flood at "
          f"{rate:,.0f}/s", flush=True)


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
    parser.add_argument("--hostile", action="store_true",
                        help="also measure the floods of broken producers (issue 18)")
    parser.add_argument("--baseline", metavar="REF",
                        help="with --hostile: the normal flood on REF's code too, same run")
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
        for label in filter(None, args.configs.split(",")):
            with_keys, settings = configs[label]
            print(f"--- {label}" + (f" (synchronous={args.synchronous})"
                                     if label != "memory" else ""), flush=True)
            p50, p95 = latency(args.latency_samples, with_keys, settings)
            print(f"latency, idle relay:  p50 {p50:.2f} ms   p95 {p95:.2f} ms "
                  f"({args.latency_samples} notifications)", flush=True)
            cpu = idle_cpu(args.idle_seconds, settings)
            print(f"idle CPU:             {cpu:.3f} s in {args.idle_seconds:g} s", flush=True)
            raw = raw_pull_rate(args.messages, data, with_keys)
            print(f"bare pyzmq PULL loop: {raw:,.0f}/s, {len(data)}-byte envelopes, "
                  f"{args.messages:,} pushed", flush=True)
            room = {**settings, "SWIMMY_NOTIFIER_QUEUE_MAX": str(args.messages + 1000)}
            for kind, how, distinct in (("one envelope over and over", settings, False),
                                        ("distinct, queue full", settings, True),
                                        ("distinct, room for all", room, True)):
                rate, growth, cpu, _ = flood(args.messages, data_for, with_keys, how,
                                             distinct=distinct)
                absorbed.setdefault(kind, {})[label] = rate
                print(f"absorb, {kind}: {rate:,.0f}/s (ratio to the bare loop "
                      f"{rate / raw:.2f}); relay CPU {cpu:.2f} µs per envelope (all its "
                      f"threads); RSS growth {growth:.1f} MiB (peak minus before)",
                      flush=True)
        if args.hostile:
            hostile(args.messages, data, data_for, durable, args.baseline)
    for kind, rates in absorbed.items():
        for label in rates.keys() - {"memory"}:
            if "memory" in rates:
                print(f"absorb {kind}, {label} / memory: "
                      f"{rates[label] / rates['memory']:.2f}", flush=True)


if __name__ == "__main__":
    main()
