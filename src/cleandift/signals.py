"""Graceful stop for long runs: SIGTERM / SIGHUP / SIGINT finish the current step, save, and exit.

Cluster schedulers send SIGTERM (or SIGHUP when a session ends) a grace period before SIGKILL; a
user presses Ctrl-C (SIGINT). Dying on the spot loses every step since the last checkpoint, so
:func:`stop_on_signals` only *records* the first signal and the training loop checks
:attr:`StopRequest.requested` between steps, checkpoints, and returns. A second signal means
"now": SIGINT raises :class:`KeyboardInterrupt`, SIGTERM / SIGHUP get their default action (a
checkpoint being written at that moment is never half-visible: checkpoints are renamed into place).

Exit status convention (what shells and schedulers expect): ``128 + signal number``, i.e. 130
for SIGINT, 143 for SIGTERM, 129 for SIGHUP (:func:`exit_code`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

#: The signals a run stops gracefully on (SIGHUP does not exist on Windows).
STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT")
                                      if hasattr(signal, name))


@dataclass
class StopRequest:
    """Set by the handlers; ``signum`` is the first stop signal received (``None``: keep going)."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else ""


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15 (the number as text when unknown)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The conventional exit status after stopping on ``signum`` (128 + number: INT 130, TERM 143, HUP 129)."""
    return 128 + int(signum)


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Record the first of ``signals`` in the yielded :class:`StopRequest` instead of dying.

    Handlers can only be installed from the main thread; elsewhere (a run started from a worker
    thread) nothing is installed and the request never fires. The previous handlers come back on exit.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame) -> None:
        if stop.signum is None:
            stop.signum = signum
            return
        # a second signal: stop now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def ignore_stop_signals() -> None:
    """For worker processes (e.g. DataLoader workers): leave stop signals to the main process.

    A terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group; a worker that dies
    of it makes the main process fail with "DataLoader worker killed" before it can checkpoint.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
