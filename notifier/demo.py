"""`python -m notifier demo`: the whole path, end to end, without a Discord webhook.

Starts a local Discord stand-in (rate-limited like Discord, 5 requests per 2 s) and the
real relay as a child process beside it, sends notifications through the producer
client, shows each request as the stand-in receives it and explains what the relay did
with them (split, combined), prints the relay's status, stops the relay with SIGTERM,
and ends with the next steps. Everything runs on loopback in a temporary SWIMMY_HOME.
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
REPORT = "Daily report\n" + "\n".join(f"strategy {i:02d}: +{i * 1.7:.1f} pips" for i in range(200))
NEXT_STEPS = """\
demo: next steps
  a real webhook:  in Discord, channel settings > Integrations > Webhooks > New Webhook >
                   Copy Webhook URL, then
                   export SWIMMY_DISCORD_WEBHOOK='https://discord.com/api/webhooks/<id>/<token>'
  run the relay:   scripts/run.sh --port 5562     (as a service: sudo scripts/install.sh)
  send:            scripts/run.sh send "Deploy finished"
  status:          scripts/run.sh status           (exit 0 OK, 1 WARNING, 2 CRITICAL)
  test a producer: scripts/run.sh standin --rate-limit 5/2   (prints the URL and setting)
  everything else: README.md"""


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _show(request: RecordedRequest) -> None:
    body = request.json if isinstance(request.json, dict) else {}
    content, embeds = body.get("content") or "", body.get("embeds") or []
    first = (content or (embeds[0].get("title") if embeds else "") or "").split("\n")[0][:40]
    print(f"discord: HTTP {request.status} <- {len(content):4} characters of text, "
          f"{len(embeds):2} embed(s), starting {first!r}", flush=True)


def _explain(requests: list[RecordedRequest], rate_limited: int) -> None:
    """What the requests shown mean, for someone who has never seen the relay."""
    bodies = [r.json for r in requests if isinstance(r.json, dict)]
    report = sum(1 for body in bodies if "strategy " in (body.get("content") or ""))
    alerts = sum(1 for body in bodies if any("of a burst" in (embed.get("title") or "")
                                             for embed in body.get("embeds") or []))
    _say(f"what happened: {BURST + 3} notifications became {len(requests)} requests, "
         f"{rate_limited} of them refused by the rate limit (429)")
    print(f"  - the report has {len(REPORT)} characters, over Discord's 2000: the relay split it "
          f"at line breaks\n    into {report} messages, in order (one notification, {report} "
          f"requests: its log says requests={report})\n"
          f"  - the {BURST} alerts came faster than 5 requests per 2 s allow: the relay combined "
          f"them,\n    up to 10 embeds a request, into {alerts} requests (notifications "
          "waiting for one webhook\n    share a request when Discord's limits allow; what a "
          "reader sees does not change)\n"
          "  - the producer never waited: it hands each notification over and moves on",
          flush=True)


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
        env["SWIMMY_NOTIFIER_LOG_LEVEL"] = "warning"  # problems only: the demo says the rest
        env.pop("SWIMMY_NOTIFIER_LOG_FILE", None)
        env.pop("SWIMMY_NOTIFIER_METRICS_FILE", None)
        _say(f"a local stand-in for Discord listens on {discord.url}; like Discord, it "
             "allows 5 requests per 2 s per webhook")
        relay = subprocess.Popen([python, "-m", "notifier"], env=env)
        try:
            if not _wait(metrics_file.exists, 30) or relay.poll() is not None:
                _say("the relay did not start; see its log above")
                return 1
            _say(f"the relay runs (pid {relay.pid}), receiving on tcp://127.0.0.1:{port}; "
                 "its log shows warnings only")
            webhook = discord.webhook_url(1, "demo-token")
            with NotifierClient(f"tcp://127.0.0.1:{port}", webhook=webhook,
                                allowed_hosts=(("127.0.0.1", discord.port),)) as client:
                client.notify("Relay demo: hello from the producer client")
                client.notify(title="Trade opened", description="USDJPY buy 0.10 lots at 151.234",
                              color=0x2ECC71)
                client.send({"content": REPORT})
                for i in range(BURST):
                    client.notify(title=f"Alert {i + 1} of a burst", color=0xE74C3C)
                _say(f"a producer sent a text, an embed, a 200-line report and a burst of "
                     f"{BURST} alerts: {client.stats()}; Discord receives, request by request:")
            expected = 3 + BURST
            delivered = _wait(lambda: _delivered(metrics_file) >= expected, 30)
            if not delivered:
                _say(f"not all {expected} were delivered within 30 s")
            _explain(discord.requests, discord.count_status(429))
            _say("the relay's own account (python -m notifier status):")
            print(status.command(metrics_file)[1], flush=True)
            _say("stopping the relay with SIGTERM")
            relay.send_signal(signal.SIGTERM)
            code = relay.wait(30)
            _say(f"relay exited with {code}" + (": everything delivered, nothing left to save"
                                                  if delivered and code == 0 else ""))
            print(NEXT_STEPS, flush=True)
            return 0 if delivered and code == 0 else 1
        finally:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
