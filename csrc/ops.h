// Host entry points of megaswift's CUDA ops (bound to Python in bindings.cpp).
//
// linear_ce.cu: the two row passes of the chunked linear cross entropy; the contract (arguments, results,
//               edge cases) is megaswift/ops/linear_ce_rows.py, whose torch functions these mirror.
// packing.cu:   padded <-> packed (THD) layout conversions driven by cu_seqlens.
#pragma once

#include <ATen/core/Tensor.h>

namespace megaswift {

// z: [n, v] float32/bfloat16/float16/float64 on CUDA, rows contiguous (z.stride(1) == 1; any row stride);
// target: [n] int64 (-1: no target in this shard). Returns [n, 6] float32 (float64 for float64 z):
// (max, sumexp, target logit, sum, sumexpz, argmax).
at::Tensor row_stats(const at::Tensor& z, const at::Tensor& target);

// In place: z_j <- exp(z_j - lse) * (A + B z_j) - C [j == target] - D with coef[row] = (A, B, C, D), in
// float32 (float64 for float64 z). lse: [n], coef: [n, 4] float tensors (converted to that type),
// target: [n] int64. Returns z.
at::Tensor logit_grad_(at::Tensor z, const at::Tensor& lse, const at::Tensor& target, const at::Tensor& coef);

// cu_seqlens: [B + 1] int32 (int64 accepted, converted). total < 0: cu_seqlens[B] (one device sync).
// Returns [total] int64: i - cu[b] for the last b with cu[b] <= i (i itself before cu[0]).
at::Tensor position_ids(const at::Tensor& cu_seqlens, int64_t total);

// padded: [B, S, *F] (a copy is made if not contiguous), any dtype of 1/2/4/8 bytes. Returns [T, *F] with T = total (< 0: cu[B],
// one device sync): packed row r = padded[b, r - cu[b]] for cu[b] <= r < cu[b + 1]; rows outside every
// segment, or past S, are zero.
at::Tensor pack(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total);

// packed: [T, *F] (made contiguous). Returns [B, max_len, *F]: out[b, s] = packed[cu[b] + s] for
// s < min(cu[b + 1] - cu[b], max_len) (and cu[b] + s < T), pad_value elsewhere.
at::Tensor unpack(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_len, double pad_value);

}  // namespace megaswift
