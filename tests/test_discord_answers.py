"""Discord's answers read for what they mean, the relay as a real process against the
stand-in: a 2xx whose body breaks off is delivered once (and counted unconfirmed), the
deadline holds whatever the answer's framing, and a 429 with a bad retry_after but
valid rate-limit headers is a 429 of its webhook, not a ban of every webhook."""

import pytest

from notifier.standin import DiscordStandIn
from tests.harness import assert_balanced, contents
from tests.test_discord_limits import DEADLINE, run  # noqa: F401 (a fixture)


def delivered(relay, count, **more):
    snapshot = relay.wait_metrics(
        lambda m: m["delivered"] == count and m["pending"] == 0
        and all(m[key] == value for key, value in more.items()),
        timeout=DEADLINE, what=f"{count} delivered, {more}")
    assert_balanced(snapshot)
    return snapshot


def test_a_200_whose_connection_resets_mid_body_is_delivered_once_and_counted(run):
    with DiscordStandIn() as discord:
        discord.set_mode("1", "reset", times=1)
        relay, push = run(discord)
        push(1, {"content": "once"})
        snapshot = delivered(relay, 1, delivered_unconfirmed=1)
        assert (snapshot["errors"], snapshot["retries"], snapshot["requests"]) == (0, 0, 1)
        assert contents(discord, 1) == ["once"]
        assert "delivered unconfirmed webhook=1: HTTP 200, then the answer broke off" in relay.log()


@pytest.mark.parametrize("framing", ["length", "close"])
def test_a_200_trickled_past_the_deadline_is_delivered_once_and_frees_its_sender(run, framing):
    """One sender thread: the other webhook's message goes out once the deadline cut
    the trickle (a minute and more), not after it."""
    with DiscordStandIn() as discord:
        discord.set_mode("1", "trickle", interval=0.2, framing=framing, times=1)
        relay, push = run(discord, senders="1", request_deadline_sec="1")
        push(1, {"content": "slow"})
        assert discord.wait_for(1, DEADLINE)
        push(2, {"content": "next"})
        snapshot = delivered(relay, 2, delivered_unconfirmed=1)
        assert (snapshot["errors"], snapshot["requests"]) == (0, 2)
        assert (contents(discord, 1), contents(discord, 2)) == (["slow"], ["next"])
        assert "HTTP 200, then no whole answer within 1 s" in relay.log()


def test_bad_retry_after_values_hold_their_webhook_only_and_are_no_ban(run):
    with DiscordStandIn() as discord:
        discord.set_mode("1", "route_429", retry_after=None, times=1)
        relay, push = run(discord)
        push(1, {"content": "limited"})
        relay.wait_metrics(lambda m: m["rate_limited"] == 1, timeout=DEADLINE, what="a 429")
        for count, bad in enumerate((-1, float("nan")), 2):
            relay.wait_metrics(lambda m: m["pending"] == 0, timeout=DEADLINE, what="idle")
            discord.set_mode("1", "route_429", retry_after=bad, times=1)
            push(1, {"content": f"limited {bad}"})
            push(2, {"content": f"free {bad}"})
            relay.wait_metrics(lambda m: m["rate_limited"] == count, timeout=DEADLINE,
                               what=f"429 number {count}")
        snapshot = delivered(relay, 5, rate_limited=3)
        assert snapshot["rate_limited_by_scope"] == {"route": 3, "shared": 0, "global": 0,
                                                     "ban": 0}
        assert "limited" in contents(discord, 1) and len(contents(discord, 2)) == 2
        log = relay.log()
        assert log.count("scope=route wait_s=0.500 reason=HTTP 429 (route), retry after 0.5 s") == 3
        assert "banned" not in log
