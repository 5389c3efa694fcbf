"""One sender's HTTP side against the real stand-in: the deadline holds whatever the
answer's framing, and a 2xx whose body breaks off is delivered, never posted again."""

import time

import pytest

from notifier.lanes import Job, Lane
from notifier.sender import Sender
from notifier.standin import DiscordStandIn

TRICKLE = 0.2  # seconds per byte: a message object of ~400 bytes takes over a minute


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


@pytest.fixture
def sender():
    sender = Sender(deadline=1.0)
    yield sender
    sender.close()


def job(discord, hook=1):
    url = discord.webhook_url(hook)
    return Job(Lane(url), [], [{"content": "slow"}], url, None)


@pytest.mark.parametrize("framing", ["length", "chunked", "close", "none"])
def test_a_2xx_trickled_past_the_deadline_is_delivered_unconfirmed_and_cut_off(
        discord, sender, framing):
    """With Connection: close the watchdog had no socket to shut (http.client hands it
    to the response), and a sender was held for the whole trickle."""
    discord.set_mode("1", "trickle", interval=TRICKLE, framing=framing, times=1)
    started = time.monotonic()
    outcome = sender.post(job(discord))
    held = time.monotonic() - started
    assert (outcome.kind, outcome.unconfirmed) == ("delivered", True)
    assert outcome.reason == "HTTP 200, then no whole answer within 1 s"
    assert held < 20 * TRICKLE  # the whole answer would take 80 s and more
    assert len(discord.messages("1")) == 1
    again = sender.post(job(discord))
    assert again.kind == "delivered" and not again.unconfirmed
    assert again.channel == discord.channel_of(1)


def test_a_2xx_whose_connection_is_reset_mid_body_is_delivered_unconfirmed(discord, sender):
    discord.set_mode("1", "reset", times=1)
    outcome = sender.post(job(discord))
    assert (outcome.kind, outcome.unconfirmed) == ("delivered", True)
    assert outcome.reason.startswith("HTTP 200, then the answer broke off (")
    assert sender.post(job(discord)).channel == discord.channel_of(1)
    assert len(discord.messages("1")) == 2


def test_no_status_line_within_the_deadline_is_an_error_to_retry(discord, sender):
    discord.set_mode("1", "hang", times=1)
    try:
        outcome = sender.post(job(discord))
    finally:
        discord.release_hangs()
    assert (outcome.kind, outcome.reason) == ("retry", "no whole answer within 1 s")
    assert sender.post(job(discord)).kind == "delivered"
