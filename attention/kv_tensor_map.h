// Bulk-tensor-copy (TMA) descriptors of a K/V view, for the Hopper extend kernel
// (internal). Host code; the descriptors are passed to the kernel by value as
// __grid_constant__ parameters, so a captured CUDA graph replays with them unchanged.
//
// Both layouts are one tensor per K and per V, innermost first:
//   (head_dim, kv_heads, tokens, pages)          paged:   tokens = page_tokens, stride
//                                                         token_stride; pages stride page_stride
//   (head_dim, kv_heads, tokens, chunks, rows)   virtual: tokens = 2^chunk_shift, stride
//                                                         token_stride; chunks stride
//                                                         tokens * token_stride + chunk_gap;
//                                                         rows stride row_stride. Shift 0:
//                                                         one chunk of max_context tokens,
//                                                         token_stride + chunk_gap apart
// and a box is 64 elements (128 bytes) x 1 head x box_rows tokens x 1 page / chunk, stored
// with the 128-byte swizzle the wgmma tiles use (wgmma.cuh), so a box lands as one
// box_rows x 64 slab of a K or V stage. The outermost extent (pages, rows) is not known
// to a view; it is set to the largest int32 index, so the copy unit never clips an index
// the page table or row ids can hold: like the cp.async path, the kernel reads whatever
// index the caller's table names.
#ifndef KVMEM_ATTENTION_KV_TENSOR_MAP_H_
#define KVMEM_ATTENTION_KV_TENSOR_MAP_H_

#include <cuda.h>

#include "absl/status/statusor.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"

namespace kvmem::internal {

struct KvTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
};

// The descriptors of `kv` (one layer) with boxes of box_rows tokens (1..256). Internal
// (from the driver, with its message) when the driver has no cuTensorMapEncodeTiled or
// rejects the view (a base not 16-byte aligned, a stride not a multiple of 16 bytes).
absl::StatusOr<KvTensorMaps> EncodeKvTensorMaps(const PagedKv& kv, DType dtype, int head_dim,
                                                int num_kv_heads, int box_rows);
absl::StatusOr<KvTensorMaps> EncodeKvTensorMaps(const VirtualKv& kv, DType dtype, int head_dim,
                                                int num_kv_heads, int box_rows);

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_KV_TENSOR_MAP_H_
