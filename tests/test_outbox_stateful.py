"""The Outbox under random sequences of what the relay's threads do (issue 8): accept
envelopes (valid, invalid, oversized), parse them as the receiver does, take jobs as
senders do and finish them with any answer Discord gives, under drop pressure, and close.
Webhooks are named by several URLs each (API versions, hosts, threads),
and some messages are forum posts (``thread_name``).

After every step the accounting holds: received = delivered + drops + rejected +
deduplicated + failed + lost + pending (lost never moves before a stop); nothing is held
twice; every envelope received is held or went to exactly one final counter, the one
its step allows (a drop on accept, a rejection for a bad envelope, a delivery for a
200...). Per webhook (its key, whatever URL named it): one request in flight at a time,
one lane and one line in the snapshot, messages delivered in the order received, each
posted to the URL it asked for, and a forum post never combined. At the end, if Discord
then answers 200 to everything, everything still held is delivered: nothing is stuck.

`next_job` blocks until some lane may send, and the fake clock never moves while it
waits, so it is only called when the scheduler's own `ready_at` says a lane is ready
now (as in test_outbox.py); the clock is advanced by rules of its own.
"""

import json
import random
import re
from collections import Counter

import requests
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from requests.structures import CaseInsensitiveDict

from notifier import envelope, payload
from notifier.discord import RetryPolicy, classify, network_error
from notifier.envelope import MAX_ENVELOPE_BYTES, webhook_key
from notifier.limits import Limits
from notifier.held import dedupe_key
from notifier.outbox import Outbox
from notifier.standin import validate

EPOCH = 1_700_000_000.0  # wall clock = EPOCH + the fake monotonic clock
_ONE, _TWO, _THREE = (f"https://discord.com/api/webhooks/{n}/tok{n}" for n in (1, 2, 3))
HOOKS = [_ONE, _TWO, _THREE, _ONE.replace("/api/", "/api/v10/"),
         _ONE.replace("discord.com", "ptb.discordapp.com"), _ONE + "?thread_id=11",
         _ONE.replace("/api/", "/api/v9/") + "?thread_id=12", _TWO + "?thread_id=21"]
"""Three webhooks, the first two also named by other spellings and threads."""
FINAL = ("delivered", "drops", "rejected", "deduplicated", "failed", "lost")
KINDS = ("valid", "valid", "valid", "long", "forum", "invalid", "oversized")
BATCHES = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, len(HOOKS) - 1),
                             st.booleans()), min_size=1, max_size=6)
"""Envelopes as (kind, webhook URL, whether it resends the previous message)."""


def make_envelope(kind, hook, marker):
    """A raw envelope whose payload content starts with `marker` (its identity here):
    valid, long (fit() makes several requests of it), a forum post (``thread_name``),
    invalid (an unknown action) or over the size limit."""
    content = marker + (" filler" * 400 if kind == "long" else "")
    fields = {"type": "NOTIFIER", "webhook": HOOKS[hook], "payload": {"content": content}}
    if kind == "forum":
        fields["payload"]["thread_name"] = "Price alert"
    if kind == "invalid":
        fields["action"] = "FLY"
    if kind == "oversized":
        fields["padding"] = "x" * MAX_ENVELOPE_BYTES
    return json.dumps(fields).encode()


def marker(data):
    return re.search(rb'"content": "(m\d+)', data)[1].decode()


def held_marker(item):
    return item.message.payload["content"].split(" ")[0]


def posted_markers(job):
    """The markers in the requests a job posts: its messages' contents, combined or split."""
    contents = " ".join(part.get("content", "") for part in job.parts)
    return Counter(re.findall(r"\bm\d+\b", contents))


def answer(status, body=None, broken=None, **headers):
    """Discord's answer as notifier/discord.py reads it."""
    headers = CaseInsensitiveDict({name.replace("_", "-"): value
                                   for name, value in headers.items()})
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body else b""
    return classify(status, headers, data, broken)


RATE = {"X_RateLimit_Limit": "5", "X_RateLimit_Reset_After": "2.0"}
RATE_LIMITED = "You are being rate limited."
ANSWERS = {
    "200": lambda wall: answer(200, X_RateLimit_Remaining="4", **RATE),
    "200, bucket spent": lambda wall: answer(200, X_RateLimit_Remaining="0", **RATE),
    "200, body broken off": lambda wall: answer(200, broken="the answer broke off", **RATE),
    "200, shared bucket spent": lambda wall: answer(
        200, X_RateLimit_Remaining="0", X_RateLimit_Bucket="b1",
        X_RateLimit_Reset=f"{wall + 1.5:.3f}", **RATE),
    "429 route": lambda wall: answer(
        429, {"message": RATE_LIMITED, "retry_after": 1.5, "global": False},
        X_RateLimit_Scope="user", X_RateLimit_Remaining="0", **RATE),
    "429 global": lambda wall: answer(
        429, {"message": RATE_LIMITED, "retry_after": 3.0, "global": True},
        X_RateLimit_Global="true", X_RateLimit_Scope="global"),
    "429 shared": lambda wall: answer(
        429, {"message": RATE_LIMITED, "retry_after": 40.0, "global": False},
        X_RateLimit_Scope="shared", X_RateLimit_Remaining="3", **RATE),
    "429 ban page": lambda wall: answer(429, b"<html>Error 1015</html>", Retry_After="600"),
    "500": lambda wall: answer(500),
    "503": lambda wall: answer(503, {"message": "upstream"}),
    "400": lambda wall: answer(400, {"code": 50035, "message": "Invalid Form Body", "errors": {
        "content": {"_errors": [{"message": "Must be 2000 or fewer in length."}]}}}),
    "401": lambda wall: answer(401, {"code": 50027, "message": "Invalid Webhook Token"}),
    "404": lambda wall: answer(404, {"code": 10015, "message": "Unknown Webhook"}),
    "network error": lambda wall: network_error(requests.ConnectionError("connection refused")),
}
"""Discord's answers (headers, bodies) by name, as functions of the wall clock."""


def is_subsequence(items, sequence):
    remaining = iter(sequence)
    return all(item in remaining for item in items)


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 1000.0
        self.jobs = []  # claimed by a "sender", not finished yet
        self.received = []  # markers in the order their envelopes were received
        self.closed = False
        self.serial = 0
        self.sent_to = {}  # marker -> webhook key, as received
        self.delivered = {}  # webhook key -> markers delivered, in order

    @initialize(queue_max=st.sampled_from([3, 10, 1, 5, 50]),
                dedupe_window=st.sampled_from([0.0, 0.0, 30.0]), max_attempts=st.integers(1, 4),
                batch=BATCHES)
    def start(self, queue_max, dedupe_window, max_attempts, batch):
        """A small bound (drop pressure) and a few retries, so that every path is near."""
        wall = lambda: EPOCH + self.now  # noqa: E731
        self.outbox = Outbox(queue_max, dedupe_window,
                             limits=Limits(retry=RetryPolicy(max_attempts=max_attempts),
                                           rng=random.Random(0), wall=wall),
                             monotonic=lambda: self.now, wall=wall)
        self.accept(batch)

    # ------------------------------------------------------------ model of what is held

    def held(self):
        """Markers of everything the outbox holds (what a stop would save)."""
        return Counter(marker(raw.data) for raw in self.outbox.holdings().raws)

    def step(self, received, allowed, do):
        """Run `do`, having received `received` new markers; every message that leaves
        the outbox in it must go to one of the `allowed` final counters. Returns what
        `do` returned, the markers that left and how each final counter moved."""
        before, counts = self.held(), dict(self.outbox.counts)
        result = do()
        after = self.held()
        arrived = before + Counter(received)
        assert not after - arrived, f"held from nowhere: {after - arrived}"
        left = arrived - after
        moved = {key: self.outbox.counts[key] - counts[key] for key in FINAL}
        assert sum(moved.values()) == left.total(), (moved, left)
        assert all(moved[key] == 0 for key in FINAL if key not in allowed), (moved, allowed)
        self.received += received
        return result, left, moved

    # ------------------------------------------------------------ the receiver

    @precondition(lambda self: not self.closed)
    @rule(batch=BATCHES)
    def accept(self, batch):
        """Envelopes off the socket; `again` resends an earlier message (a duplicate)."""
        envelopes, markers = [], []
        for kind, hook, again in batch:
            if not (again and self.serial):
                self.serial += 1
            markers.append(f"m{self.serial - 1}")
            envelopes.append(make_envelope(kind, hook, markers[-1]))
            self.sent_to.setdefault(markers[-1], []).append(webhook_key(HOOKS[hook]))
        oversized = sum(len(data) > MAX_ENVELOPE_BYTES for data in envelopes)
        (dropped, sizes), _, moved = self.step(markers, ("drops", "rejected"),
                                               lambda: self.outbox.accept(envelopes))
        assert len(sizes) == moved["rejected"] == oversized
        assert dropped == moved["drops"]

    @precondition(lambda self: not self.closed and self.outbox.unparsed)
    @rule(limit=st.integers(1, 8))
    def parse(self, limit):
        """What relay._parse does: take_unparsed, envelope.parse, add_parsed."""
        dedupe = self.outbox.dedupe_window > 0
        invalid = 0

        def do():
            nonlocal invalid
            results = []
            for data, _ in self.outbox.take_unparsed(limit):
                try:
                    message = envelope.parse(data)
                except envelope.EnvelopeError as exc:
                    invalid += 1
                    results.append((exc.reason, None))
                    continue
                results.append((message, dedupe_key(message) if dedupe else None))
            self.outbox.add_parsed(results)

        _, _, moved = self.step([], ("rejected", "deduplicated", "failed") if dedupe
                                else ("rejected", "failed"), do)
        assert moved["rejected"] == invalid

    # ------------------------------------------------------------ the senders

    def ready_times(self):
        """When each lane with something to send may send it, as the scheduler says."""
        return [at for lane in self.outbox._lanes
                if (at := self.outbox._lanes.ready_at(lane, self.now)) is not None]

    def ready(self):
        return any(at <= self.now for at in self.ready_times())

    @precondition(lambda self: not self.closed and self.ready())
    @rule()
    def next_job(self):
        job, _, _ = self.step([], (), self.outbox.next_job)
        assert job is not None and job.lane.busy and job not in self.jobs
        key = job.lane.key  # one request in flight per webhook, whatever its URLs
        assert all(other.lane.key != key for other in self.jobs)
        assert webhook_key(job.webhook) == key
        assert all(item.message.key == key and item.message.webhook == job.url
                   for item in job.items)  # posted where each asked to go
        assert posted_markers(job) == Counter(map(held_marker, job.items))  # each posted, once
        request = job.payload
        if "thread_name" in job.parts[0] and job.items:
            assert len(job.items) == 1  # a forum post alone
        json.dumps(request, ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert payload.fits(request) and validate(request) == {}, request
        self.jobs.append(job)

    @precondition(lambda self: self.jobs)  # after close too: requests in flight come back
    @rule(data=st.data(), name=st.sampled_from(["200"] * 3 + ["400"] * 2 + sorted(ANSWERS)))
    def finish(self, data, name):
        job = self.jobs.pop(data.draw(st.integers(0, len(self.jobs) - 1)))
        outcome = ANSWERS[name](EPOCH + self.now)
        last_part = job.part == len(job.parts) - 1
        allowed = {"delivered": ("delivered",), "retry": ("failed",), "dead": ("failed",),
                   "refused": ("failed",), "rate_limited": ()}[outcome.kind]
        _, left, _ = self.step([], allowed, lambda: self.finished(job, outcome))
        if outcome.kind == "delivered":
            assert left.total() == (len(job.items) if last_part else 0)
        if outcome.kind == "refused":
            assert left.total() == (1 if len(job.items) == 1 else 0)

    def finished(self, job, outcome):
        """`outbox.finish`, noting the messages a last part delivered, per webhook."""
        done = outcome.kind == "delivered" and job.part == len(job.parts) - 1
        self.outbox.finish(job, outcome)
        if done:
            self.delivered.setdefault(job.lane.key, []).extend(map(held_marker, job.items))

    @rule(seconds=st.sampled_from([None, None, 0.1, 2.0, 45.0, 700.0, 4000.0]))
    def advance(self, seconds):
        """Let time pass: by `seconds`, or (None) to when the next lane may send, as a
        waiting sender would wake."""
        later = [at for at in self.ready_times() if at > self.now]
        if seconds is not None:
            self.now += seconds
        elif later:
            self.now = min(later)

    # ------------------------------------------------------------ shutdown

    @precondition(lambda self: not self.closed and self.serial >= 30)
    @rule()
    def close(self):
        """What relay.stop does: parse what is left, close; a stop then saves what is held,
        oldest first. (Only late in a run: picked as often as any other rule, it would end
        most runs early.)"""
        while self.outbox.unparsed:
            self.parse(limit=512)
        self.step([], (), self.outbox.close)
        assert self.outbox.next_job() is None
        assert is_subsequence([marker(raw.data) for raw in self.outbox.holdings().raws],
                              self.received)
        self.closed = True

    # ------------------------------------------------------------ invariants

    @invariant()
    def accounting(self):
        snapshot = self.outbox.snapshot()
        held = self.held()
        assert snapshot["received"] == len(self.received)
        assert snapshot["pending"] == held.total() <= self.outbox.queue_max
        assert snapshot["received"] == sum(snapshot[key] for key in FINAL) + snapshot["pending"]
        assert not held - Counter(self.received)
        lanes = snapshot["webhooks"]
        early = sum(drops for drops, _ in self.outbox._ledger.early.values())
        assert sum(lane["dropped"] for lane in lanes) + early == snapshot["drops"]
        for key in ("delivered", "failed"):
            assert sum(lane[key] for lane in lanes) == snapshot[key]
        assert (sum(lane["pending"] for lane in lanes) + snapshot["unparsed"]
                == snapshot["pending"])

    @invariant()
    def one_webhook_one_lane_and_its_order(self):
        """Every URL of a webhook is one lane (one line in the snapshot), and what it
        delivered came in the order it was received (each marker to the webhooks it was
        sent to: a resend may name another)."""
        keys = [lane.key for lane in self.outbox._lanes]
        assert len(keys) == len(set(keys)) == len(self.outbox.snapshot()["webhooks"]) <= 3
        for key, delivered in self.delivered.items():
            received = [m for m in self.received if key in self.sent_to[m]]
            assert is_subsequence(delivered, received), (key, delivered, received)

    @invariant()
    def nothing_held_twice(self):
        """Each envelope received is its own bytes object, so one held twice shows."""
        envelopes = [id(raw.data) for raw in self.outbox.holdings().raws]
        assert len(envelopes) == len(set(envelopes))
        for lane in self.outbox._lanes:
            assert lane.busy == any(job.lane is lane for job in self.jobs)

    def teardown(self):
        """Discord recovers and answers 200 to everything: all that is held goes out."""
        if self.closed:
            return
        for _ in range(2000):
            while self.jobs:
                self.finished(self.jobs.pop(), ANSWERS["200"](EPOCH + self.now))
            while self.outbox.unparsed:
                self.parse(limit=512)
            if not self.outbox.snapshot()["pending"] and not self.ready():
                break
            if self.ready():
                self.jobs.append(self.outbox.next_job())
            else:
                self.advance(None)
        assert self.outbox.snapshot()["pending"] == 0, self.outbox.snapshot()
        self.one_webhook_one_lane_and_its_order()


TestOutbox = OutboxMachine.TestCase  # the budget of the profile loaded in conftest.py
