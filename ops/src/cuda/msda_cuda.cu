// CUDA kernels of multi-scale deformable attention (see ../msda.h for the definition and layouts).
//
// Thread mapping (forward and backward): one group of G lanes per (batch, query, head) item,
// G = the smallest power of two >= C, capped at 32, so a group never straddles a warp. Lane j
// handles channels j, j + G, j + 2G, ... Consecutive lanes read consecutive channels of a value
// row, so the four neighbour reads of a sampling point are coalesced.
//
// Backward: the value gradient is scattered with atomicAdd into an accumulator of the
// accumulation type (float32 for float32/float16/bfloat16, float64 for float64); the binding casts
// it to the value dtype. The location and attention-weight gradients are sums over channels,
// reduced within the group with warp shuffles and written by lane 0 (no atomics).
//
// float16 and bfloat16 are loaded, converted to float32 and accumulated in float32.
// This file only includes CUDA headers (no ATen) to keep nvcc time low.
#include "../msda.h"
#include "../msda_neighbourhood.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace msda {
namespace {

constexpr int kThreads = 256;

// Level table passed by value to the kernels.
struct Levels {
  int count;
  int height[kMaxLevels];
  int width[kMaxLevels];
  int64_t start[kMaxLevels];
};

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ value, const T* __restrict__ loc,
                   const T* __restrict__ attn, T* __restrict__ out, Levels lv, int64_t S,
                   int M, int C, int64_t Q, int P, int G, int64_t items) {
  using A = typename Acc<T>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t it = tid / G;
  const int lane = static_cast<int>(tid % G);
  if (it >= items) {
    return;
  }
  const int h = static_cast<int>(it % M);
  const int64_t n = it / (Q * M);
  const int64_t row = static_cast<int64_t>(M) * C;
  const T* vhead = value + n * S * row + static_cast<int64_t>(h) * C;
  const int L = lv.count;
  const T* lp0 = loc + it * L * P * 2;
  const T* ap0 = attn + it * L * P;
  for (int c = lane; c < C; c += G) {
    A acc = A(0);
    const T* lp = lp0;
    const T* ap = ap0;
    for (int l = 0; l < L; ++l) {
      const int H = lv.height[l], W = lv.width[l];
      const T* vlev = vhead + lv.start[l] * row + c;
      for (int p = 0; p < P; ++p, lp += 2, ++ap) {
        const A a = to_acc(*ap);
        Neighbourhood<A, int> nb;
        if (!neighbourhood(to_acc(lp[0]) * W - A(0.5), to_acc(lp[1]) * H - A(0.5), H, W, nb)) {
          continue;
        }
        const int64_t off = (static_cast<int64_t>(nb.y0) * W + nb.x0) * row;
        const A v00 = nb.in00 ? to_acc(vlev[off]) : A(0);
        const A v01 = nb.in01 ? to_acc(vlev[off + row]) : A(0);
        const A v10 = nb.in10 ? to_acc(vlev[off + W * row]) : A(0);
        const A v11 = nb.in11 ? to_acc(vlev[off + W * row + row]) : A(0);
        const A gx = A(1) - nb.fx, gy = A(1) - nb.fy;
        acc += a * (gy * (gx * v00 + nb.fx * v01) + nb.fy * (gx * v10 + nb.fx * v11));
      }
    }
    out[it * C + c] = from_acc<T>(acc);
  }
}

template <typename A>
__device__ __forceinline__ A group_sum(A v, unsigned mask, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(mask, v, offset, G);
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ value, const T* __restrict__ loc,
                    const T* __restrict__ attn, const T* __restrict__ grad_out,
                    typename Acc<T>::type* __restrict__ grad_value, T* __restrict__ grad_loc,
                    T* __restrict__ grad_attn, Levels lv, int64_t S, int M, int C, int64_t Q,
                    int P, int G, int64_t items) {
  using A = typename Acc<T>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t it = tid / G;
  const int lane = static_cast<int>(tid % G);
  // Groups are aligned to G lanes inside a warp and whole groups are either in range or not, so
  // an out-of-range group can leave; the shuffles below only involve the lanes of one group.
  if (it >= items) {
    return;
  }
  const int warp_lane = threadIdx.x & 31;
  const unsigned mask =
      G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (warp_lane & ~(G - 1)));
  const int h = static_cast<int>(it % M);
  const int64_t n = it / (Q * M);
  const int64_t row = static_cast<int64_t>(M) * C;
  const int64_t head_off = n * S * row + static_cast<int64_t>(h) * C;
  const T* vhead = value + head_off;
  A* gvhead = grad_value + head_off;
  const T* go = grad_out + it * C;
  const int L = lv.count;
  int64_t k = it * L * P;  // index of (it, l, p) in attn / grad_attn
  for (int l = 0; l < L; ++l) {
    const int H = lv.height[l], W = lv.width[l];
    const T* vlev = vhead + lv.start[l] * row;
    A* gvlev = gvhead + lv.start[l] * row;
    for (int p = 0; p < P; ++p, ++k) {
      const A a = to_acc(attn[k]);
      A s_attn = A(0), s_x = A(0), s_y = A(0);
      Neighbourhood<A, int> nb;
      // Uniform across the group: depends only on (it, l, p).
      const bool inside =
          neighbourhood(to_acc(loc[2 * k]) * W - A(0.5), to_acc(loc[2 * k + 1]) * H - A(0.5), H,
                        W, nb);
      if (inside) {
        const int64_t off = (static_cast<int64_t>(nb.y0) * W + nb.x0) * row;
        const A fx = nb.fx, fy = nb.fy, gx = A(1) - fx, gy = A(1) - fy;
        const A w00 = gy * gx, w01 = gy * fx, w10 = fy * gx, w11 = fy * fx;
        for (int c = lane; c < C; c += G) {
          const A v00 = nb.in00 ? to_acc(vlev[off + c]) : A(0);
          const A v01 = nb.in01 ? to_acc(vlev[off + row + c]) : A(0);
          const A v10 = nb.in10 ? to_acc(vlev[off + W * row + c]) : A(0);
          const A v11 = nb.in11 ? to_acc(vlev[off + W * row + row + c]) : A(0);
          const A gc = to_acc(go[c]);
          s_attn += gc * (w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11);
          s_x += gc * (gy * (v01 - v00) + fy * (v11 - v10));
          s_y += gc * (gx * (v10 - v00) + fx * (v11 - v01));
          const A ag = a * gc;
          if (ag != A(0)) {
            if (nb.in00) atomicAdd(gvlev + off + c, ag * w00);
            if (nb.in01) atomicAdd(gvlev + off + row + c, ag * w01);
            if (nb.in10) atomicAdd(gvlev + off + W * row + c, ag * w10);
            if (nb.in11) atomicAdd(gvlev + off + W * row + row + c, ag * w11);
          }
        }
      }
      s_attn = group_sum(s_attn, mask, G);
      s_x = group_sum(s_x, mask, G);
      s_y = group_sum(s_y, mask, G);
      if (lane == 0) {  // exact zeros for a point with no neighbour inside (as on the CPU)
        grad_attn[k] = from_acc<T>(s_attn);
        grad_loc[2 * k] = from_acc<T>(inside ? a * static_cast<A>(W) * s_x : A(0));
        grad_loc[2 * k + 1] = from_acc<T>(inside ? a * static_cast<A>(H) * s_y : A(0));
      }
    }
  }
}

int group_lanes(int64_t C) {
  int G = 1;
  while (G < C && G < 32) {
    G *= 2;
  }
  return G;
}

Levels make_levels(const Geometry& g) {
  Levels lv{};
  lv.count = static_cast<int>(g.levels);
  for (int64_t l = 0; l < g.levels; ++l) {
    lv.height[l] = static_cast<int>(g.height[l]);
    lv.width[l] = static_cast<int>(g.width[l]);
    lv.start[l] = g.start[l];
  }
  return lv;
}

// Blocks of kThreads threads for `items` work items of `lanes` threads each, into *blocks;
// nullptr, or why one launch cannot hold them.
const char* grid_blocks(int64_t items, int lanes, unsigned* blocks) {
  const int64_t n = (items * lanes + kThreads - 1) / kThreads;
  if (n > 0x7fffffff) {
    return "ms_deform_attn: problem too large for one launch (more than 2^31 - 1 blocks)";
  }
  *blocks = static_cast<unsigned>(n);
  return nullptr;
}

// nullptr when the last kernel launch succeeded, else CUDA's error string.
const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* launch_forward(const Geometry& g, const void* value, const void* loc,
                           const void* attn, void* out, cudaStream_t stream) {
  const int64_t items = g.batch * g.queries * g.heads;
  if (items == 0 || g.channels == 0) {
    return nullptr;
  }
  const int G = group_lanes(g.channels);
  unsigned blocks = 0;
  if (const char* error = grid_blocks(items, G, &blocks)) {
    return error;
  }
  forward_kernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(value), static_cast<const T*>(loc), static_cast<const T*>(attn),
      static_cast<T*>(out), make_levels(g), g.values, static_cast<int>(g.heads),
      static_cast<int>(g.channels), g.queries, static_cast<int>(g.points), G, items);
  return last_launch_error();
}

template <typename T>
const char* launch_backward(const Geometry& g, const void* value, const void* loc,
                            const void* attn, const void* grad_out, void* grad_value_acc,
                            void* grad_loc, void* grad_attn, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t items = g.batch * g.queries * g.heads;
  if (items == 0) {
    return nullptr;
  }
  const int G = group_lanes(g.channels);
  unsigned blocks = 0;
  if (const char* error = grid_blocks(items, G, &blocks)) {
    return error;
  }
  backward_kernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(value), static_cast<const T*>(loc), static_cast<const T*>(attn),
      static_cast<const T*>(grad_out), static_cast<A*>(grad_value_acc),
      static_cast<T*>(grad_loc), static_cast<T*>(grad_attn), make_levels(g), g.values,
      static_cast<int>(g.heads), static_cast<int>(g.channels), g.queries,
      static_cast<int>(g.points), G, items);
  return last_launch_error();
}

}  // namespace

const char* forward_cuda(DType dtype, const Geometry& g, const void* value, const void* loc,
                         const void* attn, void* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(g, value, loc, attn, out, s);
    case DType::kFloat64: return launch_forward<double>(g, value, loc, attn, out, s);
    case DType::kFloat16: return launch_forward<__half>(g, value, loc, attn, out, s);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(g, value, loc, attn, out, s);
  }
  return "ms_deform_attn: unknown dtype";
}

const char* backward_cuda(DType dtype, const Geometry& g, const void* value, const void* loc,
                          const void* attn, const void* grad_out, void* grad_value_acc,
                          void* grad_loc, void* grad_attn, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(g, value, loc, attn, grad_out, grad_value_acc, grad_loc,
                                    grad_attn, s);
    case DType::kFloat64:
      return launch_backward<double>(g, value, loc, attn, grad_out, grad_value_acc, grad_loc,
                                     grad_attn, s);
    case DType::kFloat16:
      return launch_backward<__half>(g, value, loc, attn, grad_out, grad_value_acc, grad_loc,
                                     grad_attn, s);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(g, value, loc, attn, grad_out, grad_value_acc,
                                            grad_loc, grad_attn, s);
  }
  return "ms_deform_attn: unknown dtype";
}

}  // namespace msda
