"""Training schedules as pure functions of the step and the tokens seen.

Nothing here keeps state: the trainer asks "what is the learning rate / batch / sequence length
at step s having seen t tokens", so a resumed run picks up exactly where it stopped.

- Learning rate (the Llama 3 recipe): linear warm-up over `warmup_steps`, cosine decay to
  `min_lr_ratio * lr` at the end of the decay phase, then an optional anneal phase where the rate
  falls linearly to 0 over the last `anneal_steps` steps (from the floor), or over the last
  `anneal_tokens` tokens (a linear factor on the step schedule). The paper anneals the last 40M
  tokens to 0 and averages the checkpoints taken there.
- Batch-size ramp-up: a list of (tokens_seen, global_batch_rows); from each threshold on, that
  many rows (the paper starts with a smaller batch for stability).
- Staged sequence length: a list of (tokens_seen, seq_len) or (tokens_seen, seq_len, cp) (the
  paper goes 8K -> 128K in six stages); the optional third element is the stage's context-parallel
  degree, or "auto" (the trainer re-plans its mesh at the boundary: `llama3hp/train/stages.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate schedule parameters (see module docstring)."""

    lr: float  # peak learning rate, reached at the end of warm-up
    total_steps: int  # optimizer steps in the run
    warmup_steps: int = 0  # linear warm-up steps (0 = start at the peak)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    anneal_steps: int = 0  # final steps linearly from the floor to 0 (0 = none)
    anneal_tokens: int = 0  # or: final tokens linearly to 0 (needs total_tokens)
    total_tokens: int = 0  # tokens the whole run will see; used by anneal_tokens


def lr_at(s: LRSchedule, step: int, tokens_seen: int = 0) -> float:
    """Learning rate for optimizer step `step` (0-based) taken after `tokens_seen` tokens.

    Warm-up uses (step + 1) / warmup so the very first step already moves the weights.
    The cosine phase spans [warmup_steps, total_steps - anneal_steps).
    """
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    floor = s.lr * s.min_lr_ratio
    decay_end = s.total_steps - s.anneal_steps
    span = max(decay_end - s.warmup_steps, 1)
    progress = min(max((step - s.warmup_steps) / span, 0.0), 1.0)
    lr = floor + (s.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if s.anneal_steps and step >= decay_end:
        # Step decay_end runs at the floor, the last step at floor / anneal_steps.
        lr = floor * (s.total_steps - step) / s.anneal_steps
    if s.anneal_tokens and s.total_tokens:
        left = s.total_tokens - tokens_seen
        if left < s.anneal_tokens:
            # Scales whatever the step schedule gives, so the rate stays continuous.
            lr = lr * max(left, 0) / s.anneal_tokens
    return lr


def _staged(table: Sequence[Sequence[Any]], tokens_seen: int, default: Any, column: int = 1) -> Any:
    value = default
    for entry in table:
        if tokens_seen >= entry[0] and len(entry) > column:
            value = entry[column]
    return value


def batch_rows_at(ramp: Sequence[Sequence[int]], tokens_seen: int, default: int) -> int:
    """Global batch rows after `tokens_seen` tokens: the value of the last (threshold, rows) entry
    with threshold <= tokens_seen; `default` before the first threshold."""
    return int(_staged(ramp, tokens_seen, default))


def seq_len_at(stages: Sequence[Sequence[Any]], tokens_seen: int, default: int) -> int:
    """Sequence length after `tokens_seen` tokens, from (threshold, seq_len[, layout]) stages (as above)."""
    return int(_staged(stages, tokens_seen, default))


def stage_cp_at(stages: Sequence[Sequence[Any]], tokens_seen: int, default: int) -> int | str:
    """The context-parallel degree the stage in effect asks for: its third element (an int, or "auto":
    the smallest that fits memory), `default` (parallel.cp) for a stage without one."""
    value = default
    for entry in stages:
        if tokens_seen >= entry[0]:
            value = entry[2] if len(entry) > 2 else default
    return value


def plan_tokens(
    steps: int,
    rows: int,
    seq_len: int,
    ramp: Sequence[Sequence[int]] = (),
    stages: Sequence[Sequence[int]] = (),
) -> int:
    """Tokens a run of `steps` optimizer steps will see, walking the ramp and the stages."""
    tokens = 0
    for _ in range(steps):
        tokens += batch_rows_at(ramp, tokens, rows) * seq_len_at(stages, tokens, seq_len)
    return tokens


def check_table(name: str, table: Sequence[Sequence[Any]], *, layouts: bool = False) -> None:
    """One-line error unless `table` is a list of [tokens_seen, value] pairs with rising thresholds
    and positive values; with `layouts`, an entry may add a third element, a context-parallel degree
    (an int >= 1) or "auto"."""
    last = -1
    width = "[tokens_seen, value] or [tokens_seen, value, cp]" if layouts else "[tokens_seen, value]"
    for entry in table:
        if not isinstance(entry, (list, tuple)) or len(entry) not in ((2, 3) if layouts else (2,)):
            raise ValueError(f"{name}: each entry must be {width}, got {entry!r}")
        threshold, value = entry[0], entry[1]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (threshold, value)):
            raise ValueError(f"{name}: thresholds and values must be integers, got {list(entry)}")
        if threshold < 0 or value <= 0:
            raise ValueError(f"{name}: thresholds must be >= 0 and values > 0, got {list(entry)}")
        if threshold <= last:
            raise ValueError(f"{name}: thresholds must rise strictly, got {threshold} after {last}")
        if len(entry) == 3 and entry[2] != "auto" and not (isinstance(entry[2], int) and entry[2] >= 1):
            raise ValueError(
                f'{name}: a stage\'s layout is a context-parallel degree >= 1 or "auto", got {entry[2]!r}'
            )
        last = threshold
