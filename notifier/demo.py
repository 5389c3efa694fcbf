"""`python -m notifier demo`: the whole path, end to end, without a Discord webhook.

Starts a local Discord stand-in (rate-limited like Discord, 5 requests per 2 s) and the
real relay as a child process beside it, sends notifications through the producer
client, shows each request as the stand-in receives it, prints the relay's status, and
stops the relay with SIGTERM. Everything runs on loopback in a temporary SWIMMY_HOME.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from notifier import metrics, status
from notifier.client import NotifierClient
from notifier.standin import DiscordStandIn, RecordedRequest

BURST = 20


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _show(request: RecordedRequest) -> None:
    body = request.json if isinstance(request.json, dict) else {}
    lines = (body.get("content") or "").count("\n") + 1 if body.get("content") else 0
    embeds = body.get("embeds") or []
    first = (body.get("content") or (embeds[0].get("title") if embeds else "") or "")
    first = first.splitlines()[0][:60] if first else ""
    print(f"discord: webhook {request.webhook_id} <- HTTP {request.status}: "
          f"{lines} content line(s), {len(embeds)} embed(s)  {first!r}", flush=True)


def _delivered(path: Path) -> int:
    try:
        return metrics.read(path)["delivered"]
    except (OSError, ValueError, KeyError):
        return 0


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(python: str = sys.executable) -> int:
    with tempfile.TemporaryDirectory(prefix="notifier-demo-") as home, \
            DiscordStandIn(rate_limit=(5, 2.0), on_request=_show) as discord:
        port = free_port()
        metrics_file = Path(home) / "data" / "notifier_metrics.sexp"
        env = {**os.environ, "SWIMMY_HOME": home, "SWIMMY_PORT_NOTIFIER": str(port),
               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": f"127.0.0.1:{discord.port}",
               "SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC": "0.5"}
        env.pop("SWIMMY_NOTIFIER_LOG_FILE", None)
        env.pop("SWIMMY_NOTIFIER_METRICS_FILE", None)
        _say(f"Discord stand-in listening on {discord.url} (5 requests per 2 s per webhook)")
        relay = subprocess.Popen([python, "-m", "notifier"], env=env)
        try:
            if not _wait(metrics_file.exists, 30) or relay.poll() is not None:
                _say("the relay did not start; see its log above")
                return 1
            _say(f"relay running (pid {relay.pid}) on tcp://127.0.0.1:{port}")
            webhook = discord.webhook_url(1, "demo-token")
            with NotifierClient(f"tcp://127.0.0.1:{port}", webhook=webhook,
                                allowed_hosts=(("127.0.0.1", discord.port),)) as client:
                client.notify("Relay demo: hello from the producer client")
                client.notify(title="Trade opened", description="USDJPY buy 0.10 lots at 151.234",
                              color=0x2ECC71)
                client.send({"content": "Daily report\n" + "\n".join(
                    f"strategy {i:02d}: +{i * 1.7:.1f} pips" for i in range(200))})
                for i in range(BURST):
                    client.notify(title=f"Alert {i + 1} of a burst", color=0xE74C3C)
                _say(f"sent 3 notifications and a burst of {BURST} alerts: {client.stats()}")
            expected = 3 + BURST
            delivered = _wait(lambda: _delivered(metrics_file) >= expected, 30)
            _say(f"{'all' if delivered else 'not all'} {expected} delivered in "
                 f"{len(discord.messages())} requests, {discord.count_status(429)} of them 429s")
            _say("the relay's own account (python -m notifier status):")
            print(status.command(metrics_file)[1], flush=True)
            _say("stopping the relay with SIGTERM")
            relay.send_signal(signal.SIGTERM)
            code = relay.wait(30)
            _say(f"relay exited with {code}. Run it for real with: python -m notifier "
                 "(settings in the README)")
            return 0 if delivered and code == 0 else 1
        finally:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
