"""Stopping on request: checkpoint now, exit 0, and let the scheduler requeue the job.

A rank's request is either a signal (SIGUSR1 by default; Slurm sends it before the time limit with
`--signal=USR1@SECONDS`, see launch/slurm/train.sbatch) or a stop file appearing (`<run dir>/STOP`,
or `$LLAMA3HP_STOP_FILE`: a batch script's trap can create it for every node at once on a shared
file system). The request rides on the step's one health all-reduce, so every rank sees it at the
same step; the trainer then saves a checkpoint, waits for it, and returns normally.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from types import FrameType

STOP_FILE = "STOP"


class StopRequest:
    """Whether this rank has been asked to stop (`requested`); installs its signal handlers only in
    the main thread (a Trainer built in a worker thread listens to the stop file alone)."""

    def __init__(self, run_dir: Path, *, watch_file: bool, signals: tuple[int, ...] = (signal.SIGUSR1,)):
        # Rank 0 alone watches the file (the all-reduce tells the others), so a stale file that rank 0
        # removes at start-up cannot stop another rank first.
        self.file = Path(os.environ.get("LLAMA3HP_STOP_FILE") or run_dir / STOP_FILE)
        self.watch_file = watch_file
        self._signalled = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    @property
    def requested(self) -> bool:
        return self._signalled or (self.watch_file and self.file.exists())

    def clear_stale(self) -> None:
        """At start-up (rank 0): a stop file left by the previous job would stop this one at once."""
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
