// FP8 row-wise cast+transpose (see cast_transpose.h). Recipe, as in kernels/fp8_quant.py:
//   a_c = clamp(amax, 1e-12, scale_ub); scale = fp8_max / a_c (1 for amax == 0, NaN for a row with
//   inf/NaN); q = cvt_rn_satfinite(x * scale); scale_inv = 1 / scale.
// Two kernels over 32x32 tiles: (1) per-tile row/column amax merged with atomicMax on the float
// bits (valid because the values are non-negative; NaN is mapped to +inf first); (2) each tile
// read once into shared memory and written twice, row-major and transposed, both coalesced.

#include "cast_transpose.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace {

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // blockDim = (32, 8): each thread handles 4 rows of a tile
constexpr float kAmaxEps = 1e-12f;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float abs_nan_to_inf(float v) { return isnan(v) ? INFINITY : fabsf(v); }

__host__ __device__ __forceinline__ float fp8_scale(float amax, float fp8_max, float scale_ub) {
  if (!isfinite(amax)) return NAN;
  if (amax == 0.f) return 1.f;
  float a = fmaxf(amax, kAmaxEps);
  if (scale_ub > 0.f) a = fminf(a, scale_ub);
  return fp8_max / a;
}

template <__nv_fp8_interpretation_t kFmt>
__device__ __forceinline__ __nv_fp8_storage_t to_fp8(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, kFmt);
}

template <typename T>
__global__ void tile_amax_kernel(const T* __restrict__ x, int64_t M, int64_t K, int64_t stride_xm,
                                 unsigned int* __restrict__ row_amax, unsigned int* __restrict__ col_amax) {
  __shared__ float col_part[kRowsPerPass][kTile];
  const int64_t m0 = int64_t(blockIdx.x) * kTile, k0 = int64_t(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k = k0 + tx;
  float cmax = 0.f;
  for (int r = ty; r < kTile; r += kRowsPerPass) {
    const int64_t m = m0 + r;
    float a = (m < M && k < K) ? abs_nan_to_inf(to_float(x[m * stride_xm + k])) : 0.f;
    cmax = fmaxf(cmax, a);
    // Row max across the 32 lanes of this warp (one warp = one tile row).
    for (int off = 16; off > 0; off >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));
    if (tx == 0 && m < M) atomicMax(row_amax + m, __float_as_uint(a));
  }
  col_part[ty][tx] = cmax;
  __syncthreads();
  if (ty == 0) {
    float c = col_part[0][tx];
    for (int i = 1; i < kRowsPerPass; ++i) c = fmaxf(c, col_part[i][tx]);
    if (k < K) atomicMax(col_amax + k, __float_as_uint(c));
  }
}

template <typename T, __nv_fp8_interpretation_t kFmt>
__global__ void cast_transpose_kernel(const T* __restrict__ x, int64_t M, int64_t K, int64_t stride_xm,
                                      const float* __restrict__ row_amax, const float* __restrict__ col_amax,
                                      float fp8_max, float scale_ub, __nv_fp8_storage_t* __restrict__ q,
                                      __nv_fp8_storage_t* __restrict__ qt, float* __restrict__ s_inv,
                                      float* __restrict__ st_inv) {
  __shared__ float tile[kTile][kTile + 1];  // +1: no bank conflicts on the transposed read
  __shared__ float row_scale[kTile], col_scale[kTile];
  const int64_t m0 = int64_t(blockIdx.x) * kTile, k0 = int64_t(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (ty == 0) {
    const int64_t m = m0 + tx, k = k0 + tx;
    const float rs = m < M ? fp8_scale(row_amax[m], fp8_max, scale_ub) : 1.f;
    const float cs = k < K ? fp8_scale(col_amax[k], fp8_max, scale_ub) : 1.f;
    row_scale[tx] = rs;
    col_scale[tx] = cs;
    if (blockIdx.y == 0 && m < M) s_inv[m] = 1.f / rs;
    if (blockIdx.x == 0 && k < K) st_inv[k] = 1.f / cs;
  }
  for (int r = ty; r < kTile; r += kRowsPerPass) {
    const int64_t m = m0 + r, k = k0 + tx;
    tile[r][tx] = (m < M && k < K) ? to_float(x[m * stride_xm + k]) : 0.f;
  }
  __syncthreads();
  for (int r = ty; r < kTile; r += kRowsPerPass) {
    const int64_t m = m0 + r, k = k0 + tx;
    if (m < M && k < K) q[m * K + k] = to_fp8<kFmt>(tile[r][tx] * row_scale[r]);
  }
  for (int c = ty; c < kTile; c += kRowsPerPass) {
    const int64_t k = k0 + c, m = m0 + tx;
    if (m < M && k < K) qt[k * M + m] = to_fp8<kFmt>(tile[tx][c] * col_scale[c]);
  }
}

template <typename T, __nv_fp8_interpretation_t kFmt>
cudaError_t launch(const void* x, int64_t M, int64_t K, int64_t stride_xm, float fp8_max, float scale_ub,
                   void* q, void* qt, float* s_inv, float* st_inv, float* row_amax, float* col_amax,
                   cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(row_amax, 0, M * sizeof(float), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(col_amax, 0, K * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const dim3 grid((M + kTile - 1) / kTile, (K + kTile - 1) / kTile), block(kTile, kRowsPerPass);
  const T* xt = static_cast<const T*>(x);
  tile_amax_kernel<T><<<grid, block, 0, stream>>>(xt, M, K, stride_xm, reinterpret_cast<unsigned int*>(row_amax),
                                                  reinterpret_cast<unsigned int*>(col_amax));
  cast_transpose_kernel<T, kFmt><<<grid, block, 0, stream>>>(
      xt, M, K, stride_xm, row_amax, col_amax, fp8_max, scale_ub, static_cast<__nv_fp8_storage_t*>(q),
      static_cast<__nv_fp8_storage_t*>(qt), s_inv, st_inv);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fmt(int out_dtype, const void* x, int64_t M, int64_t K, int64_t stride_xm, float scale_ub,
                       void* q, void* qt, float* s_inv, float* st_inv, float* row_amax, float* col_amax,
                       cudaStream_t stream) {
  if (out_dtype == LLAMA3HP_FP8_E4M3)
    return launch<T, __NV_E4M3>(x, M, K, stride_xm, 448.f, scale_ub, q, qt, s_inv, st_inv, row_amax, col_amax,
                                stream);
  if (out_dtype == LLAMA3HP_FP8_E5M2)
    return launch<T, __NV_E5M2>(x, M, K, stride_xm, 57344.f, scale_ub, q, qt, s_inv, st_inv, row_amax,
                                col_amax, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" cudaError_t llama3hp_fp8_cast_transpose(const void* x, int in_dtype, int out_dtype, int64_t M,
                                                   int64_t K, int64_t stride_xm, float scale_ub, void* q,
                                                   void* qt, float* s_inv, float* st_inv, float* row_amax,
                                                   float* col_amax, cudaStream_t stream) {
  if (M <= 0 || K <= 0) return cudaSuccess;
  switch (in_dtype) {
    case LLAMA3HP_IN_F32:
      return launch_fmt<float>(out_dtype, x, M, K, stride_xm, scale_ub, q, qt, s_inv, st_inv, row_amax, col_amax,
                               stream);
    case LLAMA3HP_IN_F16:
      return launch_fmt<__half>(out_dtype, x, M, K, stride_xm, scale_ub, q, qt, s_inv, st_inv, row_amax,
                                col_amax, stream);
    case LLAMA3HP_IN_BF16:
      return launch_fmt<__nv_bfloat16>(out_dtype, x, M, K, stride_xm, scale_ub, q, qt, s_inv, st_inv, row_amax,
                                       col_amax, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
