"""A torch.profiler window over training steps [start, end) (`metrics.profile_steps`), written as a
Chrome trace `trace-steps-<start>-<end>.json` in the run folder (temporary name, then rename)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class ProfileWindow:
    """Call `step_begins(step)` before each step and `step_ended(step)` after it; `close()` at the
    end writes a window the run did not finish (it ended, or failed, inside it)."""

    def __init__(self, steps: list[int], run_dir: Path, device: torch.device, *, enabled: bool = True):
        self.window = tuple(steps) if steps and enabled else None
        self.run_dir, self.device = run_dir, device
        self.prof: torch.profiler.profile | None = None
        self.start = 0

    def step_begins(self, step: int) -> None:
        """`step`: the number of steps done so far (the step about to run is step + 1)."""
        if self.window is not None and self.prof is None and step == self.window[0]:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self.prof.__enter__()
            self.start = step

    def step_ended(self, step: int) -> None:
        if self.prof is not None and self.window is not None and step == self.window[1]:
            self._write(step)

    def close(self, step: int) -> None:
        if self.prof is not None:
            self._write(step)

    def _write(self, end: int) -> None:
        prof, self.prof = self.prof, None
        assert prof is not None
        prof.__exit__(None, None, None)
        path = self.run_dir / f"trace-steps-{self.start}-{end}.json"
        tmp = path.with_name(path.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
