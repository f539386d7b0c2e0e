// The two row passes of the chunked linear cross entropy on CUDA.
//
// Contract: megaswift/ops/linear_ce_rows.py (row_stats, logit_grad_), same arguments and results.
//
// row_stats: one block per row, one pass over the row. Every thread keeps an online state
//   (max m, sum exp(z - m), sum exp(z - m) * z, sum z, first index of m) in float32 (float64 for float64
//   logits, like the reference) over its strided slice
//   of the row (16-byte vector loads on the aligned middle part of the row, scalar loads on the unaligned
//   head and tail), then the block merges the states with warp shuffles and one shared-memory round.
// logit_grad_: element-wise and memory bound; grid (row, column tile), each thread loads its vectors of
//   the tile first, then computes and stores them (one read and one write per element).
//
// Rows need unit column stride only: z may be a row-slice of a wider tensor (any z.stride(0) >= v), and
// each row is aligned on its own, so v need not be a multiple of the vector width.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the current stream (at::cuda::getCurrentCUDAStream is this function)

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>

#include "ops.h"

namespace megaswift {
namespace {

constexpr int kNumStats = 6;
constexpr int kRowStatsMaxThreads = 512;
constexpr int kGradMaxThreads = 256;
constexpr int kGradItems = 4;  // vectors per thread per column tile in logit_grad_
constexpr int kNoIndex = INT_MAX;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

__device__ __forceinline__ float ms_exp(float x) {
#ifdef MEGASWIFT_FAST_EXP
  return __expf(x);
#else
  return expf(x);
#endif
}

__device__ __forceinline__ double ms_exp(double x) {
  return exp(x);
}

// The statistics' type: float32 whatever z's dtype, float64 for float64 logits (gradient checks).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Elements before the first (sizeof(T) * VEC)-byte boundary of the row, at most v.
template <typename T, int VEC>
__device__ __forceinline__ int head_len(const T* row, int v) {
  constexpr uintptr_t kBytes = sizeof(T) * VEC;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(row) % kBytes;
  const int head = mis == 0 ? 0 : static_cast<int>((kBytes - mis) / sizeof(T));
  return head < v ? head : v;
}

// ------------------------------------------------------------------------------------------ row_stats
template <typename A>
struct RowState {
  A m;      // running max (NaN, once seen, is the max: torch.max propagates NaN)
  A s;      // sum exp(z - m)
  A sz;     // sum exp(z - m) * z
  A sum;    // sum z
  int idx;  // first column holding m (kNoIndex: none yet)
};

template <typename A>
__device__ __forceinline__ RowState<A> empty_state() {
  return RowState<A>{A(-INFINITY), A(0), A(0), A(0), kNoIndex};
}

// Does (a, ia) take over from (b, ib) as the row max? NaN beats numbers; ties go to the lower column.
template <typename A>
__device__ __forceinline__ bool beats(A a, int ia, A b, int ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// One element; a thread visits its columns in increasing order, so a tie never takes over.
template <typename A>
__device__ __forceinline__ void push(RowState<A>& st, A z, int j) {
  st.sum += z;
  if (z > st.m || (z != z && st.m == st.m)) {
    const A r = ms_exp(st.m - z);  // 0 while m is -inf
    st.s = st.s * r + A(1);
    st.sz = st.sz * r + z;
    st.m = z;
    st.idx = j;
  } else {
    // -inf columns (masked) add nothing to the sum of exps, also while m is still -inf (no -inf - -inf);
    // their e * z is 0 * -inf = NaN in sumexpz, as in the torch reference.
    const A e = z == A(-INFINITY) ? A(0) : ms_exp(z - st.m);
    st.s += e;
    st.sz += e * z;
  }
}

template <typename A>
__device__ __forceinline__ RowState<A> merge(const RowState<A>& a, const RowState<A>& b) {
  const bool b_wins = beats(b.m, b.idx, a.m, a.idx);
  const RowState<A>& hi = b_wins ? b : a;
  const RowState<A>& lo = b_wins ? a : b;
  const A r = lo.m == A(-INFINITY) ? A(0) : ms_exp(lo.m - hi.m);
  RowState<A> out;
  out.m = hi.m;
  out.idx = hi.idx;
  out.s = hi.s + lo.s * r;
  out.sz = hi.sz + lo.sz * r;
  out.sum = a.sum + b.sum;
  return out;
}

template <typename A>
__device__ __forceinline__ RowState<A> shfl_xor_state(const RowState<A>& a, int mask) {
  RowState<A> b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, mask);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, mask);
  b.sz = __shfl_xor_sync(0xffffffffu, a.sz, mask);
  b.sum = __shfl_xor_sync(0xffffffffu, a.sum, mask);
  b.idx = __shfl_xor_sync(0xffffffffu, a.idx, mask);
  return b;
}

template <typename A>
__device__ __forceinline__ RowState<A> warp_reduce(RowState<A> st) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) st = merge(st, shfl_xor_state(st, mask));
  return st;
}

// blockDim.x: a multiple of 32, at most 1024. The result is valid in thread 0.
template <typename A>
__device__ __forceinline__ RowState<A> block_reduce(RowState<A> st) {
  __shared__ RowState<A> warp_states[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x >> 5) ? warp_states[lane] : empty_state<A>();
    st = warp_reduce(st);
  }
  return st;
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void push_vec(RowState<A>& st, const AlignedVec<T, VEC>& x, int j0) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) push(st, static_cast<A>(x.val[i]), j0 + i);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowStatsMaxThreads)
row_stats_kernel(const T* __restrict__ z, int64_t ld, int v, const int64_t* __restrict__ target,
                 typename AccOf<T>::type* __restrict__ out) {
  using A = typename AccOf<T>::type;
  using V = AlignedVec<T, VEC>;
  const int64_t row = blockIdx.x;
  const T* zr = z + row * ld;
  const int tid = threadIdx.x, nt = blockDim.x;  // nt >= 32 > VEC: one pass covers the head and the tail
  const int head = head_len<T, VEC>(zr, v);
  const int nvec = (v - head) / VEC;
  const int tail = head + nvec * VEC;

  RowState<A> st = empty_state<A>();
  if (tid < head) push(st, static_cast<A>(zr[tid]), tid);
  const V* zv = reinterpret_cast<const V*>(zr + head);
  int k = tid;
  for (; k + nt < nvec; k += 2 * nt) {  // two loads in flight per thread
    const V a = zv[k];
    const V b = zv[k + nt];
    push_vec(st, a, head + k * VEC);
    push_vec(st, b, head + (k + nt) * VEC);
  }
  if (k < nvec) {
    const V a = zv[k];
    push_vec(st, a, head + k * VEC);
  }
  if (tail + tid < v) push(st, static_cast<A>(zr[tail + tid]), tail + tid);

  st = block_reduce(st);
  if (tid == 0) {
    const int64_t t = target[row];
    // A target past the shard has no column: NaN flags it (the torch reference raises an index error).
    const A zt = t < 0 ? A(0) : (t < v ? static_cast<A>(zr[t]) : A(NAN));
    A* o = out + row * kNumStats;
    // An all -inf row: exp(-inf - -inf) makes the reference's sumexp and sumexpz NaN, and its max is at 0.
    const bool all_neg_inf = st.m == A(-INFINITY);
    o[0] = st.m;
    o[1] = all_neg_inf ? A(NAN) : st.s;
    o[2] = zt;
    o[3] = st.sum;
    o[4] = all_neg_inf ? A(NAN) : st.sz;
    o[5] = static_cast<A>(st.idx == kNoIndex ? 0 : st.idx);
  }
}

// ---------------------------------------------------------------------------------------- logit_grad_
template <typename A>
struct GradRow {
  A lse, a, b, c, d;
  int64_t target;

  __device__ __forceinline__ A operator()(A z, int j) const {
    A g = ms_exp(z - lse) * (a + b * z) - d;
    if (j == target) g -= c;
    return g;
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kGradMaxThreads)
logit_grad_kernel(T* __restrict__ z, int64_t ld, int v, const typename AccOf<T>::type* __restrict__ lse,
                  const int64_t* __restrict__ target, const typename AccOf<T>::type* __restrict__ coef,
                  int tile_vecs) {
  using A = typename AccOf<T>::type;
  using V = AlignedVec<T, VEC>;
  const int64_t row = blockIdx.x;
  T* zr = z + row * ld;
  const int tid = threadIdx.x, nt = blockDim.x;
  const A* cr = coef + row * 4;
  const GradRow<A> g{lse[row], cr[0], cr[1], cr[2], cr[3], target[row]};
  const int head = head_len<T, VEC>(zr, v);
  const int nvec = (v - head) / VEC;
  const int tail = head + nvec * VEC;

  V* zv = reinterpret_cast<V*>(zr + head);
  const int k0 = static_cast<int>(blockIdx.y) * tile_vecs + tid;
  const int k1 = min(nvec, (static_cast<int>(blockIdx.y) + 1) * tile_vecs);
  V buf[kGradItems];
#pragma unroll
  for (int u = 0; u < kGradItems; ++u) {
    const int k = k0 + u * nt;
    if (k < k1) buf[u] = zv[k];
  }
#pragma unroll
  for (int u = 0; u < kGradItems; ++u) {
    const int k = k0 + u * nt;
    if (k < k1) {
      const int j0 = head + k * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) buf[u].val[i] = static_cast<T>(g(static_cast<A>(buf[u].val[i]), j0 + i));
      zv[k] = buf[u];
    }
  }
  if (blockIdx.y == 0) {
    if (tid < head) zr[tid] = static_cast<T>(g(static_cast<A>(zr[tid]), tid));
    if (tail + tid < v) zr[tail + tid] = static_cast<T>(g(static_cast<A>(zr[tail + tid]), tail + tid));
  }
}

// ------------------------------------------------------------------------------------------------ host
int pow2_threads(int64_t units, int lo, int hi) {
  int t = lo;
  while (t < hi && t < units) t *= 2;
  return t;
}

void check_logits(const at::Tensor& z, const char* fn) {
  TORCH_CHECK(z.is_cuda(), fn, ": z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2, fn, ": z must be 2-D [n, v], got shape ", z.sizes());
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, fn,
              ": z must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(z.size(1) <= 1 || z.stride(1) == 1, fn, ": z's rows must be contiguous (stride(1) == 1), got strides ",
              z.strides());
  TORCH_CHECK(z.size(0) <= 1 || z.stride(0) >= z.size(1), fn, ": z's rows overlap (strides ", z.strides(), ")");
  TORCH_CHECK(z.size(1) <= INT_MAX, fn, ": at most 2**31 - 1 columns, got ", z.size(1));
  TORCH_CHECK(z.size(0) <= INT_MAX, fn, ": at most 2**31 - 1 rows (one block each), got ", z.size(0));
}

void check_target(const at::Tensor& target, const at::Tensor& z, const char* fn) {
  TORCH_CHECK(target.device() == z.device(), fn, ": target must be on ", z.device(), ", got ", target.device());
  TORCH_CHECK(target.scalar_type() == at::kLong, fn, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == z.size(0), fn, ": target must have shape [", z.size(0),
              "], got ", target.sizes());
}

// A small float tensor (lse [n], coef [n, 4]) in the statistics' dtype, contiguous (a copy only if needed).
at::Tensor acc_tensor(const at::Tensor& t, const at::Tensor& z, at::ScalarType acc, at::IntArrayRef shape,
                      const char* fn, const char* name) {
  TORCH_CHECK(t.device() == z.device(), fn, ": ", name, " must be on ", z.device(), ", got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.to(acc).contiguous();
}

at::ScalarType acc_type(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// f(T{}) with T z's element type.
template <typename F>
void dispatch_logits(const at::Tensor& z, F&& f) {
  switch (z.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: f(double{}); break;  // check_logits allows nothing else
  }
}

}  // namespace

at::Tensor row_stats(const at::Tensor& z, const at::Tensor& target) {
  check_logits(z, "row_stats");
  check_target(target, z, "row_stats");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), v = z.size(1);
  at::Tensor out = at::empty({n, kNumStats}, z.options().dtype(acc_type(z)));
  if (n == 0) return out;
  if (v == 0) {
    out.zero_();
    out.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
    return out;
  }
  const at::Tensor tgt = target.contiguous();
  const int64_t ld = n > 1 ? z.stride(0) : v;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(z, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    constexpr int VEC = 16 / sizeof(T);
    const int threads = pow2_threads((v + VEC - 1) / VEC, 32, kRowStatsMaxThreads);
    row_stats_kernel<T, VEC><<<static_cast<unsigned>(n), threads, 0, stream>>>(
        static_cast<const T*>(z.const_data_ptr()), ld, static_cast<int>(v), tgt.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor logit_grad_(at::Tensor z, const at::Tensor& lse, const at::Tensor& target, const at::Tensor& coef) {
  check_logits(z, "logit_grad_");
  check_target(target, z, "logit_grad_");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), v = z.size(1);
  const at::ScalarType acc = acc_type(z);
  const at::Tensor lse_c = acc_tensor(lse, z, acc, {n}, "logit_grad_", "lse");
  const at::Tensor coef_c = acc_tensor(coef, z, acc, {n, 4}, "logit_grad_", "coef");
  if (n == 0 || v == 0) return z;
  const at::Tensor tgt = target.contiguous();
  const int64_t ld = n > 1 ? z.stride(0) : v;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits(z, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    constexpr int VEC = 16 / sizeof(T);
    const int64_t max_vecs = v / VEC;
    const int threads = pow2_threads((max_vecs + kGradItems - 1) / kGradItems, 32, kGradMaxThreads);
    const int tile_vecs = threads * kGradItems;
    const int64_t tiles = std::max<int64_t>(1, (max_vecs + tile_vecs - 1) / tile_vecs);
    TORCH_CHECK(tiles <= 65535, "logit_grad_: too many columns (", v, ")");
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(tiles));
    logit_grad_kernel<T, VEC><<<grid, threads, 0, stream>>>(
        static_cast<T*>(z.mutable_data_ptr()), ld, static_cast<int>(v), lse_c.const_data_ptr<A>(),
        tgt.const_data_ptr<int64_t>(), coef_c.const_data_ptr<A>(), tile_vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

}  // namespace megaswift
