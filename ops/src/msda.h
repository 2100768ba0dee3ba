// Multi-scale deformable attention: declarations shared by the Python binding (msda_bindings.cpp),
// the CPU kernels (cpu/msda_cpu.cpp) and the CUDA kernels (cuda/msda_cuda.cu).
//
// This header is deliberately free of torch/ATen includes: the kernels take raw pointers and a
// Geometry that the binding has already validated, so the kernel translation units compile fast.
//
// Definition (Zhu et al., "Deformable DETR", eq. 2-3), for batch n, query q, head h:
//   out[n, q, h, :] = sum_l sum_p A[n, q, h, l, p] * bilinear(V_l[n, :, :, h, :], x, y)
//   x = loc[n, q, h, l, p, 0] * W_l - 0.5,   y = loc[n, q, h, l, p, 1] * H_l - 0.5
// bilinear() reads the four neighbours (floor(x) + {0, 1}, floor(y) + {0, 1}); a neighbour outside
// the H_l x W_l map reads zero (grid_sample's align_corners=False, padding_mode="zeros").
// Memory layouts (all contiguous, row-major):
//   value      (N, S, M, C)        S = sum_l H_l * W_l, level l starts at row start[l]
//   loc        (N, Q, M, L, P, 2)  (x, y) in [0, 1] for points inside the map
//   attn       (N, Q, M, L, P)
//   out        (N, Q, M * C)
#pragma once

#include <cstdint>

namespace msda {

// Upper bound on the number of feature levels (the CUDA kernels take the level table by value).
constexpr int kMaxLevels = 16;

struct Geometry {
  int64_t batch = 0;     // N
  int64_t values = 0;    // S
  int64_t heads = 0;     // M
  int64_t channels = 0;  // C
  int64_t queries = 0;   // Q
  int64_t levels = 0;    // L
  int64_t points = 0;    // P
  int64_t height[kMaxLevels] = {};
  int64_t width[kMaxLevels] = {};
  int64_t start[kMaxLevels] = {};
};

// ---- CPU (cpu/msda_cpu.cpp) --------------------------------------------------------------------
// forward: writes every element of out.
// backward: grad_value must be zero-filled on entry; grad_loc and grad_attn are fully written.
void forward_cpu(const Geometry& g, const float* value, const float* loc, const float* attn,
                 float* out);
void forward_cpu(const Geometry& g, const double* value, const double* loc, const double* attn,
                 double* out);
void backward_cpu(const Geometry& g, const float* value, const float* loc, const float* attn,
                  const float* grad_out, float* grad_value, float* grad_loc, float* grad_attn);
void backward_cpu(const Geometry& g, const double* value, const double* loc, const double* attn,
                  const double* grad_out, double* grad_value, double* grad_loc,
                  double* grad_attn);

// ---- CUDA (cuda/msda_cuda.cu), compiled only with WITH_CUDA -------------------------------------
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Each returns nullptr on success, else a static error string (cudaGetErrorString).
// `stream` is a cudaStream_t. All pointers are device pointers of the given dtype, except:
// backward's grad_value_acc is float32 for kFloat32/kFloat16/kBFloat16 and float64 for kFloat64,
// zero-filled on entry (the kernel accumulates into it with atomics).
const char* forward_cuda(DType dtype, const Geometry& g, const void* value, const void* loc,
                         const void* attn, void* out, void* stream);
const char* backward_cuda(DType dtype, const Geometry& g, const void* value, const void* loc,
                          const void* attn, const void* grad_out, void* grad_value_acc,
                          void* grad_loc, void* grad_attn, void* stream);

}  // namespace msda
