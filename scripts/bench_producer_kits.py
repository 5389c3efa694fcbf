#!/usr/bin/env python3
"""Cost of one send from the producer kits, beside a bare non-blocking send in the same run.

For each kit, the time one call takes (p50, p99, max) over COUNT calls, each in a fresh
process, with the relay up (a real `python -m notifier` posting to the local stand-in)
and down (an endpoint nobody listens on: the first 1,000 calls queue, every later one is
dropped on EAGAIN):

- Lisp: `notifier-send` (envelope printed, mutex, `pzmq:send :dontwait t`) against a bare
  `pzmq:send :dontwait t` of the same envelope on a socket with the same options;
- Rust: `Notifier::send` (envelope built, mutex, `send(DONTWAIT)`) against a bare
  `zmq` `send(DONTWAIT)` of the same envelope.

The kits are built as the tests build them (tests/kits.py): SBCL compiles the Lisp kit,
cargo builds the Rust driver in release mode, offline; both in a scratch directory.
Each configuration runs ROUNDS times, alternating kit and bare; the median round of each
figure is shown, with the ratio kit / bare.

Usage: python scripts/bench_producer_kits.py [--count 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.kits, tests.harness

from notifier import sexp  # noqa: E402
from notifier.standin import DiscordStandIn  # noqa: E402
from tests import kits  # noqa: E402
from tests.harness import RelayProcess  # noqa: E402
from tests.test_client import unused_endpoint  # noqa: E402

PAYLOAD = {"embeds": [{"title": "Swimmy", "description": "USDJPY filled 0.10 lot at 151.234",
                       "color": 3447003}]}
PAYLOAD_JSON = '{"embeds":[{"title":"Swimmy","description":"USDJPY filled 0.10 lot at 151.234","color":3447003}]}'


def lisp_round(kit: kits.LispKit, count: int, hook: str, endpoint: str, bare: bool) -> list:
    with kit.start() as lisp:
        return lisp.eval(f"(bench {count} {sexp.dumps(hook)} {sexp.dumps(PAYLOAD_JSON)} "
                         f"{sexp.dumps(endpoint)} :bare {'t' if bare else 'nil'})", timeout=600)


def rust_round(kit: kits.RustKit, count: int, hook: str, endpoint: str, bare: bool) -> list:
    with kit.start() as rust:
        if not bare:
            assert "endpoint" in rust.call(op="new", endpoint=endpoint)
        found = rust.call(op="bench", webhook=hook, payload=PAYLOAD, count=count,
                          endpoint=endpoint, bare=bare, timeout=600)
        return [found["p50_us"], found["p99_us"], found["max_us"]]


def measure(run, kit, count, hook, endpoint, rounds) -> dict[bool, list[float]]:
    """Median p50, p99, max (µs) over the rounds, for the kit (False) and bare (True)."""
    samples = {False: [], True: []}
    for _ in range(rounds):
        for bare in (False, True):
            samples[bare].append(run(kit, count, hook, endpoint, bare))
    return {bare: [statistics.median(round_[i] for round_ in found) for i in range(3)]
            for bare, found in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-kits-"))
    print("building the kits ...", flush=True)
    lisp = kits.build_lisp(scratch / "lisp")
    rust = kits.build_rust(scratch / "rust", release=True)
    kit_runs = {"Lisp notifier-send / bare pzmq:send": (lisp_round, lisp),
                "Rust Notifier::send / bare zmq send": (rust_round, rust)}
    rows = []
    with DiscordStandIn() as discord:
        (scratch / "home").mkdir()
        relay = RelayProcess(scratch / "home", f"127.0.0.1:{discord.port}").start()
        try:
            hook = discord.webhook_url(1)
            for state, endpoint in (("up", relay.endpoint), ("down", None)):
                for name, (run, kit) in kit_runs.items():
                    # Down: a fresh endpoint each time, or a previous round's queue would linger.
                    found = measure(run, kit, options.count, hook, endpoint or unused_endpoint(),
                                    options.rounds)
                    rows.append((name, state, found[False], found[True]))
                    print(f"  {name}, relay {state}: done", flush=True)
        finally:
            relay.stop()
    print(f"\none call, µs (median of {options.rounds} rounds of {options.count:,} calls); "
          "kit / bare")
    print(f"{'':40} {'relay':5} {'p50':>17} {'p99':>17} {'max':>22}")
    for name, state, found, bare in rows:
        cells = [f"{k:6.2f} / {b:6.2f}" for k, b in zip(found, bare)]
        print(f"{name:40} {state:5} {cells[0]:>17} {cells[1]:>17} {cells[2]:>22}")
    print("\nratios kit / bare (p50, p99):")
    for name, state, found, bare in rows:
        print(f"  {name}, relay {state}: {found[0] / bare[0]:.2f}, {found[1] / bare[1]:.2f}")


if __name__ == "__main__":
    main()
