"""llama3hp.kernels: the fused ops the model calls.

Each op lives in one module with its Triton kernels, its autograd Function and its plain-PyTorch
reference (`*_ref`); an op that outgrows a file becomes a package split by job (`attention/`). The public function dispatches by `backend` ("auto" | "triton" | "torch",
see `dispatch.py`): Triton on CUDA, the reference elsewhere.
"""

from llama3hp.kernels.attention import (
    attention,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
    document_ids,
)
from llama3hp.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from llama3hp.kernels.dispatch import BACKENDS, check_backend, triton_available, use_triton
from llama3hp.kernels.fp8_gemm import fp8_gemm_rowwise, fp8_gemm_rowwise_ref, scaled_mm_rowwise
from llama3hp.kernels.fp8_quant import (
    dequantize_rowwise,
    fp8_cast_transpose,
    fp8_cast_transpose_ref,
    fp8_quantize_rowwise,
    fp8_quantize_rowwise_ref,
    fp8_scale_ref,
)
from llama3hp.kernels.logprobs import linear_logprobs, linear_logprobs_ref, sequence_sums
from llama3hp.kernels.paged_attention import paged_attention_decode, paged_attention_decode_ref
from llama3hp.kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_residual, rms_norm_residual_ref
from llama3hp.kernels.rope import apply_rope, apply_rope_ref
from llama3hp.kernels.swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref

__all__ = [
    "BACKENDS",
    "apply_rope",
    "apply_rope_ref",
    "attention",
    "attention_ref",
    "attention_varlen",
    "attention_varlen_ref",
    "check_backend",
    "dequantize_rowwise",
    "document_ids",
    "fp8_cast_transpose",
    "fp8_cast_transpose_ref",
    "fp8_gemm_rowwise",
    "fp8_gemm_rowwise_ref",
    "fp8_quantize_rowwise",
    "fp8_quantize_rowwise_ref",
    "fp8_scale_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "linear_logprobs",
    "linear_logprobs_ref",
    "paged_attention_decode",
    "paged_attention_decode_ref",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_residual",
    "rms_norm_residual_ref",
    "scaled_mm_rowwise",
    "sequence_sums",
    "swiglu",
    "swiglu_packed",
    "swiglu_packed_ref",
    "swiglu_ref",
    "triton_available",
    "use_triton",
]
