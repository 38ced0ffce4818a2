"""SIGTERM and SIGINT as a stop flag the main thread waits on, safely.

Every long-running command (``tether edge``'s fleet agent, the sensor bridge, the cloud
worker, the rollout controller, ``tether up``) stops on SIGTERM or Ctrl-C. The obvious
``signal.signal(SIGTERM, lambda *_: event.set())`` beside ``event.wait()`` can deadlock:
Python runs a handler in the main thread between two bytecodes, and when that happens
while the main thread is inside ``Event.wait`` holding the event's (non-reentrant) lock,
the handler's ``set()`` waits for that lock forever and the process ignores every later
signal until it is killed. :class:`ShutdownSignals` keeps its handler lock-free (it only
counts) and lets the main thread poll the count in short sleeps.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any

#: How often :meth:`ShutdownSignals.wait` looks at the flag: the longest a stop waits.
POLL_S = 0.05


class ShutdownSignals:
    """A stop flag set by SIGTERM/SIGINT (or :meth:`set`), used as a context manager that
    installs the handlers and restores the previous ones on exit.

    ``on_signal(signum, count)`` runs inside the handler after the count is raised (the
    ``count``-th signal); it must not take locks either (logging from it is avoided for
    that reason: logging takes a lock). A second signal is commonly a request to exit at
    once: ``on_signal`` may call :func:`os._exit`.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        on_signal: Callable[[int, int], None] | None = None,
    ) -> None:
        self.signals = tuple(signals)
        self.on_signal = on_signal
        #: Signals received so far (an int: the handler only adds to it).
        self.count = 0
        #: The last signal received, ``None`` before any.
        self.last: int | None = None
        self._set = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ShutdownSignals:
        self.install()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()

    def install(self) -> None:
        """Install the handlers (main thread only, as :func:`signal.signal` requires)."""
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.last = signum
        self._set = True
        if self.on_signal is not None:
            self.on_signal(signum, self.count)

    def set(self) -> None:
        """Ask for a stop from code (another thread, a test) rather than a signal."""
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a stop is asked for or ``timeout`` seconds pass; whether it was."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            if deadline is None:
                time.sleep(POLL_S)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S, left))
        return True
