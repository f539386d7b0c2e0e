// Packing ops on CUDA: padded [B, S, *F] <-> packed (THD) [T, *F] and the position ids of a packed row,
// all driven by cu_seqlens ([B + 1] int32 offsets: sequence b is packed rows cu[b] .. cu[b + 1] - 1).
//
// pack and unpack only move bytes, so they dispatch on the element size (1, 2, 4 or 8 bytes: every dtype
// up to complex64, bool and the float8 types included). A block copies several rows at once (blockDim.y
// rows of blockDim.x lanes), with 16-byte vectors when every row is 16-byte aligned.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

namespace megaswift {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops past this

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// The last b in [0, nb] with cu[b] <= x (-1 when x < cu[0]); cu is non-decreasing, so an empty
// sequence never owns a row.
__device__ __forceinline__ int segment_of(const int32_t* __restrict__ cu, int nb, int64_t x) {
  int lo = 0, hi = nb + 1;  // first index with cu[index] > x
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (cu[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo - 1;
}

__global__ void position_ids_kernel(const int32_t* __restrict__ cu, int nb, int64_t total, int64_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int b = segment_of(cu, nb, i);
    out[i] = b < 0 ? i : i - cu[b];
  }
}

// One row of `width` vectors: a copy of src, or `fill` everywhere when src is null.
template <typename U, int VEC>
__device__ __forceinline__ void copy_row(U* __restrict__ dst, const U* __restrict__ src, int64_t width, U fill) {
  using V = AlignedVec<U, VEC>;
  V* d = reinterpret_cast<V*>(dst);
  if (src != nullptr) {
    const V* s = reinterpret_cast<const V*>(src);
    for (int64_t k = threadIdx.x; k < width; k += blockDim.x) d[k] = s[k];
  } else {
    V f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) f.val[i] = fill;
    for (int64_t k = threadIdx.x; k < width; k += blockDim.x) d[k] = f;
  }
}

// out[r] = padded[b, r - cu[b]] for the segment b of packed row r; zero outside every segment or past S.
template <typename U, int VEC>
__global__ void pack_kernel(const U* __restrict__ padded, const int32_t* __restrict__ cu, int nb, int64_t seq,
                            int64_t feat, int64_t rows, U* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const int b = segment_of(cu, nb, r);
    const U* src = nullptr;
    if (b >= 0 && b < nb) {  // then cu[b] <= r < cu[b + 1]
      const int64_t s = r - cu[b];
      if (s < seq) src = padded + (static_cast<int64_t>(b) * seq + s) * feat;
    }
    copy_row<U, VEC>(out + r * feat, src, feat / VEC, U(0));
  }
}

// out[b, s] = packed[cu[b] + s] for s < cu[b + 1] - cu[b] (and a row inside packed), else fill.
template <typename U, int VEC>
__global__ void unpack_kernel(const U* __restrict__ packed, int64_t packed_rows, const int32_t* __restrict__ cu,
                              int nb, int64_t max_len, int64_t feat, U fill, U* __restrict__ out) {
  const int64_t rows = static_cast<int64_t>(nb) * max_len;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; q < rows; q += stride) {
    const int64_t b = q / max_len, s = q - b * max_len;
    const int64_t start = cu[b], len = static_cast<int64_t>(cu[b + 1]) - start, src_row = start + s;
    const U* src = (s < len && src_row >= 0 && src_row < packed_rows) ? packed + src_row * feat : nullptr;
    copy_row<U, VEC>(out + q * feat, src, feat / VEC, fill);
  }
}

// ------------------------------------------------------------------------------------------------ host
at::Tensor checked_cu_seqlens(const at::Tensor& cu, const at::Device& device, const char* fn) {
  TORCH_CHECK(cu.device() == device, fn, ": cu_seqlens must be on ", device, ", got ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, fn,
              ": cu_seqlens must be int32 (or int64), got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, fn, ": cu_seqlens must be 1-D [B + 1], got shape ", cu.sizes());
  TORCH_CHECK(cu.numel() - 1 <= INT32_MAX, fn, ": too many sequences");
  return cu.to(at::kInt).contiguous();
}

int64_t last_offset(const at::Tensor& cu) {  // cu[B] on the host: one device sync
  return cu.select(0, cu.numel() - 1).item<int64_t>();
}

std::vector<int64_t> feature_shape(const at::Tensor& t, int64_t skip) {
  return std::vector<int64_t>(t.sizes().begin() + skip, t.sizes().end());
}

struct RowLaunch {
  dim3 grid, block;
};

// blockDim.x lanes per row (a power of two covering the row's vectors, at most kThreads), the rest of the
// kThreads in blockDim.y rows.
RowLaunch row_launch(int64_t rows, int64_t width) {
  int lanes = 1;
  while (lanes < kThreads && lanes < width) lanes *= 2;
  const int per_block = kThreads / lanes;
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, (rows + per_block - 1) / per_block));
  return RowLaunch{dim3(static_cast<unsigned>(blocks)), dim3(lanes, per_block)};
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// f(U{}) with U the unsigned integer type of t's element size.
template <typename F>
void dispatch_element_size(const at::Tensor& t, const char* fn, F&& f) {
  switch (t.element_size()) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, fn, ": elements of 1, 2, 4 or 8 bytes only, got ", t.scalar_type());
  }
}

}  // namespace

at::Tensor position_ids(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.is_cuda(), "position_ids: cu_seqlens must be a CUDA tensor, got ", cu_seqlens.device());
  const c10::cuda::CUDAGuard guard(cu_seqlens.device());
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, cu_seqlens.device(), "position_ids");
  if (total < 0) total = last_offset(cu);
  at::Tensor out = at::empty({total}, cu.options().dtype(at::kLong));
  if (total == 0) return out;
  const int nb = static_cast<int>(cu.numel() - 1);
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (total + kThreads - 1) / kThreads);
  position_ids_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      cu.const_data_ptr<int32_t>(), nb, total, out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pack(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(padded.is_cuda(), "pack: padded must be a CUDA tensor, got ", padded.device());
  TORCH_CHECK(padded.dim() >= 2, "pack: padded must be [B, S, *F], got shape ", padded.sizes());
  const c10::cuda::CUDAGuard guard(padded.device());
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, padded.device(), "pack");
  const int64_t nb = cu.numel() - 1;
  TORCH_CHECK(padded.size(0) == nb, "pack: padded has ", padded.size(0), " rows for ", nb,
              " sequences in cu_seqlens");
  const at::Tensor src = padded.contiguous();
  if (total < 0) total = last_offset(cu);
  std::vector<int64_t> shape = feature_shape(src, 2);
  int64_t feat = 1;
  for (const int64_t d : shape) feat *= d;
  shape.insert(shape.begin(), total);
  at::Tensor out = at::empty(shape, src.options());
  if (total == 0 || feat == 0) return out;
  const int64_t seq = src.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_element_size(src, "pack", [&](auto tag) {
    using U = decltype(tag);
    constexpr int VEC = 16 / sizeof(U);
    const U* in = static_cast<const U*>(src.const_data_ptr());
    U* o = static_cast<U*>(out.mutable_data_ptr());
    if (feat % VEC == 0 && aligned16(in) && aligned16(o)) {
      const RowLaunch l = row_launch(total, feat / VEC);
      pack_kernel<U, VEC><<<l.grid, l.block, 0, stream>>>(in, cu.const_data_ptr<int32_t>(), static_cast<int>(nb),
                                                         seq, feat, total, o);
    } else {
      const RowLaunch l = row_launch(total, feat);
      pack_kernel<U, 1><<<l.grid, l.block, 0, stream>>>(in, cu.const_data_ptr<int32_t>(), static_cast<int>(nb),
                                                       seq, feat, total, o);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpack(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_len, double pad_value) {
  TORCH_CHECK(packed.is_cuda(), "unpack: packed must be a CUDA tensor, got ", packed.device());
  TORCH_CHECK(packed.dim() >= 1, "unpack: packed must be [T, *F], got a scalar");
  TORCH_CHECK(max_len >= 0, "unpack: max_len must be >= 0, got ", max_len);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, packed.device(), "unpack");
  const int64_t nb = cu.numel() - 1;
  const at::Tensor src = packed.contiguous();
  std::vector<int64_t> shape = feature_shape(src, 1);
  int64_t feat = 1;
  for (const int64_t d : shape) feat *= d;
  shape.insert(shape.begin(), {nb, max_len});
  at::Tensor out = at::empty(shape, src.options());
  if (nb == 0 || max_len == 0 || feat == 0) return out;
  // pad_value in packed's dtype (raises for a value the dtype cannot hold, e.g. NaN for an integer type)
  const at::Tensor fill_t = at::full({}, pad_value, src.options().device(at::kCPU));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_element_size(src, "unpack", [&](auto tag) {
    using U = decltype(tag);
    constexpr int VEC = 16 / sizeof(U);
    U fill;
    std::memcpy(&fill, fill_t.const_data_ptr(), sizeof(U));
    const U* in = static_cast<const U*>(src.const_data_ptr());
    U* o = static_cast<U*>(out.mutable_data_ptr());
    const int64_t rows = nb * max_len;
    if (feat % VEC == 0 && aligned16(in) && aligned16(o)) {
      const RowLaunch l = row_launch(rows, feat / VEC);
      unpack_kernel<U, VEC><<<l.grid, l.block, 0, stream>>>(in, src.size(0), cu.const_data_ptr<int32_t>(),
                                                           static_cast<int>(nb), max_len, feat, fill, o);
    } else {
      const RowLaunch l = row_launch(rows, feat);
      unpack_kernel<U, 1><<<l.grid, l.block, 0, stream>>>(in, src.size(0), cu.const_data_ptr<int32_t>(),
                                                         static_cast<int>(nb), max_len, feat, fill, o);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace megaswift
