#!/usr/bin/env python3
"""Envelopes parsed per second on one core: (a) a typical Lisp envelope whose payload_json
holds one embed, (b) the same payload as a nested `payload` alist, (c) the same as JSON.

Usage: python scripts/bench_envelope.py [--seconds 1.0]
Prints the best of five rounds for each form (the least disturbed by other work).
"""

import argparse
import json
import time

from notifier import envelope, sexp

WEBHOOK = "https://discord.com/api/webhooks/123456789012345678/made-up-token"
EMBED = {"title": "Swimmy Notification",
         "description": "Trade opened: USDJPY buy 0.10 lots at 151.234",
         "color": 3447003}
FORMS = {
    "a: sexp + payload_json": sexp.dumps({
        "type": "NOTIFIER", "schema_version": 1, "action": "SEND", "webhook": WEBHOOK,
        "payload_json": json.dumps({"embeds": [EMBED]}, separators=(",", ":"))}),
    "b: sexp + payload alist": sexp.dumps({
        "type": "NOTIFIER", "schema_version": 1, "action": "SEND", "webhook": WEBHOOK,
        "payload": {"embeds": [EMBED]}}),
    "c: JSON envelope": json.dumps({
        "type": "NOTIFIER", "schema_version": 1, "action": "SEND", "webhook": WEBHOOK,
        "payload": {"embeds": [EMBED]}}),
}


def rate(data: bytes, seconds: float) -> float:
    parse = envelope.parse
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(1000):
            parse(data)
        count += 1000
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    args = parser.parse_args()
    for name, text in FORMS.items():
        data = text.encode("utf-8")
        envelope.parse(data)  # fail early on a bad form
        best = max(rate(data, args.seconds) for _ in range(5))
        print(f"{name:26s} {len(data):4d} bytes  {best:9,.0f} envelopes/s  "
              f"{1e6 / best:5.1f} us each")


if __name__ == "__main__":
    main()
