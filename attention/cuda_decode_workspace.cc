// DecodeWorkspace: the host-side split-KV plan of a decode step and the fixed-capacity
// device buffers it is uploaded to. The plan is made from host lengths only, so no
// launch waits on device data, and a captured CUDA graph replays with whatever the last
// Plan() uploaded (docs/kernels.md). Host code (CUDA runtime API, no kernels); built only
// with CUDA (cuda_*.cc).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "attention/cuda_status.h"
#include "attention/decode_plan.h"
#include "kvmem/attention.h"
#include "src/core/int_math.h"
#include "src/core/logging.h"
#include "src/core/status_macros.h"

namespace kvmem {

DecodeWorkspace::Impl::~Impl() {
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      internal::Logger()->error("DecodeWorkspace: {} failed: {}", what, cudaGetErrorString(err));
    }
  };
  for (int i = 0; i < 2; ++i) {
    if (stage_done[i] != nullptr) {
      check(cudaEventSynchronize(stage_done[i]), "cudaEventSynchronize");
      check(cudaEventDestroy(stage_done[i]), "cudaEventDestroy");
    }
    if (stage[i] != nullptr) check(cudaFreeHost(stage[i]), "cudaFreeHost");
  }
  if (block != nullptr) check(cudaFree(block), "cudaFree");
  if (partial_o != nullptr) check(cudaFree(partial_o), "cudaFree");
  if (partial_lse != nullptr) check(cudaFree(partial_lse), "cudaFree");
  if (counters != nullptr) check(cudaFree(counters), "cudaFree");
}

namespace {

absl::Status ValidateOptions(const DecodeOptions& o) {
  KVMEM_RETURN_IF_ERROR(ValidateAttentionShape(o.shape));
  const int group = o.shape.num_q_heads / o.shape.num_kv_heads;
  if (group < 1 || group > internal::kMaxDecodeGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode supports 1..16 query heads per KV head, not ", group));
  }
  if (o.max_batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch must be >= 1, not ", o.max_batch));
  }
  if (o.max_context < 1 || o.max_context > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_context must be in [1, 2^31), not ", o.max_context));
  }
  if (o.layout == Layout::kPaged && o.page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_tokens must be >= 1, not ", o.page_tokens));
  }
  return absl::OkStatus();
}

absl::Status ValidateLens(absl::Span<const int32_t> lens, const DecodeOptions& o) {
  if (lens.size() > static_cast<size_t>(o.max_batch)) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch of ", lens.size(), " over max_batch ", o.max_batch));
  }
  for (size_t b = 0; b < lens.size(); ++b) {
    if (lens[b] < 0 || lens[b] > o.max_context) {
      return absl::OutOfRangeError(absl::StrCat("seq_lens[", b, "] = ", lens[b],
                                                " outside [0, max_context = ", o.max_context, "]"));
    }
  }
  return absl::OkStatus();
}

// Plans `lens` into the next staging buffer, lets `fill_index(int32_t* index)` write the
// index rows, and enqueues one upload of the used part of the block.
// Without `with_index` the index is neither filled nor copied (the kernel reads the
// caller's, e.g. a DeviceRunningBatch's page table).
template <typename FillIndex>
absl::Status Upload(DecodeWorkspace::Impl& w, absl::Span<const int32_t> lens,
                    FillIndex&& fill_index, CudaStream stream, bool with_index = true) {
  using Impl = DecodeWorkspace::Impl;
  const int slot = w.next_stage;
  // The buffer's previous upload (two plans ago) must be done before it is rewritten.
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaEventSynchronize(w.stage_done[slot]), "cudaEventSynchronize"));
  void* buf = w.stage[slot];
  auto* header = Impl::At<internal::DecodePlanHeader>(buf, 0);
  KVMEM_ASSIGN_OR_RETURN(
      const int num_work,
      internal::BuildDecodePlan(lens, w.options.shape.window_left, w.num_kv_heads, w.tile_tokens,
                                w.resident_ctas, w.max_work, internal::DecodeSplitPolicy{},
                                Impl::At<int32_t>(buf, w.off_work_begin),
                                Impl::At<internal::DecodeWork>(buf, w.off_work)));
  *header = {static_cast<int32_t>(lens.size()), num_work, {0, 0}};
  int32_t* index = Impl::At<int32_t>(buf, w.off_index);
  fill_index(index);
  if (w.options.layout == Layout::kVirtual) {  // each work item carries its row id
    internal::SetDecodeRowIds(absl::MakeConstSpan(index, lens.size()),
                              absl::MakeSpan(Impl::At<internal::DecodeWork>(buf, w.off_work),
                                             static_cast<size_t>(num_work)));
  }
  const size_t bytes =
      w.off_index + (with_index ? lens.size() * w.index_stride * sizeof(int32_t) : 0);
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMemcpyAsync(w.block, buf, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync"));
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaEventRecord(w.stage_done[slot], stream), "cudaEventRecord"));
  w.next_stage ^= 1;
  w.batch = static_cast<int>(lens.size());
  w.num_work = num_work;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<DecodeWorkspace>> DecodeWorkspace::Create(
    const DecodeOptions& options) {
  KVMEM_RETURN_IF_ERROR(ValidateOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->num_q_heads = options.shape.num_q_heads;
  impl->num_kv_heads = options.shape.num_kv_heads;
  impl->group = impl->num_q_heads / impl->num_kv_heads;
  impl->head_dim = options.shape.head_dim;
  impl->scale_log2 = options.shape.EffectiveScale() * 1.4426950408889634f;

  KVMEM_ASSIGN_OR_RETURN(
      const internal::DecodeKernelInfo info,
      internal::PrepareDecodeKernel(options.layout, options.shape.kv_dtype, options.shape.head_dim,
                                    options.pipeline_stages));
  KVMEM_ASSIGN_OR_RETURN(const int sms,
                         internal::CurrentDeviceAttribute(cudaDevAttrMultiProcessorCount));
  impl->tile_tokens = info.tile_tokens;
  impl->stages = info.stages;
  impl->resident_ctas = std::max(1, info.ctas_per_sm) * sms;
  impl->max_work =
      internal::MaxDecodeWork(options.max_batch, impl->num_kv_heads, impl->resident_ctas);
  impl->index_stride = options.layout == Layout::kPaged
                           ? internal::CeilDiv(options.max_context, options.page_tokens)
                           : 1;
  impl->off_work_begin = internal::Align16(sizeof(internal::DecodePlanHeader));
  impl->off_work =
      impl->off_work_begin + internal::Align16((options.max_batch + 1) * sizeof(int32_t));
  impl->off_index = impl->off_work + impl->max_work * sizeof(internal::DecodeWork);
  impl->block_bytes =
      impl->off_index + internal::Align16(options.max_batch * impl->index_stride * sizeof(int32_t));

  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaMalloc(&impl->block, impl->block_bytes), "cudaMalloc"));
  // Zeroed so that a launch before the first Plan() finds an empty batch.
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaMemset(impl->block, 0, impl->block_bytes), "cudaMemset"));
  const size_t rows = static_cast<size_t>(impl->max_work) * impl->num_q_heads;
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMalloc(reinterpret_cast<void**>(&impl->partial_o), rows * impl->head_dim * sizeof(float)),
      "cudaMalloc"));
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMalloc(reinterpret_cast<void**>(&impl->partial_lse), rows * sizeof(float)),
      "cudaMalloc"));
  const size_t counter_bytes = static_cast<size_t>(options.max_batch) * impl->num_kv_heads * 4;
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMalloc(reinterpret_cast<void**>(&impl->counters), counter_bytes), "cudaMalloc"));
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaMemset(impl->counters, 0, counter_bytes), "cudaMemset"));
  for (int i = 0; i < 2; ++i) {
    KVMEM_RETURN_IF_ERROR(
        internal::CudaStatus(cudaMallocHost(&impl->stage[i], impl->block_bytes), "cudaMallocHost"));
    KVMEM_RETURN_IF_ERROR(
        internal::CudaStatus(cudaEventCreateWithFlags(&impl->stage_done[i], cudaEventDisableTiming),
                             "cudaEventCreateWithFlags"));
  }
  return std::unique_ptr<DecodeWorkspace>(new DecodeWorkspace(std::move(impl)));
}

DecodeWorkspace::DecodeWorkspace(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DecodeWorkspace::~DecodeWorkspace() = default;

const DecodeOptions& DecodeWorkspace::options() const { return impl_->options; }
int DecodeWorkspace::batch() const { return impl_->batch; }
int DecodeWorkspace::num_work() const { return impl_->num_work; }
int DecodeWorkspace::max_work() const { return impl_->max_work; }
int DecodeWorkspace::pipeline_stages() const { return impl_->stages; }

absl::Status DecodeWorkspace::PlanPaged(absl::Span<const int32_t> seq_lens,
                                        absl::Span<const int32_t> page_table,
                                        int64_t page_table_stride, CudaStream stream) {
  const DecodeOptions& o = impl_->options;
  if (o.layout != Layout::kPaged) {
    return absl::FailedPreconditionError("PlanPaged on a workspace for the virtual layout");
  }
  KVMEM_RETURN_IF_ERROR(ValidateLens(seq_lens, o));
  const size_t batch_size = seq_lens.size();
  if (batch_size > 0 && (page_table_stride < 1 ||
                         page_table.size() < batch_size * static_cast<size_t>(page_table_stride))) {
    return absl::InvalidArgumentError(absl::StrCat("page_table has ", page_table.size(),
                                                   " entries, fewer than ", batch_size, " rows of ",
                                                   page_table_stride));
  }
  for (size_t b = 0; b < batch_size; ++b) {
    const int64_t pages = internal::CeilDiv(seq_lens[b], o.page_tokens);
    if (pages > page_table_stride) {
      return absl::InvalidArgumentError(absl::StrCat(
          "request ", b, " needs ", pages, " pages, over page_table_stride ", page_table_stride));
    }
    for (int64_t i = 0; i < pages; ++i) {
      if (page_table[b * page_table_stride + i] < 0) {
        return absl::InvalidArgumentError(absl::StrCat("page_table[", b, "][", i, "] < 0"));
      }
    }
  }
  const int64_t stride = impl_->index_stride;
  return Upload(
      *impl_, seq_lens,
      [&](int32_t* index) {
        for (size_t b = 0; b < batch_size; ++b) {
          const int64_t pages = internal::CeilDiv(seq_lens[b], o.page_tokens);
          std::memcpy(index + b * stride, page_table.data() + b * page_table_stride,
                      pages * sizeof(int32_t));
        }
      },
      stream);
}

absl::Status DecodeWorkspace::PlanVirtual(absl::Span<const int32_t> seq_lens,
                                          absl::Span<const int32_t> row_ids, CudaStream stream) {
  const DecodeOptions& o = impl_->options;
  if (o.layout != Layout::kVirtual) {
    return absl::FailedPreconditionError("PlanVirtual on a workspace for the paged layout");
  }
  KVMEM_RETURN_IF_ERROR(ValidateLens(seq_lens, o));
  if (row_ids.size() != seq_lens.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("row_ids has ", row_ids.size(), " entries for a batch of ", seq_lens.size()));
  }
  for (size_t b = 0; b < row_ids.size(); ++b) {
    if (row_ids[b] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("row_ids[", b, "] < 0"));
    }
  }
  return Upload(
      *impl_, seq_lens,
      [&](int32_t* index) {
        if (!row_ids.empty()) std::memcpy(index, row_ids.data(), row_ids.size() * sizeof(int32_t));
      },
      stream);
}

absl::Status DecodeWorkspace::Plan(const BatchMetadata& meta, CudaStream stream) {
  if (impl_->options.layout == Layout::kPaged) {
    return PlanPaged(meta.seq_lens, meta.page_table, meta.page_table_stride, stream);
  }
  return PlanVirtual(meta.seq_lens, meta.row_ids, stream);
}

absl::Status DecodeWorkspace::Plan(const RunningBatchView& batch, CudaStream stream) {
  const DecodeOptions& o = impl_->options;
  if (batch.size < 0 || batch.size > batch.max_batch || batch.seq_lens == nullptr ||
      batch.row_ids == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("Plan: a running batch of ", batch.size, " entries of ", batch.max_batch,
                     " without its arrays"));
  }
  const absl::Span<const int32_t> lens(batch.seq_lens, batch.size);
  KVMEM_RETURN_IF_ERROR(ValidateLens(lens, o));
  if (o.layout == Layout::kPaged) {
    // The table stays where it is; only the plan goes up.
    return Upload(*impl_, lens, [](int32_t*) {}, stream, /*with_index=*/false);
  }
  for (int32_t b = 0; b < batch.size; ++b) {
    if (lens[b] > 0 && batch.row_ids[b] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("row_ids[", b, "] < 0"));
    }
  }
  return Upload(
      *impl_, lens,
      [&](int32_t* index) {
        // An empty entry (a freed member, row -1) gets no work item; 0 keeps it in range.
        for (int32_t b = 0; b < batch.size; ++b) index[b] = lens[b] > 0 ? batch.row_ids[b] : 0;
      },
      stream);
}

PagedKv DecodeWorkspace::Bind(PagedKv view) const {
  view.page_table = impl_->index();
  view.page_table_stride = impl_->index_stride;
  return view;
}

VirtualKv DecodeWorkspace::Bind(VirtualKv view) const {
  view.row_ids = impl_->index();
  return view;
}

}  // namespace kvmem
