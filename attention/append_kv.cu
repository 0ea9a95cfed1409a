// AppendKv: copies the K and V of new tokens to their slots (KvCache::Extend locations)
// in one or more layers, one launch. A byte copy in 16-byte vectors, so every storage
// dtype works; the destination offset of a slot comes from the accessor (SlotOffset).
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "attention/device_utils.cuh"
#include "kvmem/attention.h"
#include "src/core/status_macros.h"

namespace kvmem {
namespace internal {
namespace {

constexpr int kAppendThreads = 256;

// Kernel parameters (about 2.1 KiB, under the 4 KiB limit): the view of layer 0 gives
// strides and batch index, k[l] / v[l] the bases of layer l.
template <typename Kv>
struct AppendParams {
  Kv kv;
  const uint8_t* src_k;  // [layers][tokens] rows, strides below (bytes)
  const uint8_t* src_v;
  int64_t src_token_bytes;
  int64_t src_layer_bytes;
  const int64_t* slots;  // [num_tokens]
  int64_t num_tokens;
  int chunks_per_token;  // 16-byte chunks of one token's [kv_heads][head_dim] block
  int elem_bytes;
  void* k[kMaxAppendLayers];
  void* v[kMaxAppendLayers];
};

// Grid (ceil(num_tokens * chunks_per_token / kAppendThreads), num_layers): a thread per
// 16-byte chunk of one token's K and V in one layer.
template <typename Kv>
__global__ void __launch_bounds__(kAppendThreads) AppendKvKernel(const AppendParams<Kv> p) {
  const int layer = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x;
  const int64_t t = i / p.chunks_per_token;
  if (t >= p.num_tokens) return;
  const int c = static_cast<int>(i - t * p.chunks_per_token);
  const int64_t slot = p.slots[t];
  if (slot < 0) return;  // padding
  const int64_t dst = p.kv.SlotOffset(slot) * p.elem_bytes + c * 16;
  const int64_t src = layer * p.src_layer_bytes + t * p.src_token_bytes + c * 16;
  const int4 k = *reinterpret_cast<const int4*>(p.src_k + src);
  const int4 v = *reinterpret_cast<const int4*>(p.src_v + src);
  *reinterpret_cast<int4*>(static_cast<uint8_t*>(p.k[layer]) + dst) = k;
  *reinterpret_cast<int4*>(static_cast<uint8_t*>(p.v[layer]) + dst) = v;
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Everything but k / v must match layer 0 (one set of strides per launch).
bool SameLayout(const PagedKv& a, const PagedKv& b) {
  return a.page_stride == b.page_stride && a.token_stride == b.token_stride &&
         a.page_tokens == b.page_tokens && a.page_table == b.page_table &&
         a.page_table_stride == b.page_table_stride;
}
bool SameLayout(const VirtualKv& a, const VirtualKv& b) {
  return a.row_stride == b.row_stride && a.token_stride == b.token_stride &&
         a.max_context == b.max_context && a.row_ids == b.row_ids &&
         a.chunk_shift == b.chunk_shift && a.chunk_gap == b.chunk_gap;
}

// The strides of a view that a 16-byte copy must keep aligned (elements).
absl::Status CheckStrides(const PagedKv& kv, int64_t row) {
  if (kv.page_tokens < 1 || kv.token_stride < row ||
      kv.page_stride < kv.token_stride * kv.page_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("bad paged view: page_tokens ", kv.page_tokens,
                                                   ", token_stride ", kv.token_stride,
                                                   ", page_stride ", kv.page_stride));
  }
  return absl::OkStatus();
}
absl::Status CheckStrides(const VirtualKv& kv, int64_t row) {
  if (kv.max_context < 1 || kv.token_stride < row || kv.chunk_shift < 0 || kv.chunk_shift > 30 ||
      kv.chunk_gap < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad virtual view: max_context ", kv.max_context, ", token_stride ", kv.token_stride,
        ", chunk_shift ", kv.chunk_shift, ", chunk_gap ", kv.chunk_gap));
  }
  return absl::OkStatus();
}
// The steps besides the token stride that a destination offset is built from.
int64_t OuterStride(const PagedKv& kv) { return kv.page_stride; }
int64_t OuterStride(const VirtualKv& kv) { return kv.row_stride; }
int64_t ChunkStep(const PagedKv&) { return 0; }
int64_t ChunkStep(const VirtualKv& kv) { return kv.chunk_gap; }

}  // namespace
}  // namespace internal

template <typename Kv>
absl::Status AppendKv(const AttentionShape& shape, absl::Span<const Kv> layers, const NewKv& src,
                      CudaStream stream) {
  if (shape.num_kv_heads < 1 || shape.head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad shape: kv_heads ", shape.num_kv_heads, ", head_dim ", shape.head_dim));
  }
  if (layers.empty() || layers.size() > static_cast<size_t>(kMaxAppendLayers)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AppendKv takes 1..", kMaxAppendLayers, " layers, not ", layers.size()));
  }
  if (src.num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens ", src.num_tokens, " < 0"));
  }
  if (src.num_tokens == 0) return absl::OkStatus();
  if (src.k == nullptr || src.v == nullptr || src.slots == nullptr) {
    return absl::InvalidArgumentError("null src.k, src.v or src.slots");
  }
  const int elem = DTypeBytes(shape.kv_dtype);
  const int64_t row = int64_t{shape.num_kv_heads} * shape.head_dim;  // elements per token
  const int64_t token_stride = src.token_stride > 0 ? src.token_stride : row;
  const int64_t layer_stride =
      src.layer_stride > 0 ? src.layer_stride : src.num_tokens * token_stride;
  if (token_stride < row) {
    return absl::InvalidArgumentError(
        absl::StrCat("src.token_stride ", token_stride, " < kv_heads * head_dim ", row));
  }
  const Kv& first = layers[0];
  KVMEM_RETURN_IF_ERROR(internal::CheckStrides(first, row));
  // 16-byte vectors: every byte offset the kernel forms must be a multiple of 16.
  const int64_t byte_steps[] = {row * elem,
                                token_stride * elem,
                                layer_stride * elem,
                                first.token_stride * elem,
                                internal::OuterStride(first) * elem,
                                internal::ChunkStep(first) * elem};
  for (int64_t s : byte_steps) {
    if (s % 16 != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "AppendKv copies 16-byte vectors: token bytes and strides must be multiples of 16 (got ",
          s, ")"));
    }
  }
  if (!internal::Aligned16(src.k) || !internal::Aligned16(src.v)) {
    return absl::InvalidArgumentError("src.k and src.v must be 16-byte aligned");
  }

  internal::AppendParams<Kv> p;
  p.kv = first;
  p.src_k = static_cast<const uint8_t*>(src.k);
  p.src_v = static_cast<const uint8_t*>(src.v);
  p.src_token_bytes = token_stride * elem;
  p.src_layer_bytes = layer_stride * elem;
  p.slots = src.slots;
  p.num_tokens = src.num_tokens;
  p.chunks_per_token = static_cast<int>(row * elem / 16);
  p.elem_bytes = elem;
  for (size_t l = 0; l < layers.size(); ++l) {
    if (!internal::SameLayout(layers[l], first)) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer view ", l, " differs from layer 0 in more than k / v"));
    }
    if (layers[l].k == nullptr || layers[l].v == nullptr || !internal::Aligned16(layers[l].k) ||
        !internal::Aligned16(layers[l].v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer view ", l, ": k and v must be non-null and 16-byte aligned"));
    }
    p.k[l] = layers[l].k;
    p.v[l] = layers[l].v;
  }
  const int64_t threads = src.num_tokens * p.chunks_per_token;
  const int64_t blocks = (threads + internal::kAppendThreads - 1) / internal::kAppendThreads;
  if (blocks > 0x7fffffff) {
    return absl::InvalidArgumentError(absl::StrCat("too many tokens: ", src.num_tokens));
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(layers.size()));
  internal::AppendKvKernel<Kv><<<grid, internal::kAppendThreads, 0, stream>>>(p);
  return internal::CudaStatus(cudaGetLastError(), "AppendKvKernel launch");
}

template absl::Status AppendKv<PagedKv>(const AttentionShape&, absl::Span<const PagedKv>,
                                        const NewKv&, CudaStream);
template absl::Status AppendKv<VirtualKv>(const AttentionShape&, absl::Span<const VirtualKv>,
                                          const NewKv&, CudaStream);

}  // namespace kvmem
