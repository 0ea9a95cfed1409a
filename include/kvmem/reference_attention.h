// CPU reference attention over the KV accessor: the ground truth every GPU kernel is
// tested against. Storage in fp32 / bf16 / fp16 (AttentionShape::kv_dtype), fp32 math,
// GQA (num_q_heads a multiple of num_kv_heads; query head h reads KV head
// h / (num_q_heads / num_kv_heads)), optional sliding window.
//
// Positions: a query at position p attends to keys at [max(0, p - window_left), p]
// (window_left < 0: no window). Decode: one query per batch entry at position
// seq_len - 1 (its own K/V already appended). A batch entry with seq_len 0 has no keys:
// its output is all zeros (the convention of the GPU kernels too).
#ifndef KVMEM_REFERENCE_ATTENTION_H_
#define KVMEM_REFERENCE_ATTENTION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"

namespace kvmem {

struct KVMEM_EXPORT AttentionShape {
  int num_q_heads = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  DType kv_dtype = DType::kBFloat16;
  float scale = 0.f;     // softmax scale; 0 means 1 / sqrt(head_dim)
  int window_left = -1;  // sliding window: keys at most this many positions back

  float EffectiveScale() const;
};

// InvalidArgument for a bad shape (heads not dividing, head_dim < 1, ...).
KVMEM_EXPORT absl::Status ValidateAttentionShape(const AttentionShape& shape);

// Writes the K and V of new tokens to their slots (locations from KvCache::Extend),
// rounding to shape.kv_dtype: the CPU reference of the AppendKv kernel.
// k, v: [slots.size()][num_kv_heads][head_dim]. The view's memory must be host-accessible.
template <typename Kv>
absl::Status ReferenceAppendKv(const AttentionShape& shape, const Kv& kv,
                               absl::Span<const int64_t> slots, const float* k, const float* v);

// q: [batch][num_q_heads][head_dim]; out: same shape. batch = seq_lens.size().
template <typename Kv>
absl::Status ReferenceDecode(const AttentionShape& shape, const Kv& kv,
                             absl::Span<const int32_t> seq_lens, const float* q, float* out);

// Ragged extend / prefill. Batch entry b has prefix_lens[b] cached tokens followed by
// new_lens[b] new tokens (their K/V already appended, so the cache holds
// prefix_lens[b] + new_lens[b] tokens). Its queries are rows [cu_q[b], cu_q[b] + new_lens[b])
// of q, with cu_q the exclusive prefix sum of new_lens; query i sits at position
// prefix_lens[b] + i and attends causally. q / out: [total_new][num_q_heads][head_dim].
template <typename Kv>
absl::Status ReferenceExtend(const AttentionShape& shape, const Kv& kv,
                             absl::Span<const int32_t> prefix_lens,
                             absl::Span<const int32_t> new_lens, const float* q, float* out);

extern template KVMEM_EXPORT absl::Status ReferenceAppendKv<PagedKv>(const AttentionShape&, const PagedKv&,
                                                        absl::Span<const int64_t>, const float*,
                                                        const float*);
extern template KVMEM_EXPORT absl::Status ReferenceAppendKv<VirtualKv>(const AttentionShape&, const VirtualKv&,
                                                          absl::Span<const int64_t>, const float*,
                                                          const float*);
extern template KVMEM_EXPORT absl::Status ReferenceDecode<PagedKv>(const AttentionShape&, const PagedKv&,
                                                      absl::Span<const int32_t>, const float*,
                                                      float*);
extern template KVMEM_EXPORT absl::Status ReferenceDecode<VirtualKv>(const AttentionShape&, const VirtualKv&,
                                                        absl::Span<const int32_t>, const float*,
                                                        float*);
extern template KVMEM_EXPORT absl::Status ReferenceExtend<PagedKv>(const AttentionShape&, const PagedKv&,
                                                      absl::Span<const int32_t>,
                                                      absl::Span<const int32_t>, const float*,
                                                      float*);
extern template KVMEM_EXPORT absl::Status ReferenceExtend<VirtualKv>(const AttentionShape&, const VirtualKv&,
                                                        absl::Span<const int32_t>,
                                                        absl::Span<const int32_t>, const float*,
                                                        float*);

}  // namespace kvmem

#endif  // KVMEM_REFERENCE_ATTENTION_H_
