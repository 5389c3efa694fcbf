"""Threads that never die silently, and signals the main thread sees whichever thread the
kernel gave them to: the supervisor and the signal pipe on their own, with real threads
and real signals."""

import logging
import os
import signal
import threading

import pytest

from notifier import signals, supervisor
from notifier.supervisor import CannotGoOn, Supervisor
from tests.harness import Clock, wait_until



class Steps:
    """A unit doing `plan`'s steps in turn: True (a step done), an exception (raised),
    or False (done: the thread ends)."""

    def __init__(self, plan, clock=None, tick=0.0):
        self.plan, self.done, self.closed = list(plan), [], False
        self.clock, self.tick = clock, tick

    def loop(self) -> bool:
        if self.clock is not None:
            self.clock.now += self.tick
        step = self.plan.pop(0) if self.plan else False
        self.done.append(step)
        if isinstance(step, BaseException):
            raise step
        return step

    def close(self) -> None:
        self.closed = True


def finished(watched: Supervisor, name: str) -> bool:
    return not watched.join([name], 10)


def test_an_exception_in_a_step_is_logged_once_with_its_traceback_and_the_thread_goes_on(
        caplog):
    watched = Supervisor()
    unit = Steps([True, KeyError("bug"), KeyError("bug"), True, ValueError("other"), True])
    with caplog.at_level(logging.ERROR, "notifier.supervisor"):
        watched.start("worker", unit)
        assert finished(watched, "worker")
    assert len(unit.done) == 7 and unit.closed
    assert watched.errors == 3 and watched.check() is None
    lines = [(r.getMessage(), r.exc_info[0].__name__) for r in caplog.records]
    assert lines == [("unexpected error in the worker thread; it carries on", "KeyError"),
                     ("unexpected error in the worker thread; it carries on", "ValueError")]


def test_a_unit_that_cannot_go_on_is_a_failure_and_its_resources_are_closed(caplog):
    watched = Supervisor()
    unit = Steps([True, CannotGoOn("its socket is gone"), True])
    watched.start("receiver", unit)
    assert finished(watched, "receiver") and unit.closed and len(unit.done) == 2
    assert watched.check() == "the receiver thread cannot go on: its socket is gone"
    assert "the receiver thread cannot go on: its socket is gone; stopping the relay" \
        in caplog.text


def test_a_unit_failing_at_every_step_gives_up_after_a_while_not_at_once(monkeypatch):
    monkeypatch.setattr(supervisor, "PAUSE_SEC", (0.001, 0.002))
    clock = Clock()
    watched = Supervisor(clock)
    every = Steps([RuntimeError("always")] * 1000, clock=clock, tick=1.0)
    watched.start("sender-1", every)
    assert finished(watched, "sender-1")
    assert len(every.done) == supervisor.GIVE_UP_SEC + 1  # a second per failed step
    assert watched.failure == "the sender-1 thread failed at every step for 30 s (RuntimeError)"
    clock = Clock()
    watched = Supervisor(clock)
    recovering = Steps(([RuntimeError("now and then")] * 20 + [True]) * 3, clock=clock, tick=1.0)
    watched.start("sender-2", recovering)
    assert finished(watched, "sender-2") and watched.failure is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_thread_and_a_dead_watched_thread_are_noticed_and_the_first_reason_kept():
    watched = Supervisor()
    watched.start("metrics", Steps([SystemExit(3)]))
    watched.join(["metrics"], 10)
    alive = threading.Event()
    alive.set()
    watched.watch("the CURVE authenticator thread", alive.is_set)
    assert watched.check() == "the metrics thread died: SystemExit"
    alive.clear()
    assert watched.check() == "the metrics thread died: SystemExit"
    fresh = Supervisor()
    fresh.watch("the CURVE authenticator thread", alive.is_set)
    assert fresh.check() == "the CURVE authenticator thread died"


def test_live_threads_are_counted_by_name():
    watched = Supervisor()
    release = threading.Event()

    class Waits:
        def loop(self):
            return not release.wait(10)
    for n in range(3):
        watched.start(f"sender-{n + 1}", Waits())
    watched.start("metrics", Waits())
    assert watched.alive("sender-") == 3
    release.set()
    assert watched.join([f"sender-{n + 1}" for n in range(3)], 10) == []
    assert watched.alive("sender-") == 0 and watched.check() is None


# ---------------------------------------------------------------------- signals

@pytest.fixture
def caught():
    """The signals caught as the relay catches them, given back afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in signals.HANDLED}
    installed = signals.install()
    yield installed
    installed.release()
    assert {signum: signal.getsignal(signum) for signum in signals.HANDLED} == handlers


def test_a_signal_the_kernel_gives_another_thread_wakes_the_main_thread_at_once(caught):
    """The main thread used to wait without a timeout: a SIGTERM that went to a /metrics
    thread was not acted on until something else woke it."""
    started, release = threading.Event(), threading.Event()

    def busy():
        started.set()
        release.wait(10)
    other = threading.Thread(target=busy)
    other.start()
    started.wait(10)
    signal.pthread_kill(other.ident, signal.SIGTERM)  # delivered to that thread only
    try:
        assert caught.wait(30) == [signal.SIGTERM]
    finally:
        release.set()
        other.join()
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGINT)
    assert wait_until(lambda: caught.wait(1), 10, what="two signals") == [signal.SIGHUP,
                                                                          signal.SIGINT]
    assert caught.wait(0) == []


def test_a_signal_blocked_before_the_start_waits_and_is_caught_at_install():
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        signal.raise_signal(signal.SIGHUP)  # pending: blocked, as a launcher leaves it
        installed = signals.install()
        try:
            assert installed.wait(10) == [signal.SIGHUP]
        finally:
            installed.release()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
