"""Pipeline parallelism: stage partitioning, the 1F1B and interleaved 1F1B schedules, a simulator
and the executor that runs a schedule with asynchronous send/recv.

A schedule is, per pipeline rank, a list of `Action(kind, mb, chunk)`: "F" or "B" of micro-batch
`mb` on the rank's model chunk `chunk` (virtual stage chunk*pp + rank). Each schedule reads as
warm-up (forwards only), steady state (one forward, one backward) and cool-down (backwards only).
The executor only blocks on receives and posts the receive of the next action before computing the
current one, so transfers overlap compute; the simulator models exactly that and so also proves a
schedule free of deadlock before it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Action:
    kind: str  # "F" forward or "B" backward
    mb: int  # micro-batch index
    chunk: int  # model chunk on this rank (virtual stage chunk * pp + rank)


def partition_layers(
    n_layers: int, pp: int, virtual: int = 1, edge_cost: float = 1.0, explicit: list[int] | None = None
) -> list[tuple[int, int]]:
    """Layer ranges [start, end) of the pp*virtual virtual stages, in pipeline order.

    The embedding (first stage) and the head and loss (last stage) count as `edge_cost` layers each,
    so the balanced split gives those stages fewer transformer layers (the paper's choice);
    `explicit` gives the layer count of every virtual stage instead.
    """
    n_stages = pp * virtual
    if explicit:
        if len(explicit) != n_stages or sum(explicit) != n_layers or min(explicit) < 1:
            raise ValueError(
                f"parallel.pp_stage_layers {explicit} must give {n_stages} positive counts summing to {n_layers} layers"
            )
        counts = list(explicit)
    else:
        if n_layers < n_stages:
            raise ValueError(
                f"{n_layers} layers cannot be split over pp*virtual = {n_stages} stages: need at least one layer each"
            )
        total = n_layers + 2 * edge_cost
        bounds = [0] + [
            min(max(round(k * total / n_stages - edge_cost), 0), n_layers) for k in range(1, n_stages)
        ]
        bounds.append(n_layers)
        for k in range(1, n_stages + 1):  # at least one layer per stage, keeping room for the rest
            bounds[k] = min(max(bounds[k], bounds[k - 1] + 1), n_layers - (n_stages - k))
        counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    starts = [sum(counts[:k]) for k in range(n_stages)]
    return [(s, s + c) for s, c in zip(starts, counts)]


def schedule_1f1b(pp: int, m: int, rank: int) -> list[Action]:
    """One-forward-one-backward (PipeDream-Flush): any m >= 1; at most pp - rank micro-batches in flight."""
    warmup = min(pp - rank - 1, m)
    acts = [Action("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):  # steady state
        acts += [Action("F", warmup + i, 0), Action("B", i, 0)]
    acts += [Action("B", i, 0) for i in range(m - warmup, m)]  # cool-down
    return acts


def _interleaved_order(pp: int, virtual: int, m: int, backward: bool) -> list[tuple[int, int]]:
    """(mb, chunk) in the order a rank runs them: groups of pp micro-batches sweep the chunks
    (in reverse for backward); a last, smaller group covers m not a multiple of pp."""
    order = []
    for g0 in range(0, m, pp):
        group = range(g0, min(g0 + pp, m))
        chunks = range(virtual - 1, -1, -1) if backward else range(virtual)
        order += [(mb, c) for c in chunks for mb in group]
    return order


def schedule_interleaved(pp: int, virtual: int, m: int, rank: int) -> list[Action]:
    """Interleaved 1F1B (Narayanan et al. 2021) over `virtual` chunks per rank: the bubble shrinks by
    `virtual`. Warm-up runs enough forwards to fill the pipeline of pp*virtual virtual stages."""
    fwd = _interleaved_order(pp, virtual, m, backward=False)
    bwd = _interleaved_order(pp, virtual, m, backward=True)
    total = m * virtual
    warmup = min((pp - rank - 1) * 2 + (virtual - 1) * pp, total)
    acts = [Action("F", mb, c) for mb, c in fwd[:warmup]]
    for i in range(total - warmup):  # steady state
        acts += [Action("F", *fwd[warmup + i]), Action("B", *bwd[i])]
    acts += [Action("B", mb, c) for mb, c in bwd[total - warmup :]]  # cool-down
    return acts


def forward_schedule(virtual: int, m: int) -> list[Action]:
    """Forward only (evaluation, a frozen reference's pass), the same list on every rank: micro-batch
    by micro-batch, chunk by chunk. Each forward waits only for earlier entries of other ranks' lists,
    so it cannot deadlock."""
    return [Action("F", mb, c) for mb in range(m) for c in range(virtual)]


def build_schedule(kind: str, pp: int, virtual: int, m: int, rank: int) -> list[Action]:
    if m < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch, got {m}")
    if kind == "1f1b":
        return schedule_1f1b(pp, m, rank)
    if kind == "interleaved":
        return schedule_interleaved(pp, virtual, m, rank)
    raise ValueError(f"unknown pipeline schedule {kind!r}: use '1f1b' or 'interleaved'")


@dataclass
class ScheduleStats:
    makespan: float  # time of the whole step, in units of one full-stage forward
    bubble: float  # idle fraction of the pipeline ranks
    peak_in_flight: list[float]  # per rank: most micro-batches' stage activations held at once


def simulate(
    kind: str, pp: int, virtual: int, m: int, t_fwd: float = 1.0, t_bwd: float = 2.0
) -> ScheduleStats:
    """Run the schedule on a model of the executor: a rank starts its next action when the action's
    input has been produced (sends never block). A forward of one chunk costs t_fwd / virtual.
    Raises if the schedule would deadlock. For 1F1B the bubble is (pp-1)/(m+pp-1)."""
    v = virtual if kind == "interleaved" else 1
    n_vs = pp * v
    plans = [build_schedule(kind, pp, v, m, r) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    clock, pos = [0.0] * pp, [0] * pp
    in_flight, peak = [0] * pp, [0] * pp
    while any(pos[r] < len(plans[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(plans[r]):
                a = plans[r][pos[r]]
                vs = a.chunk * pp + r
                if a.kind == "F":
                    dep = ("F", a.mb, vs - 1) if vs > 0 else None
                else:
                    dep = ("B", a.mb, vs + 1) if vs < n_vs - 1 else ("F", a.mb, vs)
                if dep is not None and dep not in done:
                    break
                start = max(clock[r], done[dep] if dep is not None else 0.0)
                clock[r] = start + (t_fwd if a.kind == "F" else t_bwd) / v
                done[(a.kind, a.mb, vs)] = clock[r]
                in_flight[r] += 1 if a.kind == "F" else -1
                peak[r] = max(peak[r], in_flight[r])
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {kind} deadlocks with pp={pp}, virtual={v}, m={m}")
    makespan = max(clock)
    busy = m * (t_fwd + t_bwd)
    return ScheduleStats(makespan / t_fwd, 1.0 - busy / makespan, [p / v for p in peak])


class PipelineExecutor:
    """Runs one rank's schedule over its model chunks.

    forward(mb, chunk, x) -> output: hidden states for the next stage, or the scalar loss to
    backpropagate on the last virtual stage; x is the received activation (None on stage 0).
    act_shape/act_dtype describe the activations between stages (the same for every micro-batch).
    """

    def __init__(self, pp_group, pp_ranks: list[int], pp_rank: int, virtual: int):
        self.group, self.ranks, self.rank, self.v = pp_group, pp_ranks, pp_rank, virtual
        self.pp = len(pp_ranks)
        self.n_vs = self.pp * virtual

    def _peer(self, vs: int) -> int:
        return self.ranks[vs % self.pp]

    def _tag(self, kind: str, mb: int, vs: int) -> int:
        return (mb * self.n_vs + vs) * 2 + (kind == "B")

    def run(
        self,
        actions: list[Action],
        forward: Callable[[int, int, torch.Tensor | None], torch.Tensor],
        act_shape: tuple[int, ...],
        act_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        pending: dict[int, tuple[torch.Tensor, Any]] = {}  # (buffer, its irecv's work handle)
        sends: list[tuple[torch.Tensor, Any]] = []  # (tensor kept alive, its isend's work handle)

        def needs_recv(i: int) -> tuple[int, int] | None:
            """(source virtual stage, tag) of the tensor action i receives, or None."""
            a = actions[i]
            vs = a.chunk * self.pp + self.rank
            if a.kind == "F" and vs > 0:
                return vs - 1, self._tag("F", a.mb, vs - 1)
            if a.kind == "B" and vs < self.n_vs - 1:
                return vs + 1, self._tag("B", a.mb, vs + 1)
            return None

        def post_recv(i: int) -> None:
            if i < len(actions) and i not in pending and (src := needs_recv(i)) is not None:
                buf = torch.empty(act_shape, dtype=act_dtype, device=device)
                pending[i] = (buf, dist.irecv(buf, src=self._peer(src[0]), group=self.group, tag=src[1]))

        for i, a in enumerate(actions):
            post_recv(i)
            post_recv(i + 1)  # the next action's input travels while this one computes
            received = None
            if i in pending:
                received, work = pending.pop(i)
                work.wait()
            vs = a.chunk * self.pp + self.rank
            key = (a.mb, a.chunk)
            if a.kind == "F":
                x = received.requires_grad_() if received is not None else None
                assert vs == 0 or x is not None, "a forward past the first stage receives its input"
                out = forward(a.mb, a.chunk, x)
                inputs[key], outputs[key] = x, out
                if vs < self.n_vs - 1:
                    t = out.detach().to(act_dtype).contiguous()
                    sends.append(
                        (
                            t,
                            dist.isend(
                                t, dst=self._peer(vs + 1), group=self.group, tag=self._tag("F", a.mb, vs)
                            ),
                        )
                    )
            else:
                out, x = outputs.pop(key), inputs.pop(key)
                if vs == self.n_vs - 1:
                    out.backward()
                else:
                    assert received is not None, "a backward before the last stage receives its gradient"
                    torch.autograd.backward(out, grad_tensors=received.to(out.dtype))
                if vs > 0:
                    assert x is not None and x.grad is not None
                    g = x.grad.to(act_dtype).contiguous()
                    sends.append(
                        (
                            g,
                            dist.isend(
                                g, dst=self._peer(vs - 1), group=self.group, tag=self._tag("B", a.mb, vs)
                            ),
                        )
                    )
        for _, work in sends:
            work.wait()
