"""The scheduler, driven by hand: one thread, a fake clock, a seeded rng, and Discord's
answers written as `Outcome`s.

`next_job` blocks until a lane may send, so a test never calls it unless `Rig.ready`
says a lane is ready at the fake clock's time; `Rig.ready_at` asks the scheduler when a
lane would be. Every step checks the accounting identity, so a counter that goes astray
fails the step that moved it.
"""

import json
import logging
import random
import threading

import pytest

from notifier import envelope
from notifier.discord import BAN_COOLDOWN_SEC, Outcome, RateLimit, RetryPolicy
from notifier.limits import Limits
from notifier.held import dedupe_key
from notifier.ledger import MAX_PRODUCERS, OTHER_PRODUCERS
from notifier.answers import MAX_AGE_SEC
from notifier.outbox import Outbox
from notifier.payload import LOSS_THREAD_NAME
from notifier.store import Contents, NoStore

EPOCH = 1_700_000_000.0  # wall clock = EPOCH + the fake monotonic clock
HOOKS = {n: f"https://discord.com/api/webhooks/{n}/token{n}" for n in (1, 2, 3)}
HOOKS.update({4: HOOKS[1] + "?thread_id=41", 5: HOOKS[1] + "?thread_id=42"})
"""4 and 5 post into threads through webhook 1: one Discord webhook, one bucket."""
DEADLINE = 30.0  # for the tests with threads: generous, the machine may be loaded
BALANCE = ("delivered", "drops", "rejected", "deduplicated", "failed", "pending")

RETRY = Outcome("retry", reason="HTTP 503")
UNAUTHORIZED = Outcome("dead", reason="HTTP 401: Invalid Webhook Token (code 50027)",
                       invalid=True)
FORBIDDEN = Outcome("dead", reason="HTTP 403: Missing Access (code 50001)", invalid=True)
GONE = Outcome("dead", reason="HTTP 404: Unknown Webhook (code 10015)", gone=True)
REFUSED = Outcome("refused", reason="HTTP 400: Invalid Form Body (code 50035): "
                  "content: Must be 2000 or fewer in length.")


def ok(remaining=None, reset_after=None, bucket=None, limit=5):
    """A 200 whose X-RateLimit-* headers said `remaining` and `reset_after`."""
    return Outcome("delivered", rate=RateLimit(bucket, limit, remaining, reset_after))


def limited(scope, wait, remaining=None):
    return Outcome("rate_limited", reason=f"HTTP 429 ({scope})", wait=wait, scope=scope,
                   invalid=scope != "shared", rate=RateLimit(None, 5, remaining, None))


class Rig:
    """An Outbox on a fake clock, fed real envelopes the way the relay's receiver does."""

    def __init__(self, queue_max=100, dedupe_window=0.0, retry=RetryPolicy(), seed=7,
                 global_rate=1000, max_age=MAX_AGE_SEC, dead_letters=None):
        self.now = 1000.0
        wall = lambda: EPOCH + self.now  # noqa: E731
        limits = Limits(global_rate, retry, rng=random.Random(seed), wall=wall)
        self.outbox = Outbox(queue_max, dedupe_window, limits=limits, max_age=max_age,
                             monotonic=lambda: self.now, wall=wall, dead_letters=dead_letters)

    def advance(self, seconds):
        self.now += seconds

    def accept(self, hook, *payloads):
        """Envelopes off the socket, not parsed yet."""
        self.outbox.accept([json.dumps({"type": "NOTIFIER", "webhook": HOOKS[hook],
                                        "payload": p if isinstance(p, dict) else {"content": p}}
                                       ).encode() for p in payloads])
        self.check()

    def parse(self):
        """Parse everything unparsed, with a dedupe key only when deduplication is on."""
        results = []
        for data, _ in self.outbox.take_unparsed(10_000):
            message = envelope.parse(data)
            key = dedupe_key(message) if self.outbox.dedupe_window > 0 else None
            results.append((message, key))
        self.outbox.add_parsed(results)
        self.check()

    def push(self, hook, *payloads):
        self.accept(hook, *payloads)
        self.parse()

    def ready_at(self, hook):
        """When the lane of `hook` may send next; None when it has nothing to send."""
        lane = self.outbox._lanes.get(envelope.webhook_key(HOOKS[hook]))
        return None if lane is None else self.outbox._lanes.ready_at(lane, self.now)

    def ready(self):
        """The webhooks that may send right now, each named by the URL its next request
        goes to (threads of one webhook are one webhook, with one next request)."""
        lanes = self.outbox._lanes
        urls = [lane.job.webhook if lane.job else lane.url if lane.notice_due
                else lane.waiting[0].message.webhook for lane in lanes
                if (at := lanes.ready_at(lane, self.now)) is not None and at <= self.now]
        return sorted(n for n, url in HOOKS.items() if url in urls)

    def take(self, hook=None):
        """The next job (of `hook`'s lane, if given); fails instead of blocking."""
        ready = self.ready()
        assert ready and (hook is None or hook in ready), f"ready: {ready}, wanted {hook}"
        job = self.outbox.next_job()
        assert hook is None or job.webhook == HOOKS[hook], job.webhook
        return job

    def finish(self, job, outcome):
        self.outbox.finish(job, outcome)
        self.check()

    def deliver(self, hook=None):
        """Take one job and have Discord accept it; returns the payload posted."""
        job = self.take(hook)
        payload = job.payload
        self.finish(job, ok())
        return payload

    def snapshot(self):
        return self.outbox.snapshot()

    def lane(self, hook):
        return next(line for line in self.snapshot()["webhooks"] if line["id"] == str(hook))

    def check(self):
        snapshot = self.snapshot()
        assert snapshot["received"] == sum(snapshot[key] for key in BALANCE), snapshot


def counts(rig, *keys):
    snapshot = rig.snapshot()
    return tuple(snapshot[key] for key in keys)


def log_lines(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# Sending and batching


def test_a_lone_message_goes_out_exactly_as_sent():
    rig = Rig()
    payload = {"content": "hello", "username": "swimmy", "embeds": [{"title": "t"}]}
    rig.push(1, payload)
    assert rig.deliver(1) == payload
    assert counts(rig, "delivered", "pending", "requests") == (1, 0, 1)
    assert rig.lane(1)["last_success_at"] == EPOCH + rig.now
    assert rig.ready() == []


def test_a_backlog_is_combined_in_order_into_one_request():
    rig = Rig()
    rig.push(1, "a", "b", "c")
    job = rig.take(1)
    assert job.payload == {"content": "a\nb\nc"} and len(job.items) == 3
    rig.finish(job, ok())
    assert counts(rig, "delivered", "requests") == (3, 1)


def test_a_busy_lane_holds_only_itself():
    """One request at a time per webhook keeps its order; the others go meanwhile."""
    rig = Rig()
    rig.push(1, "a")
    first = rig.take(1)
    rig.push(1, "b")
    rig.push(2, "x")
    assert rig.ready() == [2]
    rig.finish(rig.take(2), ok())
    rig.finish(first, ok())
    assert rig.deliver(1) == {"content": "b"}


def test_content_over_the_limit_goes_as_several_requests_in_order():
    rig = Rig()
    text = " ".join(f"word{i:04d}" for i in range(600))  # 5399 characters
    rig.push(1, text)
    job = rig.take(1)
    parts = []
    while True:
        parts.append(job.payload["content"])
        rig.finish(job, ok())
        if rig.ready() != [1]:
            break
        assert rig.take(1) is job  # the same message, its next part
    assert len(parts) == 3 and all(len(part) <= 2000 for part in parts)
    assert " ".join(parts).split() == text.split()
    assert counts(rig, "delivered", "requests") == (1, 3)


# Rate limits followed before they bite


@pytest.mark.parametrize("reset_after", [1.5, 0.25])
def test_remaining_zero_waits_for_the_reset(reset_after):
    rig = Rig()
    rig.push(1, "a")
    rig.finish(rig.take(1), ok(remaining=0, reset_after=reset_after))
    rig.push(1, "b")
    reset_at = rig.ready_at(1)
    assert reset_at == rig.now + reset_after
    rig.now = reset_at - 0.001
    assert rig.ready() == []
    rig.now = reset_at
    assert rig.deliver(1) == {"content": "b"}


def test_remaining_above_zero_sends_at_once():
    rig = Rig()
    rig.push(1, "a")
    rig.finish(rig.take(1), ok(remaining=1, reset_after=2.0))
    rig.push(1, "b")
    assert rig.ready() == [1]


def test_webhooks_reporting_the_same_bucket_hash_are_counted_apart():
    """Discord counts webhook executes per webhook, whatever hash it reports."""
    rig = Rig()
    rig.push(1, "a")
    rig.push(2, "a")
    rig.finish(rig.take(1), ok(remaining=0, reset_after=2.0, bucket="same"))
    rig.finish(rig.take(2), ok(remaining=1, reset_after=2.0, bucket="same"))
    rig.push(1, "b")
    rig.push(2, "b")
    assert rig.ready() == [2] and rig.ready_at(1) == rig.now + 2.0


def test_threads_of_one_webhook_are_one_webhook_one_request_at_a_time():
    """Found against Discord's imitation: thread URLs of one webhook were sent as if
    each were a webhook of its own. They share its lane (one request in flight, in the
    order received) and its bucket, learned from the first answer, whichever thread."""
    rig = Rig()
    rig.push(4, "a")
    rig.push(5, "a")
    rig.push(1, "a")
    job = rig.take(4)
    assert rig.ready() == []  # the webhook's one request is in flight
    rig.finish(job, ok(remaining=0, reset_after=2.0, bucket="same"))
    assert rig.ready() == [] and rig.ready_at(5) == rig.now + 2.0
    rig.advance(2.0)
    assert rig.deliver(5) == {"content": "a"}
    assert rig.take(1).webhook == HOOKS[1]
    assert [line["id"] for line in rig.snapshot()["webhooks"]] == ["1"]


def test_every_spelling_of_a_webhook_is_one_lane_and_each_posts_where_it_asked():
    rig = Rig()
    spellings = [HOOKS[1], HOOKS[1].replace("/api/", "/api/v10/"),
                 HOOKS[1].replace("discord.com", "canary.discord.com"),
                 HOOKS[1].replace("discord.com", "ptb.discordapp.com"), HOOKS[4]]
    for i, url in enumerate(spellings):
        rig.outbox.accept([json.dumps({"type": "NOTIFIER", "webhook": url,
                                       "payload": {"content": f"m{i}"}}).encode()])
    rig.parse()
    posted = []
    for _ in spellings:
        job = rig.outbox.next_job()
        posted.append((job.webhook, job.payload["content"]))
        rig.finish(job, ok())
    assert posted == [(url, f"m{i}") for i, url in enumerate(spellings)]  # none combined


# 429s by kind


def test_a_route_429_holds_that_webhook_for_retry_after_then_resends_the_same_request():
    rig = Rig()
    rig.push(1, "a")
    rig.push(2, "x")
    job = rig.take(1)
    rig.finish(job, limited("route", 2.5, remaining=0))
    assert rig.ready() == [2] and rig.ready_at(1) == rig.now + 2.5
    rig.deliver(2)
    rig.advance(2.5)
    assert rig.take(1) is job and job.payload == {"content": "a"}
    rig.finish(job, ok())
    assert counts(rig, "rate_limited", "delivered", "invalid_requests_10m") == (1, 2, 1)


def test_a_global_429_pauses_every_webhook():
    rig = Rig()
    rig.push(1, "a")
    rig.push(2, "x")
    rig.finish(rig.take(1), limited("global", 1.5))
    assert rig.ready() == [] and rig.ready_at(2) == rig.now + 1.5
    assert rig.lane(2)["state"] == "waiting"
    rig.advance(1.5)
    assert sorted(rig.ready()) == [1, 2]


def test_a_shared_429_holds_its_webhook_even_with_requests_left_and_is_not_invalid():
    rig = Rig()
    rig.push(1, "a")
    rig.push(2, "x")
    rig.finish(rig.take(1), limited("shared", 40.0, remaining=4))
    assert rig.ready() == [2] and rig.ready_at(1) == rig.now + 40.0
    assert counts(rig, "rate_limited", "invalid_requests_10m") == (1, 0)
    rig.advance(40.0)
    assert 1 in rig.ready()


def test_a_ban_page_pauses_everyone_for_the_long_cooldown():
    rig = Rig()
    rig.push(1, "a")
    rig.push(2, "x")
    ban = Outcome("rate_limited", reason="HTTP 429 without a JSON body (blocked?)",
                  wait=BAN_COOLDOWN_SEC, scope="ban", invalid=True)
    rig.finish(rig.take(1), ban)
    assert rig.ready() == [] and rig.ready_at(2) == rig.now + BAN_COOLDOWN_SEC
    assert counts(rig, "invalid_requests_10m", "pending") == (1, 2)


def test_a_thousand_invalid_requests_in_ten_minutes_pause_all_sending():
    """Discord bans at 10,000; the relay stops at a tenth of that until they age out."""
    rig = Rig()
    rig.push(1, "a")
    job = rig.take(1)
    first = rig.now
    for _ in range(999):
        rig.finish(job, limited("route", 0.0))
        rig.advance(0.1)
        assert rig.take(1) is job
    rig.finish(job, limited("route", 0.0))
    rig.push(2, "x")
    assert counts(rig, "invalid_requests_10m") == (1000,)
    assert rig.ready() == [] and rig.ready_at(2) == first + 600
    rig.advance(first + 600 - rig.now)
    assert sorted(rig.ready()) == [1, 2]


# Dead webhooks


@pytest.mark.parametrize("dead", [UNAUTHORIZED, FORBIDDEN], ids=["401", "403"])
def test_401_403_fail_what_waits_and_newcomers_without_a_request_then_probe(caplog, dead):
    """The token may be restored, so the webhook is tried again after ten minutes."""
    caplog.set_level(logging.INFO, "notifier.outbox")
    rig = Rig()
    rig.push(1, "a")
    job = rig.take(1)
    rig.push(1, "b", "c")
    rig.push(2, "x")
    rig.finish(job, dead)
    assert counts(rig, "failed", "pending", "errors", "invalid_requests_10m") == (3, 1, 1, 1)
    assert rig.lane(1)["state"] == "quarantined" and rig.lane(1)["failed"] == 3
    for i in range(20):
        rig.push(1, f"late{i}")
    assert rig.ready() == [2]
    assert counts(rig, "failed", "requests") == (23, 1)
    rig.deliver(2)
    rig.advance(599.9)
    rig.push(1, "still dead")
    assert counts(rig, "failed") == (24,)
    rig.advance(0.1)
    rig.push(1, "probe")
    assert rig.deliver(1) == {"content": "probe"}
    notice = rig.deliver(1)["content"]
    assert "24 failed" in notice and "dropped" not in notice
    assert counts(rig, "delivered", "failed", "notices", "pending") == (2, 24, 1, 0)
    assert len(log_lines(caplog, "quarantined")) == 1
    assert dead.reason in log_lines(caplog, "quarantined")[0]
    assert len(log_lines(caplog, "is back after quarantine")) == 1


def test_404_is_quarantined_for_an_hour_and_logged_once_per_period(caplog):
    """Unknown Webhook: it was deleted, so it is probed only rarely."""
    caplog.set_level(logging.INFO, "notifier.outbox")
    rig = Rig()
    rig.push(1, *[f"m{i}" for i in range(5)])
    rig.finish(rig.take(1), GONE)
    assert counts(rig, "failed", "pending", "invalid_requests_10m") == (5, 0, 0)
    rig.advance(600)
    rig.push(1, "an hour is not over")
    assert rig.ready() == [] and counts(rig, "failed") == (6,)
    rig.advance(3000)
    rig.push(1, "probe")
    rig.finish(rig.take(1), GONE)
    assert counts(rig, "failed", "requests") == (7, 2)
    assert len(log_lines(caplog, "quarantined")) == 2
    assert rig.lane(1)["state"] == "quarantined"


# Payloads Discord refuses


def test_a_refused_batch_is_split_and_only_the_bad_message_fails(caplog):
    rig = Rig()
    rig.push(1, "a", "b", "c")
    batch = rig.take(1)
    assert len(batch.items) == 3
    rig.finish(batch, REFUSED)
    assert counts(rig, "failed", "pending") == (0, 3)
    assert rig.deliver(1) == {"content": "a"}
    bad = rig.take(1)
    assert bad.payload == {"content": "b"}
    rig.finish(bad, REFUSED)
    assert counts(rig, "failed", "pending") == (1, 1)
    assert rig.deliver(1) == {"content": "c"}
    assert "1 failed" in rig.deliver(1)["content"]  # the loss notice
    assert counts(rig, "delivered", "failed", "pending", "requests") == (2, 1, 0, 5)
    assert rig.ready() == []
    assert any("failed webhook=1 messages=1" in line and "code 50035" in line
               for line in log_lines(caplog, "failed"))


def test_a_refused_single_message_is_never_sent_again():
    rig = Rig()
    rig.push(1, "a")
    rig.finish(rig.take(1), REFUSED)
    assert counts(rig, "failed", "pending", "retries") == (1, 0, 0)
    assert rig.ready() == []


# Retries


def test_errors_of_its_own_are_retried_with_the_policys_backoff_then_counted_failed(caplog):
    """Webhook 1 keeps failing while webhook 2 delivers: the errors are its own."""
    policy = RetryPolicy(base=0.5, cap=60.0, max_attempts=3)
    rig = Rig(retry=policy, seed=42)
    twin = random.Random(42)
    rig.push(1, "a", "b")
    job = rig.take(1)
    for attempt in (1, 2):
        rig.push(2, f"other {attempt}")
        rig.deliver(2)
        rig.finish(job, RETRY)
        delay = policy.backoff(attempt, twin)
        assert rig.ready_at(1) == rig.now + delay
        rig.advance(delay)
        assert rig.take(1) is job
    rig.push(2, "other 3")
    rig.deliver(2)
    rig.finish(job, RETRY)
    assert counts(rig, "failed", "retries", "errors", "pending", "requests") == (2, 2, 3, 0, 6)
    assert rig.lane(1)["failed"] == 2
    assert log_lines(caplog, "failed webhook=1 messages=2 reason=HTTP 503 after 3 attempts")


def test_an_outage_is_waited_out_with_probes_a_few_seconds_apart():
    rig = Rig(retry=RetryPolicy(max_attempts=3))
    rig.push(1, "a")
    rig.push(2, "b")
    for _ in range(50):  # every webhook fails: Discord is down, no error is anyone's own
        for hook in rig.ready():
            rig.finish(rig.take(hook), RETRY)
        waits = [rig.ready_at(hook) - rig.now for hook in (1, 2)]
        assert all(0 < wait <= 5.0 for wait in waits)
        rig.advance(min(waits))
    assert counts(rig, "failed", "pending") == (0, 2)


def test_a_success_on_any_webhook_ends_the_backoff_of_the_others():
    rig = Rig()
    rig.push(1, "a")
    rig.push(2, "b")
    for _ in range(6):
        for hook in rig.ready():
            rig.finish(rig.take(hook), RETRY)
        rig.advance(min(rig.ready_at(hook) for hook in (1, 2)) - rig.now)
    first = rig.ready()[0]
    rig.finish(rig.take(first), ok())  # Discord is back
    assert rig.ready() == [3 - first]


def test_a_message_failing_past_the_maximum_age_is_given_up_with_its_status():
    letters = []
    rig = Rig(max_age=60.0, dead_letters=type("Letters", (), {"append": letters.extend})())
    rig.push(1, "a")
    rig.finish(rig.take(1), RETRY)
    rig.advance(61.0)
    rig.finish(rig.take(1), Outcome("retry", reason="HTTP 502", status=502))
    assert counts(rig, "failed", "pending") == (1, 0)
    assert [(letter.reason, letter.status) for letter in letters] == [
        ("HTTP 502, still failing 61 s after it was received", 502)]


def test_attempts_count_per_request_of_a_split_message():
    """Each part may use the policy's attempts: a 502 on every part fails none."""
    rig = Rig(retry=RetryPolicy(base=0.1, cap=0.1, max_attempts=2))
    rig.push(1, "x" * 5000)  # three requests
    for part in range(3):
        job = rig.take(1)
        rig.push(2, f"other {part}")
        rig.deliver(2)
        rig.finish(job, RETRY)  # its own: webhook 2 delivered meanwhile
        rig.advance(0.1)
        rig.finish(rig.take(1), ok())
    assert counts(rig, "delivered", "failed") == (4, 0)


def test_a_success_after_errors_clears_the_backoff():
    rig = Rig(retry=RetryPolicy(base=10.0, cap=10.0))
    rig.push(1, "a")
    job = rig.take(1)
    rig.finish(job, RETRY)
    rig.advance(10.0)
    rig.finish(rig.take(1), ok())
    rig.push(1, "b")
    assert rig.ready() == [1]


def test_a_webhook_is_failing_from_its_first_error_until_a_success():
    rig = Rig(retry=RetryPolicy(base=10.0, cap=10.0))
    rig.push(1, "a")
    assert rig.lane(1)["failing_since"] is None
    rig.finish(rig.take(1), RETRY)
    rig.advance(10.0)
    rig.finish(rig.take(1), RETRY)
    assert rig.lane(1)["failing_since"] == EPOCH + 1000.0  # the first error, not the last
    rig.advance(10.0)
    rig.finish(rig.take(1), ok())
    assert rig.lane(1)["failing_since"] is None


def test_the_time_of_the_last_rejection_is_kept():
    rig = Rig()
    assert rig.snapshot()["last_rejected_at"] is None
    rig.outbox.accept([b"((type . "])
    assert len(rig.outbox.take_unparsed(1)) == 1
    rig.outbox.add_parsed([("bad S-expression", None)])
    assert rig.snapshot()["last_rejected_at"] == EPOCH + 1000.0


# Drops and loss notices


def test_a_full_queue_drops_the_oldest_message_whatever_its_webhook():
    rig = Rig(queue_max=3)
    rig.push(1, "a")
    rig.push(2, "b")
    rig.push(1, "c")
    rig.push(2, "d")
    rig.push(1, "e")
    assert counts(rig, "drops", "pending") == (2, 3)
    assert (rig.lane(1)["dropped"], rig.lane(2)["dropped"]) == (1, 1)
    assert rig.deliver(1) == {"content": "c\ne"}
    assert rig.deliver(2) == {"content": "d"}


def test_a_message_being_sent_is_never_dropped():
    rig = Rig(queue_max=1)
    rig.push(1, "a")
    job = rig.take(1)
    rig.push(1, "b")  # nothing else to drop: the newcomer goes
    assert counts(rig, "drops", "pending") == (1, 1)
    rig.finish(job, ok())
    assert counts(rig, "delivered", "pending") == (1, 0)


def test_after_drops_the_next_success_is_followed_by_one_loss_notice():
    rig = Rig(queue_max=2)
    rig.push(1, "a")
    job = rig.take(1)
    for content in ("b", "c", "d"):
        rig.push(1, content)
    assert counts(rig, "drops", "pending") == (2, 2)
    rig.finish(job, ok())
    notice = rig.take(1)
    assert "2 dropped (relay queue full)" in notice.payload["content"]
    assert notice.payload["allowed_mentions"] == {"parse": []}
    rig.finish(notice, ok())
    assert rig.deliver(1) == {"content": "d"}
    assert rig.ready() == []
    assert counts(rig, "delivered", "notices", "drops") == (2, 1, 2)
    line = rig.lane(1)
    assert (line["dropped"], line["delivered"], line["last_success_at"]) == (2, 2, EPOCH + rig.now)


def test_drops_before_parsing_are_still_reported_to_their_webhook():
    """The receiver takes a burst off the socket before parsing it, so a queue that
    fills during a burst drops envelopes whose webhook is not known yet."""
    rig = Rig(queue_max=2)
    rig.accept(1, "a", "b", "c", "d", "e")
    rig.parse()
    assert counts(rig, "drops", "pending") == (3, 2)
    assert rig.lane(1)["dropped"] == 3
    rig.deliver(1)
    assert "3 dropped" in rig.deliver(1)["content"]


# Deduplication


def test_an_identical_payload_to_the_same_webhook_is_suppressed_within_the_window():
    rig = Rig(dedupe_window=180.0)
    rig.push(1, {"content": "a", "username": "u"})
    rig.advance(179.0)
    rig.push(1, {"username": "u", "content": "a"})  # key order does not matter
    rig.push(2, {"content": "a", "username": "u"})  # another webhook
    rig.push(1, {"content": "a", "username": "v"})  # another payload
    assert counts(rig, "deduplicated", "pending") == (1, 3)
    rig.advance(1.5)
    rig.push(1, {"content": "a", "username": "u"})
    assert counts(rig, "deduplicated", "pending") == (1, 4)


# Bounded memory


def test_idle_lanes_beyond_the_limit_are_forgotten_least_recent_first(monkeypatch):
    monkeypatch.setattr("notifier.lanes.MAX_LANES", 2)
    rig = Rig()
    rig.push(1, "a")
    rig.deliver(1)
    rig.push(2, "b")  # waiting: not idle, so never forgotten
    rig.push(3, "c")
    assert [line["id"] for line in rig.snapshot()["webhooks"]] == ["2", "3"]
    assert rig.deliver() == {"content": "b"} and rig.deliver() == {"content": "c"}


def test_a_message_failed_for_a_quarantined_webhook_does_not_unremember_a_delivered_twin():
    rig = Rig(dedupe_window=7200.0)
    rig.push(1, "same")
    rig.deliver(1)
    rig.push(1, "other")
    rig.finish(rig.take(1), GONE)
    rig.push(1, "same")  # failed at once: the webhook is quarantined
    rig.advance(3600.0)
    rig.push(1, "same")  # the delivered one is still remembered
    assert counts(rig, "delivered", "failed", "deduplicated") == (1, 2, 1)


def test_a_refused_loss_notice_is_logged_once_with_its_counts_and_never_posted_again(caplog):
    rig = Rig(queue_max=1)
    rig.push(1, "a")
    rig.push(1, "b")  # "a" dropped
    rig.deliver(1)
    notice = rig.take(1)
    assert notice.notice == (1, 0)
    rig.finish(notice, REFUSED)
    for i in range(3):
        rig.push(1, f"later {i}")
        assert "Notifications lost" not in rig.deliver(1)["content"]
    assert counts(rig, "notices", "requests") == (0, 5)
    assert len(log_lines(caplog, "loss notice refused webhook=1 dropped=1 failed=0")) == 1


def test_log_lines_are_written_after_the_lock_is_released():
    """A log handler that blocks (a full disk, a stuck pipe) holds up no other thread."""
    rig = Rig()
    entered, release = threading.Event(), threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record):
            entered.set()
            release.wait(DEADLINE)

    handler = Stuck(logging.ERROR)
    logging.getLogger("notifier.outbox").addHandler(handler)
    try:
        rig.push(1, "a")
        job = rig.take(1)
        finishing = threading.Thread(target=rig.finish, args=(job, REFUSED))
        finishing.start()
        assert entered.wait(DEADLINE)
        accepting = threading.Thread(target=rig.push, args=(2, "b"))
        accepting.start()
        accepting.join(DEADLINE)
        assert not accepting.is_alive()  # accepted and parsed while the log line waits
    finally:
        release.set()
        logging.getLogger("notifier.outbox").removeHandler(handler)
    finishing.join(DEADLINE)


def test_drops_and_rejections_are_charged_to_their_producers():
    """Parsed, unparsed and newly arrived messages dropped, and envelopes rejected for
    size or syntax, each count against the producer that sent it; the sums are the
    totals."""
    outbox = Outbox(3, 0.0)

    def accept(producer, *texts):
        outbox.accept([t if isinstance(t, bytes) else json.dumps(
            {"type": "NOTIFIER", "webhook": HOOKS[1], "payload": {"content": t}}).encode()
            for t in texts], producers=[producer] * len(texts))

    def parse(lent):
        outbox.add_parsed([(envelope.parse(data) if data != b"(" else "bad", None)
                           for data, _ in lent])
    accept("a", "a1", "a2")
    parse(outbox.take_unparsed(10))  # a1 and a2 wait in their lane
    accept("b", b"(", b" " * 70_000)  # rejected: too large at once, bad syntax when parsed
    parse(outbox.take_unparsed(10))
    accept("c", "c1", "c2")  # drops a1, the oldest
    accept("c", "c3")  # drops a2
    accept("b", "b1")  # drops c1, the oldest not parsed yet
    lent = outbox.take_unparsed(10)  # c2, c3, b1: lent for parsing, so not droppable
    accept("c", "c4")  # dropped itself
    parse(lent)
    snapshot = outbox.snapshot()
    producers = {p["name"]: (p["received"], p["rejected"], p["drops"])
                 for p in snapshot["producers"]}
    assert producers == {"a": (2, 0, 2), "b": (3, 2, 0), "c": (4, 0, 2)}
    for index, key in enumerate(("received", "rejected", "drops")):
        assert sum(counts[index] for counts in producers.values()) == snapshot[key]


def test_producers_beyond_the_bound_are_counted_together():
    outbox = Outbox(10, 0.0)
    names = [f"p{i}" for i in range(MAX_PRODUCERS + 5)]
    outbox.refuse(names)
    producers = {p["name"]: p["received"] for p in outbox.snapshot()["producers"]}
    assert len(producers) == MAX_PRODUCERS + 1 and producers[OTHER_PRODUCERS] == 5


class RecordingStore(NoStore):
    """Keeps the loss-notice states the outbox writes, as the store would."""

    def __init__(self):
        self.notices = {}

    def notice(self, key, dropped, failed, since):
        self.notices[key] = (dropped, failed, since)


def test_losses_kept_per_url_by_an_earlier_version_are_one_notice_per_webhook():
    """Before webhooks had one key, losses (and forum facts) were kept per URL: a
    thread, an API version. Restored, they are one notice for the webhook, kept by its
    key from then on, and the forum fact is the webhook's."""
    store, now = RecordingStore(), 1000.0
    outbox = Outbox(100, 0.0, monotonic=lambda: now, wall=lambda: EPOCH + now, store=store)
    versioned = HOOKS[1].replace("/api/", "/api/v10/")
    outbox.restore(Contents([], [], {HOOKS[4]: (2, 0, EPOCH + 5), versioned: (1, 1, EPOCH + 3),
                                     "3": (4, 0, None)}, {HOOKS[5]: {"forum": True}}))
    lane = outbox._lanes.get(HOOKS[1])
    assert [lane.key for lane in outbox._lanes] == [HOOKS[1]]
    assert lane.notice_due and lane.forum and lane.account.notice == (3, 1, EPOCH + 3)
    assert store.notices == {HOOKS[4]: (0, 0, None), versioned: (0, 0, None),
                             HOOKS[1]: (3, 1, EPOCH + 3)}
    assert outbox.holdings().facts == {HOOKS[1]: {"forum": True}}
    job = outbox.next_job()  # a forum's notice makes a thread of its own
    assert job.webhook == HOOKS[1] and job.payload["thread_name"] == LOSS_THREAD_NAME
    assert "3 dropped" in job.payload["content"] and "1 failed" in job.payload["content"]


def test_envelopes_being_parsed_still_count_as_unparsed():
    """The snapshot said 0 unparsed while a chunk was being parsed, so a reader waiting
    for `unparsed == 0` saw webhooks whose messages were not in any lane yet."""
    outbox = Outbox(10, 0.0)
    outbox.accept([b"a", b"b", b"c"])
    assert [data for data, _ in outbox.take_unparsed(2)] == [b"a", b"b"]
    assert outbox.snapshot()["unparsed"] == 3
    outbox.add_parsed([("junk", None), ("junk", None)])
    assert outbox.snapshot()["unparsed"] == 1
