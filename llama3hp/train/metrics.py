"""Per-step metrics: loss, grad norm, lr, tokens/s, MFU, memory, GPU telemetry.

MFU (model FLOPs utilisation), as in PaLM:

    MFU = tokens_per_second * flops_per_token / peak_flops_per_second

- tokens_per_second: tokens of the global batch over the step's wall time (all ranks together;
  the peak is then multiplied by the number of devices).
- flops_per_token: `llama3hp.model.flops.flops_per_token(args, seq_len, doc_lens)`, the forward +
  backward model FLOPs (6 x matmul parameters + causal attention pairs of the documents actually
  packed, from the batch's cu_seqlens). Recomputation is not counted.
- peak: dense bf16 tensor-core FLOP/s of the GPU from `PEAK_BF16_FLOPS` by device name; on CPU
  the fp32 matmul rate measured once at start-up (`measure_cpu_peak`: the best of several 1024^3
  matmuls on all threads), so CPU MFU reads as "fraction of what this machine's BLAS reaches", not
  a vendor peak. It is fixed for the run: MFU is then comparable from step to step and run to run.
  `metrics.peak_flops` overrides both.

With FP8 on (`fp8.recipe` not "none") each row also carries, from `llama3hp.fp8.fp8_mfu`:

    fp8_share       s = fp8_flops_per_token / flops_per_token   (6 x params of the converted linears)
    model_tflops    tokens_per_second * flops_per_token / n_devices / 1e12
    mfu_bf16        achieved / P16     (the `mfu` column; can pass 100% of what bf16 allows)
    mfu_fp8         achieved / P8      (as if every FLOP could have run in FP8)
    mfu_mixed       achieved / P_mixed,  P_mixed = 1 / ((1 - s) / P16 + s / P8)

P_mixed is the time-weighted peak: the bf16 share takes its time at P16 whatever the FP8 share
does. P8 is the dense FP8 tensor-core peak from `PEAK_FP8_FLOPS` (`metrics.peak_fp8_flops`
overrides it). A GPU without FP8 tensor cores (A100) has no P8: mfu_fp8 and mfu_mixed are left
out and `fp8_mfu_note` says why. On CPU the FP8 GEMMs are emulated on the fp32 units, so P8 = P16
= the measured peak.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama3hp.errors import ConfigError

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s.
# Matched in order: the first key contained in the device name wins (PCIe before the SXM default).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
]

# Dense FP8 (E4M3/E5M2) tensor-core peaks, FP8 x FP8 -> fp32 accumulate, FLOP/s; same matching rule.
# A100 and A10G have no FP8 tensor cores and are absent on purpose.
PEAK_FP8_FLOPS: list[tuple[str, float]] = [
    ("H200", 1979e12),
    ("H100 PCIe", 1513e12),
    ("H100 NVL", 1671e12),
    ("H100", 1979e12),  # SXM5
    ("L40S", 733e12),
]


def _lookup(table: list[tuple[str, float]], name: str) -> float | None:
    for key, peak in table:
        if key.lower() in name.lower():
            return peak
    return None


def gpu_fp8_peak_flops(name: str) -> float | None:
    """FP8 dense peak for a CUDA device name, or None for a GPU without FP8 tensor cores (or unknown)."""
    return _lookup(PEAK_FP8_FLOPS, name)


def gpu_peak_flops(name: str) -> float | None:
    """bf16 dense peak for a CUDA device name such as "NVIDIA H100 80GB HBM3", or None if unknown."""
    return _lookup(PEAK_BF16_FLOPS, name)


def measure_cpu_peak(n: int = 1024, repeats: int = 8) -> float:
    """Best fp32 matmul FLOP/s of an n x n x n product on this CPU (about 0.3 s on 2 cores): the
    best of several, so a busy moment of a shared machine does not lower it."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    b = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    a @ b  # warm-up: thread pool, allocator
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, override: float = 0.0) -> tuple[float, bool]:
    """(peak FLOP/s, whether it was measured here rather than taken from the override or table)."""
    if override > 0:
        return override, False
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak, False
    return measure_cpu_peak(), True


def fp8_peak_flops(device: torch.device, bf16_peak: float, override: float = 0.0) -> tuple[float | None, str]:
    """(FP8 peak FLOP/s or None, a note saying where it came from or why there is none)."""
    if override > 0:
        return override, "metrics.peak_fp8_flops"
    if device.type != "cuda":
        return bf16_peak, "CPU: FP8 GEMMs emulated on the fp32 units, FP8 peak = measured peak"
    name = torch.cuda.get_device_name(device)
    peak = gpu_fp8_peak_flops(name)
    if peak is None:
        return None, f"{name} has no FP8 tensor-core peak in PEAK_FP8_FLOPS: FP8 MFU omitted"
    return peak, f"{name} dense FP8 peak"


def fp8_fields(
    tokens_per_s: float,
    flops_per_token: float,
    fp8_flops_per_token: float,
    peak_bf16: float,
    peak_fp8: float | None,
    n_devices: int = 1,
    note: str = "",
) -> dict[str, float | str]:
    """The FP8 columns of a metrics row (see module docstring); mfu_fp8/mfu_mixed only with a P8."""
    from llama3hp.fp8 import fp8_mfu

    per_device = tokens_per_s / n_devices
    fpt8 = min(fp8_flops_per_token, flops_per_token)
    m = fp8_mfu(flops_per_token, fpt8, per_device, peak_bf16, peak_fp8 or peak_bf16)
    out: dict[str, float | str] = {
        "fp8_share": m.fp8_share,
        "model_tflops": m.model_tflops,
        "mfu_bf16": m.mfu_bf16,
    }
    if peak_fp8 is None:
        out["fp8_mfu_note"] = note or "no FP8 peak for this device: FP8 MFU omitted"
    else:
        out |= {"mfu_fp8": m.mfu_fp8, "mfu_mixed": m.mfu_mixed, "peak_mixed_tflops": m.peak_mixed_tflops}
    return out


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation in [0, 1] (see module docstring)."""
    return tokens_per_s * flops_per_token / (peak * n_devices)


def doc_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """Document lengths [n_docs] from cu_seqlens [n_docs + 1]."""
    return torch.diff(cu_seqlens.detach().cpu().long()).tolist()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated by the caching allocator; CPU: the process's max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


TELEMETRY_KEYS = ("gpu_sm_clock_mhz", "gpu_temp_c", "gpu_power_w", "gpu_mem_used_gib")


class GpuTelemetry:
    """SM clock, temperature, power and memory of one GPU via nvidia-ml-py; inert when absent. Every
    rank reads its own GPU each step; the trainer agrees on the min and max over ranks in the step's
    one all-reduce (`telemetry_extra` / `telemetry_columns`)."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no driver library, no permission: telemetry is optional
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        try:
            return {
                "gpu_sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                "gpu_temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
                "gpu_power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "gpu_mem_used_gib": n.nvmlDeviceGetMemoryInfo(h).used / 1024**3,
            }
        except Exception:
            return {}


def telemetry_extra(reading: dict[str, float], keys: Sequence[str] = TELEMETRY_KEYS) -> dict[str, float]:
    """This rank's reading as values to agree on by MAX: each key as itself (the max over ranks) and
    negated (the min); a value this rank lacks is -inf for both."""
    out = {}
    for k in keys:
        v = reading.get(k)
        out[f"{k}_max"] = float(v) if v is not None else -math.inf
        out[f"{k}_min"] = -float(v) if v is not None else -math.inf
    return out


def telemetry_columns(synced: dict[str, float], keys: Sequence[str] = TELEMETRY_KEYS) -> dict[str, float]:
    """The metrics columns `<key>_min` / `<key>_max` over every rank from the agreed values."""
    out = {}
    for k in keys:
        hi, lo = synced.get(f"{k}_max", -math.inf), synced.get(f"{k}_min", -math.inf)
        if math.isfinite(hi) and math.isfinite(lo):
            out[f"{k}_max"], out[f"{k}_min"] = hi, -lo
    return out


class MetricsLogger:
    """Writes one JSON row per logged step to metrics.jsonl (and TensorBoard when asked)."""

    def __init__(
        self, run_dir: Path, *, jsonl: bool = True, tensorboard: bool = False, after_step: int | None = None
    ):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl" if jsonl else None
        if self.path is not None and after_step is not None:
            keep_rows_up_to(self.path, after_step)
        self._file = open(self.path, "a") if self.path else None
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: optional by design
                self._tb = None
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._file:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._tb:
            self._tb.close()
            self._tb = None


def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` from a metrics file (a resumed or rolled-back run replays
    them: each step keeps one row). Rewritten to a temporary name and renamed."""
    if not path.is_file():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def smoothed(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, ema = [], 0.0
    for i, v in enumerate(values, 1):
        ema = (1 - alpha) * ema + alpha * v
        out.append(ema / (1 - (1 - alpha) ** i))
    return out


PREFERENCE_STATS = ("rewards/margin", "rewards/accuracy")  # DPO's, shown beside the loss


def plot_loss(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """loss.png: loss per step and its moving average (and DPO's reward margin and accuracy in a second
    panel when the rows have them), written to a temp name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A resumed run re-logs steps (the last one wins); skipped non-finite steps leave a gap.
    last = {r["step"]: r for r in rows if math.isfinite(r["loss"])}
    steps = sorted(last)
    losses = [last[s]["loss"] for s in steps]
    dpo = all(k in last[steps[-1]] for k in PREFERENCE_STATS) if steps else False
    fig, axes = plt.subplots(1, 2 if dpo else 1, figsize=(12 if dpo else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) > 1:
        ax.plot(steps, smoothed(losses), lw=1.6, label="smoothed")
    if dpo:
        ax.axhline(math.log(2), ls=":", c="gray", lw=0.8, label="ln 2 (policy = reference)")
        ax.set_ylabel("DPO loss per pair")
        right = axes[0][1]
        for key in PREFERENCE_STATS:
            values = [last[s].get(key, math.nan) for s in steps]
            right.plot(
                steps, smoothed(values) if len(values) > 1 else values, lw=1.4, label=f"{key} (smoothed)"
            )
        right.set_xlabel("step")
        right.grid(alpha=0.3)
        right.legend()
    else:
        ax.axhline(math.log(128256), ls=":", c="gray", lw=0.8, label="ln(128256)")
        ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def format_summary(rows: Sequence[dict[str, Any]], wall_s: float) -> str:
    """The one-line end-of-run summary."""
    if not rows:
        return f"no steps run ({wall_s:.1f} s)"
    last = rows[-1]
    finite = [r["loss"] for r in rows if math.isfinite(r["loss"])] or [math.nan]
    loss_first, loss_last = rows[0]["loss"], smoothed(finite)[-1]
    skipped = sum(1 for r in rows if r.get("health_action") == "skip")
    tok_s = sum(r["tokens"] for r in rows) / max(sum(r["step_time_s"] for r in rows), 1e-9)
    return (
        f"done: {last['step']} steps, {last['tokens_seen']:,} tokens in {wall_s:.1f} s | "
        f"loss {loss_first:.3f} -> {last['loss']:.3f} (smoothed {loss_last:.3f}) | "
        f"{tok_s:,.0f} tok/s | MFU {100 * sum(r['mfu'] for r in rows) / len(rows):.2f}% | "
        f"peak mem {last['peak_mem_gib']:.2f} GiB"
        + (f" | {skipped} step(s) skipped by the health monitor" if skipped else "")
        + (
            f" | FP8 {100 * last['fp8_share']:.0f}% of FLOPs, mixed MFU "
            f"{100 * sum(r['mfu_mixed'] for r in rows) / len(rows):.2f}%"
            if all("mfu_mixed" in r for r in rows)
            else ""
        )
    )


@dataclass
class MetricsConfig:
    """What is logged each step and where (TOML section [metrics])."""

    log_interval: int = 1  # write a metrics row every N steps
    jsonl: bool = True  # write <run dir>/metrics.jsonl
    tensorboard: bool = False  # also write TensorBoard events when torch.utils.tensorboard imports
    progress: bool = True  # tqdm progress bar with loss, tok/s and MFU
    plot: bool = True  # write <run dir>/loss.png at the end
    gpu_telemetry: bool = True  # SM clock, temperature, power via nvidia-ml-py on CUDA
    profile_steps: list[int] = field(default_factory=list)  # [start, end): torch.profiler trace window
    peak_flops: float = 0.0  # peak FLOP/s for MFU (0 = from the GPU table, or measured on CPU)
    peak_fp8_flops: float = 0.0  # FP8 peak FLOP/s for the FP8 MFUs (0 = from the GPU table; see above)

    def validate(self) -> None:
        if self.log_interval <= 0:
            raise ConfigError(f"metrics.log_interval must be positive, got {self.log_interval}")
        p = self.profile_steps
        if p and (len(p) != 2 or not 0 <= p[0] < p[1]):
            raise ConfigError(f"metrics.profile_steps must be [start, end) with 0 <= start < end, got {p}")
        if self.peak_flops < 0 or self.peak_fp8_flops < 0:
            raise ConfigError("metrics.peak_flops and metrics.peak_fp8_flops must be >= 0")


class MetricsProcessor:
    """A run's metrics: completes each step's row (tokens/s, MFU against the peak fixed at start,
    memory, the FP8 and GPU columns), writes it (rank 0 only), drives the progress bar, and at the
    end plots the loss and prints the summary."""

    def __init__(
        self,
        cfg: MetricsConfig,
        run_dir: Path,
        device: torch.device,
        model_args: Any,
        *,
        leader: bool,
        world_size: int,
        total_steps: int,
        first_step: int,
        fp8_recipe: str | None = None,
        fp8_fqns: Sequence[str] = (),
    ):
        from tqdm import tqdm

        from llama3hp.model.flops import flops_per_token

        self.cfg, self.run_dir, self.device, self.args = cfg, run_dir, device, model_args
        self.leader, self.world_size, self.total_steps = leader, world_size, total_steps
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device, cfg.peak_flops)[0] if leader else 1.0
        self.fp8_recipe, self.fp8_fpt = fp8_recipe, 0.0
        if fp8_recipe is not None and fp8_fqns:
            from llama3hp.fp8 import fp8_flops_per_token

            self.fp8_fpt = fp8_flops_per_token(model_args, fqns=list(fp8_fqns))
        # A resumed run replays the steps after its checkpoint: their old rows go, each step keeps one.
        self.logger = MetricsLogger(
            run_dir, jsonl=cfg.jsonl and leader, tensorboard=cfg.tensorboard and leader, after_step=first_step
        )
        self.events_path = run_dir / "events.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.bar = tqdm(
            total=total_steps, initial=first_step, disable=not (cfg.progress and leader), unit="step",
            dynamic_ncols=True,
        )  # fmt: skip

    def log(self, row: dict[str, Any], step_time_s: float, doc_lens: list[int]) -> dict[str, Any]:
        """Complete a step's row (its "step", "loss", "tokens", "seq_len", ...) with the timing
        columns, record it, and write it every log_interval steps; returns it."""
        tok_s = row["tokens"] / step_time_s
        fpt = self.flops_per_token(self.args, row["seq_len"], doc_lens)
        row.update(
            step_time_s=step_time_s,
            tokens_per_s=tok_s,
            flops_per_token=fpt,
            mfu=mfu(tok_s, fpt, self.peak, self.world_size),
            peak_mem_gib=peak_memory_bytes(self.device) / 1024**3,
        )
        if self.fp8_recipe is not None:
            peak8, note = fp8_peak_flops(self.device, self.peak, self.cfg.peak_fp8_flops)
            row["fp8_recipe"] = self.fp8_recipe
            row.update(fp8_fields(tok_s, fpt, self.fp8_fpt, self.peak, peak8, self.world_size, note))
        self.rows.append(row)
        if self.leader and (row["step"] % self.cfg.log_interval == 0 or row["step"] == self.total_steps):
            self.logger.log(row)
        self.bar.update(1)
        extra = {"margin": f"{row['rewards/margin']:.3f}", "acc": f"{row['rewards/accuracy']:.2f}"} if all(
            k in row for k in PREFERENCE_STATS
        ) else {}  # fmt: skip
        self.bar.set_postfix(
            loss=f"{row['loss']:.3f}", **extra, tok_s=f"{tok_s:,.0f}", mfu=f"{100 * row['mfu']:.2f}%"
        )
        return row

    def event(self, kind: str, step: int, message: str, **fields: Any) -> None:
        """A run event (a health verdict, a rollback, a stop, a re-plan, stragglers, a resume): one log
        line and one row of <run dir>/events.jsonl, from rank 0."""
        if not self.leader:
            return
        self.bar.write(f"[{kind}] {message}")
        row = {"time": time.time(), "kind": kind, "step": step, "message": message, **fields}
        with open(self.events_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rewind(self, step: int) -> None:
        """Forget the rows after `step` (a rollback replays from there with other data)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self.logger.rows = [r for r in self.logger.rows if r["step"] <= step]
        if self.logger.path is not None and self.logger._file is not None:
            self.logger._file.close()
            keep_rows_up_to(self.logger.path, step)
            self.logger._file = open(self.logger.path, "a")
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.logger.close()

    def finish(self, wall_s: float) -> None:
        """After the last step (rank 0): loss.png and the one-line summary."""
        if not self.leader:
            return
        path = self.logger.path
        if self.cfg.plot and path is not None and path.is_file():
            plot_loss(read_jsonl(path), self.run_dir / "loss.png")
        print(format_summary(self.rows, wall_s), flush=True)
