// FP8 row-wise cast+transpose: x [M, K] -> q [M, K] (scales per row) and qt [K, M] (scales per
// column of x), both fp8, in one pass over x after an amax pass. Torch-free C interface so the
// kernel file compiles with nvcc alone; csrc/fp8/binding.cpp is the thin torch wrapper.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

enum Llama3hpFp8InDtype { LLAMA3HP_IN_F32 = 0, LLAMA3HP_IN_F16 = 1, LLAMA3HP_IN_BF16 = 2 };
enum Llama3hpFp8OutDtype { LLAMA3HP_FP8_E4M3 = 0, LLAMA3HP_FP8_E5M2 = 1 };

// x: row stride stride_xm (elements), unit column stride. q [M, K], qt [K, M] contiguous (1 byte
// each); s_inv [M], st_inv [K] fp32 dequantization scales. row_amax [M], col_amax [K]: fp32
// workspaces (overwritten). scale_ub <= 0: no upper bound on the amax.
// Returns cudaSuccess, cudaErrorInvalidValue for a bad dtype code, or the launch error.
cudaError_t llama3hp_fp8_cast_transpose(const void* x, int in_dtype, int out_dtype, int64_t M, int64_t K,
                                        int64_t stride_xm, float scale_ub, void* q, void* qt, float* s_inv,
                                        float* st_inv, float* row_amax, float* col_amax, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
