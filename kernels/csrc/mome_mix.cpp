// Torch binding of the fused soft-MoME token-mixing CUDA kernels: ops torch.ops.mks2_cuda.{mix_fwd, mix_bwd}.
//
// Built on demand by mks2_kernels/cuda_mix.py with torch.utils.cpp_extension.load (is_python_module=False).
// Callers (mks2_kernels/op.py) pass x [T, D], w [E, D], y [E, T, D] and grad_out [T, D] whose last
// dimension is unit-stride (rows may be strided: no copy); w is made contiguous fp32-or-x.dtype here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

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

std::tuple<at::Tensor, at::Tensor> mix_fwd(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& y) {
  check_inputs(x, w_in, y);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = router_for_kernel(w_in, x);
  const mks2::MixShape s = shape_of(x, w, y);
  at::Tensor out = at::empty({s.T, s.D}, x.options());
  at::Tensor gates = at::empty({s.T, s.E}, x.options().dtype(at::kFloat));
  if (s.T == 0) return {out, gates};
  check_cuda(mks2::launch_fwd(to_dtype(x), x.data_ptr(), w.data_ptr(), w.scalar_type() == at::kFloat &&
                                x.scalar_type() != at::kFloat, y.data_ptr(), out.data_ptr(), gates.data_ptr<float>(), s,
                                c10::cuda::getCurrentCUDAStream().stream()),
               "forward launch");
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& w_in, const at::Tensor& y,
                                                       const at::Tensor& gates_in) {
  check_inputs(x, w_in, y);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() && grad_out.stride(1) == 1,
              "mome_mix cuda backend: grad_out must match x with a unit-stride last dim");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = router_for_kernel(w_in, x);
  const at::Tensor gates = gates_in.to(at::kFloat).contiguous();
  const mks2::MixShape s = shape_of(x, w, y);
  const bool w_f32 = w.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  const mks2::DType dt = to_dtype(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  at::Tensor dy = at::empty({s.E, s.T, s.D}, y.options());
  at::Tensor dx = at::empty({s.T, s.D}, x.options());
  if (s.T == 0) return {dx, at::zeros_like(w_in), dy};
  at::Tensor dlogits = at::empty({s.T, s.E}, x.options().dtype(at::kFloat));
  check_cuda(mks2::launch_bwd_dy(dt, grad_out.data_ptr(), grad_out.stride(0), y.data_ptr(), gates.data_ptr<float>(),
                                   dy.data_ptr(), dlogits.data_ptr<float>(), s, stream),
               "backward dy launch");

  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()), "device query");
  const int64_t splits = mks2::dxdw_splits(s.T, s.D, s.E, sms);
  at::Tensor dw_part = at::empty({splits, s.E, s.D}, x.options().dtype(at::kFloat));
  check_cuda(mks2::launch_bwd_dxdw(dt, x.data_ptr(), w.data_ptr(), w_f32, dlogits.data_ptr<float>(), dx.data_ptr(),
                                     dw_part.data_ptr<float>(), splits, s, stream),
               "backward dx/dw launch");
  // Deterministic two-stage reduction of the per-split dw partials (fp32), then w's dtype.
  at::Tensor dw = (splits > 1 ? dw_part.sum(0) : dw_part.select(0, 0)).to(w_in.scalar_type());
  return {dx, dw, dy};
}

}  // namespace

TORCH_LIBRARY(mks2_cuda, m) {
  m.def("mix_fwd(Tensor x, Tensor w, Tensor y) -> (Tensor, Tensor)");
  m.def("mix_bwd(Tensor grad_out, Tensor x, Tensor w, Tensor y, Tensor gates) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mks2_cuda, CUDA, m) {
  m.impl("mix_fwd", &mix_fwd);
  m.impl("mix_bwd", &mix_bwd);
}
