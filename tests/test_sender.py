"""One sender's HTTP side against the real stand-in."""

from notifier.lanes import Job, Lane
from notifier.relay import Sender
from notifier.standin import DiscordStandIn


def test_an_answer_trickled_past_the_deadline_frees_the_sender_for_the_next_request():
    with DiscordStandIn() as discord:
        discord.set_mode("1", "trickle", interval=0.2, times=1)
        sender = Sender(deadline=1.0)
        try:
            job = Job(Lane(discord.webhook_url(1)), [], [{"content": "slow"}])
            outcome = sender.post(job)
            assert (outcome.kind, outcome.reason) == ("retry", "no whole answer within 1 s")
            again = sender.post(job)
            assert again.kind == "delivered" and again.channel == discord.channel_of(1)
        finally:
            sender.close()
