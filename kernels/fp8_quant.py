"""FP8 row-wise quantization: amax -> scale -> saturating cast, and the cast+transpose the backward needs.

The recipe (the one place its math lives; the emulated path, the Triton kernels and the CUDA
kernel all follow it, and `fp8_scale_ref` / `_fp8_scale` below are the two spellings of it):

    a      = amax of |x| over the row (the reduction dim of the GEMM that consumes it)
    a_c    = clamp(a, min=AMAX_EPS, max=scale_ub)        (scale_ub: None = no upper bound)
    scale  = fp8_max / a_c                               (1.0 for an all-zero row)
    q      = cast_fp8(clamp(x * scale, -fp8_max, fp8_max))   (round to nearest even)
    x     ~= q * scale_inv,  scale_inv = 1 / scale       (what the GEMM epilogue multiplies by)

`scale_ub` is the paper's bound on the dynamic activation scale (1200 in Llama 3's FP8 recipe,
Meta's llama-models loader and torchao's `activation_scale_ub`): it clamps the per-row amax
before the scale is taken, so a row whose |x| exceeds 1200 saturates at +-fp8_max instead of
stretching the scale (and so losing the resolution of every other value in the row).

Non-finite input: a row containing inf or NaN gets amax = inf (NaN is mapped to inf before the
max, so a NaN can never hide behind a max that ignores it) and scale = scale_inv = NaN, so any
GEMM that consumes the row produces NaN and the loss shows it, without a host sync. Called
with `check_finite=True` the public functions instead raise a one-line ValueError (one device
sync per call).

Outputs are `scale_inv` (the dequantization scale, fp32), the convention of `torch._scaled_mm`.

Shape legend: M rows, K columns of the input x [M, K].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import check_backend, use_triton

# Floor on the amax, as torchao and PyTorch's FP8 tests do: 448 / 1e-12 is still a finite fp32 scale,
# while a denormal amax (1e-40) would make fp8_max / amax overflow to inf.
AMAX_EPS = 1e-12

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype: 448 for E4M3, 57344 for E5M2."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"unsupported fp8 dtype {dtype}: use torch.float8_e4m3fn or torch.float8_e5m2")
    return float(torch.finfo(dtype).max)


def fp8_scale_ref(amax: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None = None):
    """The recipe's scale from an amax tensor of any shape (fp32). Returns (scale, scale_inv), fp32."""
    a = amax.float()
    a_c = a.clamp(min=AMAX_EPS)
    if scale_ub is not None:
        a_c = a_c.clamp(max=scale_ub)
    scale = fp8_max(fp8_dtype) / a_c
    scale = torch.where(a == 0, torch.ones_like(scale), scale)
    scale = torch.where(torch.isfinite(a), scale, torch.full_like(scale, float("nan")))
    return scale, 1.0 / scale


@triton.jit
def _fp8_scale(amax, FP8_MAX: tl.constexpr, SCALE_UB: tl.constexpr, HAS_UB: tl.constexpr):
    """Triton spelling of fp8_scale_ref (amax: fp32 tensor, inf for a non-finite row)."""
    a_c = tl.maximum(amax, 1e-12)
    if HAS_UB:
        a_c = tl.minimum(a_c, SCALE_UB)
    scale = FP8_MAX / a_c
    scale = tl.where(amax == 0.0, 1.0, scale)
    return tl.where(amax == float("inf"), float("nan"), scale)


@triton.jit
def _to_fp8(v, dtype: tl.constexpr, FP8_MAX: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """Saturating cast of fp32 v to the fp8 `dtype`, round to nearest even.

    EXACT_ROUND (set under TRITON_INTERPRET): the interpreter's fp32->fp8 conversion loses the carry
    when rounding overflows the mantissa (124.7 -> 64 instead of 128 in E4M3), so v is first rounded
    onto the fp8 grid in fp32 (integer RNE on the bits for normals, a magic-number add for
    subnormals) and only exact values are converted. The GPU converts with cvt.rn.satfinite.
    """
    v = tl.clamp(v, -FP8_MAX, FP8_MAX)
    if EXACT_ROUND:
        if dtype == tl.float8e5:
            mant: tl.constexpr = 2
            min_normal: tl.constexpr = 2.0**-14
            sub_magic: tl.constexpr = 192.0  # fp32 spacing 2**-16 = E5M2 subnormal spacing
        else:
            # Triton wants a constexpr annotation on each assignment; mypy reads them as redefinitions.
            mant: tl.constexpr = 3  # type: ignore[no-redef]
            min_normal: tl.constexpr = 2.0**-6  # type: ignore[no-redef]
            sub_magic: tl.constexpr = 24576.0  # type: ignore[no-redef]  # fp32 spacing 2**-9 = E4M3 subnormals
        drop: tl.constexpr = 23 - mant
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & (-(1 << drop))
        v = tl.where(tl.abs(v) < min_normal, (v + sub_magic) - sub_magic, bits.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def _abs_nan_to_inf(x):
    return tl.where(x == x, tl.abs(x), float("inf"))


def _row_amax_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    a = x.float().abs()
    return torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a).amax(dim=dim)


def _cast_ref(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    m = fp8_max(fp8_dtype)
    return (x.float() * scale).clamp(-m, m).to(fp8_dtype)


def fp8_quantize_rowwise_ref(x: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None = None):
    """Row-wise quantization of x [M, K] along K. Returns (q [M, K] fp8, scale_inv [M] fp32)."""
    amax = _row_amax_ref(x, dim=1) if x.shape[1] else x.new_zeros(x.shape[0], dtype=torch.float32)
    scale, scale_inv = fp8_scale_ref(amax, fp8_dtype, scale_ub)
    return _cast_ref(x, scale[:, None], fp8_dtype), scale_inv


def fp8_cast_transpose_ref(x: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None = None):
    """x [M, K] quantized along K (per row) and along M (per column, stored transposed).

    Returns (q [M, K], scale_inv [M], qt [K, M], scale_inv_t [K]); qt is row-major, qt[k, m]
    quantizes x[m, k] with column k's scale.
    """
    q, s = fp8_quantize_rowwise_ref(x, fp8_dtype, scale_ub)
    qt, st = fp8_quantize_rowwise_ref(x.t(), fp8_dtype, scale_ub)
    return q, s, qt.contiguous(), st


def dequantize_rowwise(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """q [M, K] fp8, scale_inv [M] -> fp32 [M, K]."""
    return q.float() * scale_inv[:, None]


# ---------------------------------------------------------------------------------------------- Triton


@triton.jit
def _fp8_quant_rowwise_kernel(
    X, Q, S_INV, M, K, stride_xm, stride_qm,
    FP8_MAX: tl.constexpr, SCALE_UB: tl.constexpr, HAS_UB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EXACT_ROUND: tl.constexpr,
):  # fmt: skip
    # Two passes over BLOCK_M rows: amax, then scale + cast. The second read usually hits L2.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(_abs_nan_to_inf(x), axis=1))
    scale = _fp8_scale(amax, FP8_MAX, SCALE_UB, HAS_UB)
    tl.store(S_INV + rows, 1.0 / scale, mask=row_mask)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q = _to_fp8(x * scale[:, None], Q.dtype.element_ty, FP8_MAX, EXACT_ROUND)
        tl.store(Q + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)


@triton.jit
def _fp8_tile_amax_kernel(
    X, ROW_PART, COL_PART, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    # Partial amaxes of one tile: ROW_PART[pid_k, m] and COL_PART[pid_m, k]; reduced by torch.amax.
    # Plain stores instead of float atomics keep the result deterministic and interpreter-friendly.
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    a = _abs_nan_to_inf(x.to(tl.float32))
    tl.store(ROW_PART + pid_k.to(tl.int64) * M + rows, tl.max(a, axis=1), mask=rows < M)
    tl.store(COL_PART + pid_m.to(tl.int64) * K + cols, tl.max(a, axis=0), mask=cols < K)


@triton.jit
def _fp8_cast_transpose_kernel(
    X, ROW_AMAX, COL_AMAX, Q, QT, S_INV, ST_INV, M, K, stride_xm,
    FP8_MAX: tl.constexpr, SCALE_UB: tl.constexpr, HAS_UB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EXACT_ROUND: tl.constexpr,
):  # fmt: skip
    # One tile, quantized twice: with its rows' scales into Q [M, K], with its columns' scales into
    # QT [K, M]. The transposed store goes through registers/shared memory (tl.trans), not strided.
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask, cmask = rows < M, cols < K
    mask = rmask[:, None] & cmask[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    row_scale = _fp8_scale(tl.load(ROW_AMAX + rows, mask=rmask, other=0.0), FP8_MAX, SCALE_UB, HAS_UB)
    col_scale = _fp8_scale(tl.load(COL_AMAX + cols, mask=cmask, other=0.0), FP8_MAX, SCALE_UB, HAS_UB)
    q = _to_fp8(x * row_scale[:, None], Q.dtype.element_ty, FP8_MAX, EXACT_ROUND)
    tl.store(Q + rows64[:, None] * K + cols[None, :], q, mask=mask)
    qt = _to_fp8(tl.trans(x) * col_scale[:, None], QT.dtype.element_ty, FP8_MAX, EXACT_ROUND)
    tl.store(QT + cols64[:, None] * M + rows[None, :], qt, mask=cmask[:, None] & rmask[None, :])
    if pid_k == 0:
        tl.store(S_INV + rows, 1.0 / row_scale, mask=rmask)
    if pid_m == 0:
        tl.store(ST_INV + cols, 1.0 / col_scale, mask=cmask)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _quant_rowwise_triton(x: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None):
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((M, K), dtype=fp8_dtype, device=x.device)
    s_inv = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s_inv
    # 4 rows x 1,024 columns per program on the GPU (8 KiB of bf16 per pass); small tiles under the
    # interpreter so a test grid stays at tens of programs.
    block_m, block_k = (16, 32) if _interpreting() else (4, 1024)
    _fp8_quant_rowwise_kernel[(triton.cdiv(M, block_m),)](
        x, q, s_inv, M, K, x.stride(0), q.stride(0),
        FP8_MAX=fp8_max(fp8_dtype), SCALE_UB=float(scale_ub or 0.0), HAS_UB=scale_ub is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, EXACT_ROUND=_interpreting(),
    )  # fmt: skip
    return q, s_inv


def _cast_transpose_triton(x: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None):
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    dev = x.device
    q = torch.empty((M, K), dtype=fp8_dtype, device=dev)
    qt = torch.empty((K, M), dtype=fp8_dtype, device=dev)
    s_inv = torch.empty((M,), dtype=torch.float32, device=dev)
    st_inv = torch.empty((K,), dtype=torch.float32, device=dev)
    if M == 0 or K == 0:
        return q, s_inv.fill_(1.0), qt, st_inv.fill_(1.0)
    # 64x64 tiles: 8 KiB of bf16 in, two 4 KiB fp8 tiles out per program.
    block_m, block_k = (16, 16) if _interpreting() else (64, 64)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    row_part = torch.empty((grid[1], M), dtype=torch.float32, device=dev)
    col_part = torch.empty((grid[0], K), dtype=torch.float32, device=dev)
    _fp8_tile_amax_kernel[grid](x, row_part, col_part, M, K, x.stride(0), BLOCK_M=block_m, BLOCK_K=block_k)
    row_amax, col_amax = row_part.amax(dim=0), col_part.amax(dim=0)
    _fp8_cast_transpose_kernel[grid](
        x, row_amax, col_amax, q, qt, s_inv, st_inv, M, K, x.stride(0),
        FP8_MAX=fp8_max(fp8_dtype), SCALE_UB=float(scale_ub or 0.0), HAS_UB=scale_ub is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, EXACT_ROUND=_interpreting(),
    )  # fmt: skip
    return q, s_inv, qt, st_inv


# ---------------------------------------------------------------------------------------------- public


def check_quant_input(x: torch.Tensor, fp8_dtype: torch.dtype, scale_ub: float | None) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"fp8 quantization expects a 2-D tensor [M, K], got shape {tuple(x.shape)}: reshape first"
        )
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"fp8 quantization input must be float32/float16/bfloat16, got {x.dtype}")
    fp8_max(fp8_dtype)
    if scale_ub is not None and not scale_ub > 0:
        raise ValueError(f"scale_ub must be positive or None, got {scale_ub}")


def check_finite_scales(*scale_invs: torch.Tensor) -> None:
    """Raises ValueError when any row was non-finite (its scale_inv is NaN); one device sync."""
    for s in scale_invs:
        if s.numel() and not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"fp8 quantization input has inf/NaN in {int((~torch.isfinite(s)).sum())} row(s): "
                "fix the upstream overflow (lower the learning rate, check the data) before quantizing"
            )


def fp8_quantize_rowwise(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_ub: float | None = None,
    *,
    check_finite: bool = True,
    backend: str = "auto",
):
    """Row-wise FP8 quantization of x [M, K] along K. Returns (q [M, K] fp8, scale_inv [M] fp32)."""
    check_backend(backend)
    check_quant_input(x, fp8_dtype, scale_ub)
    if use_triton(backend, x):
        q, s = _quant_rowwise_triton(x, fp8_dtype, scale_ub)
    else:
        q, s = fp8_quantize_rowwise_ref(x, fp8_dtype, scale_ub)
    if check_finite:
        check_finite_scales(s)
    return q, s


def fp8_cast_transpose(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_ub: float | None = None,
    *,
    check_finite: bool = True,
    backend: str = "auto",
):
    """x [M, K] quantized per row and per column in one go (the operands of a forward GEMM and of the
    backward GEMM that reduces over M). Returns (q [M, K], scale_inv [M], qt [K, M], scale_inv_t [K]).
    """
    check_backend(backend)
    check_quant_input(x, fp8_dtype, scale_ub)
    if use_triton(backend, x):
        out = _cast_transpose_triton(x, fp8_dtype, scale_ub)
    else:
        out = fp8_cast_transpose_ref(x, fp8_dtype, scale_ub)
    if check_finite:
        check_finite_scales(out[1], out[3])
    return out
