"""Webhook URLs are checked as URLs (issue 18, item 5), as a user meets them: `check`
and the relay as real processes, the stand-in as Discord.

A token of ``..`` or ``.`` passed the path check; `requests` removes dot segments, so the
relay posted to ``/api/webhooks/?wait=true`` and ``/api/webhooks/456/?wait=true`` and
counted both delivered, and `check` showed a URL that was not the one posted."""

import json
import subprocess
import sys
from urllib.parse import parse_qsl, urlsplit

import pytest

from notifier import envelope
from notifier.standin import DiscordStandIn
from tests.harness import assert_balanced

LOCAL = "127.0.0.1:8099"
TOKEN = "s3cr3tXYZ"  # made up


def check(data: bytes, allowed: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "notifier", "check", "--allowed-hosts",
                           allowed], input=data, capture_output=True, timeout=60)


def notifier(url: str, content: str = "x") -> bytes:
    return json.dumps({"type": "NOTIFIER", "webhook": url,
                       "payload": {"content": content}}).encode()


BROKEN_PATHS = [
    "/api/webhooks/456/..",  # requests would post to /api/webhooks/
    "/api/webhooks/456/.",  # ... and to /api/webhooks/456/
    "/api/webhooks/456/../1/s3cr3tXYZ",
    "/api/webhooks/456/./s3cr3tXYZ",
    "/api/webhooks/456/s3cr3tXYZ/..",
    "/api/webhooks/456/%2E%2E",
    "/api/webhooks/456//s3cr3tXYZ",  # empty segments
    "/api/webhooks//456/s3cr3tXYZ",
    "/api/webhooks/456/s3cr3tXYZ/",
    "/api/webhooks/456/s3cr3tXYZ//",
    "/api/webhooks/456/s3cr.3tXYZ",  # outside Discord's token alphabet
    "/api/webhooks/456/s3cr3tXYZ%20",
    "/api/webhooks/4x6/s3cr3tXYZ",  # the id all digits
    "/api/webhooks/\u0664\u0665\u0666/s3cr3tXYZ",  # Arabic-Indic digits are not digits here
    "/api/webhooks/456/s3cr3tXYZ?thread_id=\u0663",
    "/api/webhooks/456/s3cr3tXYZ?thread_id=1x",
    "/api/webhooks/456/s3cr3tXYZ?thread_id=",
]


@pytest.mark.parametrize("path", BROKEN_PATHS)
def test_a_path_that_is_not_id_and_token_is_refused(path):
    with pytest.raises(envelope.EnvelopeError) as refused:
        envelope.check_webhook(f"http://{LOCAL}{path}", (("127.0.0.1", 8099),))
    assert "s3cr" not in refused.value.reason and "456" not in refused.value.reason


@pytest.mark.parametrize("url", [
    f"http://{LOCAL}/api/webhooks/456/tok",
    f"http://{LOCAL}/api/v10/webhooks/456/A-b_9?thread_id=77",
    f"HTTP://{LOCAL}/api/webhooks/1234567890123456789/{'x' * 68}",
])
def test_discord_s_own_shapes_still_pass(url):
    assert envelope.check_webhook(url, (("127.0.0.1", 8099),)) == url.replace("HTTP:", "http:")


def test_dot_tokens_are_refused_by_check_and_the_relay_and_nothing_is_posted(relays, pushers):
    """Every broken path, sent to a relay process beside one good message: each is
    rejected with its reason, never posted; `check` refuses each the same way."""
    with DiscordStandIn() as discord:
        allowed = f"127.0.0.1:{discord.port}"
        relay = relays(allowed=allowed)
        pusher = pushers(relay.endpoint)
        for path in BROKEN_PATHS:
            pusher.send(notifier(discord.url + path))
        pusher.send(notifier(discord.webhook_url(1, TOKEN), "the good one"))
        snapshot = relay.wait_metrics(
            lambda m: m["received"] == len(BROKEN_PATHS) + 1 and m["pending"] == 0,
            what="every envelope handled")
        assert (snapshot["rejected"], snapshot["delivered"]) == (len(BROKEN_PATHS), 1)
        assert [(r.path, r.query) for r in discord.requests] == [
            (f"/api/webhooks/1/{TOKEN}", {"wait": "true"})]
        assert_balanced(snapshot)
        log = relay.log()
        assert log.count("reason=webhook path must be /api/webhooks/<id>/<token>") >= 13
        assert relay.stop() == 0
        for path in BROKEN_PATHS[:2]:
            shown = check(notifier(discord.url + path), allowed)
            assert shown.returncode == 1 and shown.stdout == b""
            assert b"rejected: webhook path must be /api/webhooks/<id>/<token>" in shown.stderr
            assert b"not '.' or '..'" in shown.stderr


@pytest.mark.parametrize("url", [
    "{base}/api/webhooks/3/{token}",
    "HTTP://127.0.0.1:{port}/api/v10/webhooks/3/{token}?thread_id=55",
])
def test_check_prints_exactly_the_url_the_relay_posts(relays, pushers, url):
    """What `check` shows (token redacted) is the request the stand-in received:
    scheme and path as `requests` sends them, `wait=true` after any thread_id."""
    with DiscordStandIn() as discord:
        allowed = f"127.0.0.1:{discord.port}"
        url = url.format(base=discord.url, port=discord.port, token=TOKEN)
        shown = check(notifier(url), allowed)
        assert shown.returncode == 0, shown.stderr
        webhook = json.loads(shown.stdout)["webhook"]
        relay = relays(allowed=allowed)
        pushers(relay.endpoint).send(notifier(url))
        relay.wait_metrics(lambda m: m["delivered"] == 1, what="the message delivered")
        assert relay.stop() == 0
    [request] = discord.requests
    posted = urlsplit(webhook)
    assert f"{posted.scheme}://{posted.netloc}" == discord.url
    assert posted.path == request.path.replace(TOKEN, "<token>")
    assert parse_qsl(posted.query) == list(request.query.items())
    assert posted.query.endswith("wait=true") and TOKEN not in webhook
