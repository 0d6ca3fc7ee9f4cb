// Torch binding of the fused soft-MoME token-mixing CUDA kernels: ops torch.ops.mks2_cuda.{mix_fwd, mix_bwd}.
//
// Built on demand by mks2_kernels/cuda_mix.py with torch.utils.cpp_extension.load (is_python_module=False).
// Callers (mks2_kernels/cuda_mix.py) pass x [T, D], w [E, D], y [E, T, D] and grad_out [T, D] whose last
// dimension is unit-stride (rows may be strided: no copy) plus contiguous outputs they allocated;
// w is made contiguous fp32-or-x.dtype here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mome_mix.h"

namespace {

mks2::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return mks2::DType::kFloat32;
    case at::kHalf:
      return mks2::DType::kFloat16;
    case at::kBFloat16:
      return mks2::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "mome_mix cuda backend: unsupported dtype ", t.scalar_type(), " (fp32, fp16, bf16)");
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && y.is_cuda(), "mome_mix cuda backend: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && y.dim() == 3, "mome_mix cuda backend: want x [T, D], w [E, D], y [E, T, D]");
  TORCH_CHECK(w.size(1) == x.size(1) && y.size(0) == w.size(0) && y.size(1) == x.size(0) && y.size(2) == x.size(1),
              "mome_mix cuda backend: shape mismatch x ", x.sizes(), " w ", w.sizes(), " y ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "mome_mix cuda backend: x and y must share a dtype");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(2) == 1, "mome_mix cuda backend: last dims must be unit-stride");
  // Each warp keeps its token's E logits (and dg) in shared memory: 4 warps * 2E floats must fit in 48 KB.
  TORCH_CHECK(w.size(0) <= 1024, "mome_mix cuda backend supports up to 1024 experts, got ", w.size(0));
}

// w as the kernels read it: contiguous, in x's dtype or fp32 (anything else is converted to fp32).
at::Tensor router_for_kernel(const at::Tensor& w, const at::Tensor& x) {
  if (w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat) return w.contiguous();
  return w.to(at::kFloat).contiguous();
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mome_mix cuda backend: ", what, " failed: ", cudaGetErrorString(err));
}

mks2::MixShape shape_of(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y) {
  return mks2::MixShape{x.size(0), x.size(1), w.size(0), x.stride(0), y.stride(0), y.stride(1)};
}

void check_out(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.is_contiguous() && t.device() == x.device(),
              "mome_mix cuda backend: output ", name, " must be a contiguous ", dtype, " tensor of shape ", shape,
              " on ", x.device());
}

// Outputs are allocated by the caller (cuda_mix.py), so tests can poison them.
void mix_fwd(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& y, at::Tensor& out, at::Tensor& gates) {
  check_inputs(x, w_in, y);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = router_for_kernel(w_in, x);
  const mks2::MixShape s = shape_of(x, w, y);
  check_out(out, {s.T, s.D}, x.scalar_type(), x, "out");
  check_out(gates, {s.T, s.E}, at::kFloat, x, "gates");
  if (s.T == 0) return;
  const bool w_f32 = w.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  check_cuda(mks2::launch_fwd(to_dtype(x), x.data_ptr(), w.data_ptr(), w_f32, y.data_ptr(), out.data_ptr(),
                              gates.data_ptr<float>(), s, c10::cuda::getCurrentCUDAStream().stream()),
             "forward launch");
}

// dw_part [splits, E, D] fp32 receives per-split dw partials; the caller sums them (deterministic, no atomics).
void mix_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& y,
             const at::Tensor& gates, at::Tensor& dy, at::Tensor& dlogits, at::Tensor& dx, at::Tensor& dw_part) {
  check_inputs(x, w_in, y);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() && grad_out.stride(1) == 1,
              "mome_mix cuda backend: grad_out must match x with a unit-stride last dim");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = router_for_kernel(w_in, x);
  const mks2::MixShape s = shape_of(x, w, y);
  check_out(gates, {s.T, s.E}, at::kFloat, x, "gates");
  check_out(dy, {s.E, s.T, s.D}, y.scalar_type(), x, "dy");
  check_out(dlogits, {s.T, s.E}, at::kFloat, x, "dlogits");
  check_out(dx, {s.T, s.D}, x.scalar_type(), x, "dx");
  TORCH_CHECK(dw_part.dim() == 3 && dw_part.size(0) >= 1, "mome_mix cuda backend: dw_part must be [splits, E, D]");
  check_out(dw_part, {dw_part.size(0), s.E, s.D}, at::kFloat, x, "dw_part");
  if (s.T == 0) return;
  const bool w_f32 = w.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  const mks2::DType dt = to_dtype(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(mks2::launch_bwd_dy(dt, grad_out.data_ptr(), grad_out.stride(0), y.data_ptr(), gates.data_ptr<float>(),
                                 dy.data_ptr(), dlogits.data_ptr<float>(), s, stream),
             "backward dy launch");
  check_cuda(mks2::launch_bwd_dxdw(dt, x.data_ptr(), w.data_ptr(), w_f32, dlogits.data_ptr<float>(), dx.data_ptr(),
                                   dw_part.data_ptr<float>(), dw_part.size(0), s, stream),
             "backward dx/dw launch");
}

}  // namespace

// The op namespace is a macro so kernels/tune.py can load differently-configured builds side by side.
#ifndef MKS2_CUDA_LIB
#define MKS2_CUDA_LIB mks2_cuda
#endif
#define MKS2_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MKS2_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

MKS2_TORCH_LIBRARY(MKS2_CUDA_LIB, m) {
  m.def("mix_fwd(Tensor x, Tensor w, Tensor y, Tensor(a!) out, Tensor(b!) gates) -> ()");
  m.def(
      "mix_bwd(Tensor grad_out, Tensor x, Tensor w, Tensor y, Tensor gates, Tensor(a!) dy, Tensor(b!) dlogits, "
      "Tensor(c!) dx, Tensor(d!) dw_part) -> ()");
}

MKS2_TORCH_LIBRARY_IMPL(MKS2_CUDA_LIB, CUDA, m) {
  m.impl("mix_fwd", &mix_fwd);
  m.impl("mix_bwd", &mix_bwd);
}
