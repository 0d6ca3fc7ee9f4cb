// Host-side launchers of the fused soft-MoME token-mixing kernels (mome_mix_kernels.cu).
// Plain CUDA runtime types only, so the kernels compile with nvcc alone (no torch headers);
// mome_mix.cpp binds them to torch tensors.
//
// Shapes: x [T, D] (row stride sxt), w [E, D] contiguous (dtype of x, or fp32 when w_f32),
// y [E, T, D] (strides sye, syt), out/dx [T, D] contiguous, dy [E, T, D] contiguous,
// gates/dlogits [T, E] fp32 contiguous, dw_part [splits, E, D] fp32. Last dims are unit-stride.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mks2 {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct MixShape {
  int64_t T;
  int64_t D;
  int64_t E;
  int64_t sxt;  // row stride of x (and of grad_out in the backward)
  int64_t sye;  // expert stride of y
  int64_t syt;  // row stride of y
};

// out = sum_e softmax(x w^T)[:, e] * y[e]; gates [T, E] fp32 saved for the backward.
cudaError_t launch_fwd(DType dt, const void* x, const void* w, bool w_f32, const void* y, void* out, float* gates,
                       MixShape s, cudaStream_t stream);

// dy = g * dout and dlogits = g * (dg - <g, dg>) with dg = <dout, y[e]>, one pass over dout and y.
cudaError_t launch_bwd_dy(DType dt, const void* grad_out, int64_t sgt, const void* y, const float* gates, void* dy,
                          float* dlogits, MixShape s, cudaStream_t stream);

// dx = dlogits @ w and dw_part[s] = dlogits[rows of split s]^T @ x[rows of split s] (fp32);
// the T tokens are cut into `splits` equal ranges, one grid row each.
cudaError_t launch_bwd_dxdw(DType dt, const void* x, const void* w, bool w_f32, const float* dlogits, void* dx,
                            float* dw_part, int64_t splits, MixShape s, cudaStream_t stream);

}  // namespace mks2
