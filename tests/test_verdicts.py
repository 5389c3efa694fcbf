"""Envelopes whose bytes were parsed before are not parsed again (`Admission`): a
producer resending one envelope in a loop, or one broken frame, is parsed once, and its
copies are counted at once (rejected, or suppressed as duplicates) without being held.

The shortcut must change nothing but speed. The property test runs two relays' intake
side by side, one remembering verdicts and one not, through any mix of repeated and new
envelopes, junk, frames over the cap, parsing, time passing the dedupe window, and
Discord delivering or answering 404 (a quarantine, where copies fail instead of being
suppressed): after every step that both have parsed, their counters, held messages and
the requests they hand out are the same."""

import json
import random

from hypothesis import given, strategies as st

from notifier import config
from notifier.admission import VERDICT_BYTES, Admission
from notifier.envelope import MAX_ENVELOPE_BYTES
from notifier.limits import Limits
from notifier.logs import Throttle
from notifier.outbox import Outbox
from tests.harness import Clock, assert_balanced
from tests.test_outbox import EPOCH, GONE, ok

LOCAL = "127.0.0.1:8099"
HOOK = {n: f"http://{LOCAL}/api/webhooks/{n}/tok" for n in (1, 2)}
WINDOW = 10.0
JUNK = [b"not an envelope", b'{"type": "NOTIFIER"}', b"(", b"\xff\xfe"]


def envelope(hook: int, content: str) -> bytes:
    return json.dumps({"type": "NOTIFIER", "webhook": HOOK[hook],
                       "payload": {"content": content}}).encode()


class Intake:
    """An outbox on a fake clock and the admission that feeds it."""

    def __init__(self, clock: Clock, queue_max: int, remember: int | None):
        settings = config.load({"SWIMMY_NOTIFIER_QUEUE_MAX": str(queue_max),
                                "SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC": str(WINDOW),
                                "SWIMMY_NOTIFIER_ALLOWED_HOSTS": LOCAL,
                                "SWIMMY_NOTIFIER_DURABLE": "0"})
        wall = lambda: EPOCH + clock.now  # noqa: E731
        self.outbox = Outbox(queue_max, WINDOW, monotonic=clock, wall=wall,
                             limits=Limits(1000, rng=random.Random(7), wall=wall))
        self.admission = Admission(self.outbox, settings,
                                   **({} if remember is None else {"remember": remember}))

    def settled(self) -> dict:
        """Everything parsed: the snapshot, and what each webhook holds, in order."""
        self.admission.digest_all()
        snapshot = dict(self.outbox.snapshot())
        assert_balanced(snapshot)
        # Copies are decided before the newcomers beside them are parsed, so which of one
        # batch's rejections came last may differ; each is still counted with its reason.
        del snapshot["last_rejected_reason"]
        snapshot["held"] = [(item.message.webhook, item.message.payload)
                            for item, _ in self.outbox._lanes.held()]
        return snapshot


FRAME = st.one_of(
    st.tuples(st.sampled_from([1, 2]), st.sampled_from(["a", "b", "c"])).map(
        lambda pick: envelope(*pick)),
    st.integers(0, 10**6).map(lambda n: envelope(1, f"new {n}")),
    st.sampled_from(JUNK),
    st.integers(1, 9))  # that many bytes over the cap: `frame` makes it
STEP = st.one_of(
    st.lists(st.tuples(FRAME, st.sampled_from(["p1", "p2"])), min_size=1, max_size=40).map(
        lambda frames: ("batch", frames)),  # each from a producer (CURVE: counted apart)
    st.integers(1, 20).map(lambda n: ("parse", n)),
    st.floats(0.5, 2 * WINDOW).map(lambda seconds: ("wait", seconds)),
    st.sampled_from(["ok", "gone"]).map(lambda answer: ("deliver", answer)))


def frame(drawn: bytes | int) -> bytes:
    return drawn if isinstance(drawn, bytes) else b"(" * (MAX_ENVELOPE_BYTES + drawn)


@given(st.integers(1, 12), st.lists(STEP, max_size=30))
def test_remembering_verdicts_changes_nothing_but_speed(queue_max, steps):
    clock = Clock(1000.0)
    fast, plain = Intake(clock, queue_max, None), Intake(clock, queue_max, 0)
    for kind, value in steps:
        if kind == "batch":
            for intake in (fast, plain):
                intake.admission.take_in([frame(drawn) for drawn, _ in value],
                                         [producer for _, producer in value])
        elif kind == "parse":
            for intake in (fast, plain):
                intake.admission.parse(value)
        elif kind == "wait":  # a copy is judged as it arrives, the others as parsed,
            # and the relay parses what it holds within milliseconds: so both have
            # parsed before seconds pass (or the window could close in between)
            assert fast.settled() == plain.settled()
            clock.now += value
        else:  # both parse all first: what is parsed decides what a request combines
            assert fast.settled() == plain.settled()
            ready = [intake.outbox._lanes.ready(clock())[0] for intake in (fast, plain)]
            assert (ready[0] is None) == (ready[1] is None)
            if ready[0] is None:
                continue
            jobs = [intake.outbox.next_job() for intake in (fast, plain)]
            assert (jobs[0].webhook, jobs[0].payload) == (jobs[1].webhook, jobs[1].payload)
            for intake, job in zip((fast, plain), jobs):
                intake.outbox.finish(job, ok() if value == "ok" else GONE)
    assert fast.settled() == plain.settled()


def test_a_runaway_producer_is_parsed_once_and_its_copies_counted_at_once(monkeypatch):
    """One envelope 5,000 times and one broken frame 5,000 times, queue_max 10: one
    message held, 4,999 suppressed, 5,000 rejected, and the parser ran twice."""
    clock = Clock(1000.0)
    intake = Intake(clock, 10, None)
    parsed = []
    real = Admission._parse_new
    monkeypatch.setattr(Admission, "_parse_new",
                        lambda self, data: parsed.append(data) or real(self, data))
    for _ in range(10):
        intake.admission.take_in([envelope(1, "loop")] * 500 + [JUNK[0]] * 500, None)
        intake.admission.digest(busy=True, taken=1000)
    snapshot = intake.settled()
    assert (snapshot["received"], snapshot["pending"], snapshot["deduplicated"],
            snapshot["rejected"], snapshot["drops"]) == (10_000, 1, 4_999, 5_000, 0)
    assert sorted(parsed) == sorted([envelope(1, "loop"), JUNK[0]])


def test_only_small_envelopes_are_remembered_and_only_so_many():
    clock = Clock(1000.0)
    intake = Intake(clock, 10_000, 3)
    big = json.dumps({"type": "NOTIFIER", "webhook": HOOK[1],
                      "payload": {"content": "x" * 1900, "username": "y" * 80,
                                  "embeds": [{"description": "z" * 4000}]}}).encode()
    assert len(big) > VERDICT_BYTES
    frames = [big] + [envelope(1, f"m{i}") for i in range(5)]
    intake.admission.take_in(frames, None)
    intake.admission.digest_all()
    assert list(intake.admission._verdicts) == frames[3:]  # the newest three, small ones


def test_a_throttled_line_for_alike_events_counts_the_rest_as_left_out():
    clock = Clock(0.0)
    throttle = Throttle(burst=1, interval=1.0, clock=clock)
    assert throttle.allow(500) == 0  # one line says the first; 499 left out
    assert throttle.allow(3) is None  # over the burst: 3 more left out
    clock.now += 1.0
    assert throttle.allow() == 502
