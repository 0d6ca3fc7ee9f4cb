// Fused soft-MoME token mixing: CUDA kernels (forward, backward dy+dlogits, backward dx+dw).
//
// Layout and formulas: see mome_mix.h and kernels/reference.py. Design, per kernel:
// - fwd: one warp per token. Pass 1 streams x[t] and accumulates the E logits (w rows come from L1/L2;
//   experts in register groups of EG); softmax in fp32 through shared memory; pass 2 streams y[e, t]
//   and writes out[t]. HBM traffic: x + y + out, each once.
// - bwd_dy: one warp per token, one pass over dout[t] and y[e, t]: writes dy[e, t] = g * dout and
//   reduces dg[e] = <dout, y[e]>; then dlogits = g * (dg - <g, dg>) to a [T, E] fp32 buffer.
// - bwd_dxdw: each thread owns VEC columns and walks a range of tokens: dx[t] = sum_e dlogits[t, e] w[e]
//   and dw[e] partial += dlogits[t, e] x[t] in fp32 registers, written to dw_part[split] (no atomics;
//   the host sums the few splits).
// Vector path: 16-byte loads/stores (VEC = 16 / sizeof(T)) when D, the strides and every base pointer
// allow it; otherwise the scalar path (VEC = 1) handles any D.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "mome_mix.h"

// Launch shape knobs (compile-time; kernels/tune.py builds variants with -D to compare them).
#ifndef MKS2_ROW_WARPS
#define MKS2_ROW_WARPS 4  // warps (= tokens) per block of the row kernels
#endif
#ifndef MKS2_ROW_UNROLL
#define MKS2_ROW_UNROLL 2  // column steps in flight per warp
#endif
#ifndef MKS2_COL_THREADS
#define MKS2_COL_THREADS 128  // threads per block of the dx/dw kernel
#endif
#ifndef MKS2_COL_UNROLL
#define MKS2_COL_UNROLL 4  // tokens in flight per thread of the dx/dw kernel
#endif
#define MKS2_PRAGMA(x) _Pragma(#x)
#define MKS2_UNROLL(n) MKS2_PRAGMA(unroll n)

namespace mks2 {
namespace {

constexpr int kWarp = 32;
constexpr int kRowThreads = MKS2_ROW_WARPS * kWarp;
constexpr int kColThreads = MKS2_COL_THREADS;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements as fp32; one 16-byte access when VEC * sizeof(T) == 16 (alignment checked on host).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_f(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_f(p[k]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) e[k] = from_f<T>(v[k]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = from_f<T>(v[k]);
  }
}

// Router weight row slice: w has x's dtype, or fp32 when w_f32 (uniform branch).
template <typename T, int VEC>
__device__ __forceinline__ void load_w(const void* __restrict__ w, bool w_f32, int64_t off, float (&v)[VEC]) {
  if (w_f32) {
    const float* p = static_cast<const float*>(w) + off;
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int k = 0; k < VEC; k += 4) {
        const float4 f = __ldg(reinterpret_cast<const float4*>(p + k));
        v[k] = f.x;
        v[k + 1] = f.y;
        v[k + 2] = f.z;
        v[k + 3] = f.w;
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = p[k];
    }
  } else {
    load_vec<T, VEC>(static_cast<const T*>(w) + off, v);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T, int VEC, int EG>
__global__ void __launch_bounds__(kRowThreads) fwd_kernel(const T* __restrict__ x, const void* __restrict__ w,
                                                          bool w_f32, const T* __restrict__ y, T* __restrict__ out,
                                                          float* __restrict__ gates, MixShape s) {
  extern __shared__ float smem[];  // [warps, E]: logits, then gates
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kRowThreads / kWarp) + warp;
  if (t >= s.T) return;  // whole warps leave together; only warp-level sync below
  float* g = smem + warp * s.E;
  const T* xr = x + t * s.sxt;

  // Pass 1: logits[e] = <x[t], w[e]>, experts in register groups of EG (x re-read from L1 only if E > EG).
  for (int64_t e0 = 0; e0 < s.E; e0 += EG) {
    float acc[EG];
#pragma unroll
    for (int j = 0; j < EG; ++j) acc[j] = 0.f;
    MKS2_UNROLL(MKS2_ROW_UNROLL)
    for (int64_t c = lane * VEC; c < s.D; c += kWarp * VEC) {
      float xv[VEC];
      load_vec<T, VEC>(xr + c, xv);
#pragma unroll
      for (int j = 0; j < EG; ++j) {
        if (e0 + j < s.E) {
          float wv[VEC];
          load_w<T, VEC>(w, w_f32, (e0 + j) * s.D + c, wv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[j] = fmaf(xv[k], wv[k], acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < EG; ++j) {
      const float v = warp_sum(acc[j]);
      if (lane == 0 && e0 + j < s.E) g[e0 + j] = v;
    }
  }
  __syncwarp();

  // Softmax over E in fp32, lanes striding over experts.
  float m = -INFINITY;
  for (int64_t e = lane; e < s.E; e += kWarp) m = fmaxf(m, g[e]);
  m = warp_max(m);
  float sum = 0.f;
  for (int64_t e = lane; e < s.E; e += kWarp) {
    const float p = expf(g[e] - m);
    g[e] = p;
    sum += p;
  }
  sum = warp_sum(sum);
  const float inv = 1.f / sum;
  for (int64_t e = lane; e < s.E; e += kWarp) {
    const float gv = g[e] * inv;
    g[e] = gv;
    gates[t * s.E + e] = gv;
  }
  __syncwarp();

  // Pass 2: out[t] = sum_e g[e] y[e, t].
  const T* yr = y + t * s.syt;
  T* orow = out + t * s.D;
  MKS2_UNROLL(MKS2_ROW_UNROLL)
  for (int64_t c = lane * VEC; c < s.D; c += kWarp * VEC) {
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    for (int64_t e0 = 0; e0 < s.E; e0 += EG) {
#pragma unroll
      for (int j = 0; j < EG; ++j) {
        if (e0 + j < s.E) {
          float yv[VEC];
          load_vec<T, VEC>(yr + (e0 + j) * s.sye + c, yv);
          const float gv = g[e0 + j];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = fmaf(gv, yv[k], acc[k]);
        }
      }
    }
    store_vec<T, VEC>(orow + c, acc);
  }
}

template <typename T, int VEC, int EG>
__global__ void __launch_bounds__(kRowThreads)
    bwd_dy_kernel(const T* __restrict__ go, int64_t sgt, const T* __restrict__ y, const float* __restrict__ gates,
                  T* __restrict__ dy, float* __restrict__ dlogits, MixShape s) {
  extern __shared__ float smem[];  // [warps, 2E]: gates, dg
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kRowThreads / kWarp) + warp;
  if (t >= s.T) return;
  float* g = smem + warp * 2 * s.E;
  float* dg = g + s.E;
  for (int64_t e = lane; e < s.E; e += kWarp) g[e] = gates[t * s.E + e];
  __syncwarp();

  const T* gr = go + t * sgt;
  const T* yr = y + t * s.syt;
  const int64_t dy_se = s.T * s.D;
  T* dyr = dy + t * s.D;
  for (int64_t e0 = 0; e0 < s.E; e0 += EG) {
    float acc[EG], ge[EG];
#pragma unroll
    for (int j = 0; j < EG; ++j) {
      acc[j] = 0.f;
      ge[j] = e0 + j < s.E ? g[e0 + j] : 0.f;
    }
    MKS2_UNROLL(MKS2_ROW_UNROLL)
    for (int64_t c = lane * VEC; c < s.D; c += kWarp * VEC) {
      float gv[VEC];
      load_vec<T, VEC>(gr + c, gv);
#pragma unroll
      for (int j = 0; j < EG; ++j) {
        if (e0 + j < s.E) {
          float yv[VEC], d[VEC];
          load_vec<T, VEC>(yr + (e0 + j) * s.sye + c, yv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            acc[j] = fmaf(gv[k], yv[k], acc[j]);
            d[k] = ge[j] * gv[k];
          }
          store_vec<T, VEC>(dyr + (e0 + j) * dy_se + c, d);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < EG; ++j) {
      const float v = warp_sum(acc[j]);
      if (lane == 0 && e0 + j < s.E) dg[e0 + j] = v;
    }
  }
  __syncwarp();

  // Softmax backward: dlogits = g * (dg - <g, dg>).
  float p = 0.f;
  for (int64_t e = lane; e < s.E; e += kWarp) p += g[e] * dg[e];
  p = warp_sum(p);
  for (int64_t e = lane; e < s.E; e += kWarp) dlogits[t * s.E + e] = g[e] * (dg[e] - p);
}

template <typename T, int VEC, int EG>
__global__ void __launch_bounds__(kColThreads)
    bwd_dxdw_kernel(const T* __restrict__ x, const void* __restrict__ w, bool w_f32, const float* __restrict__ dl,
                    T* __restrict__ dx, float* __restrict__ dw_part, int64_t tokens_per_split, MixShape s) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x) * VEC;
  if (c >= s.D) return;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t t1 = t0 + tokens_per_split < s.T ? t0 + tokens_per_split : s.T;

  for (int64_t e0 = 0; e0 < s.E; e0 += EG) {
    float wv[EG][VEC], dwa[EG][VEC];
#pragma unroll
    for (int j = 0; j < EG; ++j) {
      if (e0 + j < s.E) {
        load_w<T, VEC>(w, w_f32, (e0 + j) * s.D + c, wv[j]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) wv[j][k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) dwa[j][k] = 0.f;
    }
    MKS2_UNROLL(MKS2_COL_UNROLL)
    for (int64_t t = t0; t < t1; ++t) {
      float xv[VEC], dlv[EG];
      load_vec<T, VEC>(x + t * s.sxt + c, xv);
#pragma unroll
      for (int j = 0; j < EG; ++j) dlv[j] = e0 + j < s.E ? __ldg(dl + t * s.E + e0 + j) : 0.f;
#pragma unroll
      for (int j = 0; j < EG; ++j) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dwa[j][k] = fmaf(dlv[j], xv[k], dwa[j][k]);
      }
      if (e0 == 0) {  // dx needs every expert: the first group adds the rest from L1-resident w rows
        float dxv[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float a = 0.f;
#pragma unroll
          for (int j = 0; j < EG; ++j) a = fmaf(dlv[j], wv[j][k], a);
          dxv[k] = a;
        }
        for (int64_t e = EG; e < s.E; ++e) {
          const float de = __ldg(dl + t * s.E + e);
          float we[VEC];
          load_w<T, VEC>(w, w_f32, e * s.D + c, we);
#pragma unroll
          for (int k = 0; k < VEC; ++k) dxv[k] = fmaf(de, we[k], dxv[k]);
        }
        store_vec<T, VEC>(dx + t * s.D + c, dxv);
      }
    }
    float* part = dw_part + (static_cast<int64_t>(blockIdx.y) * s.E + e0) * s.D + c;
#pragma unroll
    for (int j = 0; j < EG; ++j) {
      if (e0 + j < s.E) store_vec<float, VEC>(part + j * s.D, dwa[j]);
    }
  }
}

template <typename T_, int VEC_, int EG_>
struct Cfg {
  using T = T_;
  static constexpr int VEC = VEC_;
  static constexpr int EG = EG_;
};

// Picks (element type, vector width, expert group) and calls fn(Cfg<...>{}).
template <typename T, typename Fn>
cudaError_t dispatch_t(bool vec, int64_t E, Fn&& fn) {
  constexpr int V = 16 / sizeof(T);
  if (vec) return E <= 2 ? fn(Cfg<T, V, 2>{}) : fn(Cfg<T, V, 8>{});
  return E <= 2 ? fn(Cfg<T, 1, 2>{}) : fn(Cfg<T, 1, 8>{});
}

template <typename Fn>
cudaError_t dispatch(DType dt, bool vec, int64_t E, Fn&& fn) {
  switch (dt) {
    case DType::kFloat32:
      return dispatch_t<float>(vec, E, fn);
    case DType::kFloat16:
      return dispatch_t<__half>(vec, E, fn);
    case DType::kBFloat16:
      return dispatch_t<__nv_bfloat16>(vec, E, fn);
  }
  return cudaErrorInvalidValue;
}

int elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// True when every row of every operand starts 16-byte aligned, so the 16-byte vector path is valid.
bool vec_ok(DType dt, const MixShape& s, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  const int64_t v = 16 / elem_size(dt);
  if (s.D % v != 0) return false;
  for (int64_t st : strides)
    if (st % v != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

constexpr int64_t row_blocks(int64_t T) { return (T + kRowThreads / kWarp - 1) / (kRowThreads / kWarp); }

}  // namespace

cudaError_t launch_fwd(DType dt, const void* x, const void* w, bool w_f32, const void* y, void* out, float* gates,
                       MixShape s, cudaStream_t stream) {
  const bool vec = vec_ok(dt, s, {x, w, y, out}, {s.sxt, s.sye, s.syt});
  const size_t smem = sizeof(float) * (kRowThreads / kWarp) * s.E;
  return dispatch(dt, vec, s.E, [&](auto cfg) {
    using C = decltype(cfg);
    using T = typename C::T;
    fwd_kernel<T, C::VEC, C::EG><<<row_blocks(s.T), kRowThreads, smem, stream>>>(
        static_cast<const T*>(x), w, w_f32, static_cast<const T*>(y), static_cast<T*>(out), gates, s);
    return cudaGetLastError();
  });
}

cudaError_t launch_bwd_dy(DType dt, const void* grad_out, int64_t sgt, const void* y, const float* gates, void* dy,
                          float* dlogits, MixShape s, cudaStream_t stream) {
  const bool vec = vec_ok(dt, s, {grad_out, y, dy}, {sgt, s.sye, s.syt});
  const size_t smem = sizeof(float) * (kRowThreads / kWarp) * 2 * s.E;
  return dispatch(dt, vec, s.E, [&](auto cfg) {
    using C = decltype(cfg);
    using T = typename C::T;
    bwd_dy_kernel<T, C::VEC, C::EG><<<row_blocks(s.T), kRowThreads, smem, stream>>>(
        static_cast<const T*>(grad_out), sgt, static_cast<const T*>(y), gates, static_cast<T*>(dy), dlogits, s);
    return cudaGetLastError();
  });
}

cudaError_t launch_bwd_dxdw(DType dt, const void* x, const void* w, bool w_f32, const float* dlogits, void* dx,
                            float* dw_part, int64_t splits, MixShape s, cudaStream_t stream) {
  const bool vec = vec_ok(dt, s, {x, w, dx, dw_part}, {s.sxt});
  const int64_t tokens_per_split = (s.T + splits - 1) / splits;
  return dispatch(dt, vec, s.E, [&](auto cfg) {
    using C = decltype(cfg);
    using T = typename C::T;
    const int64_t cols_per_block = static_cast<int64_t>(kColThreads) * C::VEC;
    const dim3 grid(static_cast<unsigned>((s.D + cols_per_block - 1) / cols_per_block), static_cast<unsigned>(splits));
    bwd_dxdw_kernel<T, C::VEC, C::EG><<<grid, kColThreads, 0, stream>>>(
        static_cast<const T*>(x), w, w_f32, dlogits, static_cast<T*>(dx), dw_part, tokens_per_split, s);
    return cudaGetLastError();
  });
}

}  // namespace mks2
