"""The relay's threads: each runs one unit's `loop()` step after step, and none dies
silently (huey's consumer is the model).

A unit is an object with ``loop()``, one step of its work, and optionally ``close()``
(run when its thread ends, however it ends). `Supervisor.start` runs it in a thread of
its own, until its ``loop()`` returns False (its work is done: the receiver once woken,
a sender once the outbox is closed) or, for a background unit (metrics, store,
/metrics), until the one stop event, `stopping`, is set:

- an exception in a step is logged (with its traceback the first time, then once a
  minute with how many more) and the thread carries on after a short pause: one bad
  message or one bug in a rare path costs that step, not the thread;
- a unit that raises `CannotGoOn`, or whose every step failed for `GIVE_UP_SEC`, cannot
  go on: the supervisor records why (`failure`), and the relay stops gracefully and exits
  1, so that its supervisor (systemd) restarts it;
- a thread found dead without having finished (a BaseException, or a thread the relay
  did not start: `watch`) is a failure too.

`check` is called by the main thread between signals; it is the one place where a dead
thread is noticed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from notifier.logs import Throttle

log = logging.getLogger("notifier.supervisor")

GIVE_UP_SEC = 30.0
"""A unit whose every step failed for this long cannot go on: the relay stops for a
restart rather than run on with a thread that does nothing."""

PAUSE_SEC = (0.01, 1.0)
"""After a failed step, the pause before the next one: doubled from the first up to the
second while steps keep failing, so a bug that fails every step cannot spin a core."""


class CannotGoOn(Exception):
    """Raised by a unit whose thread cannot do its work any more (its socket is gone, a
    thread it depends on died): the relay stops gracefully and exits 1."""


class Unit(Protocol):
    def loop(self) -> bool | None: ...


class Supervisor:
    """Starts the relay's threads and watches them, and the threads it depends on."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        """`clock` times how long a unit has been failing (tests give a fake one)."""
        self.stopping = threading.Event()
        """The one stop event: units that run until the end (metrics, store, /metrics)
        finish their step loop once it is set; the relay sets it last in its stop."""
        self.errors = 0  # exceptions caught in units' steps since the start
        self._clock = clock
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._threads: dict[str, threading.Thread] = {}
        self._finished: set[str] = set()
        self._watched: list[tuple[str, Callable[[], bool]]] = []
        self._error_log: dict[tuple[str, type], Throttle] = {}
        self._pause = threading.Event()  # never set: a pause that is not a sleep

    # ------------------------------------------------------------------ threads

    def start(self, name: str, unit: Unit, *, background: bool = False) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(name, unit, background), name=name,
                                  daemon=True)
        with self._lock:
            self._threads[name] = thread
        thread.start()
        return thread

    def watch(self, what: str, alive: Callable[[], bool]) -> None:
        """Have `check` notice when `alive()` turns false: a thread the relay depends on
        but does not run itself (the CURVE authenticator, a sender's watchdog...)."""
        self._watched.append((what, alive))

    def _run(self, name: str, unit: Unit, background: bool) -> None:
        failing_since: float | None = None
        pause = PAUSE_SEC[0]
        try:
            while not (background and self.stopping.is_set()):
                try:
                    if not (unit.loop() or background):
                        break
                    failing_since, pause = None, PAUSE_SEC[0]
                except CannotGoOn as exc:
                    self.fail(f"the {name} thread cannot go on: {exc}")
                    break
                except Exception as exc:
                    now = self._clock()
                    failing_since = now if failing_since is None else failing_since
                    self._error(name, exc)
                    if now - failing_since >= GIVE_UP_SEC:
                        self.fail(f"the {name} thread failed at every step for "
                                  f"{now - failing_since:.0f} s ({type(exc).__name__})")
                        break
                    self._pause.wait(pause)
                    pause = min(2 * pause, PAUSE_SEC[1])
        except BaseException as exc:  # SystemExit, KeyboardInterrupt...: not a step's
            self.fail(f"the {name} thread died: {type(exc).__name__}")
            raise
        finally:
            self._close(name, unit)
        with self._lock:
            self._finished.add(name)

    def _error(self, name: str, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            throttle = self._error_log.setdefault((name, type(exc)),
                                                  Throttle(burst=1, interval=60.0))
            suppressed = throttle.allow()
        if suppressed is not None:
            log.error("unexpected error in the %s thread; it carries on%s", name,
                      f" ({suppressed} more since the last such line)" if suppressed else "",
                      exc_info=exc)

    def _close(self, name: str, unit: Unit) -> None:
        close = getattr(unit, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            log.exception("closing the %s thread's resources failed", name)

    # ------------------------------------------------------------------ the main thread's

    def fail(self, reason: str) -> None:
        """Record why the relay cannot go on (the first reason is kept) and say it."""
        with self._lock:
            first = self._failure is None
            if first:
                self._failure = reason
        if first:
            log.error("%s; stopping the relay", reason)

    @property
    def failure(self) -> str | None:
        with self._lock:
            return self._failure

    def check(self) -> str | None:
        """Notice threads that died without finishing, and watched ones that died;
        returns why the relay cannot go on, or None."""
        with self._lock:
            dead = [name for name, thread in self._threads.items()
                    if not thread.is_alive() and name not in self._finished]
        for name in dead:
            self.fail(f"the {name} thread died")
        for what, alive in self._watched:
            try:
                ok = alive()
            except Exception:
                ok = False
            if not ok:
                self.fail(f"{what} died")
        return self.failure

    def alive(self, prefix: str) -> int:
        """How many threads whose name starts with `prefix` are running."""
        with self._lock:
            return sum(thread.is_alive() for name, thread in self._threads.items()
                       if name.startswith(prefix))

    def join(self, names: list[str], timeout: float) -> list[str]:
        """Wait up to `timeout` seconds in all for the threads `names`; returns those
        still running."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = [self._threads[name] for name in names if name in self._threads]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in threads if thread.is_alive()]
