// The bilinear neighbourhood of one sampling point, shared by the CPU kernels
// (cpu/msda_cpu.cpp, I = int64_t) and the CUDA kernels (cuda/msda_cuda.cu, I = int).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE __attribute__((always_inline)) inline
#endif

namespace msda {

template <typename A, typename I>
struct Neighbourhood {
  A fx, fy;                     // fractional parts of x and y
  I x0, y0;                     // top-left neighbour
  bool in00, in01, in10, in11;  // neighbour (y0 + i, x0 + j) inside the map, named in{i}{j}
};

MSDA_HOST_DEVICE float floor_of(float v) { return floorf(v); }
MSDA_HOST_DEVICE double floor_of(double v) { return floor(v); }

// Fills nb for the point (x, y) (pixel coordinates) on an H x W map. Returns false when no
// neighbour of the point lies inside the map (the point contributes nothing and has zero
// gradients); non-finite coordinates also return false.
template <typename A, typename I>
MSDA_HOST_DEVICE bool neighbourhood(A x, A y, I H, I W, Neighbourhood<A, I>& nb) {
  // floor(x) in [-1, W - 1] and floor(y) in [-1, H - 1] iff at least one neighbour is inside.
  if (!(x >= A(-1) && x < static_cast<A>(W) && y >= A(-1) && y < static_cast<A>(H))) {
    return false;
  }
  const A xf = floor_of(x);
  const A yf = floor_of(y);
  nb.fx = x - xf;
  nb.fy = y - yf;
  nb.x0 = static_cast<I>(xf);
  nb.y0 = static_cast<I>(yf);
  const bool x0_in = nb.x0 >= 0, x1_in = nb.x0 + 1 < W;
  const bool y0_in = nb.y0 >= 0, y1_in = nb.y0 + 1 < H;
  nb.in00 = y0_in && x0_in;
  nb.in01 = y0_in && x1_in;
  nb.in10 = y1_in && x0_in;
  nb.in11 = y1_in && x1_in;
  return true;
}

}  // namespace msda
