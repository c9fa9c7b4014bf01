"""Hangs and stragglers: a watchdog thread per rank, and per-rank section times compared every N steps.

Hangs. Each rank runs a daemon thread that publishes a heartbeat to the job's store every
`heartbeat_s` (a beat counter, the rank's progress counter, host and PID). The loop arms it around
every step with a deadline of max(`hang_floor_s`, `hang_factor` x the median step time) (and
`phase_timeout_s` for the first steps, saves, rollbacks and re-plans). When a deadline passes the
thread, on every rank still running:
1. reads every rank's heartbeat twice, `2 x heartbeat_s` apart: a rank whose beat did not move is
   hung (SIGSTOP, a dead process, a deadlock holding the GIL); a rank whose progress is behind the
   furthest rank's is slow (stuck in compute or data);
2. dumps every thread's Python stack (faulthandler) and, on NCCL, the flight recorder's ring of
   recent collectives (`TORCH_NCCL_TRACE_BUFFER_SIZE`, set by the launch scripts) into
   `<run dir>/hangs/`;
3. kills the hung ranks that run on its own host (SIGKILL by the PID they published: a stopped
   process ignores the launcher's SIGTERM for 30 s), prints ONE line naming the slow ranks, and
   exits with code 3, so torchrun's elastic restart takes over instead of a silent wait for the
   collective timeout.

Stragglers. `StepSections` times each step's sections on every rank (data, forward_backward,
sync: the step's one health all-reduce, where a fast rank waits for the slowest; optimizer), with
CUDA events on a GPU (no synchronisation added) and the wall clock on CPU. Every
`straggler_interval` steps the per-rank means are all-gathered and a rank whose section time exceeds
`straggler_factor` x that section's median over ranks (and the median by at least 10 ms) is flagged
in the metrics row and the log.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llama3hp.errors import ConfigError

EXIT_HUNG = 3
SECTIONS = ("data", "forward_backward", "sync", "optimizer")


@dataclass
class WatchdogConfig:
    """Hang detection and straggler reports (TOML section [watchdog])."""

    enabled: bool = True  # run the watchdog thread
    hang_factor: float = 10.0  # a step running longer than factor x the median step time ...
    hang_floor_s: float = 120.0  # ... and longer than this is a hang
    phase_timeout_s: float = 1800.0  # deadline of the first steps, saves, rollbacks and re-plans
    heartbeat_s: float = 5.0  # how often each rank publishes its heartbeat to the job's store
    kill_hung_peers: bool = True  # SIGKILL hung ranks on this host before exiting
    straggler_interval: int = 100  # compare the ranks' section times every N steps (0 = never)
    straggler_factor: float = 1.5  # a section slower than factor x its median over ranks is flagged

    def validate(self) -> None:
        for name in ("hang_factor", "hang_floor_s", "phase_timeout_s", "heartbeat_s", "straggler_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"watchdog.{name} must be positive, got {getattr(self, name)}")
        if self.straggler_interval < 0:
            raise ConfigError(f"watchdog.straggler_interval must be >= 0, got {self.straggler_interval}")


class StepSections:
    """Section times of this rank's steps; `progress` counts every section entered (the watchdog
    publishes it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.progress = 0
        self.sums = dict.fromkeys(SECTIONS, 0.0)
        self.steps = 0
        self._events: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.progress += 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.sums[name] += time.perf_counter() - t0

    def end_step(self) -> None:
        """After the step's work has finished (the loop synchronises CUDA at the end of each step)."""
        for name, start, end in self._events:
            self.sums[name] += start.elapsed_time(end) / 1000.0
        self._events.clear()
        self.steps += 1

    def gather(self, group: dist.ProcessGroup | None, factor: float) -> dict[str, Any]:
        """All-gather every rank's mean section times since the last call (collective); the metrics
        columns: per section the max and min over ranks, and the flagged stragglers."""
        mine = torch.tensor([self.sums[s] / max(self.steps, 1) for s in SECTIONS], dtype=torch.float64)
        self.sums, self.steps = dict.fromkeys(SECTIONS, 0.0), 0
        if group is None:
            rows = [mine.tolist()]
        else:
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend(group) == "nccl"
                else None
            )
            out = [torch.empty_like(mine, device=dev) for _ in range(dist.get_world_size(group))]
            dist.all_gather(out, mine.to(dev), group=group)
            rows = [t.tolist() for t in out]
        return straggler_columns(rows, factor)


def straggler_columns(rows: list[list[float]], factor: float) -> dict[str, Any]:
    """From every rank's mean section times (rows[rank][section], SECTIONS order): each section's max
    and min over ranks, and the ranks whose section time exceeds factor x that section's median over
    ranks by at least 10 ms (`stragglers`)."""
    cols: dict[str, Any] = {}
    flagged = []
    for j, name in enumerate(SECTIONS):
        times = [r[j] for r in rows]
        median = statistics.median(times)
        cols[f"time_{name}_max_s"], cols[f"time_{name}_min_s"] = max(times), min(times)
        for rank, v in enumerate(times):
            if v > factor * median and v - median > 0.01:
                flagged.append(
                    {"rank": rank, "section": name, "s": round(v, 4), "median_s": round(median, 4)}
                )
    cols["stragglers"] = flagged
    return cols


def flight_recorder_dump() -> bytes | None:
    """The NCCL flight recorder's pickled trace of recent collectives, or None (no NCCL build)."""
    c10d = torch._C._distributed_c10d
    for name in ("_dump_nccl_trace", "_dump_fr_trace"):
        fn = getattr(c10d, name, None)
        if fn is not None:
            try:
                return fn()
            except Exception:  # a build or backend without the recorder: nothing to dump
                return None
    return None


class Watchdog:
    """This rank's hang detector (see the module docstring). `watch(...)` arms it around a step or
    a phase; `close()` stops the thread."""

    def __init__(
        self,
        cfg: WatchdogConfig,
        *,
        rank: int,
        world: int,
        store: Any,
        sections: StepSections,
        dump_dir: Path,
        attempt: int = 0,
        log: Callable[[str], None] | None = None,
        exit: Callable[[int], None] = os._exit,
    ):
        self.cfg, self.rank, self.world, self.sections = cfg, rank, world, sections
        self.dump_dir, self.attempt, self.exit = dump_dir, attempt, exit
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.times: deque[float] = deque(maxlen=200)
        self._deadline: float | None = None
        self._what, self._armed_at = "", 0.0
        self._beat = 0
        self._stop = threading.Event()
        self.store = None
        if store is not None and world > 1:
            self.store = store.clone()  # a client of its own: the main thread may be inside the store
            self.store.set_timeout(datetime.timedelta(seconds=max(10.0, 2 * cfg.heartbeat_s)))
        self._publish()  # the key exists before any step can hang
        self._thread = threading.Thread(target=self._loop, name="llama3hp-watchdog", daemon=True)
        if cfg.enabled:
            self._thread.start()

    # ------------------------------------------------------------------ main thread
    def timeout(self, is_step: bool) -> float:
        c = self.cfg
        if is_step and len(self.times) >= 3:
            return max(c.hang_floor_s, c.hang_factor * statistics.median(self.times))
        return c.phase_timeout_s

    @contextlib.contextmanager
    def watch(self, what: str, *, is_step: bool = False) -> Iterator[None]:
        """Arm the deadline around a step (`is_step`: its time joins the median) or another phase."""
        t0 = time.monotonic()
        self._what, self._armed_at = what, t0
        self._deadline = t0 + self.timeout(is_step)
        self.sections.progress += 1
        try:
            yield
        finally:
            self._deadline = None
            if is_step:
                self.times.append(time.monotonic() - t0)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ the thread
    def _key(self, rank: int) -> str:
        return f"llama3hp/heartbeat/{rank}"

    def _publish(self) -> None:
        self._beat += 1
        if self.store is not None:
            value = f"{self._beat} {self.sections.progress} {socket.gethostname()} {os.getpid()}"
            with contextlib.suppress(Exception):  # a store that went away: the launcher handles that
                self.store.set(self._key(self.rank), value)

    def _loop(self) -> None:
        last = time.monotonic()
        tick = min(1.0, self.cfg.heartbeat_s)
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now - last >= self.cfg.heartbeat_s:
                self._publish()
                last = now
            deadline = self._deadline
            if deadline is not None and now > deadline:
                self._fire(now)
                return

    def _read(self) -> list[tuple[int, int, str, int] | None]:
        if self.store is None:
            return []
        try:
            raw = self.store.multi_get([self._key(r) for r in range(self.world)])
        except Exception:
            return [None] * self.world
        out: list[tuple[int, int, str, int] | None] = []
        for v in raw:
            beat, progress, host, pid = v.decode().split()
            out.append((int(beat), int(progress), host, int(pid)))
        return out

    def slow_ranks(self) -> tuple[list[int], list[int], list[tuple[str, int]]]:
        """(hung ranks, ranks behind the furthest one, (host, PID) of the hung ranks)."""
        first = self._read()
        if not first or any(x is None for x in first):
            return [], [], []
        # Every live rank's watchdog is here at about the same time: keep beating while waiting.
        until = time.monotonic() + 2 * self.cfg.heartbeat_s + 0.5
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(self.cfg.heartbeat_s / 2, left))
            self._publish()
        second = self._read()
        if not second or any(x is None for x in second):
            return [], [], []
        hung = [
            r
            for r, (a, b) in enumerate(zip(first, second))
            if r != self.rank and a is not None and b is not None and a[0] == b[0]
        ]
        furthest = max(x[1] for r, x in enumerate(second) if x is not None and r not in hung)
        behind = [r for r, x in enumerate(second) if x is not None and x[1] < furthest and r not in hung]
        where = [(second[r][2], second[r][3]) for r in hung if second[r] is not None]  # type: ignore[index]
        return hung, behind, where

    def _dump(self) -> Path | None:
        try:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            path = self.dump_dir / f"attempt{self.attempt}-rank{self.rank}-stacks.txt"
            with open(path, "w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
            trace = flight_recorder_dump()
            if trace:
                (self.dump_dir / f"attempt{self.attempt}-rank{self.rank}-flight-recorder.pkl").write_bytes(
                    trace
                )
            return path
        except OSError:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            return None

    def _fire(self, now: float) -> None:
        ran = now - self._armed_at
        limit = (self._deadline or now) - self._armed_at
        hung, behind, where = self.slow_ranks()
        dumped = self._dump()
        parts = []
        if hung:
            parts.append(f"ranks {hung} have no heartbeat (stopped, dead or deadlocked)")
        if behind:
            parts.append(f"ranks {behind} are behind")
        if not parts:
            parts.append("no slow rank identified" if self.store is not None else "one process: no peers")
        if self.cfg.kill_hung_peers:
            here = socket.gethostname()
            for host, pid in where:
                if host == here and pid != os.getpid():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        median = statistics.median(self.times) if self.times else float("nan")
        self.log(
            f"error: rank {self.rank}: {self._what} has run {ran:.1f} s, over its {limit:.1f} s deadline "
            f"(median step {median:.2f} s): {'; '.join(parts)}; stacks in {dumped or 'stderr'}; exiting "
            f"so the launcher restarts the job"
        )
        self.exit(EXIT_HUNG)
