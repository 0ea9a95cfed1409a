// The KV accessor: where a token's K and V live, for both layouts, on host and device.
//
// Every attention kernel (the CPU reference included) is written once against this
// concept:
//   int64_t Offset(int32_t b, int64_t pos) const;  // batch entry b, token position pos
//   int64_t SlotOffset(int64_t slot) const;        // a location returned by KvCache::Extend
//   void* k; void* v;                              // bases of this layer's K and V
// Offsets are 64-bit element counts (never bytes, never int32: large pools overflow
// int32 page offsets) to the start of the token's [kv_heads][head_dim] block, which is
// contiguous; head h starts at + h * head_dim. K and V share offsets.
//
// Both views are POD: copy them into kernel parameters as they are.
#ifndef KVMEM_KV_ACCESSOR_H_
#define KVMEM_KV_ACCESSOR_H_

#include <cstdint>

#include "kvmem/platform.h"

namespace kvmem {

// Paged layout, one layer: K and V pools [num_pages, page_tokens, kv_heads, head_dim].
// page_table: [batch][page_table_stride] int32 page ids of each batch entry, in order.
struct PagedKv {
  void* k = nullptr;
  void* v = nullptr;
  int64_t page_stride = 0;   // elements per page: page_tokens * kv_heads * head_dim
  int64_t token_stride = 0;  // elements per token: kv_heads * head_dim
  int32_t page_tokens = 1;
  const int32_t* page_table = nullptr;
  int64_t page_table_stride = 0;

  KVMEM_HOST_DEVICE int64_t SlotOffset(int64_t slot) const {
    return (slot / page_tokens) * page_stride + (slot % page_tokens) * token_stride;
  }
  KVMEM_HOST_DEVICE int64_t PageOffset(int32_t page) const {
    return static_cast<int64_t>(page) * page_stride;
  }
  KVMEM_HOST_DEVICE int64_t Offset(int32_t b, int64_t pos) const {
    const int32_t page = page_table[b * page_table_stride + pos / page_tokens];
    return PageOffset(page) + (pos % page_tokens) * token_stride;
  }
};

// Virtual layout, one layer: a strided tensor. Token pos of row r starts at
//   r * row_stride + pos * token_stride + (pos >> chunk_shift) * chunk_gap.
// Per-layer arrangement: k and v are separate tensors, token_stride = kv_heads * head_dim,
// no chunks (chunk_shift = chunk_gap = 0). All-layer arrangement, in chunks of
// C = 2^chunk_shift tokens: a chunk holds every layer's K and V of its C tokens, layer by
// layer, so the C tokens of one layer's K are token_stride = kv_heads * head_dim apart and
// the next chunk starts chunk_gap elements after the chunk's last token (the other
// layers); v = k + C * token_stride. With C = 1 (shift 0, gap 0) token_stride covers
// every layer's K and V. Both defaults (0) give a plain strided tensor.
// row_ids: [batch] int32 row of each batch entry.
struct VirtualKv {
  void* k = nullptr;
  void* v = nullptr;
  int64_t row_stride = 0;
  int64_t token_stride = 0;
  int64_t max_context = 0;  // slot = row * max_context + pos
  const int32_t* row_ids = nullptr;
  int32_t chunk_shift = 0;  // log2 of tokens per chunk
  int64_t chunk_gap = 0;    // elements between a chunk's last token and the next chunk

  // Offset of token pos from its row's start.
  KVMEM_HOST_DEVICE int64_t InRow(int64_t pos) const {
    return pos * token_stride + (pos >> chunk_shift) * chunk_gap;
  }
  KVMEM_HOST_DEVICE int64_t SlotOffset(int64_t slot) const {
    return (slot / max_context) * row_stride + InRow(slot % max_context);
  }
  KVMEM_HOST_DEVICE int64_t Offset(int32_t b, int64_t pos) const {
    return static_cast<int64_t>(row_ids[b]) * row_stride + InRow(pos);
  }
};

}  // namespace kvmem

#endif  // KVMEM_KV_ACCESSOR_H_
