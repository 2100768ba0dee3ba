// CPU kernels of multi-scale deformable attention (see ../msda.h for the definition and layouts).
//
// Forward: parallel over (batch, query, head) items with at::parallel_for; each item accumulates
// its C output channels from L * P bilinear samples. No shared writes.
//
// Backward: the value gradient is a scatter (many queries sample the same pixel), so queries must
// not be split across threads that write the same grad_value rows. Work is partitioned by
// (batch, head): a task owns grad_value[n, :, h, :] exclusively and walks the queries, writing the
// location and attention-weight gradients of its (n, q, h) items as it goes (also exclusive).
// A thread walks its tasks query-major (see backward_tasks) for cache locality.
// When there are fewer (batch, head) pairs than threads, the queries of each pair are split into
// chunks; chunk 0 writes grad_value directly and every other chunk writes a private zeroed copy
// that is summed in afterwards. This is race-free and deterministic for a given thread count.
//
// The backward reads the four neighbour rows once per sampling point: it accumulates the dot
// products d_ij = sum_c grad_out[c] * v_ij[c], from which the attention-weight gradient
// (sum_ij w_ij d_ij) and the location gradients (slopes of the bilinear weights times d_ij,
// times W or H) follow, and scatters a * w_ij * grad_out into the value gradient in the same pass.
#include "../msda.h"
#include "../msda_neighbourhood.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

// The hot loops are compiled several times (GCC function multiversioning, resolved once at load
// time from the CPU's features): AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline, so one
// binary is portable and still uses the widest vectors of the machine it runs on.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MSDA_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSDA_SIMD_CLONES
#endif
#define MSDA_INLINE __attribute__((always_inline)) inline

namespace msda {
namespace {

// o[c] += w00 * p00[c] + w01 * p01[c] + w10 * p10[c] + w11 * p11[c]
template <typename T>
MSDA_INLINE void accumulate4(T* __restrict o, const T* __restrict p00, const T* __restrict p01,
                        const T* __restrict p10, const T* __restrict p11, T w00, T w01, T w10,
                        T w11, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    o[c] += w00 * p00[c] + w01 * p01[c] + w10 * p10[c] + w11 * p11[c];
  }
}

// One pass over the channels of one sampling point in the backward:
//   d_ij = sum_c go[c] * v_ij[c]     (the four neighbour rows dotted with the output gradient)
//   q_ij[c] += aw_ij * go[c]          (scatter into the value gradient)
// Invalid neighbours read a zero row and write a private scratch row, so no pointer aliases.
template <typename T>
MSDA_INLINE void dot_and_scatter4(const T* __restrict go, const T* __restrict p00,
                                  const T* __restrict p01, const T* __restrict p10,
                                  const T* __restrict p11, T* __restrict q00, T* __restrict q01,
                                  T* __restrict q10, T* __restrict q11, T aw00, T aw01, T aw10,
                                  T aw11, int64_t C, T d[4]) {
  T d00 = T(0), d01 = T(0), d10 = T(0), d11 = T(0);
#pragma omp simd reduction(+ : d00, d01, d10, d11)
  for (int64_t c = 0; c < C; ++c) {
    const T gc = go[c];
    d00 += gc * p00[c];
    d01 += gc * p01[c];
    d10 += gc * p10[c];
    d11 += gc * p11[c];
    q00[c] += aw00 * gc;
    q01[c] += aw01 * gc;
    q10[c] += aw10 * gc;
    q11[c] += aw11 * gc;
  }
  d[0] = d00;
  d[1] = d01;
  d[2] = d10;
  d[3] = d11;
}

// Forward for items [begin, end) of the flattened (batch, query, head) range.
template <typename T>
MSDA_INLINE void forward_items(const Geometry& g, const T* value, const T* loc, const T* attn,
                               T* out, const T* z, int64_t begin, int64_t end) {
  const int64_t M = g.heads, C = g.channels, Q = g.queries, L = g.levels, P = g.points;
  const int64_t row = M * C;  // distance between two pixels of value, in elements
  for (int64_t it = begin; it < end; ++it) {
    const int64_t h = it % M;
    const int64_t n = it / (Q * M);
    T* o = out + it * C;
    std::fill(o, o + C, T(0));
    const T* vhead = value + n * g.values * row + h * C;
    const T* lp = loc + it * L * P * 2;
    const T* ap = attn + it * L * P;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = g.height[l], W = g.width[l];
      const T* vlev = vhead + g.start[l] * row;
      for (int64_t p = 0; p < P; ++p, lp += 2, ++ap) {
        const T a = *ap;
        Neighbourhood<T, int64_t> nb;
        if (!neighbourhood(lp[0] * static_cast<T>(W) - T(0.5),
                           lp[1] * static_cast<T>(H) - T(0.5), H, W, nb)) {
          continue;
        }
        // Pointers are formed only for neighbours inside the map.
        const int64_t off = (nb.y0 * W + nb.x0) * row;
        const T gx = T(1) - nb.fx, gy = T(1) - nb.fy;
        accumulate4(o, nb.in00 ? vlev + off : z, nb.in01 ? vlev + off + row : z,
                    nb.in10 ? vlev + off + W * row : z, nb.in11 ? vlev + off + W * row + row : z,
                    a * gy * gx, a * gy * nb.fx, a * nb.fy * gx, a * nb.fy * nb.fx, C);
      }
    }
  }
}

// Backward for tasks [begin, end). Task t = ((n * chunks + chunk) * M + h) owns the value
// gradient rows of head h in batch n for the queries of `chunk` (chunk 0 writes grad_value, chunk
// k > 0 its private copy extra[k - 1]); no two tasks write the same memory. A call walks its
// tasks query-major (for each query, its consecutive owned heads), the same order as the forward,
// which keeps the value, location and gradient rows of neighbouring heads hot in cache.
template <typename T>
MSDA_INLINE void backward_tasks(const Geometry& g, const T* value, const T* loc, const T* attn,
                                const T* grad_out, T* grad_value, T* extra, T* grad_loc,
                                T* grad_attn, int64_t chunks, const T* z, T* scratch,
                                int64_t begin, int64_t end) {
  const int64_t N = g.batch, M = g.heads, C = g.channels, Q = g.queries, L = g.levels,
                P = g.points;
  const int64_t row = M * C;
  const int64_t value_numel = N * g.values * row;
  T* s00 = scratch;
  T* s01 = s00 + C;
  T* s10 = s01 + C;
  T* s11 = s10 + C;
  for (int64_t t = begin; t < end;) {
    const int64_t group = t / M;  // (n, chunk)
    const int64_t h_begin = t % M;
    const int64_t h_end = std::min(M, h_begin + (end - t));
    t += h_end - h_begin;
    const int64_t chunk = group % chunks;
    const int64_t n = group / chunks;
    const T* vbatch = value + n * g.values * row;
    T* gvbatch = (chunk == 0 ? grad_value : extra + (chunk - 1) * value_numel) + n * g.values * row;
    const int64_t q_begin = Q * chunk / chunks;
    const int64_t q_end = Q * (chunk + 1) / chunks;
    for (int64_t q = q_begin; q < q_end; ++q) {
      for (int64_t h = h_begin; h < h_end; ++h) {
        const int64_t it = (n * Q + q) * M + h;
        const T* go = grad_out + it * C;
        const T* lp = loc + it * L * P * 2;
        const T* ap = attn + it * L * P;
        T* glp = grad_loc + it * L * P * 2;
        T* gap = grad_attn + it * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = g.height[l], W = g.width[l];
          const T* vlev = vbatch + g.start[l] * row + h * C;
          T* gvlev = gvbatch + g.start[l] * row + h * C;
          for (int64_t p = 0; p < P; ++p, lp += 2, ++ap, glp += 2, ++gap) {
            const T a = *ap;
            Neighbourhood<T, int64_t> nb;
            if (!neighbourhood(lp[0] * static_cast<T>(W) - T(0.5),
                               lp[1] * static_cast<T>(H) - T(0.5), H, W, nb)) {
              glp[0] = T(0);
              glp[1] = T(0);
              *gap = T(0);
              continue;
            }
            const int64_t off = (nb.y0 * W + nb.x0) * row;
            const T fx = nb.fx, fy = nb.fy, gx = T(1) - fx, gy = T(1) - fy;
            const T w00 = gy * gx, w01 = gy * fx, w10 = fy * gx, w11 = fy * fx;
            T d[4];
            dot_and_scatter4(go, nb.in00 ? vlev + off : z, nb.in01 ? vlev + off + row : z,
                             nb.in10 ? vlev + off + W * row : z,
                             nb.in11 ? vlev + off + W * row + row : z,
                             nb.in00 ? gvlev + off : s00, nb.in01 ? gvlev + off + row : s01,
                             nb.in10 ? gvlev + off + W * row : s10,
                             nb.in11 ? gvlev + off + W * row + row : s11, a * w00, a * w01,
                             a * w10, a * w11, C, d);
            // sampled value . go, and its slopes along x and y (bilinear weights' derivatives)
            *gap = w00 * d[0] + w01 * d[1] + w10 * d[2] + w11 * d[3];
            glp[0] = a * static_cast<T>(W) * (gy * (d[1] - d[0]) + fy * (d[3] - d[2]));
            glp[1] = a * static_cast<T>(H) * (gx * (d[2] - d[0]) + fx * (d[3] - d[1]));
          }
        }
      }
    }
  }
}

MSDA_SIMD_CLONES void forward_items_f32(const Geometry& g, const float* value, const float* loc,
                                        const float* attn, float* out, const float* z,
                                        int64_t begin, int64_t end) {
  forward_items(g, value, loc, attn, out, z, begin, end);
}
MSDA_SIMD_CLONES void forward_items_f64(const Geometry& g, const double* value,
                                        const double* loc, const double* attn, double* out,
                                        const double* z, int64_t begin, int64_t end) {
  forward_items(g, value, loc, attn, out, z, begin, end);
}
MSDA_SIMD_CLONES void backward_tasks_f32(const Geometry& g, const float* value, const float* loc,
                                         const float* attn, const float* grad_out,
                                         float* grad_value, float* extra, float* grad_loc,
                                         float* grad_attn, int64_t chunks, const float* z,
                                         float* scratch, int64_t begin, int64_t end) {
  backward_tasks(g, value, loc, attn, grad_out, grad_value, extra, grad_loc, grad_attn, chunks, z,
                 scratch, begin, end);
}
MSDA_SIMD_CLONES void backward_tasks_f64(const Geometry& g, const double* value,
                                         const double* loc, const double* attn,
                                         const double* grad_out, double* grad_value,
                                         double* extra, double* grad_loc, double* grad_attn,
                                         int64_t chunks, const double* z, double* scratch,
                                         int64_t begin, int64_t end) {
  backward_tasks(g, value, loc, attn, grad_out, grad_value, extra, grad_loc, grad_attn, chunks, z,
                 scratch, begin, end);
}

inline void run_forward_items(const Geometry& g, const float* v, const float* l, const float* a,
                              float* o, const float* z, int64_t b, int64_t e) {
  forward_items_f32(g, v, l, a, o, z, b, e);
}
inline void run_forward_items(const Geometry& g, const double* v, const double* l,
                              const double* a, double* o, const double* z, int64_t b, int64_t e) {
  forward_items_f64(g, v, l, a, o, z, b, e);
}
inline void run_backward_tasks(const Geometry& g, const float* v, const float* l, const float* a,
                               const float* go, float* gv, float* ex, float* gl, float* ga,
                               int64_t chunks, const float* z, float* s, int64_t b, int64_t e) {
  backward_tasks_f32(g, v, l, a, go, gv, ex, gl, ga, chunks, z, s, b, e);
}
inline void run_backward_tasks(const Geometry& g, const double* v, const double* l,
                               const double* a, const double* go, double* gv, double* ex,
                               double* gl, double* ga, int64_t chunks, const double* z, double* s,
                               int64_t b, int64_t e) {
  backward_tasks_f64(g, v, l, a, go, gv, ex, gl, ga, chunks, z, s, b, e);
}

template <typename T>
void forward_impl(const Geometry& g, const T* value, const T* loc, const T* attn, T* out) {
  const int64_t items = g.batch * g.queries * g.heads;
  if (items == 0 || g.channels == 0) {
    return;
  }
  const std::vector<T> zeros(static_cast<size_t>(g.channels), T(0));  // outside neighbours
  const int64_t cost = std::max<int64_t>(1, g.levels * g.points * g.channels);
  const int64_t grain = std::max<int64_t>(1, 16384 / cost);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    run_forward_items(g, value, loc, attn, out, zeros.data(), begin, end);
  });
}

template <typename T>
void backward_impl(const Geometry& g, const T* value, const T* loc, const T* attn,
                   const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn) {
  const int64_t pairs = g.batch * g.heads;
  const int64_t value_numel = g.batch * g.values * g.heads * g.channels;
  if (pairs == 0 || g.queries == 0) {
    return;
  }
  // Query chunks per (batch, head) pair: enough tasks for every thread, at least 16 queries per
  // chunk, and at most max(|value|, 32 Mi elements) of extra grad_value copies. Tasks are
  // ordered (n, chunk, h); see backward_tasks.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = 1;
  if (pairs < threads && value_numel > 0) {
    chunks = (threads + pairs - 1) / pairs;
    chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, g.queries / 16));
    const int64_t budget = std::max<int64_t>(value_numel, int64_t(32) << 20);
    chunks = std::min<int64_t>(chunks, 1 + budget / value_numel);
  }
  std::unique_ptr<T[]> extra;
  if (chunks > 1) {
    extra.reset(new T[static_cast<size_t>((chunks - 1) * value_numel)]());  // zero-filled
  }
  const std::vector<T> zeros(static_cast<size_t>(g.channels), T(0));
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(4 * g.channels));  // absorbs outside scatter
    run_backward_tasks(g, value, loc, attn, grad_out, grad_value, extra.get(), grad_loc,
                       grad_attn, chunks, zeros.data(), scratch.data(), begin, end);
  });
  if (chunks > 1) {
    const T* ex = extra.get();
    at::parallel_for(0, value_numel, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t j = 0; j < chunks - 1; ++j) {
        const T* src = ex + j * value_numel;
        for (int64_t i = begin; i < end; ++i) {
          grad_value[i] += src[i];
        }
      }
    });
  }
}

}  // namespace

void forward_cpu(const Geometry& g, const float* value, const float* loc, const float* attn,
                 float* out) {
  forward_impl(g, value, loc, attn, out);
}
void forward_cpu(const Geometry& g, const double* value, const double* loc, const double* attn,
                 double* out) {
  forward_impl(g, value, loc, attn, out);
}
void backward_cpu(const Geometry& g, const float* value, const float* loc, const float* attn,
                  const float* grad_out, float* grad_value, float* grad_loc, float* grad_attn) {
  backward_impl(g, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn);
}
void backward_cpu(const Geometry& g, const double* value, const double* loc, const double* attn,
                  const double* grad_out, double* grad_value, double* grad_loc,
                  double* grad_attn) {
  backward_impl(g, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn);
}

}  // namespace msda
