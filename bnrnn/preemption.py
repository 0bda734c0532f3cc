"""SIGTERM / SIGINT as a request to stop cleanly: finish the step, checkpoint, exit.

Clusters preempt with SIGTERM (SLURM, Kubernetes) and people press Ctrl-C; killing the
process mid-step would lose everything since the last checkpoint. Inside
:class:`StopRequest` these signals only set a flag that the training loop checks between
steps. A Ctrl-C after either stops at once (KeyboardInterrupt), for when a step hangs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType

from bnrnn.errors import BnrnnError

log = logging.getLogger("bnrnn")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(BnrnnError):
    """Training stopped on a signal after writing a checkpoint; exit status 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT set ``signum`` instead of killing.

    Only the main thread can install signal handlers; elsewhere (a launcher's worker
    thread) it stays inactive and the signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        self.at_once: str | None = None
        self.deferring = False  # inside deferred(): a second Ctrl-C or an at-once stop waits for the block's end
        self.interrupt_pending = False
        self.stop_pending = False

    def stop_at_once(self, message: str) -> None:
        """From now on a signal raises :class:`Preempted` with ``message`` ({signal} is filled
        in) at once, instead of waiting for the end of a step: for work that cannot be
        checkpointed halfway, such as the final test, where waiting would only make the
        scheduler kill the process without a word."""
        self.at_once = message

    def raise_if_stopped(self) -> None:
        """Raise the :meth:`stop_at_once` stop if a signal came and its raise was lost: code
        that catches every exception can swallow one raised from a signal handler (logging
        does, when the signal lands while it writes a record: it prints "--- Logging
        error ---" and carries on). Call before declaring such work done."""
        if self.at_once is not None and self.signum is not None:
            raise Preempted(self.at_once.format(signal=self.name), self.signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        # A Ctrl-C after any stop request (a first Ctrl-C, or a scheduler's SIGTERM) stops at
        # once; a second SIGTERM waits for the step, as the first does.
        if self.signum is not None and signum == signal.SIGINT:
            if self.deferring:
                self.interrupt_pending = True
                return
            raise KeyboardInterrupt
        self.signum = signum
        if self.at_once is not None:
            if self.deferring:
                self.stop_pending = True
                return
            raise Preempted(self.at_once.format(signal=self.name), signum)
        log.warning("%s received: finishing the current step, then writing a checkpoint (Ctrl-C%s to stop at once)",
                    signal.Signals(signum).name, " again" if signum == signal.SIGINT else "")

    @contextlib.contextmanager
    def deferred(self):
        """A block that a second Ctrl-C or an at-once stop must not cut in two: a checkpoint
        being written (an exception inside torch.save's writer leaves it a torn file and a
        confusing error), or a log record (logging swallows an exception raised while it
        writes, with a "--- Logging error ---" traceback). The interrupt or the stop is
        raised when the block ends."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.interrupt_pending:
            self.interrupt_pending = False
            raise KeyboardInterrupt
        if self.stop_pending:
            self.stop_pending = False
            self.raise_if_stopped()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
