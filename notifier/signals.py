"""The relay's signals, caught from its first line on, whichever thread the kernel picks.

`python -m notifier` calls `install` before it imports anything else, so that a SIGHUP
sent while the relay starts (imports, opening the store, binding) is handled, not the
kernel's default (death). What comes before that first line, the Python interpreter's
own start-up (about 20 ms, longer on a loaded host), no program can catch a signal in:
whatever starts the relay should block SIGHUP across the exec (the shipped unit does, with
``env --block-signal=HUP``). `install` unblocks SIGHUP, SIGTERM and SIGINT once its
handlers are in place: one sent meanwhile waited, and is handled now.

The handlers do nothing (huey's rule: a handler can interrupt any code, the logging
module's locks included, so it must not log or take a lock): CPython's C-level handler,
which runs in whichever thread the kernel delivered the signal to, writes the signal's
number to a pipe (`signal.set_wakeup_fd`), and the main thread waits on that pipe, with a
timeout besides, and acts on what it reads there, outside signal context. Why not the other two ways of making sure the main thread notices:
blocking the signals in every other thread (`pthread_sigmask`) holds only as long as no
thread is ever started with them unblocked, by this code or by any library it uses, and
one such thread brings the bug back silently; a main thread that merely never waits
without a timeout notices a signal only at the end of that timeout. The pipe wakes the
main thread at once from any thread; the timeout is there for the supervision of the
threads, which the main thread does between signals.
"""

from __future__ import annotations

import os
import select
import signal

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP = (signal.SIGTERM, signal.SIGINT)


class Signals:
    """SIGTERM, SIGINT and SIGHUP as they come, for the main thread to `wait` on."""

    def __init__(self):
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1

    def install(self) -> "Signals":
        """Catch the signals from now on (main thread only), then unblock them."""
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, _noted)
        self._previous_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        return self

    def wait(self, timeout: float) -> list[int]:
        """The signals received since the last call, oldest first; waits up to `timeout`
        seconds for one if there is none yet."""
        select.select([self._read], [], [], timeout)
        try:
            return list(os.read(self._read, 4096))  # one byte per signal: its number
        except BlockingIOError:
            return []

    def release(self) -> None:
        """Give the signals back (a command other than the relay's): the handlers that
        were there before, and any signal noted meanwhile sent again, to be taken as if
        it had come now."""
        pending = self.wait(0)
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._read)
        os.close(self._write)
        for signum in pending:
            os.kill(os.getpid(), signum)


    def ignore(self) -> None:
        """The relay has stopped: from now on the signals are ignored, so that none can
        kill it while the interpreter finalizes (which resets handlers, not SIG_IGN)."""
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_IGN)


def _noted(signum: int, frame) -> None:
    """The Python-level handler: nothing to do, the C-level one wrote to the pipe (a
    handler must be set for it to), and the main thread reads it."""


def install() -> Signals:
    return Signals().install()
