// CUDA attention entry points over the KV accessor: AppendKv (write the K/V of new tokens
// to their slots) and batch decode (one query token per request, split-KV), for both
// layouts. Built only with CUDA (KVMEM_WITH_CUDA); docs/kernels.md has the design, the
// CUDA-graph rule and the measured figures.
//
// A decode step:
//   auto ws = DecodeWorkspace::Create(options);          // once: fixed-capacity buffers
//   ws->Plan(meta, stream);                              // per step, host data only
//   for each layer l:
//     AppendKv(shape, {&view_l, 1}, new_kv_l, stream);
//     DecodeAttention(*ws, ws->Bind(view_l), q_l, out_l, stream);
//
// Inputs and outputs are device pointers in the cache's storage dtype (bf16 or fp16);
// accumulation is fp32. Semantics are those of reference_attention.h.
#ifndef KVMEM_ATTENTION_H_
#define KVMEM_ATTENTION_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/batch_metadata.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/platform.h"
#include "kvmem/reference_attention.h"
#include "kvmem/running_batch.h"

// The runtime's stream type, declared here so that this header needs no CUDA headers:
// cudaStream_t is `CUstream_st*`.
struct CUstream_st;

namespace kvmem {

using CudaStream = CUstream_st*;

// ---- AppendKv -----------------------------------------------------------------------

// The K and V of new tokens, in the storage dtype, for one or more layers.
// Token t of layer l starts at element l * layer_stride + t * token_stride of k (and v);
// its [kv_heads][head_dim] block is contiguous (a slice of a fused QKV output works).
struct NewKv {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t token_stride = 0;  // elements; 0 means kv_heads * head_dim
  int64_t layer_stride = 0;  // elements; 0 means num_tokens * token_stride
  // [num_tokens] device int64 locations from KvCache::Extend (SGLang's out_cache_loc).
  // A negative slot skips its token (padding of a graph-captured batch).
  const int64_t* slots = nullptr;
  int64_t num_tokens = 0;
};

// Most layers one AppendKv launch takes.
inline constexpr int kMaxAppendLayers = 128;

// Writes src's tokens to their slots in every view of `layers` (layer l of src goes to
// layers[l]): one launch. The views must differ only in k / v (same strides, same page
// table); any dtype (a byte copy); token bytes a multiple of 16 and 16-byte aligned
// addresses. InvalidArgument otherwise. Slots are not range-checked (device data).
template <typename Kv>
absl::Status AppendKv(const AttentionShape& shape, absl::Span<const Kv> layers, const NewKv& src,
                      CudaStream stream);

// ---- Decode ---------------------------------------------------------------------------

struct DecodeOptions {
  // num_q_heads / num_kv_heads in 1..16; head_dim 64, 128 or 256; kv_dtype bf16 or fp16;
  // scale and window_left as in reference_attention.h.
  AttentionShape shape;
  Layout layout = Layout::kPaged;
  int max_batch = 256;
  // Longest context a request may have (bound checks, and with page_tokens the width of
  // the paged page table: ceil(max_context / page_tokens) entries per request).
  int64_t max_context = 32768;
  int page_tokens = 16;  // kPaged only
  // Launch the capacity grid on every step instead of the planned one: REQUIRED when the
  // launches are captured in a CUDA graph that is replayed after later Plan() calls.
  bool fixed_grid = false;
  // K/V tiles the kernel keeps in its pipeline (one is read while the others load). 0: the
  // measured choice for the device; head_dim 128 also takes 2 (chosen where the peak
  // memory bandwidth per SM is up to 30 GB/s, as on the H100) or 3 (above, as on the
  // H200). docs/kernels.md has the measurements. Other values are InvalidArgument.
  int pipeline_stages = 0;
};

// Device state of a decode step: the plan (which CTA works on which request and token
// range), the page table or row ids, and the split-KV scratch. All buffers are allocated
// once, for options.max_batch, and keep their addresses: a step captured in a CUDA graph
// (with fixed_grid) replays correctly after Plan() is called with new lengths and tables.
//
// Thread safety: none; use one workspace per stream. Plan() and the launches that read
// the plan must be ordered on one stream (or by events), and launches on one workspace
// must not overlap: they share the split scratch and the merge counters.
class KVMEM_EXPORT DecodeWorkspace {
 public:
  // InvalidArgument for an unsupported shape or capacity; device errors as Internal.
  // Uses the current CUDA device.
  static absl::StatusOr<std::unique_ptr<DecodeWorkspace>> Create(const DecodeOptions& options);
  ~DecodeWorkspace();
  DecodeWorkspace(const DecodeWorkspace&) = delete;
  DecodeWorkspace& operator=(const DecodeWorkspace&) = delete;

  // Plans a step from host-side data and enqueues its upload on `stream`; never reads
  // device memory. It may wait on the host for the upload of the step before the last
  // (a pinned staging ring of two). Paged: page_table holds seq_lens.size() rows of
  // page_table_stride entries (the first ceil(len / page_tokens) of a row are used).
  absl::Status PlanPaged(absl::Span<const int32_t> seq_lens, absl::Span<const int32_t> page_table,
                         int64_t page_table_stride, CudaStream stream);
  // Virtual: row_ids has one row per request.
  absl::Status PlanVirtual(absl::Span<const int32_t> seq_lens, absl::Span<const int32_t> row_ids,
                           CudaStream stream);
  // Either of the above, by options().layout.
  absl::Status Plan(const BatchMetadata& meta, CudaStream stream);
  // A step of a cache's running batch (running_batch.h) from its host arrays. Paged: the
  // page table is not copied: bind the layer views to a DeviceRunningBatch
  // (device_running_batch.h), whose table the kernel then reads, instead of Bind() below.
  // Virtual: the row ids go with the plan, as in PlanVirtual. Empty entries (seq_len 0)
  // get no work and zero output.
  absl::Status Plan(const RunningBatchView& batch, CudaStream stream);

  // `view` with its batch index (page_table / row_ids) replaced by the workspace's device
  // copy, the one Plan() fills.
  PagedKv Bind(PagedKv view) const;
  VirtualKv Bind(VirtualKv view) const;

  const DecodeOptions& options() const;
  // Of the last Plan(): requests, and work items (request chunks; a CTA per work item
  // and KV head). Work items > batch means some requests are split.
  int batch() const;
  int num_work() const;
  // Capacity of the work list (the grid of a fixed_grid launch is this x num_kv_heads).
  int max_work() const;
  // Pipeline stages of the kernel this workspace launches (DecodeOptions::pipeline_stages,
  // or the device's choice when that is 0).
  int pipeline_stages() const;

  struct Impl;  // internal
  const Impl& impl() const { return *impl_; }

 private:
  explicit DecodeWorkspace(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Decode attention for the batch of the workspace's last Plan(), on one layer.
// q, out: [batch][num_q_heads][head_dim] device, kv_dtype. The view's batch index must be
// device memory (ws.Bind(view), or the caller's own at fixed addresses). K/V bases,
// strides, q and out must be 16-byte aligned. Request b's output is softmax(q K^T *
// scale) V over its positions [max(0, len - 1 - window_left), len); len 0 gives zeros.
// One kernel launch.
template <typename Kv>
absl::Status DecodeAttention(const DecodeWorkspace& ws, const Kv& kv, const void* q, void* out,
                             CudaStream stream);

extern template KVMEM_EXPORT absl::Status AppendKv<PagedKv>(const AttentionShape&, absl::Span<const PagedKv>,
                                               const NewKv&, CudaStream);
extern template KVMEM_EXPORT absl::Status AppendKv<VirtualKv>(const AttentionShape&, absl::Span<const VirtualKv>,
                                                 const NewKv&, CudaStream);
extern template KVMEM_EXPORT absl::Status DecodeAttention<PagedKv>(const DecodeWorkspace&, const PagedKv&,
                                                      const void*, void*, CudaStream);
extern template KVMEM_EXPORT absl::Status DecodeAttention<VirtualKv>(const DecodeWorkspace&, const VirtualKv&,
                                                        const void*, void*, CudaStream);

}  // namespace kvmem

#endif  // KVMEM_ATTENTION_H_
