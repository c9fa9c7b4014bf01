"""Compiles every Triton kernel of llama3hp for an H100 (sm_90) on a machine without a GPU.

python -m benchmarks.aot_compile [--quick] [--out DIR] [--arch 90]

The interpreter (how the tests run kernels on CPU) checks what a kernel computes, not whether the
compiler accepts it: dtype rules of `tl.dot`, shape limits, shared memory that a tile size needs,
registers and spills only show up when Triton lowers the kernel to PTX and ptxas assembles it.
This runs the public ops (forward and backward) on CPU tensors with the GPU's dtypes (bf16, FP8)
and shapes that reach the GPU code paths, but with Triton's driver replaced by a stub that names
the target: every launch is compiled to a cubin and not run, and every config of an autotuned
kernel is compiled (the autotuner would try each on the GPU). For each cubin it reads registers,
spilled bytes (cuobjdump's STACK/LOCAL) and shared memory, and flags what would not launch on an
H100 (more than 227 KiB of shared memory per block). Attention's per-head-dim candidate tiles
(`kernels/attention/tiles.py`, _CANDIDATES) were chosen from this report.

It writes aot_sm<arch>.json and .md to --out (default benchmarks/results/aot-sm<arch>/: a compile
report made without a GPU, not a measurement). Exit status 1 on any compile error or a kernel that
does not fit; autotune configs that do not fit are listed (the autotuner skips them) but pass.
--quick compiles one shape per op (what the CI test runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

MAX_SHARED_BYTES = 232448  # H100: 227 KiB of shared memory per block (opt-in maximum)


# ------------------------------------------------------------------------------------ the stub target


class _StubDriver:
    """What JITFunction.run asks the active driver for, for one target and no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class CompileRecorder:
    """Patches Triton so launches compile (warmup) instead of running; records every cubin once."""

    def __init__(self, arch: int):
        self.arch = arch
        self.records: list[dict] = []
        self._seen: set[int] = set()
        self.scenario = ""
        self.autotuned = False

    @contextlib.contextmanager
    def active(self):
        from triton.runtime import driver
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        orig_run, orig_at_run = JITFunction.run, Autotuner.run
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            kernel = orig_run(fn, *args, grid=grid, warmup=True, **kwargs)
            rec._record(fn, args, kwargs, kernel, time.perf_counter() - t0)
            return kernel

        def autotuner_run(tuner, *args, **kwargs):
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            rec.autotuned = True
            configs = tuner.configs
            if tuner.early_config_prune:  # as the autotuner prunes before timing
                configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args)), **kwargs)
            try:
                for cfg in configs:
                    tuner.fn.run(*args, grid=(1,), warmup=True, **cfg.all_kwargs(), **kwargs)
            finally:
                rec.autotuned = False

        previous = driver._active  # None until first used; default() needs a GPU, so restore as found
        driver.set_active(_StubDriver(self.arch))
        JITFunction.run, Autotuner.run = run, autotuner_run
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = orig_run, orig_at_run
            driver._active = previous

    def _record(self, fn, args, kwargs, kernel, seconds: float) -> None:
        if id(kernel) in self._seen:
            return
        self._seen.add(id(kernel))
        md = kernel.metadata
        dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if hasattr(a, "data_ptr")})
        consts = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, int | bool | str)}
        self.records.append({
            "scenario": self.scenario,
            "kernel": fn.fn.__name__,
            "autotune_config": self.autotuned,
            "dtypes": ",".join(dtypes),
            "constexprs": consts,
            "num_warps": md.num_warps,
            "num_stages": md.num_stages,
            "shared_bytes": md.shared,
            "compile_s": round(seconds, 3),
            **cubin_resources(kernel.asm["cubin"], md.name),
        })  # fmt: skip


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def cubin_resources(cubin: bytes, name: str) -> dict:
    """Registers per thread and spilled bytes (stack + local) of `name` in a cubin, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    fields: dict[str, int] = {}
    for line in out.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, val = item.partition(":")
                if val.isdigit():
                    fields[key] = int(val)
    return {"regs": fields.get("REG"), "spill_bytes": fields.get("STACK", 0) + fields.get("LOCAL", 0)}


# ------------------------------------------------------------------------------------- the scenarios


def scenarios(quick: bool) -> list[tuple[str, Callable[[], None]]]:
    """(name, function) pairs that call every Triton kernel, forward and backward, GPU dtypes."""
    import torch

    import llama3hp.kernels as K
    from llama3hp.parallel.context import build_cp_query_segments

    bf16, e4m3, e5m2 = torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2

    def leaf(*shape, dtype=bf16):
        return torch.randn(*shape, dtype=torch.float32).to(dtype).requires_grad_(True)

    def rmsnorm(dim, residual):
        def go():
            x, w = leaf(8, dim), leaf(dim)
            if residual:
                y, h = K.rms_norm_residual(x, leaf(8, dim), w, backend="triton")
                (y.float().sum() + h.float().sum()).backward()
            else:
                K.rms_norm(x, w, backend="triton").float().sum().backward()

        return go

    def block_norms(dim):
        # The model's norms under autocast: fp32 residual stream + bf16 branch -> bf16 norm output.
        def go():
            x, a, w = leaf(8, dim, dtype=torch.float32), leaf(8, dim), leaf(dim, dtype=torch.float32)
            y0 = K.rms_norm(x, w, out_dtype=bf16, backend="triton")
            y, h = K.rms_norm_residual(a, x, w, out_dtype=bf16, backend="triton")
            (y0.float().sum() + y.float().sum() + h.sum()).backward()

        return go

    def rope(hq, hk, d):
        def go():
            q, k = leaf(1, 16, hq, d), leaf(1, 16, hk, d)
            pos = torch.arange(16)[None]
            inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
            qo, ko = K.apply_rope(q, k, pos, inv, backend="triton")
            (qo.float().sum() + ko.float().sum()).backward()

        return go

    def swiglu(ffn, packed=False):
        # packed: the model's path, [gate | up] rows of the grouped w1/w3 GEMM read through a row stride
        def go():
            if packed:
                K.swiglu_packed(leaf(8, 2 * ffn), backend="triton").float().sum().backward()
            else:
                K.swiglu(leaf(8, ffn), leaf(8, ffn), backend="triton").float().sum().backward()

        return go

    def cross_entropy(vocab, z):
        def go():
            h, w = leaf(16, 64), leaf(vocab, 64)
            t = torch.randint(0, vocab, (16,))
            K.linear_cross_entropy(h, w, t, z_loss_scale=z, backend="triton").backward()

        return go

    def logprobs(vocab):
        def go():
            h, w = leaf(300, 512), leaf(vocab, 512)
            t = torch.randint(0, vocab, (300,))
            t[:100] = -100
            K.linear_logprobs(h, w, t, chunk_size=128, backend="triton").sum().backward()

        return go

    def attention(d, hq, hk, deterministic, dtype=bf16, prefix=False):
        def go():
            T = 256
            q, k, v = (
                leaf(1, T, hq, d, dtype=dtype),
                leaf(1, T, hk, d, dtype=dtype),
                leaf(1, T, hk, d, dtype=dtype),
            )
            cu = torch.tensor([0, 100, 101, T], dtype=torch.int32)
            # With prefix: documents 1 and 2 share document 0 (a DPO pair's prompt | chosen | rejected).
            pre = torch.tensor([-1, 0, 0], dtype=torch.int32) if prefix else None
            o = K.attention(
                q, k, v, cu, max_seqlen=155, doc_prefix=pre, deterministic=deterministic, backend="triton"
            )
            o.float().sum().backward()

        return go

    def attention_cp(d):
        def go():
            T = 256
            q, k, v = leaf(T // 2, 8, d), leaf(T, 2, d), leaf(T, 2, d)
            cu = torch.tensor([0, 90, T], dtype=torch.int32)
            seg = build_cp_query_segments(cu, [(0, 64), (192, 256)])
            o, lse = K.attention_varlen(
                q, k, v, seg.cu_seqlens_q, cu, seg.max_seqlen_q, 166, q_doc_idx=seg.q_doc_idx,
                q_pos_offsets=seg.q_pos_offsets, return_lse=True, backend="triton",
            )  # fmt: skip
            (o.float().sum() + lse.sum()).backward()

        return go

    def fp8(in_dtype, fp8_dtype):
        def go():
            x = torch.randn(64, 128).to(in_dtype)
            K.fp8_quantize_rowwise(x, fp8_dtype, 1200.0, check_finite=False, backend="triton")
            K.fp8_cast_transpose(x, fp8_dtype, None, check_finite=False, backend="triton")

        return go

    def fp8_gemm(a_dtype, b_dtype):
        def go():
            a, b = torch.randn(64, 128).to(a_dtype), torch.randn(32, 128).to(b_dtype)
            K.fp8_gemm_rowwise(a, b, torch.ones(64), torch.ones(32), bf16, backend="triton")

        return go

    out = [
        ("rmsnorm 4096", rmsnorm(4096, False)),
        ("rmsnorm+residual 4096", rmsnorm(4096, True)),
        ("block norms under autocast 4096", block_norms(4096)),
        ("rope 32q/8kv hd128", rope(32, 8, 128)),
        ("swiglu 14336", swiglu(14336)),
        ("swiglu packed 14336 (model)", swiglu(14336, packed=True)),
        ("fused linear CE vocab 128256", cross_entropy(128256, 0.0)),
        ("fused log-probs vocab 128256", logprobs(128256)),
        ("attention hd128 GQA 4", attention(128, 8, 2, False)),
        ("attention hd128 GQA 4, deterministic", attention(128, 8, 2, True)),
        ("attention hd128 GQA 4, shared prefix, deterministic", attention(128, 8, 2, True, prefix=True)),
        ("fp8 quant bf16->e4m3", fp8(bf16, e4m3)),
        ("fp8 gemm e4m3", fp8_gemm(e4m3, e4m3)),
    ]
    if not quick:
        out += [
            ("rmsnorm 8192", rmsnorm(8192, False)),
            ("rmsnorm 16384", rmsnorm(16384, False)),
            ("rmsnorm+residual 8192", rmsnorm(8192, True)),
            ("block norms under autocast 8192", block_norms(8192)),
            ("block norms under autocast 16384", block_norms(16384)),
            ("rope 64q/8kv hd128", rope(64, 8, 128)),
            ("rope 16q/4kv hd64", rope(16, 4, 64)),
            ("swiglu 28672", swiglu(28672)),
            ("swiglu packed 3584 (8B at TP4)", swiglu(3584, packed=True)),
            ("fused linear CE vocab 16032 (TP8 shard), z-loss", cross_entropy(16032, 1e-4)),
            ("attention hd128 GQA 16", attention(128, 16, 1, False)),
            ("attention hd64 GQA 4", attention(64, 8, 2, False)),
            ("attention hd64 MHA, deterministic", attention(64, 4, 4, True)),
            ("attention hd128 fp16", attention(128, 4, 1, False, torch.float16)),
            ("attention CP segments hd128", attention_cp(128)),
            ("attention hd128 GQA 4, shared prefix", attention(128, 8, 2, False, prefix=True)),
            ("fp8 quant fp32->e5m2", fp8(torch.float32, e5m2)),
            ("fp8 gemm e5m2 x e4m3", fp8_gemm(e5m2, e4m3)),
        ]
    return out


# ----------------------------------------------------------------------------------------- reporting


def run(quick: bool, arch: int) -> tuple[list[dict], list[dict]]:
    """(records of compiled kernels, errors) for every scenario."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("aot_compile: unset TRITON_INTERPRET (it compiles for the GPU, not the interpreter)")
    rec = CompileRecorder(arch)
    errors = []
    with rec.active():
        for name, go in scenarios(quick):
            rec.scenario = name
            t0 = time.perf_counter()
            try:
                go()
            except Exception as e:  # noqa: BLE001 - report every scenario's failure, not the first
                errors.append({"scenario": name, "error": f"{type(e).__name__}: {e}"[:2000],
                               "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
            n = sum(r["scenario"] == name for r in rec.records)
            print(f"{name:<50} {n:3d} kernels {time.perf_counter() - t0:6.1f} s", flush=True)
    for r in rec.records:
        r["fits_h100"] = r["shared_bytes"] <= MAX_SHARED_BYTES
    return rec.records, errors


def markdown(records: list[dict], errors: list[dict], env: dict) -> str:
    lines = [
        f"# Triton kernels compiled for sm_{env['arch']} without a GPU",
        "",
        f"Date: {env['date']}. Triton {env['triton']}, torch {env['torch']}. Command: `{env['command']}`.",
        "A compile report (ptxas via Triton, resources read by cuobjdump), not a measurement.",
        "",
        "| scenario | kernel | autotune config | constexprs | warps | stages | regs | spill B | shared B | fits H100 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(
            f"| {r['scenario']} | {r['kernel']} | {'yes' if r['autotune_config'] else ''} | {consts} | "
            f"{r['num_warps']} | {r['num_stages']} | {r['regs']} | {r['spill_bytes']} | {r['shared_bytes']} | "
            f"{'yes' if r['fits_h100'] else '**no**'} |"
        )
    if errors:
        lines += ["", "## Compile errors", ""] + [
            f"- {e['scenario']}: {e['error'].splitlines()[0]}" for e in errors
        ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one shape per op (the CI test)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--out", type=Path, default=None, help="folder for aot_sm<arch>.{json,md}")
    args = p.parse_args(argv)
    import torch
    import triton

    records, errors = run(args.quick, args.arch)
    env = {
        "arch": args.arch,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "command": " ".join(
            ["python -m benchmarks.aot_compile", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"aot-sm{args.arch}"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"aot_sm{args.arch}"
    write_atomic(
        out / f"{stem}.json", json.dumps({"env": env, "kernels": records, "errors": errors}, indent=1)
    )
    write_atomic(out / f"{stem}.md", markdown(records, errors, env))
    misfits = [r for r in records if not r["fits_h100"] and not r["autotune_config"]]
    for e in errors:
        print(f"\nCOMPILE ERROR in {e['scenario']}:\n{e['traceback']}", file=sys.stderr)
    for r in misfits:
        print(
            f"does not fit an H100: {r['kernel']} {r['constexprs']} needs {r['shared_bytes']} B",
            file=sys.stderr,
        )
    spills = sorted({r["kernel"] for r in records if r["spill_bytes"]})
    print(f"{len(records)} kernels compiled, {len(errors)} scenario errors, {len(misfits)} do not fit, "
          f"spills in: {', '.join(spills) or 'none'}; report in {out}")  # fmt: skip
    return 1 if errors or misfits else 0


if __name__ == "__main__":
    sys.exit(main())
