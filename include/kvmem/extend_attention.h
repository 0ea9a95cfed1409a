// CUDA extend / prefill attention over the KV accessor, for both layouts: a ragged batch
// whose request b has prefix_lens[b] cached tokens and new_lens[b] new tokens (their K/V
// already appended, e.g. by AppendKv); the new tokens' queries attend causally to the
// prefix and to each other. Semantics are exactly ReferenceExtend's
// (reference_attention.h); built only with CUDA (KVMEM_WITH_CUDA). docs/kernels.md has
// the design, the CUDA-graph rule and the measured figures.
//
// A chunked-prefill step:
//   auto ws = ExtendWorkspace::Create(options);                  // once
//   ws->PlanPaged(prefix_lens, new_lens, table, stride, stream); // per step, host data only
//   for each layer l:
//     AppendKv(shape, {&view_l, 1}, new_kv_l, stream);
//     ExtendAttention(*ws, ws->Bind(view_l), q_l, out_l, stream);
//
// Inputs and outputs are device pointers in the cache's storage dtype (bf16 or fp16);
// products run on tensor cores with fp32 accumulation.
#ifndef KVMEM_EXTEND_ATTENTION_H_
#define KVMEM_EXTEND_ATTENTION_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/attention.h"  // CudaStream
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/platform.h"
#include "kvmem/reference_attention.h"

namespace kvmem {

// Which kernel runs the products. kAuto: the Hopper warpgroup-MMA kernel (wgmma) on an
// sm_90 device for head_dim 64 and 128 when the library was built for sm_90a, the
// portable mma.sync kernel otherwise. kMmaSync forces the portable kernel (to compare,
// or as a fallback); kWgmma requires the Hopper kernel (InvalidArgument from Create
// where it cannot run). Both give the same results within rounding.
enum class ExtendKernel { kAuto, kMmaSync, kWgmma };

struct ExtendOptions {
  // head_dim 64, 128 or 256; kv_dtype bf16 or fp16; num_q_heads / num_kv_heads at most
  // 64 (head_dim 256) or 128; scale and window_left as in reference_attention.h.
  AttentionShape shape;
  Layout layout = Layout::kPaged;
  int max_batch = 256;
  // Most new tokens of one step, summed over the batch (the chunked-prefill budget).
  int64_t max_new_tokens = 16384;
  // Longest prefix + new of one request (bound checks, and with page_tokens the width
  // of the paged page table: ceil(max_context / page_tokens) entries per request).
  int64_t max_context = 32768;
  int page_tokens = 16;  // kPaged only
  // Launch the capacity grid on every step instead of the planned one: REQUIRED when the
  // launches are captured in a CUDA graph that is replayed after later Plan() calls.
  // CTAs past the planned work exit at once.
  bool fixed_grid = false;
  ExtendKernel kernel = ExtendKernel::kAuto;
  // The Hopper kernel's CTAs are persistent (one per SM, each running query tiles until
  // the step's are done). max_ctas > 0 caps how many a launch runs, to leave SMs to work
  // on other streams (a decode step beside a prefill chunk); 0: as many as the device
  // holds. The mma.sync kernel launches one CTA per query tile and ignores it.
  int max_ctas = 0;
};

// Device state of an extend step: the work list (which CTA takes which query tile of
// which request) and the page table or row ids, in one fixed-capacity block allocated
// by Create(); its address never changes, so a captured step (with fixed_grid) replays
// correctly after Plan() is called with new lengths and tables.
//
// Thread safety: none; use one workspace per stream. Plan() and the launches that read
// the plan must be ordered on one stream (or by events).
class KVMEM_EXPORT ExtendWorkspace {
 public:
  // InvalidArgument for an unsupported shape or capacity; device errors as Internal.
  // Uses the current CUDA device.
  static absl::StatusOr<std::unique_ptr<ExtendWorkspace>> Create(const ExtendOptions& options);
  ~ExtendWorkspace();
  ExtendWorkspace(const ExtendWorkspace&) = delete;
  ExtendWorkspace& operator=(const ExtendWorkspace&) = delete;

  // Plans a step from host-side data and enqueues its upload on `stream`; never reads
  // device memory. It may wait on the host for the upload of the step before the last
  // (a pinned staging ring of two). prefix_lens and new_lens have one entry per request;
  // the queries of request b are rows [cu_q[b], cu_q[b] + new_lens[b]) of q, cu_q the
  // exclusive prefix sum of new_lens. Paged: page_table holds batch rows of
  // page_table_stride entries (the first ceil((prefix + new) / page_tokens) of a row
  // are used, and must be >= 0).
  // Errors: InvalidArgument for malformed input (sizes, negative lengths or pages, more
  // than max_batch requests), OutOfRange for a request over max_context or a step over
  // max_new_tokens, FailedPrecondition for the other layout's Plan. Nothing is uploaded
  // on error.
  absl::Status PlanPaged(absl::Span<const int32_t> prefix_lens, absl::Span<const int32_t> new_lens,
                         absl::Span<const int32_t> page_table, int64_t page_table_stride,
                         CudaStream stream);
  // Virtual: row_ids has one row (>= 0) per request.
  absl::Status PlanVirtual(absl::Span<const int32_t> prefix_lens,
                           absl::Span<const int32_t> new_lens, absl::Span<const int32_t> row_ids,
                           CudaStream stream);

  // `view` with its batch index (page_table / row_ids) replaced by the workspace's device
  // copy, the one Plan() fills.
  PagedKv Bind(PagedKv view) const;
  VirtualKv Bind(VirtualKv view) const;

  const ExtendOptions& options() const;
  // Of the last Plan(): requests, new tokens (rows of q and out) and work items (query
  // tiles; one CTA per work item and KV head).
  int batch() const;
  int64_t total_new() const;
  int num_work() const;
  // Capacity of the work list (the grid of a fixed_grid launch is this x num_kv_heads).
  int max_work() const;
  // New tokens of one request a work item covers (rows per CTA / group size).
  int tokens_per_tile() const;
  // Whether launches run the Hopper wgmma kernel (see ExtendKernel).
  bool uses_wgmma() const;

  struct Impl;  // internal
  const Impl& impl() const { return *impl_; }

 private:
  explicit ExtendWorkspace(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Extend attention for the batch of the workspace's last Plan(), on one layer.
// q, out: [total_new][num_q_heads][head_dim] device, kv_dtype; rows past the planned
// total_new are neither read nor written. The view's batch index must be device memory
// (ws.Bind(view), or the caller's own at fixed addresses). K/V bases, strides, q and out
// must be 16-byte aligned. One kernel launch.
template <typename Kv>
absl::Status ExtendAttention(const ExtendWorkspace& ws, const Kv& kv, const void* q, void* out,
                             CudaStream stream);

extern template KVMEM_EXPORT absl::Status ExtendAttention<PagedKv>(const ExtendWorkspace&, const PagedKv&,
                                                      const void*, void*, CudaStream);
extern template KVMEM_EXPORT absl::Status ExtendAttention<VirtualKv>(const ExtendWorkspace&, const VirtualKv&,
                                                        const void*, void*, CudaStream);

}  // namespace kvmem

#endif  // KVMEM_EXTEND_ATTENTION_H_
