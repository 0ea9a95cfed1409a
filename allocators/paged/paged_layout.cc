#include "allocators/paged/paged_layout.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "allocators/vmm/device_memory.h"
#include "src/core/host_limits.h"
#include "src/core/int_math.h"
#include "src/core/logging.h"
#include "src/core/status_macros.h"

namespace kvmem::internal {
namespace {

// The error of a backend call, with what kvmem was doing in front of its message.
absl::Status WithContext(const absl::Status& s, absl::string_view context) {
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

}  // namespace

namespace {

// The part of the geometry that the budget does not change: pools, page bytes, pages per
// request and the smallest budget that holds one request.
absl::StatusOr<PagedGeometry> PagedShape(const KvCacheConfig& config, int64_t granularity) {
  KVMEM_RETURN_IF_ERROR(ValidateShape(config));
  if (granularity <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat("granularity %d", granularity));
  }
  PagedGeometry g;
  g.num_pools = 2 * int64_t{config.num_layers};
  g.granularity = granularity;
  const int64_t pt = config.page_tokens;
  const int64_t token_layer = config.TokenLayerBytes();
  if (token_layer > std::numeric_limits<int64_t>::max() / pt ||
      g.num_pools > std::numeric_limits<int64_t>::max() / granularity) {
    return absl::InvalidArgumentError("paged layout: page size overflows 64 bits");
  }
  g.pool_page_bytes = pt * token_layer;
  g.pages_per_request = CeilDiv(config.max_context, pt);
  // Every pool is mapped in whole granules, so the smallest budget is the granules of one
  // request's pages in each pool.
  int64_t request_bytes = 0;
  int64_t pool_granules = 0;
  if (__builtin_mul_overflow(g.pages_per_request, g.pool_page_bytes, &request_bytes) ||
      request_bytes > std::numeric_limits<int64_t>::max() - granularity ||
      __builtin_mul_overflow(CeilDiv(request_bytes, granularity), g.num_pools * granularity,
                             &pool_granules)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "paged layout: one request at max_context %d (%d pages of %d bytes in each of %d "
        "pools) overflows 64 bits",
        config.max_context, g.pages_per_request, g.pool_page_bytes, g.num_pools));
  }
  g.min_budget_bytes = pool_granules;
  return g;
}

// Sizes the pool for config.memory_budget_bytes: num_pages, region_bytes, chunks_total.
absl::Status FitBudget(const KvCacheConfig& config, PagedGeometry* g) {
  const int64_t pt = config.page_tokens;
  const int64_t granularity = g->granularity;
  // Every pool is mapped in whole granules, so the budget buys granules per pool.
  const int64_t granules_per_pool = config.memory_budget_bytes / (g->num_pools * granularity);
  const int64_t budget_pages = granules_per_pool * granularity / g->pool_page_bytes;
  const int64_t pages_per_request = g->pages_per_request;
  if (budget_pages < pages_per_request) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "paged layout: memory budget %d bytes holds %d pages of %d bytes (%d tokens x %d bytes "
        "per token; %d pools of %d bytes per page, each rounded to whole granules of %d bytes), "
        "but one request at max_context %d needs %d pages (%d bytes); the smallest budget "
        "that fits is %d bytes",
        config.memory_budget_bytes, budget_pages, pt * config.TokenBytes(), pt, config.TokenBytes(),
        g->num_pools, g->pool_page_bytes, granularity, config.max_context, pages_per_request,
        SatMul(pages_per_request * pt, config.TokenBytes()), g->min_budget_bytes));
  }
  // Slots (page * page_tokens + offset) are int32 in the token index. Pages beyond
  // every row at max_context could never be used together, so they are not tracked
  // (that bounds the host bookkeeping when the budget is far larger than needed).
  const int64_t slot_cap = std::numeric_limits<int32_t>::max() / pt;
  const int64_t rows_cap = int64_t{config.max_requests} * pages_per_request;
  const int64_t pages = std::min({budget_pages, slot_cap, rows_cap});
  if (pages < pages_per_request) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "paged layout: one request needs %d pages of %d tokens, but int32 slots allow %d",
        pages_per_request, pt, slot_cap));
  }
  g->num_pages = static_cast<int32_t>(pages);
  g->chunks_total = CeilDiv(pages * g->pool_page_bytes, granularity);
  g->region_bytes = g->chunks_total * granularity;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PagedGeometry> ComputePagedGeometry(const KvCacheConfig& config,
                                                   int64_t granularity) {
  KVMEM_ASSIGN_OR_RETURN(PagedGeometry g, PagedShape(config, granularity));
  KVMEM_RETURN_IF_ERROR(FitBudget(config, &g));
  return g;
}

namespace {

// What a pool of `geo` takes on the host, checked before any of it is allocated: the
// bookkeeping (rows, token index, pages, handles) against HostBookkeepingLimit, and on a
// host backend the mappings of the whole pool against vm.max_map_count (an elastic pool
// grows to all of it under load; a fixed one maps it in Create).
absl::Status CheckHost(const KvCacheConfig& config, const PagedGeometry& geo, bool device) {
  const int64_t handles = SatMul(geo.num_pools, geo.chunks_total);
  const int64_t rows = SatMul(config.max_requests,
                              kRowBookkeepingBytes + SatMul(config.max_context, sizeof(int32_t)));
  const int64_t pages = SatMul(geo.num_pages, kPageBookkeepingBytes);
  const int64_t bytes = SatMul(handles, kHandleBookkeepingBytes);
  KVMEM_RETURN_IF_ERROR(CheckHostBookkeeping(
      absl::StrFormat("paged layout: %d rows and their token index (%d bytes) + %d pages x %d "
                      "bytes + %d physical handles (%d pools x %d chunks) x %d bytes",
                      config.max_requests, rows, geo.num_pages, kPageBookkeepingBytes, handles,
                      geo.num_pools, geo.chunks_total, kHandleBookkeepingBytes),
      SatAdd(SatAdd(rows, pages), bytes)));
  if (device) return absl::OkStatus();
  return CheckHostMappings(HostMappingNeed{
      .layout = "paged layout",
      .mappings = handles,
      .granularity = geo.granularity,
      .budget_bytes = config.memory_budget_bytes,
      .min_budget_bytes = geo.min_budget_bytes,
      // A backend of host_granularity: the config picks the page (or a backend like it).
      .granularity_is_config =
          config.device == DeviceKind::kHost && geo.granularity == config.host_granularity,
  });
}

}  // namespace

absl::StatusOr<MemoryPlan> PlanPagedLayout(const KvCacheConfig& config, int64_t granularity,
                                           bool device, bool minimal_budget) {
  KVMEM_ASSIGN_OR_RETURN(PagedGeometry g, PagedShape(config, granularity));
  KvCacheConfig sized = config;
  if (minimal_budget) sized.memory_budget_bytes = g.min_budget_bytes;
  KVMEM_RETURN_IF_ERROR(FitBudget(sized, &g));
  if (absl::Status s = CheckHost(sized, g, device); absl::IsInvalidArgument(s)) return s;
  MemoryPlan plan;
  plan.layout = Layout::kPaged;
  plan.granularity = granularity;
  plan.budget_bytes = sized.memory_budget_bytes;
  plan.token_bytes = config.TokenBytes();
  plan.token_layer_bytes = config.TokenLayerBytes();
  plan.unit_tokens = config.page_tokens;
  plan.chunk_tokens = 1;
  plan.page_bytes = config.page_tokens * config.TokenBytes();
  plan.pages_total = g.num_pages;
  plan.pages_per_request = g.pages_per_request;
  plan.max_full_requests =
      std::min<int64_t>(config.max_requests, g.num_pages / g.pages_per_request);
  plan.min_budget_bytes = g.min_budget_bytes;
  plan.reservation_bytes = g.num_pools * g.region_bytes;
  plan.physical_bytes = plan.reservation_bytes;
  return plan;
}

absl::StatusOr<std::unique_ptr<KvLayout>> MakePagedLayout(const KvCacheConfig& config,
                                                          std::shared_ptr<Vmm> vmm) {
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<PagedLayout> layout,
                         PagedLayout::Create(config, std::move(vmm)));
  return std::unique_ptr<KvLayout>(std::move(layout));
}

absl::StatusOr<std::unique_ptr<PagedLayout>> PagedLayout::Create(const KvCacheConfig& config,
                                                                 std::shared_ptr<Vmm> vmm) {
  if (vmm == nullptr) return absl::InvalidArgumentError("paged layout: no memory backend");
  KVMEM_ASSIGN_OR_RETURN(PagedGeometry geo, ComputePagedGeometry(config, vmm->granularity()));
  KVMEM_RETURN_IF_ERROR(CheckHost(config, geo, vmm->is_device()));
  // A fixed pool is mapped whole below; an elastic one grows as requests do.
  KVMEM_RETURN_IF_ERROR(CheckDeviceMemory(
      *vmm, DeviceMemoryNeed{.layout = "paged layout",
                             .pool_bytes = geo.num_pools * geo.region_bytes,
                             .created_up_front = !config.elastic_pool,
                             .budget_bytes = config.memory_budget_bytes,
                             .min_budget_bytes = geo.min_budget_bytes,
                             .grow_lazily_fix = "elastic_pool = true"}));
  KVMEM_ASSIGN_OR_RETURN(TokenIndex index,
                         TokenIndex::Make(config.max_requests, config.max_context));
  const int64_t reserve_bytes = geo.num_pools * geo.region_bytes;
  absl::StatusOr<Reservation> reservation = Reservation::Make(vmm.get(), reserve_bytes);
  if (!reservation.ok()) {
    return WithContext(reservation.status(),
                       absl::StrFormat("paged layout: reserving %d bytes for %d pools of %d pages",
                                       reserve_bytes, geo.num_pools, geo.num_pages));
  }
  std::unique_ptr<PagedLayout> layout(
      new PagedLayout(config, std::move(vmm), geo, std::move(index), std::move(*reservation)));
  if (!config.elastic_pool) {
    absl::Status s = layout->MapChunks(geo.chunks_total);
    if (!s.ok()) {
      return WithContext(
          s, absl::StrFormat("paged layout: mapping the whole pool (%d chunks)", geo.chunks_total));
    }
  }
  return layout;
}

PagedLayout::PagedLayout(const KvCacheConfig& config, std::shared_ptr<Vmm> vmm, PagedGeometry geo,
                         TokenIndex index, Reservation reservation)
    : config_(config),
      vmm_(std::move(vmm)),
      geo_(geo),
      pt_(config.page_tokens),
      page_div_(config.page_tokens),
      reservation_(std::move(reservation)),
      pool_(geo.num_pages),
      index_(std::move(index)),
      rows_(config.max_requests),
      free_rows_(config.max_requests),
      partial_refs_(geo.num_pages, 0),
      partial_sum_(geo.num_pages, 0),
      copies_(geo.num_pages, 0) {
  for (int32_t r = 0; r < config.max_requests; ++r) free_rows_.Insert(r);
}

PagedLayout::~PagedLayout() {
  if (pool_.quarantined_count() > 0) {
    // Nothing can wait here: a fence that never completes would hang the destructor.
    Logger()->warn("paged layout destroyed with {} pages still waiting on fences",
                   pool_.quarantined_count());
  }
  // Every chunk goes with what failed calls left: one Unmap per run of adjacent granules
  // (the whole reservation for a full pool), then every handle is released; what fails
  // is logged once.
  for (size_t c = 0; c < chunks_.size(); ++c) {
    for (int64_t i = 0; i < geo_.num_pools; ++i) {
      stranded_.AddMapped(PoolBase(i) + c * geo_.granularity, static_cast<int64_t>(c),
                          std::move(chunks_[c][i]), /*accessible=*/true);
    }
  }
  chunks_.clear();
  stranded_.GiveBackOrLog(vmm_.get(), geo_.granularity, "paged layout destroyed");
  reservation_.Reset();
}

int64_t PagedLayout::UsablePagesFor(int64_t chunks) const {
  return std::min<int64_t>(geo_.num_pages, chunks * geo_.granularity / geo_.pool_page_bytes);
}

// ---- memory -------------------------------------------------------------------

absl::Status PagedLayout::MapChunks(int64_t target) {
  const int64_t c0 = static_cast<int64_t>(chunks_.size());
  const int64_t k = target - c0;
  if (k <= 0) return absl::OkStatus();
  const int64_t gran = geo_.granularity;
  const int64_t pools = geo_.num_pools;
  if (stranded_.AnyMappedIn(c0, target)) {
    // The retry at the start of this call failed to unmap them again.
    const absl::Status& why = stranded_error_;
    return absl::Status(
        why.ok() ? absl::StatusCode::kFailedPrecondition : why.code(),
        absl::StrFormat("chunks [%d, %d) cannot be mapped: an earlier failed call left part of "
                        "them mapped, and unmapping that failed again: %s",
                        c0, target, why.ToString()));
  }
  const StrandedMappings::Count stranded_before = stranded_.count();

  std::vector<std::vector<PhysicalPage>> fresh(k);  // [chunk][pool]
  // Takes back what this call did: unmaps whole pools before `pool` and `mapped_in_pool`
  // chunks of it (the first `accessible_pools` pools were given access), then releases
  // every handle it created. What fails stays in stranded_, and the status says so.
  auto unwind = [&](int64_t pool, int64_t mapped_in_pool, int64_t accessible_pools,
                    const absl::Status& cause) {
    absl::Status undo;
    for (int64_t i = 0; i <= pool && i < pools; ++i) {
      const int64_t m = i < pool ? k : mapped_in_pool;
      if (m == 0) continue;
      absl::Status u = vmm_->Unmap(PoolBase(i) + c0 * gran, m * gran);
      if (u.ok()) continue;
      undo.Update(
          WithContext(u, absl::StrFormat("unmapping chunks [%d, %d) of pool %d", c0, c0 + m, i)));
      for (int64_t j = 0; j < m; ++j) {
        stranded_.AddMapped(PoolBase(i) + (c0 + j) * gran, c0 + j, std::move(fresh[j][i]),
                            i < accessible_pools);
      }
    }
    std::vector<PhysicalPage> created;
    for (auto& chunk : fresh) {
      for (PhysicalPage& page : chunk) created.push_back(std::move(page));
    }
    if (absl::Status r = stranded_.Release(&created); !r.ok()) {
      undo.Update(WithContext(r, "releasing the handles it created"));
    }
    return Undone(cause, undo, c0, stranded_before);
  };

  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t j = 0; j < k; ++j) {
    fresh[j].reserve(pools);
    for (int64_t i = 0; i < pools; ++i) {
      absl::StatusOr<PhysicalPage> page = PhysicalPage::Make(vmm_.get());
      if (!page.ok()) {
        return unwind(0, 0, 0,
                      WithContext(page.status(), absl::StrFormat("creating memory for chunk %d "
                                                                 "of pool %d",
                                                                 c0 + j, i)));
      }
      fresh[j].push_back(std::move(*page));
    }
  }
  pool_create_nanos_ +=
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
          .count();

  for (int64_t i = 0; i < pools; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      absl::Status s = vmm_->Map(PoolBase(i) + (c0 + j) * gran, fresh[j][i].handle());
      if (!s.ok()) {
        return unwind(i, j, 0,
                      WithContext(s, absl::StrFormat("mapping chunk %d of pool %d", c0 + j, i)));
      }
    }
  }
  // One SetAccess per pool for the whole new range: its cost is per call, not per granule.
  for (int64_t i = 0; i < pools; ++i) {
    absl::Status s = vmm_->SetAccess(PoolBase(i) + c0 * gran, k * gran);
    if (!s.ok()) {
      return unwind(pools, 0, i,
                    WithContext(s, absl::StrFormat("enabling access to chunks [%d, %d) of pool %d",
                                                   c0, target, i)));
    }
  }
  for (auto& chunk : fresh) chunks_.push_back(std::move(chunk));
  usable_pages_ = UsablePagesFor(target);
  return absl::OkStatus();
}

absl::Status PagedLayout::UnmapChunks(int64_t target, absl::Status* undo_error) {
  const int64_t c1 = static_cast<int64_t>(chunks_.size());
  const int64_t k = c1 - target;
  if (k <= 0) return absl::OkStatus();
  const int64_t gran = geo_.granularity;
  const int64_t pools = geo_.num_pools;
  // Pools [0, unmapped) are unmapped; of pool p < unmapped, remapped[p] chunks were mapped
  // back, and given access when accessible[p].
  int64_t unmapped = 0;
  std::vector<int64_t> remapped(pools, 0);
  std::vector<bool> accessible(pools, false);
  absl::Status cause;
  for (; unmapped < pools; ++unmapped) {
    absl::Status s = vmm_->Unmap(PoolBase(unmapped) + target * gran, k * gran);
    if (s.ok()) continue;
    cause = WithContext(
        s, absl::StrFormat("unmapping chunks [%d, %d) of pool %d", target, c1, unmapped));
    break;
  }
  if (!cause.ok()) {
    // Map the pools already unmapped back (the handles still hold their contents).
    absl::Status m;
    for (int64_t r = 0; r < unmapped && m.ok(); ++r) {
      for (int64_t j = 0; j < k && m.ok(); ++j) {
        m = vmm_->Map(PoolBase(r) + (target + j) * gran, chunks_[target + j][r].handle());
        if (m.ok()) ++remapped[r];
      }
      if (m.ok()) m = vmm_->SetAccess(PoolBase(r) + target * gran, k * gran);
      if (!m.ok()) {
        undo_error->Update(WithContext(m, absl::StrFormat("mapping pool %d back", r)));
      }
      accessible[r] = m.ok();
    }
    if (m.ok()) return cause;  // every chunk is mapped and accessible as before
  }
  // The chunks leave the pool (their pages are free): what is still mapped of them (the
  // pools not unmapped, or mapped back) waits in stranded_ for a later call to unmap it.
  std::vector<PhysicalPage> released;
  for (int64_t c = target; c < c1; ++c) {
    for (int64_t i = 0; i < pools; ++i) {
      PhysicalPage& page = chunks_[c][i];
      const bool still_mapped = i >= unmapped || c - target < remapped[i];
      if (still_mapped) {
        stranded_.AddMapped(PoolBase(i) + c * gran, c, std::move(page),
                            i >= unmapped || accessible[i]);
      } else {
        released.push_back(std::move(page));
      }
    }
  }
  chunks_.resize(target);
  usable_pages_ = UsablePagesFor(target);
  // A handle the backend fails to release is kept (counted in physical bytes) and retried
  // by the next call, rather than dropped and leaked.
  if (absl::Status r = stranded_.Release(&released); !r.ok()) {
    undo_error->Update(
        WithContext(r, absl::StrFormat("releasing the handles of chunks [%d, %d)", target, c1)));
  }
  return cause;
}

void PagedLayout::RetryStranded() {
  if (stranded_.empty()) return;
  // A batch of single-row calls retries once per row while the backend is down: a warning
  // for the first failure only (errors are reported once), debug after it.
  const bool first = stranded_error_.ok();
  stranded_error_ = stranded_.Retry(vmm_.get(), geo_.granularity);
  if (!stranded_error_.ok()) {
    Logger()->log(first ? spdlog::level::warn : spdlog::level::debug,
                  "paged layout: {} granule(s) stay mapped outside the pool and {} handle(s) "
                  "unreleased after retrying: {}",
                  stranded_.mapped().size(), stranded_.unreleased().size(),
                  stranded_error_.ToString());
  }
}

absl::Status PagedLayout::Undone(const absl::Status& cause, const absl::Status& undo_error,
                                 int64_t chunks_before,
                                 const StrandedMappings::Count& stranded_before) const {
  std::vector<std::string> notes;
  const int64_t now = mapped_chunks();
  if (now > chunks_before) {
    notes.push_back(absl::StrFormat(
        "the pool keeps chunks [%d, %d) mapped (their pages free) until Trim gives them back",
        chunks_before, now));
  } else if (now < chunks_before) {
    notes.push_back(absl::StrFormat("chunks [%d, %d) left the pool (their pages were free)", now,
                                    chunks_before));
  }
  stranded_.DescribeSince(stranded_before, &notes);
  if (notes.empty()) return cause;
  return absl::Status(
      cause.code(), absl::StrCat(cause.message(),
                                 undo_error.ok() ? std::string("; it could not be undone entirely")
                                                 : absl::StrCat("; undoing it failed too (",
                                                                undo_error.ToString(), ")"),
                                 ", so the cache is not as before: ", absl::StrJoin(notes, "; ")));
}

int64_t PagedLayout::StrandedPages() const {
  if (stranded_.mapped().empty()) return 0;
  // Pages overlapping each such chunk; adjacent chunks may share a page (counted once).
  int64_t pages = 0;
  int64_t next = usable_pages_;  // every page below is counted or usable
  for (int64_t c : stranded_.Chunks()) {
    const int64_t lo = std::max(next, c * geo_.granularity / geo_.pool_page_bytes);
    const int64_t hi = std::min<int64_t>(geo_.num_pages,
                                         CeilDiv((c + 1) * geo_.granularity, geo_.pool_page_bytes));
    if (hi > lo) {
      pages += hi - lo;
      next = hi;
    }
  }
  return pages;
}

void PagedLayout::ReclaimQuarantine(bool scan_all) {
  if (pool_.quarantined_count() == 0) return;
  pool_.Reclaim([this](const Fence& f) { return vmm_->FenceComplete(f); }, scan_all);
}

absl::Status PagedLayout::TakePagesForBatch(absl::Span<const GrowStep> steps, int64_t total) {
  fresh_.clear();
  if (total <= 0) return absl::OkStatus();
  ReclaimQuarantine(/*scan_all=*/pool_.free_count() < total);
  if (pool_.free_count() < total && page_reclaimer_) {
    KVMEM_RETURN_IF_ERROR(EvictForBatch(total));  // the prefix cache's pages (paged_prefix.cc)
  }
  if (pool_.free_count() < total) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "paged layout: need %d pages of %d bytes but %d are free (%d used, %d quarantined "
        "waiting on a fence, %d total)",
        total, pt_ * config_.TokenBytes(), pool_.free_count(), pool_.used_count(),
        pool_.quarantined_count(), geo_.num_pages));
  }
  const bool contiguous = config_.page_placement == PagePlacement::kContiguous;
  // The pages a row may be placed on without growing the pool: the mapped ones, and
  // the ones the chunks of earlier rows of the batch will map (as single-row calls in
  // a row would have mapped them by then).
  auto chunks_for = [this](int32_t page) {
    return CeilDiv((int64_t{page} + 1) * geo_.pool_page_bytes, geo_.granularity);
  };
  int64_t mapped_pages = UsablePagesFor(mapped_chunks());
  int32_t highest = -1;
  for (size_t i = 0; i < steps.size(); ++i) {
    PrefetchAhead(steps, i);
    const Row& r = rows_[steps[i].row];
    int32_t near = r.pages.empty() ? -1 : r.pages.back();
    for (int64_t k = 0; k < plan_[i].count; ++k) {
      fresh_.push_back(contiguous ? pool_.AllocateNear(near, mapped_pages) : pool_.Allocate());
      near = fresh_.back();
      highest = std::max(highest, near);
    }
    if (highest >= mapped_pages) mapped_pages = UsablePagesFor(chunks_for(highest));
  }
  const int64_t need_chunks = chunks_for(highest);
  if (need_chunks > mapped_chunks()) {
    const int64_t before = mapped_chunks();
    absl::Status s = MapChunks(need_chunks);
    if (!s.ok()) {
      for (int32_t p : fresh_) pool_.Unref(p);
      fresh_.clear();
      return WithContext(
          s, absl::StrFormat("paged layout: growing the pool from %d to %d chunks (for %d pages)",
                             before, need_chunks, total));
    }
  }
  return absl::OkStatus();
}

absl::Status PagedLayout::UndoTake(const absl::Status& cause, int64_t chunks_before) {
  for (int32_t p : fresh_) pool_.Unref(p);
  fresh_.clear();
  const StrandedMappings::Count stranded_before = stranded_.count();
  absl::Status undo_error;
  // An unmap failure comes first: the later ones are of its undo.
  absl::Status u = UnmapChunks(chunks_before, &undo_error);
  u.Update(undo_error);
  return Undone(cause, u, chunks_before, stranded_before);
}

// ---- accounting ---------------------------------------------------------------

int64_t PagedLayout::PageFill(int32_t page) const {
  const int32_t rc = pool_.owners(page);  // a page only the prefix cache holds is not live
  if (rc == 0) return 0;
  const int32_t partial = partial_refs_[page];
  if (rc > partial) return pt_;  // some owner holds the page whole
  if (partial == 1) return partial_sum_[page];
  // Several rows end part-way through this page (forks, then rewinds into it).
  return shared_fills_.at(page).rbegin()->first;
}

void PagedLayout::DetachTail(const Row& r) {
  const int64_t fill = page_div_.Rem(r.len);
  if (fill == 0) return;
  const int32_t page = r.pages.back();
  if (partial_refs_[page] >= 2) {
    auto it = shared_fills_.find(page);
    auto f = it->second.find(fill);
    if (--f->second == 0) it->second.erase(f);
    if (partial_refs_[page] == 2) shared_fills_.erase(it);  // one owner left: the sum says it
  }
  --partial_refs_[page];
  partial_sum_[page] -= fill;
}

void PagedLayout::AttachTail(const Row& r) {
  const int64_t fill = page_div_.Rem(r.len);
  if (fill == 0) return;
  const int32_t page = r.pages.back();
  if (partial_refs_[page] == 1) {
    // A second row ends in this page: its fills go into a multiset (the sum holds the
    // first one's), so that the page's fill, their maximum, costs O(log owners).
    std::map<int64_t, int32_t>& fills = shared_fills_[page];
    ++fills[partial_sum_[page]];
    ++fills[fill];
  } else if (partial_refs_[page] >= 2) {
    ++shared_fills_[page][fill];
  }
  ++partial_refs_[page];
  partial_sum_[page] += fill;
}

void PagedLayout::UpdatePeaks() {
  peak_held_bytes_ = std::max(peak_held_bytes_, HeldPages() * pt_ * config_.TokenBytes());
  peak_live_bytes_ = std::max(peak_live_bytes_, stored_tokens_ * config_.TokenBytes());
}

// ---- rows ---------------------------------------------------------------------

absl::StatusOr<int32_t> PagedLayout::AcquireRow() {
  RetryStranded();
  const int64_t row = free_rows_.Lowest();
  if (row < 0) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("paged layout: all %d request rows are live", config_.max_requests));
  }
  free_rows_.Erase(row);
  rows_[row] = Row{.live = true, .len = 0, .pages = {}};
  return static_cast<int32_t>(row);
}

namespace {
absl::Status BadRow(absl::string_view op, int32_t row, int64_t len, int64_t have) {
  return absl::InternalError(
      absl::StrFormat("paged layout %s: row %d with %d tokens, but the layout has it %s with %d",
                      op, row, len, have < 0 ? "idle" : "live", have < 0 ? 0 : have));
}
}  // namespace

absl::Status PagedLayout::Grow(int32_t row, int64_t len, int64_t n, std::vector<int64_t>* locs) {
  const size_t before = locs->size();
  locs->resize(before + std::max<int64_t>(n, 0));
  const GrowStep step{row, len, n};
  absl::Status s = GrowBatch({&step, 1}, locs->data() + before);
  if (!s.ok()) locs->resize(before);
  return s;
}

absl::Status PagedLayout::GrowBatch(absl::Span<const GrowStep> steps, int64_t* out) {
  RetryStranded();
  // 1. Plan every row: the pages to add, plus one when the partly filled last page is
  //    shared, by another row or by a freed one whose fence is pending (its kernel may
  //    still read the slots this write would overwrite). Of several rows of the batch
  //    that share one last page, the last to plan writes in place once the others copy.
  plan_.clear();
  int64_t total = 0;
  // Made once: WriteNeedsCopy takes a std::function.
  const std::function<bool(const Fence&)> complete = [this](const Fence& f) {
    return vmm_->FenceComplete(f);
  };
  for (size_t i = 0; i < steps.size(); ++i) {
    PrefetchAhead(steps, i);
    const GrowStep& st = steps[i];
    if (st.row < 0 || st.row >= config_.max_requests) {
      UnplanCopies();
      return BadRow("Grow", st.row, st.len, -1);
    }
    const Row& r = rows_[st.row];
    if (!r.live || r.len != st.len) {
      UnplanCopies();
      return BadRow("Grow", st.row, st.len, r.live ? r.len : -1);
    }
    if (st.n < 0 || st.n > config_.max_context - st.len) {
      UnplanCopies();
      return absl::OutOfRangeError(
          absl::StrFormat("paged layout: row %d cannot grow from %d by %d tokens (max_context %d)",
                          st.row, st.len, st.n, config_.max_context));
    }
    GrowPlan g;
    const int64_t fill = page_div_.Rem(st.len);
    g.old_tail = (st.n > 0 && fill != 0) ? r.pages.back() : -1;
    // copies_ (a line of its own per request) is read only for a shared page: a page with
    // one owner is the last page of this row alone, so no other row planned to copy it.
    const int32_t planned =
        g.old_tail >= 0 && pool_.refcount(g.old_tail) > 1 ? copies_[g.old_tail] : 0;
    g.cow = g.old_tail >= 0 && pool_.WriteNeedsCopy(g.old_tail, complete, planned);
    if (g.cow) ++copies_[g.old_tail];
    g.count = st.n == 0 ? 0
                        : PagesFor(st.len + st.n) - static_cast<int64_t>(r.pages.size()) +
                              (g.cow ? 1 : 0);
    g.first = total;
    total += g.count;
    plan_.push_back(g);
  }
  UnplanCopies();

  // 2. Pages for the whole batch, each row's next to its last page; chunks mapped once.
  const int64_t chunks_before = mapped_chunks();
  if (absl::Status s = TakePagesForBatch(steps, total); !s.ok()) {
    if (steps.size() == 1) {
      return WithContext(s, absl::StrFormat("row %d growing from %d by %d tokens", steps[0].row,
                                            steps[0].len, steps[0].n));
    }
    return WithContext(
        s, absl::StrFormat("a batch of %d rows growing by %d pages", steps.size(), total));
  }

  // 3. Copies of shared last pages.
  for (size_t i = 0; i < steps.size(); ++i) {
    const GrowPlan& g = plan_[i];
    if (!g.cow) continue;
    const int32_t copy = fresh_[g.first];
    const int64_t bytes = (steps[i].len % pt_) * config_.TokenLayerBytes();
    for (int64_t pool = 0; pool < geo_.num_pools; ++pool) {
      absl::Status s = vmm_->Copy(PageAddr(pool, copy), PageAddr(pool, g.old_tail), bytes);
      if (s.ok()) continue;
      absl::Status cause = WithContext(
          s, absl::StrFormat("row %d: copy on write of shared page %d to page %d (pool %d)",
                             steps[i].row, g.old_tail, copy, pool));
      return UndoTake(cause, chunks_before);
    }
  }

  // 4. Commit: nothing below can fail.
  int64_t* next_out = out;
  for (size_t i = 0; i < steps.size(); ++i) {
    PrefetchAhead(steps, i);
    CommitGrow(steps[i], plan_[i], next_out);
    next_out += steps[i].n;
  }
  UpdatePeaks();
  return absl::OkStatus();
}

void PagedLayout::PrefetchAhead(absl::Span<const GrowStep> steps, size_t i) const {
  // Two distances: the block table of a row further ahead (a line on the heap), then,
  // once that is in, what the page after its last page and its token index entry need.
  constexpr size_t kTable = 16;
  constexpr size_t kPages = 8;
  if (i + kTable < steps.size()) {
    const Row& r = rows_[steps[i + kTable].row];
    if (!r.pages.empty()) __builtin_prefetch(&r.pages.back());
  }
  if (i + kPages < steps.size()) {
    const GrowStep& st = steps[i + kPages];
    if (st.row < 0 || st.row >= config_.max_requests) return;  // planning will say so
    const Row& r = rows_[st.row];
    if (r.pages.empty() || !r.live || r.len != st.len) return;
    const int32_t last = r.pages.back();
    if (page_div_.Rem(st.len) != 0) {
      // A partly filled last page: planning reads its refcount, the commit its fill.
      pool_.PrefetchRefcount(last);
      __builtin_prefetch(&partial_sum_[last]);
    } else {
      pool_.PrefetchFreeBits(last);  // a page is taken, next to it if free
    }
    if (st.len < index_.max_context()) index_.Prefetch(st.row, st.len);
  }
}

void PagedLayout::UnplanCopies() {
  for (const GrowPlan& g : plan_) {
    if (g.cow) copies_[g.old_tail] = 0;
  }
}

void PagedLayout::CommitGrow(const GrowStep& st, const GrowPlan& g, int64_t* out) {
  if (st.n == 0) return;
  Row& r = rows_[st.row];
  const int64_t len = st.len;
  // The common case (every decode step of an unshared request): no copy, and a partly
  // filled last page, if any, is the row's alone. Every page written then holds only
  // this row's tokens, so the live tokens grow by n and the tail bookkeeping moves to
  // the new last page directly, without PageFill's and the tails' general cases.
  const bool exclusive = g.old_tail < 0 || (!g.cow && pool_.refcount(g.old_tail) == 1);
  int64_t before = 0;
  if (!exclusive) {
    before = g.old_tail >= 0 ? PageFill(g.old_tail) : 0;
    DetachTail(r);
  }
  int64_t next = g.first;
  const int64_t end = g.first + g.count;
  if (g.cow) {
    const int32_t copy = fresh_[next++];
    r.pages.back() = copy;
    pool_.Unref(g.old_tail);  // still held by the other owners
    ++cow_copies_;
    for (int64_t pos = len - page_div_.Rem(len); pos < len; ++pos) {
      index_.Set(st.row, pos, static_cast<int32_t>(Slot(copy, page_div_.Rem(pos))));
    }
  }
  for (; next < end; ++next) r.pages.push_back(fresh_[next]);
  int64_t k = page_div_.Quot(len);
  int64_t offset = page_div_.Rem(len);
  for (int64_t pos = len; pos < len + st.n; ++pos) {
    const int64_t slot = Slot(r.pages[k], offset);
    index_.Set(st.row, pos, static_cast<int32_t>(slot));
    *out++ = slot;
    if (++offset == pt_) {
      offset = 0;
      ++k;
    }
  }
  r.len = len + st.n;
  if (exclusive) {
    // The row is the one partial owner of its old last page (refcount 1) and of a new
    // one; a last page that stays keeps its count and only its fill changes.
    const int64_t fill = page_div_.Rem(r.len);
    const int32_t tail = r.pages.back();
    if (g.old_tail >= 0 && (fill == 0 || tail != g.old_tail)) {
      partial_refs_[g.old_tail] = 0;
      partial_sum_[g.old_tail] = 0;
    }
    if (fill != 0) {
      if (tail != g.old_tail) partial_refs_[tail] = 1;
      partial_sum_[tail] = fill;
    }
    stored_tokens_ += st.n;
    return;
  }
  AttachTail(r);
  int64_t after = g.old_tail >= 0 ? PageFill(g.old_tail) : 0;
  for (int64_t i = g.first; i < end; ++i) after += PageFill(fresh_[i]);
  stored_tokens_ += after - before;
}

absl::Status PagedLayout::Shrink(int32_t row, int64_t len, int64_t new_len) {
  RetryStranded();
  if (row < 0 || row >= config_.max_requests) return BadRow("Shrink", row, len, -1);
  Row& r = rows_[row];
  if (!r.live || r.len != len) return BadRow("Shrink", row, len, r.live ? r.len : -1);
  if (new_len < 0 || new_len > len) {
    return absl::OutOfRangeError(absl::StrFormat(
        "paged layout: row %d cannot shrink from %d to %d tokens", row, len, new_len));
  }
  if (new_len == len) return absl::OkStatus();
  // Pages whose fill may change: the new last page and every dropped one.
  const int64_t keep = PagesFor(new_len);
  const std::vector<int32_t> touched(r.pages.begin() + std::max<int64_t>(keep - 1, 0),
                                     r.pages.end());
  int64_t before = 0;
  for (int32_t p : touched) before += PageFill(p);
  DetachTail(r);
  // Dropped pages are free at once: the engine synchronised before rewinding.
  for (size_t i = keep; i < r.pages.size(); ++i) pool_.Unref(r.pages[i]);
  r.pages.resize(keep);
  index_.Fill(row, new_len, len, -1);
  r.len = new_len;
  AttachTail(r);
  int64_t after = 0;
  for (int32_t p : touched) after += PageFill(p);
  stored_tokens_ += after - before;
  UpdatePeaks();
  return absl::OkStatus();
}

absl::Status PagedLayout::Share(int32_t parent, int64_t len, int32_t child) {
  RetryStranded();
  if (parent < 0 || parent >= config_.max_requests) return BadRow("Share", parent, len, -1);
  if (child < 0 || child >= config_.max_requests || child == parent) {
    return BadRow("Share (child)", child, 0, -1);
  }
  const Row& p = rows_[parent];
  Row& c = rows_[child];
  if (!p.live || len < 0 || len > p.len) return BadRow("Share", parent, len, p.live ? p.len : -1);
  if (!c.live || c.len != 0) return BadRow("Share (child)", child, 0, c.live ? c.len : -1);
  const int64_t n = PagesFor(len);
  int64_t before = 0;
  for (int64_t i = 0; i < n; ++i) before += PageFill(p.pages[i]);
  c.pages.assign(p.pages.begin(), p.pages.begin() + n);
  for (int32_t page : c.pages) pool_.AddRef(page);
  c.len = len;
  index_.CopyPrefix(parent, child, len);
  AttachTail(c);
  // The child fills no page further than the parent does, so this is 0; kept exact anyway.
  int64_t after = 0;
  for (int32_t page : c.pages) after += PageFill(page);
  stored_tokens_ += after - before;
  UpdatePeaks();
  return absl::OkStatus();
}

absl::Status PagedLayout::Release(int32_t row, int64_t len, Fence fence) {
  RetryStranded();
  if (row < 0 || row >= config_.max_requests) return BadRow("Release", row, len, -1);
  Row& r = rows_[row];
  if (!r.live || r.len != len) return BadRow("Release", row, len, r.live ? r.len : -1);
  int64_t before = 0;
  for (int32_t p : r.pages) before += PageFill(p);
  DetachTail(r);
  for (int32_t p : r.pages) pool_.Unref(p, fence);
  index_.Fill(row, 0, len, -1);
  const std::vector<int32_t> pages = std::move(r.pages);
  r = Row{};
  free_rows_.Insert(row);
  int64_t after = 0;
  for (int32_t p : pages) after += PageFill(p);
  stored_tokens_ += after - before;
  UpdatePeaks();
  return absl::OkStatus();
}

absl::StatusOr<int64_t> PagedLayout::Trim() {
  if (!config_.elastic_pool) return 0;  // a fixed pool keeps the whole budget mapped
  RetryStranded();
  ReclaimQuarantine(/*scan_all=*/true);
  const int64_t highest = pool_.HighestNonFree();
  const int64_t keep =
      highest < 0 ? 0 : CeilDiv((highest + 1) * geo_.pool_page_bytes, geo_.granularity);
  const int64_t before = mapped_chunks();
  if (keep >= before) return 0;
  const StrandedMappings::Count stranded_before = stranded_.count();
  absl::Status undo_error;
  absl::Status s = UnmapChunks(keep, &undo_error);
  if (!s.ok()) {
    return WithContext(Undone(s, undo_error, before, stranded_before), "paged layout: Trim");
  }
  if (!undo_error.ok()) {
    // Unmapped all the same: the memory is out of the pool, its handles wait.
    Logger()->warn("paged layout: Trim: {} handle(s) wait for a later call to release them: {}",
                   stranded_.unreleased().size(), undo_error.ToString());
  }
  return (before - keep) * geo_.num_pools * geo_.granularity;
}

// ---- queries ------------------------------------------------------------------

int64_t PagedLayout::SlotOf(int32_t row, int64_t pos) const { return index_.Get(row, pos); }

absl::StatusOr<std::vector<int32_t>> PagedLayout::BlockTable(int32_t row, int64_t len) const {
  if (row < 0 || row >= config_.max_requests || !rows_[row].live) {
    return BadRow("BlockTable", row, len, -1);
  }
  const Row& r = rows_[row];
  const int64_t n = PagesFor(len);
  if (len < 0 || n > static_cast<int64_t>(r.pages.size())) {
    return BadRow("BlockTable", row, len, r.len);
  }
  return std::vector<int32_t>(r.pages.begin(), r.pages.begin() + n);
}

void PagedLayout::FillBatch(BatchMetadata* meta) const {
  const size_t batch = meta->row_ids.size();
  int64_t stride = 1;
  for (size_t b = 0; b < batch; ++b) stride = std::max(stride, PagesFor(meta->seq_lens[b]));
  meta->page_table_stride = stride;
  meta->page_table.assign(batch * stride, 0);
  for (size_t b = 0; b < batch; ++b) {
    const Row& r = rows_[meta->row_ids[b]];
    const int64_t n = std::min<int64_t>(PagesFor(meta->seq_lens[b]), r.pages.size());
    std::copy(r.pages.begin(), r.pages.begin() + n, meta->page_table.begin() + b * stride);
  }
}

absl::StatusOr<PagedKv> PagedLayout::PagedView(int layer) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::OutOfRangeError(
        absl::StrFormat("layer %d out of range [0, %d)", layer, config_.num_layers));
  }
  PagedKv view;
  view.k = reinterpret_cast<void*>(PoolBase(2 * int64_t{layer}));
  view.v = reinterpret_cast<void*>(PoolBase(2 * int64_t{layer} + 1));
  view.token_stride = int64_t{config_.num_kv_heads} * config_.head_dim;
  view.page_stride = pt_ * view.token_stride;
  view.page_tokens = static_cast<int32_t>(pt_);
  return view;
}

absl::StatusOr<VirtualKv> PagedLayout::VirtualView(int layer) const {
  return absl::FailedPreconditionError("VirtualView of a paged KV cache: use PagedView");
}

}  // namespace kvmem::internal
