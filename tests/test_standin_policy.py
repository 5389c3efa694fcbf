"""The stand-in's answering policy on its own, with a clock the test moves: windows that
the HTTP tests could only reach by waiting."""

import pytest

from notifier.standin_policy import Limits, Modes, decide


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def answer(limits, mode="ok", params=None, payload=None, query=None, forum=False, ids=None):
    ids = ids if ids is not None else iter(str(n) for n in range(1, 100))
    return decide(mode, params or {}, limits, webhook_id="1", payload=payload or {"content": "hi"},
                  query=query or {}, channel_of=lambda webhook: "900", forum=forum, new_id=lambda: next(ids))


def test_a_bucket_refuses_past_its_limit_until_its_window_ends(clock):
    limits = Limits(rate_limit=(2, 2.0), clock=clock, wall=lambda: 0.0)
    assert [answer(limits).status for _ in range(3)] == [204, 204, 429]
    clock.now += 1.5
    refused = answer(limits)
    assert refused.status == 429 and refused.body["retry_after"] == 0.5
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    clock.now += 0.5
    fresh = answer(limits)
    assert fresh.status == 204 and fresh.headers["X-RateLimit-Remaining"] == "1"
    assert fresh.headers["X-RateLimit-Reset"] == "2.000"  # the wall clock plus Reset-After


def test_the_global_limit_counts_every_request_over_a_sliding_second(clock):
    limits = Limits(global_limit=2, clock=clock)
    assert limits.global_wait() is None
    clock.now += 0.25
    assert limits.global_wait() is None
    clock.now += 0.25
    assert limits.global_wait() == pytest.approx(0.5)
    clock.now += 0.5
    assert limits.global_wait() is None  # the first left the window, this one took its place
    assert limits.global_wait() == pytest.approx(0.25)


def test_a_channel_counts_only_accepted_messages_including_other_posters(clock):
    limits = Limits(channel_limit=(3, 60.0), clock=clock)
    limits.accept("900", 2)
    assert answer(limits, payload={"content": ""}).status == 400  # refused: not counted
    assert answer(limits).status == 204
    refused = answer(limits)
    assert refused.status == 429 and refused.headers["X-RateLimit-Scope"] == "shared"
    clock.now += 60.0
    assert answer(limits).status == 204


def test_a_forum_post_creates_its_thread_and_answers_in_it(clock):
    limits = Limits(clock=clock)
    ids = iter(["10", "11"])
    posted = answer(limits, payload={"content": "hi", "thread_name": "alerts"}, query={"wait": "true"},
                    forum=True, ids=ids)
    assert posted.status == 200 and posted.thread == ("10", "alerts")
    assert posted.body["id"] == "11" and posted.body["channel_id"] == "10"
    assert answer(limits, forum=True).body["code"] == 220001


def test_a_scripted_mode_counts_down_then_the_webhook_answers_ok():
    modes = Modes()
    modes.set(None, "status", 2, {"status": 502})
    modes.set("7", "hang", None, {})
    assert [modes.take("1")[0] for _ in range(3)] == ["status", "status", "ok"]
    assert modes.take("7")[0] == "hang"
    with pytest.raises(TypeError):
        modes.set("1", "hang", None, {"interval": 1})
    assert modes.take("7")[0] == "hang"  # a refused script changes nothing
