"""The stop flag of every long-running command: set by signals without deadlocking."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from shared.shutdown import ShutdownSignals

ROOT = Path(__file__).resolve().parents[2]


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_storm_of_signals_while_waiting_neither_hangs_nor_kills_the_process() -> None:
    """Thousands of signals land while the main thread is inside ``wait``: a handler that
    took the flag's lock (``threading.Event.set``) could deadlock or die here; this one
    counts every signal and the loop goes on."""
    child = _child(
        """
        import signal, time
        from shared.shutdown import ShutdownSignals
        stop = ShutdownSignals((signal.SIGALRM,))
        stop.install()
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.0003)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            stop.wait(0.0005)
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(stop.count, stop.is_set())
        """
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err[-2000:]
    count, was_set = out.split()
    assert int(count) > 100 and was_set == "True"


def test_sigterm_ends_an_unbounded_wait_and_a_second_signal_reaches_the_callback() -> None:
    child = _child(
        """
        import os, signal
        from shared.shutdown import ShutdownSignals
        def on_signal(signum, count):
            if count > 1:
                os._exit(7)
        with ShutdownSignals(on_signal=on_signal) as stop:
            print("waiting", flush=True)
            stop.wait()
            print("stopped by", signal.Signals(stop.last).name, flush=True)
            import time
            time.sleep(30)  # a slow drain: the second signal exits at once
        """
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "waiting"
    child.send_signal(signal.SIGTERM)
    assert child.stdout.readline().strip() == "stopped by SIGTERM"
    started = time.monotonic()
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=10) == 7
    assert time.monotonic() - started < 5


def test_the_previous_handlers_come_back_and_set_works_without_a_signal() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with ShutdownSignals((signal.SIGUSR1,)) as stop:
        assert signal.getsignal(signal.SIGUSR1) != before
        assert stop.wait(0.01) is False
        stop.set()
        assert stop.wait(5) is True and stop.count == 0
    assert signal.getsignal(signal.SIGUSR1) == before
