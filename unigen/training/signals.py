"""SIGINT/SIGTERM stop a run cleanly: the step finishes, a checkpoint is written, exit 0."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks after each step. A second signal restores
    the previous handlers and interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


def worker_ignores_sigint(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; the workers must
    keep serving batches while the main process finishes its step and saves, instead of dying
    with a KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
