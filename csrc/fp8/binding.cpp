// Thin torch wrapper around llama3hp_fp8_cast_transpose (cast_transpose.cu): argument checks with
// clear messages, output allocation, the current stream. Registered as the custom op
// llama3hp::fp8_cast_transpose (with its fake) in llama3hp/fp8/cuda_ops.py.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cast_transpose.h"

namespace {

std::vector<at::Tensor> fp8_cast_transpose(const at::Tensor& x, int64_t out_code, double scale_ub) {
  TORCH_CHECK(x.is_cuda(), "fp8_cast_transpose: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "fp8_cast_transpose: x must be 2-D [M, K], got ", x.dim(), " dims");
  TORCH_CHECK(x.stride(1) == 1, "fp8_cast_transpose: x must have unit column stride (call .contiguous())");
  int in_code;
  switch (x.scalar_type()) {
    case at::kFloat: in_code = LLAMA3HP_IN_F32; break;
    case at::kHalf: in_code = LLAMA3HP_IN_F16; break;
    case at::kBFloat16: in_code = LLAMA3HP_IN_BF16; break;
    default: TORCH_CHECK(false, "fp8_cast_transpose: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(out_code == LLAMA3HP_FP8_E4M3 || out_code == LLAMA3HP_FP8_E5M2,
              "fp8_cast_transpose: out code must be 0 (e4m3) or 1 (e5m2), got ", out_code);
  const at::ScalarType fp8 = out_code == LLAMA3HP_FP8_E4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor q = at::empty({M, K}, x.options().dtype(fp8));
  at::Tensor qt = at::empty({K, M}, x.options().dtype(fp8));
  at::Tensor s_inv = at::ones({M}, f32), st_inv = at::ones({K}, f32);
  at::Tensor row_amax = at::empty({M}, f32), col_amax = at::empty({K}, f32);
  const cudaError_t err = llama3hp_fp8_cast_transpose(
      x.data_ptr(), in_code, static_cast<int>(out_code), M, K, x.stride(0), static_cast<float>(scale_ub),
      q.data_ptr(), qt.data_ptr(), s_inv.data_ptr<float>(), st_inv.data_ptr<float>(), row_amax.data_ptr<float>(),
      col_amax.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fp8_cast_transpose: CUDA error ", cudaGetErrorString(err));
  return {q, s_inv, qt, st_inv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llama3hp FP8 CUDA kernels";
  m.def("fp8_cast_transpose", &fp8_cast_transpose, "x [M, K] -> (q [M, K], s_inv [M], qt [K, M], st_inv [K])",
        pybind11::arg("x"), pybind11::arg("out_code"), pybind11::arg("scale_ub"));
}
