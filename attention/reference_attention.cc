// CPU reference attention: the ground truth of every GPU kernel.
//
// Numerics (what a GPU kernel is compared against):
//  * K/V are read through LoadAsFloat (exact widening of the stored dtype); q is fp32.
//  * score = (sum_i q[i] * k[i]) * scale, the dot product accumulated in float in
//    increasing i, the scale applied after the sum.
//  * Softmax over the keys of one query with the maximum score subtracted first (no
//    overflow however large the scores), p = std::exp(score - max) in float.
//  * sum = sum_j p_j and acc[i] = sum_j p_j * v_j[i], both accumulated in float in
//    increasing key position; out[i] = acc[i] / sum (a division, not a reciprocal multiply).
// Everything is float, never double, so the reference carries the same kind of rounding a
// fp32-accumulating GPU kernel does; tests compare it with a float64 dense implementation.
//
// Both accessors share one non-template math routine over resolved element offsets
// (offsets are gathered per batch entry first, as the GPU kernels stage them per tile), so
// the two layouts give bitwise identical results for the same data: the float operations
// and their order do not depend on the accessor.
#include "kvmem/reference_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_format.h"

namespace kvmem {

float AttentionShape::EffectiveScale() const {
  if (scale != 0.f) return scale;
  return 1.f / std::sqrt(static_cast<float>(head_dim));
}

absl::Status ValidateAttentionShape(const AttentionShape& s) {
  if (s.num_q_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AttentionShape.num_q_heads = %d: must be >= 1", s.num_q_heads));
  }
  if (s.num_kv_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AttentionShape.num_kv_heads = %d: must be >= 1", s.num_kv_heads));
  }
  if (s.num_q_heads % s.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AttentionShape: num_kv_heads = %d does not divide num_q_heads = %d",
                        s.num_kv_heads, s.num_q_heads));
  }
  if (s.head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AttentionShape.head_dim = %d: must be >= 1", s.head_dim));
  }
  if (s.kv_dtype != DType::kFloat32 && s.kv_dtype != DType::kBFloat16 &&
      s.kv_dtype != DType::kFloat16) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AttentionShape.kv_dtype = %d: unknown", static_cast<int>(s.kv_dtype)));
  }
  if (!std::isfinite(s.scale) || s.scale < 0.f) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AttentionShape.scale = %g: must be finite and >= 0 (0 means 1/sqrt(head_dim))", s.scale));
  }
  return absl::OkStatus();
}

namespace internal {
namespace {

int64_t TokenElems(const AttentionShape& s) { return int64_t{s.num_kv_heads} * s.head_dim; }

// Checks of a view against the shape that need no batch: strides large enough that one
// token's [kv_heads][head_dim] block, one page and one row do not overlap the next.
absl::Status ValidateView(const AttentionShape& s, const PagedKv& kv) {
  if (kv.k == nullptr || kv.v == nullptr) {
    return absl::InvalidArgumentError("PagedKv: null k or v pool");
  }
  if (kv.page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedKv.page_tokens = %d: must be >= 1", kv.page_tokens));
  }
  if (kv.token_stride < TokenElems(s)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedKv.token_stride = %d < num_kv_heads * head_dim = %d", kv.token_stride,
                        TokenElems(s)));
  }
  if (kv.page_stride < kv.page_tokens * kv.token_stride) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedKv.page_stride = %d < page_tokens * token_stride = %d",
                        kv.page_stride, kv.page_tokens * kv.token_stride));
  }
  return absl::OkStatus();
}

absl::Status ValidateView(const AttentionShape& s, const VirtualKv& kv) {
  if (kv.k == nullptr || kv.v == nullptr) {
    return absl::InvalidArgumentError("VirtualKv: null k or v base");
  }
  if (kv.max_context < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("VirtualKv.max_context = %d: must be >= 1", kv.max_context));
  }
  if (kv.token_stride < TokenElems(s)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("VirtualKv.token_stride = %d < num_kv_heads * head_dim = %d",
                        kv.token_stride, TokenElems(s)));
  }
  if (kv.chunk_shift < 0 || kv.chunk_shift > 30 || kv.chunk_gap < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("VirtualKv chunks: chunk_shift = %d (0..30), chunk_gap = %d (>= 0)",
                        kv.chunk_shift, kv.chunk_gap));
  }
  // InRow(max_context): where a token past the last would start, the row's extent.
  if (kv.row_stride < kv.InRow(kv.max_context)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "VirtualKv.row_stride = %d < the %d elements of max_context tokens (token_stride %d, "
        "chunk_shift %d, chunk_gap %d)",
        kv.row_stride, kv.InRow(kv.max_context), kv.token_stride, kv.chunk_shift, kv.chunk_gap));
  }
  return absl::OkStatus();
}

// Offsets of tokens [0, len) of batch entry b, after checking that every index the
// accessor reads (page table entries, row id) is present and non-negative.
absl::Status GatherOffsets(const PagedKv& kv, int32_t b, int64_t len, std::vector<int64_t>* out) {
  out->clear();
  if (len == 0) return absl::OkStatus();
  const int64_t pages = (len + kv.page_tokens - 1) / kv.page_tokens;
  if (kv.page_table == nullptr) return absl::InvalidArgumentError("PagedKv: null page_table");
  if (pages > kv.page_table_stride) {
    return absl::InvalidArgumentError(
        absl::StrFormat("batch entry %d: %d tokens need %d pages, but page_table_stride = %d", b,
                        len, pages, kv.page_table_stride));
  }
  for (int64_t p = 0; p < pages; ++p) {
    const int32_t page = kv.page_table[b * kv.page_table_stride + p];
    if (page < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("batch entry %d: page_table[%d] = %d", b, p, page));
    }
  }
  out->reserve(len);
  for (int64_t pos = 0; pos < len; ++pos) out->push_back(kv.Offset(b, pos));
  return absl::OkStatus();
}

absl::Status GatherOffsets(const VirtualKv& kv, int32_t b, int64_t len, std::vector<int64_t>* out) {
  out->clear();
  if (len == 0) return absl::OkStatus();
  if (kv.row_ids == nullptr) return absl::InvalidArgumentError("VirtualKv: null row_ids");
  if (kv.row_ids[b] < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("batch entry %d: row id %d", b, kv.row_ids[b]));
  }
  if (len > kv.max_context) {
    return absl::InvalidArgumentError(
        absl::StrFormat("batch entry %d: %d tokens > max_context %d", b, len, kv.max_context));
  }
  out->reserve(len);
  for (int64_t pos = 0; pos < len; ++pos) out->push_back(kv.Offset(b, pos));
  return absl::OkStatus();
}

// Attention of one query token (all its heads) over the keys at offsets[0, n).
// q, out: [num_q_heads][head_dim]. scores, acc: scratch.
void AttendOneToken(const AttentionShape& s, float scale, const void* k_base, const void* v_base,
                    const int64_t* offsets, int64_t n, const float* q, float* out,
                    std::vector<float>* scores, std::vector<float>* acc) {
  const int d = s.head_dim;
  const int group = s.num_q_heads / s.num_kv_heads;
  if (n == 0) {
    std::fill(out, out + int64_t{s.num_q_heads} * d, 0.f);
    return;
  }
  scores->resize(n);
  acc->resize(d);
  for (int h = 0; h < s.num_q_heads; ++h) {
    const int64_t head_off = int64_t{h / group} * d;
    const float* qh = q + int64_t{h} * d;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t base = offsets[j] + head_off;
      float dot = 0.f;
      for (int i = 0; i < d; ++i) dot += qh[i] * LoadAsFloat(k_base, base + i, s.kv_dtype);
      const float score = dot * scale;
      (*scores)[j] = score;
      max_score = std::max(max_score, score);
    }
    float sum = 0.f;
    std::fill(acc->begin(), acc->end(), 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float p = std::exp((*scores)[j] - max_score);
      sum += p;
      const int64_t base = offsets[j] + head_off;
      for (int i = 0; i < d; ++i) (*acc)[i] += p * LoadAsFloat(v_base, base + i, s.kv_dtype);
    }
    float* oh = out + int64_t{h} * d;
    for (int i = 0; i < d; ++i) oh[i] = (*acc)[i] / sum;
  }
}

// First key position a query at `pos` sees.
int64_t WindowStart(const AttentionShape& s, int64_t pos) {
  if (s.window_left < 0) return 0;
  return std::max<int64_t>(0, pos - s.window_left);
}

absl::Status CheckBuffers(int64_t rows, const void* a, const char* a_name, const void* b,
                          const char* b_name) {
  if (rows == 0) return absl::OkStatus();
  if (a == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat("null %s for %d rows", a_name, rows));
  }
  if (b == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat("null %s for %d rows", b_name, rows));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace internal

template <typename Kv>
absl::Status ReferenceAppendKv(const AttentionShape& shape, const Kv& kv,
                               absl::Span<const int64_t> slots, const float* k, const float* v) {
  if (absl::Status st = ValidateAttentionShape(shape); !st.ok()) return st;
  if (slots.empty()) return absl::OkStatus();
  if (absl::Status st = internal::ValidateView(shape, kv); !st.ok()) return st;
  const int64_t n = static_cast<int64_t>(slots.size());
  if (absl::Status st = internal::CheckBuffers(n, k, "k", v, "v"); !st.ok()) return st;
  // All slots are checked before anything is written: a bad slot writes nothing.
  for (int64_t t = 0; t < n; ++t) {
    if (slots[t] < 0) {
      return absl::InvalidArgumentError(absl::StrFormat("slots[%d] = %d", t, slots[t]));
    }
  }
  const int64_t elems = internal::TokenElems(shape);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t base = kv.SlotOffset(slots[t]);
    for (int64_t i = 0; i < elems; ++i) {
      StoreFromFloat(kv.k, base + i, shape.kv_dtype, k[t * elems + i]);
      StoreFromFloat(kv.v, base + i, shape.kv_dtype, v[t * elems + i]);
    }
  }
  return absl::OkStatus();
}

template <typename Kv>
absl::Status ReferenceDecode(const AttentionShape& shape, const Kv& kv,
                             absl::Span<const int32_t> seq_lens, const float* q, float* out) {
  if (absl::Status st = ValidateAttentionShape(shape); !st.ok()) return st;
  const int64_t batch = static_cast<int64_t>(seq_lens.size());
  if (absl::Status st = internal::CheckBuffers(batch, q, "q", out, "out"); !st.ok()) return st;
  bool any_keys = false;
  for (int64_t b = 0; b < batch; ++b) {
    if (seq_lens[b] < 0) {
      return absl::InvalidArgumentError(absl::StrFormat("seq_lens[%d] = %d", b, seq_lens[b]));
    }
    any_keys |= seq_lens[b] > 0;
  }
  if (any_keys) {
    if (absl::Status st = internal::ValidateView(shape, kv); !st.ok()) return st;
  }
  // Validate every entry before writing any output.
  std::vector<std::vector<int64_t>> offsets(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (absl::Status st =
            internal::GatherOffsets(kv, static_cast<int32_t>(b), seq_lens[b], &offsets[b]);
        !st.ok()) {
      return st;
    }
  }
  const float scale = shape.EffectiveScale();
  const int64_t row = int64_t{shape.num_q_heads} * shape.head_dim;
  std::vector<float> scores, acc;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = seq_lens[b];
    const int64_t lo = len == 0 ? 0 : internal::WindowStart(shape, len - 1);
    internal::AttendOneToken(shape, scale, kv.k, kv.v, offsets[b].data() + lo, len - lo,
                             q + b * row, out + b * row, &scores, &acc);
  }
  return absl::OkStatus();
}

template <typename Kv>
absl::Status ReferenceExtend(const AttentionShape& shape, const Kv& kv,
                             absl::Span<const int32_t> prefix_lens,
                             absl::Span<const int32_t> new_lens, const float* q, float* out) {
  if (absl::Status st = ValidateAttentionShape(shape); !st.ok()) return st;
  if (prefix_lens.size() != new_lens.size()) {
    return absl::InvalidArgumentError(absl::StrFormat("prefix_lens has %d entries, new_lens %d",
                                                      prefix_lens.size(), new_lens.size()));
  }
  const int64_t batch = static_cast<int64_t>(new_lens.size());
  int64_t total_new = 0;
  bool any_keys = false;
  for (int64_t b = 0; b < batch; ++b) {
    if (prefix_lens[b] < 0 || new_lens[b] < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "batch entry %d: prefix_lens = %d, new_lens = %d", b, prefix_lens[b], new_lens[b]));
    }
    total_new += new_lens[b];
    any_keys |= new_lens[b] > 0;  // only entries with queries read the cache
  }
  if (absl::Status st = internal::CheckBuffers(total_new, q, "q", out, "out"); !st.ok()) {
    return st;
  }
  if (any_keys) {
    if (absl::Status st = internal::ValidateView(shape, kv); !st.ok()) return st;
  }
  std::vector<std::vector<int64_t>> offsets(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (new_lens[b] == 0) continue;
    const int64_t len = int64_t{prefix_lens[b]} + new_lens[b];
    if (absl::Status st = internal::GatherOffsets(kv, static_cast<int32_t>(b), len, &offsets[b]);
        !st.ok()) {
      return st;
    }
  }
  const float scale = shape.EffectiveScale();
  const int64_t row = int64_t{shape.num_q_heads} * shape.head_dim;
  std::vector<float> scores, acc;
  int64_t q_index = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < new_lens[b]; ++i, ++q_index) {
      const int64_t pos = int64_t{prefix_lens[b]} + i;
      const int64_t lo = internal::WindowStart(shape, pos);
      internal::AttendOneToken(shape, scale, kv.k, kv.v, offsets[b].data() + lo, pos + 1 - lo,
                               q + q_index * row, out + q_index * row, &scores, &acc);
    }
  }
  return absl::OkStatus();
}

template absl::Status ReferenceAppendKv<PagedKv>(const AttentionShape&, const PagedKv&,
                                                 absl::Span<const int64_t>, const float*,
                                                 const float*);
template absl::Status ReferenceAppendKv<VirtualKv>(const AttentionShape&, const VirtualKv&,
                                                   absl::Span<const int64_t>, const float*,
                                                   const float*);
template absl::Status ReferenceDecode<PagedKv>(const AttentionShape&, const PagedKv&,
                                               absl::Span<const int32_t>, const float*, float*);
template absl::Status ReferenceDecode<VirtualKv>(const AttentionShape&, const VirtualKv&,
                                                 absl::Span<const int32_t>, const float*, float*);
template absl::Status ReferenceExtend<PagedKv>(const AttentionShape&, const PagedKv&,
                                               absl::Span<const int32_t>, absl::Span<const int32_t>,
                                               const float*, float*);
template absl::Status ReferenceExtend<VirtualKv>(const AttentionShape&, const VirtualKv&,
                                                 absl::Span<const int32_t>,
                                                 absl::Span<const int32_t>, const float*, float*);

}  // namespace kvmem
