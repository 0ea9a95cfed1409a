// Extend / prefill attention (kvmem/extend_attention.h): the host-side plan of a step
// (ExtendWorkspace), the launch validation, and the kernel instantiations of
// attention/extend_kernel.cuh, one per (layout, dtype, head_dim): 2 x 2 x 3, and of
// attention/extend_wgmma_kernel.cuh (Hopper), 2 x 2 x 2.
//
// The plan is made from host lengths only and uploaded into one fixed-address device
// block, so no launch waits on device data and a captured CUDA graph (fixed_grid)
// replays with whatever the last Plan() uploaded.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "attention/device_utils.cuh"
#include "attention/extend_kernel.cuh"
#include "attention/extend_wgmma_kernel.cuh"
#include "attention/kv_tensor_map.h"
#include "attention/launch_util.cuh"
#include "kvmem/extend_attention.h"
#include "src/core/int_math.h"
#include "src/core/status_macros.h"

namespace kvmem {

struct ExtendWorkspace::Impl {
  ExtendOptions options;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int group = 0;
  int head_dim = 0;
  float scale_log2 = 0.f;
  int tokens_per_tile = 0;
  bool wgmma = false;  // launches run ExtendWgmmaKernel
  // CTAs of the launched kernel the device holds at once, at most options.max_ctas: the
  // persistent wgmma grid.
  int resident_ctas = 0;
  int max_work = 0;
  int64_t index_stride = 0;  // device index entries per request: pages (paged) or 1

  // One device block: header | work[max_work] | index[max_batch][index_stride].
  size_t off_work = 0;
  size_t off_index = 0;
  size_t block_bytes = 0;
  void* block = nullptr;

  // Pinned staging ring: a buffer is refilled only after its last upload completed.
  void* stage[2] = {nullptr, nullptr};
  cudaEvent_t stage_done[2] = {nullptr, nullptr};
  int next_stage = 0;

  // Of the last Plan().
  int batch = 0;
  int64_t total_new = 0;
  int num_work = 0;

  ~Impl() {
    for (int i = 0; i < 2; ++i) {
      if (stage_done[i] != nullptr) {
        cudaEventSynchronize(stage_done[i]);
        cudaEventDestroy(stage_done[i]);
      }
      if (stage[i] != nullptr) cudaFreeHost(stage[i]);
    }
    if (block != nullptr) cudaFree(block);
  }

  const internal::ExtendPlanHeader* header() const {
    return static_cast<const internal::ExtendPlanHeader*>(block);
  }
  const internal::ExtendWork* work() const {
    return reinterpret_cast<const internal::ExtendWork*>(static_cast<char*>(block) + off_work);
  }
  int32_t* index() const {
    return reinterpret_cast<int32_t*>(static_cast<char*>(block) + off_index);
  }
};

namespace internal {
namespace {

// Calls f(KernelTag<T, head_dim>{}) for the storage type of `dtype`.
template <typename F>
absl::Status DispatchExtend(DType dtype, int head_dim, F&& f) {
  return DispatchKernel("extend attention", dtype, head_dim, std::forward<F>(f));
}

// Rows of one CTA for head_dim (the kernel's kBlockM).
int BlockRows(int head_dim) {
  switch (head_dim) {
    case 64:
      return ExtendSmem<__nv_bfloat16, 64>::kBlockM;
    case 128:
      return ExtendSmem<__nv_bfloat16, 128>::kBlockM;
    case 256:
      return ExtendSmem<__nv_bfloat16, 256>::kBlockM;
  }
  return 0;
}

// Raises the dynamic shared-memory limit of `kernel` (of `threads` per CTA) to `bytes`;
// sets *ctas_per_sm to how many CTAs of it an SM holds.
template <typename Kernel>
absl::Status AllowSmem(Kernel kernel, int threads, int bytes, int* ctas_per_sm) {
  KVMEM_RETURN_IF_ERROR(
      CudaStatus(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                 "cudaFuncSetAttribute"));
  return CudaStatus(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, kernel, threads, bytes),
      "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
}

// Raises the dynamic shared-memory limit of the kernel of (layout, dtype, head_dim,
// wgmma or not) that launches will use; returns its CTAs per SM.
absl::StatusOr<int> PrepareExtendKernel(Layout layout, DType dtype, int head_dim, bool wgmma) {
  int ctas_per_sm = 0;
  auto prepare = [&](auto tag) -> absl::Status {
    using T = typename decltype(tag)::Type;
    constexpr int kDim = decltype(tag)::kDim;
    if constexpr (kDim != 256) {
      if (wgmma) {
        using WSmem = WgmmaExtendSmem<T, kDim>;
        return layout == Layout::kPaged ? AllowSmem(&ExtendWgmmaKernel<PagedKv, T, kDim>,
                                                    WSmem::kThreads, WSmem::kBytes, &ctas_per_sm)
                                        : AllowSmem(&ExtendWgmmaKernel<VirtualKv, T, kDim>,
                                                    WSmem::kThreads, WSmem::kBytes, &ctas_per_sm);
      }
    }
    constexpr int kThreads = ExtendConfig<kDim>::kWarps * 32;
    constexpr int kBytes = ExtendSmem<T, kDim>::kBytes;
    return layout == Layout::kPaged
               ? AllowSmem(&ExtendKernel<PagedKv, T, kDim>, kThreads, kBytes, &ctas_per_sm)
               : AllowSmem(&ExtendKernel<VirtualKv, T, kDim>, kThreads, kBytes, &ctas_per_sm);
  };
  KVMEM_RETURN_IF_ERROR(DispatchExtend(dtype, head_dim, prepare));
  return ctas_per_sm;
}

// Tokens per TMA box of the wgmma kernel's full tiles: the largest power of two dividing
// both the page size (the chunk size of a chunked virtual row) and the tile, so a box
// never crosses a page or chunk; a whole tile for an unchunked virtual row; 0 (every tile
// by cp.async) below 8 rows, where a box is smaller than a swizzle atom.
int TmaRowsIn(int unit) {
  const int rows = std::min(unit & -unit, WgmmaExtendConfig<128>::kBlockN);
  return rows >= 8 ? rows : 0;
}
int TmaRows(const VirtualKv& kv) {
  return kv.chunk_shift == 0 ? WgmmaExtendConfig<128>::kBlockN : TmaRowsIn(1 << kv.chunk_shift);
}
int TmaRows(const PagedKv& kv) { return TmaRowsIn(kv.page_tokens); }

// Whether the wgmma kernel can run here: an sm_90a build, an sm_90 device, head_dim
// 64 or 128.
absl::StatusOr<bool> WgmmaAvailable(int head_dim) {
#if defined(KVMEM_HAS_SM90A)
  KVMEM_ASSIGN_OR_RETURN(const int major,
                         CurrentDeviceAttribute(cudaDevAttrComputeCapabilityMajor));
  KVMEM_ASSIGN_OR_RETURN(const int minor,
                         CurrentDeviceAttribute(cudaDevAttrComputeCapabilityMinor));
  return major == 9 && minor == 0 && (head_dim == 64 || head_dim == 128);
#else
  return false;
#endif
}

// Checks the step's lengths against the workspace's capacity.
absl::Status ValidateLengths(const ExtendWorkspace::Impl& w, absl::Span<const int32_t> prefix_lens,
                             absl::Span<const int32_t> new_lens) {
  const ExtendOptions& o = w.options;
  if (prefix_lens.size() != new_lens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("prefix_lens has ", prefix_lens.size(),
                                                   " entries, new_lens ", new_lens.size()));
  }
  if (static_cast<int64_t>(new_lens.size()) > o.max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch of ", new_lens.size(), " > max_batch ", o.max_batch));
  }
  int64_t total = 0;
  for (size_t b = 0; b < new_lens.size(); ++b) {
    if (prefix_lens[b] < 0 || new_lens[b] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("request ", b, ": prefix_lens ",
                                                     prefix_lens[b], ", new_lens ", new_lens[b]));
    }
    if (int64_t{prefix_lens[b]} + new_lens[b] > o.max_context) {
      return absl::OutOfRangeError(absl::StrCat("request ", b, ": ", prefix_lens[b], " + ",
                                                new_lens[b], " tokens > max_context ",
                                                o.max_context));
    }
    total += new_lens[b];
  }
  if (total > o.max_new_tokens) {
    return absl::OutOfRangeError(
        absl::StrCat(total, " new tokens > max_new_tokens ", o.max_new_tokens));
  }
  return absl::OkStatus();
}

// Builds the work list into `work` and returns its size. Heaviest first (the CTAs that see
// the longest key ranges start first, so the causal tail does not run alone), in bands of
// kCostBand tokens of key range, and within a band request by request: the CTAs running at
// one time then mostly read one request's K/V (a stream per KV head) and find its tiles in
// L2, where strict cost order interleaves every request's equal-cost tiles (B=4: 32
// streams, a quarter of the reuse). Costs within a band differ by less than kCostBand,
// which its many pairs and the persistent kernel's snake order even out.
int BuildExtendPlan(const ExtendWorkspace::Impl& w, absl::Span<const int32_t> prefix_lens,
                    absl::Span<const int32_t> new_lens, ExtendWork* work) {
  const int tpt = w.tokens_per_tile;
  const int window = w.options.shape.window_left;
  struct Item {
    int64_t cost;
    ExtendWork work;
  };
  std::vector<Item> items;
  int32_t q_row = 0;
  for (size_t b = 0; b < new_lens.size(); ++b) {
    for (int32_t i = 0; i < new_lens[b]; i += tpt) {
      ExtendWork wk;
      wk.b = static_cast<int32_t>(b);
      wk.q_row = q_row + i;
      wk.pos0 = prefix_lens[b] + i;
      wk.ntok = std::min(tpt, new_lens[b] - i);
      const int64_t hi = int64_t{wk.pos0} + wk.ntok;
      const int64_t lo = window < 0 ? 0 : std::max<int64_t>(0, int64_t{wk.pos0} - window);
      items.push_back({hi - lo, wk});
    }
    q_row += new_lens[b];
  }
  constexpr int64_t kCostBand = 1024;
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    const int64_t band_a = a.cost / kCostBand;
    const int64_t band_b = b.cost / kCostBand;
    if (band_a != band_b) return band_a > band_b;
    if (a.work.b != b.work.b) return a.work.b < b.work.b;
    return a.cost > b.cost;
  });
  for (size_t i = 0; i < items.size(); ++i) work[i] = items[i].work;
  return static_cast<int>(items.size());
}

}  // namespace
}  // namespace internal

ExtendWorkspace::ExtendWorkspace(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ExtendWorkspace::~ExtendWorkspace() = default;

absl::StatusOr<std::unique_ptr<ExtendWorkspace>> ExtendWorkspace::Create(
    const ExtendOptions& options) {
  const AttentionShape& s = options.shape;
  KVMEM_RETURN_IF_ERROR(ValidateAttentionShape(s));
  const int rows = internal::BlockRows(s.head_dim);
  if (rows == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("extend attention supports head_dim 64, 128 and 256, not ", s.head_dim));
  }
  if (s.kv_dtype != DType::kBFloat16 && s.kv_dtype != DType::kFloat16) {
    return absl::InvalidArgumentError("extend attention supports bf16 and fp16 storage");
  }
  const int group = s.num_q_heads / s.num_kv_heads;
  if (group > rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("group of ", group, " query heads per KV head > ", rows,
                     " (rows of one CTA at head_dim ", s.head_dim, ")"));
  }
  if (options.max_batch < 1 || options.max_new_tokens < 1 || options.max_context < 1 ||
      options.max_context > (int64_t{1} << 30) || options.max_new_tokens > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch ", options.max_batch, ", max_new_tokens ", options.max_new_tokens,
                     ", max_context ", options.max_context, ": must be >= 1 (and < 2^30)"));
  }
  if (options.max_ctas < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_ctas = ", options.max_ctas, ": must be >= 0 (0: one per SM)"));
  }
  if (options.layout == Layout::kPaged && options.page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_tokens = ", options.page_tokens, ": must be >= 1"));
  }
  if (options.kernel != ExtendKernel::kAuto && options.kernel != ExtendKernel::kMmaSync &&
      options.kernel != ExtendKernel::kWgmma) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown ExtendKernel ", static_cast<int>(options.kernel)));
  }
  bool wgmma = false;
  if (options.kernel != ExtendKernel::kMmaSync) {
    KVMEM_ASSIGN_OR_RETURN(wgmma, internal::WgmmaAvailable(s.head_dim));
    if (options.kernel == ExtendKernel::kWgmma && !wgmma) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ExtendKernel::kWgmma needs an sm_90a build, an sm_90 device and head_dim 64 or 128 "
          "(head_dim ",
          s.head_dim, ")"));
    }
  }
  KVMEM_ASSIGN_OR_RETURN(const int ctas_per_sm, internal::PrepareExtendKernel(
                                                    options.layout, s.kv_dtype, s.head_dim, wgmma));
  KVMEM_ASSIGN_OR_RETURN(const int sms,
                         internal::CurrentDeviceAttribute(cudaDevAttrMultiProcessorCount));

  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->wgmma = wgmma;
  impl->resident_ctas = std::max(1, ctas_per_sm) * sms;
  if (options.max_ctas > 0) impl->resident_ctas = std::min(impl->resident_ctas, options.max_ctas);
  impl->num_q_heads = s.num_q_heads;
  impl->num_kv_heads = s.num_kv_heads;
  impl->group = group;
  impl->head_dim = s.head_dim;
  impl->scale_log2 = s.EffectiveScale() * 1.4426950408889634f;
  impl->tokens_per_tile = rows / group;
  // Each request's tiles number at most new / tpt + 1.
  const int64_t max_work =
      internal::CeilDiv(options.max_new_tokens, impl->tokens_per_tile) + options.max_batch;
  if (max_work * s.num_kv_heads > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError("capacity grid exceeds 2^31 - 1 CTAs");
  }
  impl->max_work = static_cast<int>(max_work);
  impl->index_stride = options.layout == Layout::kPaged
                           ? internal::CeilDiv(options.max_context, options.page_tokens)
                           : 1;
  impl->off_work = internal::Align16(sizeof(internal::ExtendPlanHeader));
  impl->off_index = internal::Align16(impl->off_work + max_work * sizeof(internal::ExtendWork));
  impl->block_bytes = internal::Align16(impl->off_index + static_cast<size_t>(options.max_batch) *
                                                              impl->index_stride * 4);
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaMalloc(&impl->block, impl->block_bytes), "cudaMalloc"));
  // An unplanned launch sees no work.
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMemset(impl->block, 0, sizeof(internal::ExtendPlanHeader)), "cudaMemset"));
  for (int i = 0; i < 2; ++i) {
    KVMEM_RETURN_IF_ERROR(
        internal::CudaStatus(cudaMallocHost(&impl->stage[i], impl->block_bytes), "cudaMallocHost"));
    KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
        cudaEventCreateWithFlags(&impl->stage_done[i], cudaEventDisableTiming), "cudaEventCreate"));
  }
  return std::unique_ptr<ExtendWorkspace>(new ExtendWorkspace(std::move(impl)));
}

namespace {

// Writes the plan and `index_rows` rows of the index into a staging buffer and enqueues
// its upload. fill_index(int32_t* index) fills rows [0, batch).
template <typename FillIndex>
absl::Status Upload(ExtendWorkspace::Impl& w, absl::Span<const int32_t> prefix_lens,
                    absl::Span<const int32_t> new_lens, FillIndex fill_index, CudaStream stream) {
  const int i = w.next_stage;
  w.next_stage ^= 1;
  // The buffer's previous upload (two steps back) must be done before it is rewritten.
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaEventSynchronize(w.stage_done[i]), "cudaEventSynchronize"));
  char* host = static_cast<char*>(w.stage[i]);
  auto* work = reinterpret_cast<internal::ExtendWork*>(host + w.off_work);
  const int num_work = internal::BuildExtendPlan(w, prefix_lens, new_lens, work);
  auto* header = reinterpret_cast<internal::ExtendPlanHeader*>(host);
  *header = internal::ExtendPlanHeader{num_work, {0, 0, 0}};
  const int batch = static_cast<int>(new_lens.size());
  fill_index(reinterpret_cast<int32_t*>(host + w.off_index));
  char* dev = static_cast<char*>(w.block);
  const size_t plan_bytes = w.off_work + num_work * sizeof(internal::ExtendWork);
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMemcpyAsync(dev, host, plan_bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync"));
  const size_t index_bytes = static_cast<size_t>(batch) * w.index_stride * 4;
  if (index_bytes > 0) {
    KVMEM_RETURN_IF_ERROR(
        internal::CudaStatus(cudaMemcpyAsync(dev + w.off_index, host + w.off_index, index_bytes,
                                             cudaMemcpyHostToDevice, stream),
                             "cudaMemcpyAsync"));
  }
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaEventRecord(w.stage_done[i], stream), "cudaEventRecord"));
  w.batch = batch;
  w.num_work = num_work;
  w.total_new = 0;
  for (int32_t n : new_lens) w.total_new += n;
  return absl::OkStatus();
}

}  // namespace

absl::Status ExtendWorkspace::PlanPaged(absl::Span<const int32_t> prefix_lens,
                                        absl::Span<const int32_t> new_lens,
                                        absl::Span<const int32_t> page_table,
                                        int64_t page_table_stride, CudaStream stream) {
  Impl& w = *impl_;
  if (w.options.layout != Layout::kPaged) {
    return absl::FailedPreconditionError("PlanPaged on a workspace for the virtual layout");
  }
  KVMEM_RETURN_IF_ERROR(internal::ValidateLengths(w, prefix_lens, new_lens));
  const int64_t pt = w.options.page_tokens;
  for (size_t b = 0; b < new_lens.size(); ++b) {
    if (new_lens[b] == 0) continue;  // reads no keys
    const int64_t pages = internal::CeilDiv(int64_t{prefix_lens[b]} + new_lens[b], pt);
    if (pages > page_table_stride || static_cast<int64_t>(b) * page_table_stride + pages >
                                         static_cast<int64_t>(page_table.size())) {
      return absl::InvalidArgumentError(absl::StrCat("request ", b, " needs ", pages,
                                                     " pages: page table too small (stride ",
                                                     page_table_stride, ")"));
    }
    for (int64_t i = 0; i < pages; ++i) {
      if (page_table[b * page_table_stride + i] < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "request ", b, ": page_table[", i, "] = ", page_table[b * page_table_stride + i]));
      }
    }
  }
  return Upload(
      w, prefix_lens, new_lens,
      [&](int32_t* index) {
        for (size_t b = 0; b < new_lens.size(); ++b) {
          const int64_t pages =
              new_lens[b] == 0 ? 0 : internal::CeilDiv(int64_t{prefix_lens[b]} + new_lens[b], pt);
          std::memcpy(index + b * w.index_stride, page_table.data() + b * page_table_stride,
                      pages * 4);
        }
      },
      stream);
}

absl::Status ExtendWorkspace::PlanVirtual(absl::Span<const int32_t> prefix_lens,
                                          absl::Span<const int32_t> new_lens,
                                          absl::Span<const int32_t> row_ids, CudaStream stream) {
  Impl& w = *impl_;
  if (w.options.layout != Layout::kVirtual) {
    return absl::FailedPreconditionError("PlanVirtual on a workspace for the paged layout");
  }
  KVMEM_RETURN_IF_ERROR(internal::ValidateLengths(w, prefix_lens, new_lens));
  if (row_ids.size() < new_lens.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(row_ids.size(), " row ids for ", new_lens.size(), " requests"));
  }
  for (size_t b = 0; b < new_lens.size(); ++b) {
    if (row_ids[b] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("request ", b, ": row id ", row_ids[b]));
    }
  }
  return Upload(
      w, prefix_lens, new_lens,
      [&](int32_t* index) { std::memcpy(index, row_ids.data(), new_lens.size() * 4); }, stream);
}

PagedKv ExtendWorkspace::Bind(PagedKv view) const {
  view.page_table = impl_->index();
  view.page_table_stride = impl_->index_stride;
  return view;
}

VirtualKv ExtendWorkspace::Bind(VirtualKv view) const {
  view.row_ids = impl_->index();
  return view;
}

const ExtendOptions& ExtendWorkspace::options() const { return impl_->options; }
int ExtendWorkspace::batch() const { return impl_->batch; }
int64_t ExtendWorkspace::total_new() const { return impl_->total_new; }
int ExtendWorkspace::num_work() const { return impl_->num_work; }
int ExtendWorkspace::max_work() const { return impl_->max_work; }
int ExtendWorkspace::tokens_per_tile() const { return impl_->tokens_per_tile; }
bool ExtendWorkspace::uses_wgmma() const { return impl_->wgmma; }

namespace {

// Checks that `kv` matches the workspace and that every 16-byte copy is aligned.
absl::Status ValidateView(const ExtendWorkspace::Impl& w, const PagedKv& kv) {
  return internal::ValidatePagedView(w, kv);
}

absl::Status ValidateView(const ExtendWorkspace::Impl& w, const VirtualKv& kv) {
  KVMEM_RETURN_IF_ERROR(internal::ValidateVirtualBinding(w, kv));
  const int64_t row = int64_t{w.num_kv_heads} * w.head_dim;
  return internal::ValidateVirtualStrides(kv, row);
}

}  // namespace

template <typename Kv>
absl::Status ExtendAttention(const ExtendWorkspace& ws, const Kv& kv, const void* q, void* out,
                             CudaStream stream) {
  const ExtendWorkspace::Impl& w = ws.impl();
  KVMEM_RETURN_IF_ERROR(ValidateView(w, kv));
  KVMEM_RETURN_IF_ERROR(internal::ValidateLaunchPointers(kv, q, out));
  const bool fixed = w.options.fixed_grid;
  if (!fixed && w.num_work == 0) return absl::OkStatus();
  const int work_items = fixed ? w.max_work : w.num_work;

  internal::ExtendParams<Kv> params;
  params.kv = kv;
  params.q = q;
  params.out = out;
  params.work = w.work();
  params.header = w.header();
  params.num_kv_heads = w.num_kv_heads;
  params.group = w.group;
  params.window_left = w.options.shape.window_left;
  params.scale_log2 = w.scale_log2;

  auto launch = [&](auto tag) -> absl::Status {
    using T = typename decltype(tag)::Type;
    constexpr int kDim = decltype(tag)::kDim;
    using Smem = internal::ExtendSmem<T, kDim>;
    const int64_t pairs = int64_t{work_items} * w.num_kv_heads;
    const dim3 grid(static_cast<unsigned>(pairs));
    if constexpr (kDim != 256) {
      if (w.wgmma) {
        // Persistent: one wave of CTAs, each running pairs until the plan's are done.
        const dim3 persistent_grid(
            static_cast<unsigned>(std::min<int64_t>(pairs, w.resident_ctas)));
        using WSmem = internal::WgmmaExtendSmem<T, kDim>;
        internal::WgmmaExtendParams<Kv> wp{};
        wp.p = params;
        wp.tma_rows = internal::TmaRows(kv);
        if (wp.tma_rows > 0) {
          KVMEM_ASSIGN_OR_RETURN(wp.maps,
                                 internal::EncodeKvTensorMaps(kv, w.options.shape.kv_dtype, kDim,
                                                              w.num_kv_heads, wp.tma_rows));
        }
        internal::ExtendWgmmaKernel<Kv, T, kDim>
            <<<persistent_grid, WSmem::kThreads, WSmem::kBytes, stream>>>(wp);
        return internal::CudaStatus(cudaGetLastError(), "ExtendWgmmaKernel launch");
      }
    }
    internal::ExtendKernel<Kv, T, kDim>
        <<<grid, internal::ExtendConfig<kDim>::kWarps * 32, Smem::kBytes, stream>>>(params);
    return internal::CudaStatus(cudaGetLastError(), "ExtendKernel launch");
  };
  return internal::DispatchExtend(w.options.shape.kv_dtype, w.head_dim, launch);
}

template absl::Status ExtendAttention<PagedKv>(const ExtendWorkspace&, const PagedKv&, const void*,
                                               void*, CudaStream);
template absl::Status ExtendAttention<VirtualKv>(const ExtendWorkspace&, const VirtualKv&,
                                                 const void*, void*, CudaStream);

}  // namespace kvmem
