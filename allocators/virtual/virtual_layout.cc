// The virtual layout's KvLayout operations, composed of the handle pool, the row table,
// the reclamation policy and transactions (see virtual_layout.h). Stats and invariants
// are in virtual_layout_check.cc, the background mapper's steps at the end of this file.
#include "allocators/virtual/virtual_layout.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocators/vmm/device_memory.h"
#include "kvmem/dtype.h"
#include "src/core/host_limits.h"
#include "src/core/int_math.h"
#include "src/core/logging.h"
#include "src/core/status_macros.h"

namespace kvmem::internal {
namespace {

// Keeps the backend's code, adds what the layout was doing.
absl::Status WithContext(const absl::Status& s, const std::string& what) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("virtual layout: ", what, ": ", s.message()));
}

}  // namespace

namespace {

// The most handles that can ever be mapped at once: every row at max_context (its
// whole chunks, so the tail page too), plus the copy-on-write staging copy. Handles
// are all created up front, so a budget beyond this would only cost memory and time:
// it buys no more than this many.
int64_t MaxUsefulPages(const VirtualGeometry& geo) {
  // rows * pages_per_request * granularity is the reservation, below 2^62: no overflow.
  return int64_t{geo.rows} * geo.pages_per_request() + 1;
}

// What a cache of `pages` handles takes on the host, checked before any of it is
// allocated: the bookkeeping (rows and handles) against HostBookkeepingLimit, and on a
// host backend the mappings of a full budget against vm.max_map_count.
absl::Status CheckHost(const KvCacheConfig& config, const VirtualGeometry& geo, int64_t pages,
                       bool device) {
  const int64_t rows = SatMul(geo.rows, kRowBookkeepingBytes);
  const int64_t handles = SatMul(pages, kHandleBookkeepingBytes);
  KVMEM_RETURN_IF_ERROR(CheckHostBookkeeping(
      absl::StrFormat("virtual layout: %d rows x %d bytes + %d physical handles (what the "
                      "budget buys, at most what the rows at max_context %d can map) x %d bytes",
                      geo.rows, kRowBookkeepingBytes, pages, geo.max_context,
                      kHandleBookkeepingBytes),
      SatAdd(rows, handles)));
  if (device) return absl::OkStatus();
  return CheckHostMappings(HostMappingNeed{
      .layout = "virtual layout",
      .mappings = pages,
      .granularity = geo.granularity,
      .budget_bytes = config.memory_budget_bytes,
      .min_budget_bytes = geo.pages_per_request() * geo.granularity,
      // A backend of host_granularity: the config picks the page (or a backend like it).
      .granularity_is_config =
          config.device == DeviceKind::kHost && geo.granularity == config.host_granularity,
  });
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvLayout>> MakeVirtualLayout(const KvCacheConfig& config,
                                                            std::shared_ptr<Vmm> vmm) {
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<VirtualLayout> cache,
                         VirtualLayout::Create(config, std::move(vmm)));
  return std::unique_ptr<KvLayout>(std::move(cache));
}

VirtualLayout::VirtualLayout(const KvCacheConfig& config, std::shared_ptr<Vmm> vmm,
                             VirtualGeometry geo)
    : config_(config),
      vmm_(std::move(vmm)),
      geo_(geo),
      token_bytes_(config.TokenBytes()),
      rows_(geo, config.TokenBytes(), &pool_, vmm_.get()),
      reclaim_(geo, &rows_, &pool_) {}

namespace {

// Physical pages (handles) config.memory_budget_bytes buys, all created by Create;
// InvalidArgument when they cannot hold one request at max_context or are too many.
absl::StatusOr<int64_t> BudgetPages(const KvCacheConfig& config, const VirtualGeometry& geo) {
  int64_t available = config.memory_budget_bytes / geo.granularity;
  const int64_t needed = geo.pages_per_request();
  if (available < needed) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: memory budget %d bytes holds %d pages of %d bytes (the backend's "
        "granularity), but one request at max_context %d needs %d pages (%d segment(s) x %d "
        "pages of %d tokens' bytes: max_context in whole chunks of %d); raise "
        "memory_budget_bytes to at least %d",
        config.memory_budget_bytes, available, geo.granularity, config.max_context, needed,
        geo.segments, geo.pages_per_segment, geo.WholeChunks(config.max_context), geo.chunk_tokens,
        needed * geo.granularity));
  }
  if (available > MaxUsefulPages(geo)) available = MaxUsefulPages(geo);
  if (available > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: memory budget %d bytes is %d pages of %d bytes; at most %d pages are "
        "supported",
        config.memory_budget_bytes, available, geo.granularity,
        std::numeric_limits<int32_t>::max()));
  }
  return available;
}

}  // namespace

absl::StatusOr<MemoryPlan> PlanVirtualLayout(const KvCacheConfig& config, int64_t granularity,
                                             bool device, bool minimal_budget) {
  KVMEM_RETURN_IF_ERROR(ValidateShape(config));
  KVMEM_ASSIGN_OR_RETURN(VirtualGeometry geo, VirtualGeometry::Make(config, granularity));
  KvCacheConfig sized = config;
  // The reservation's size bounds pages_per_request * granularity, so this cannot overflow.
  if (minimal_budget) sized.memory_budget_bytes = geo.pages_per_request() * granularity;
  KVMEM_ASSIGN_OR_RETURN(const int64_t pages, BudgetPages(sized, geo));
  if (absl::Status s = CheckHost(sized, geo, pages, device); absl::IsInvalidArgument(s)) return s;
  MemoryPlan plan;
  plan.layout = Layout::kVirtual;
  plan.arrangement = config.arrangement;
  plan.granularity = granularity;
  plan.budget_bytes = sized.memory_budget_bytes;
  plan.token_bytes = config.TokenBytes();
  plan.token_layer_bytes = config.TokenLayerBytes();
  plan.chunk_tokens = geo.chunk_tokens;
  plan.unit_tokens = geo.chunk_tokens > 1
                         ? geo.chunk_tokens
                         : std::max<int64_t>(1, granularity / geo.segment_token_bytes);
  plan.page_bytes = granularity;
  plan.pages_total = pages;
  plan.pages_per_request = geo.pages_per_request();
  plan.max_full_requests = std::min<int64_t>(config.max_requests, pages / geo.pages_per_request());
  plan.min_budget_bytes = geo.pages_per_request() * granularity;
  // The rows, and the one granule that copy on write stages a page in.
  plan.reservation_bytes = geo.reservation_bytes() + granularity;
  plan.physical_bytes = pages * granularity;
  return plan;
}

absl::StatusOr<std::unique_ptr<VirtualLayout>> VirtualLayout::Create(const KvCacheConfig& config,
                                                                     std::shared_ptr<Vmm> vmm) {
  if (vmm == nullptr) return absl::InvalidArgumentError("virtual layout: no memory backend");
  KVMEM_RETURN_IF_ERROR(ValidateShape(config));
  KVMEM_ASSIGN_OR_RETURN(VirtualGeometry geo, VirtualGeometry::Make(config, vmm->granularity()));
  KVMEM_ASSIGN_OR_RETURN(const int64_t available, BudgetPages(config, geo));
  KVMEM_RETURN_IF_ERROR(CheckHost(config, geo, available, vmm->is_device()));
  // Every handle is created below: they must fit the device's free memory.
  KVMEM_RETURN_IF_ERROR(CheckDeviceMemory(
      *vmm, DeviceMemoryNeed{.layout = "virtual layout",
                             .pool_bytes = SatMul(available, geo.granularity),
                             .created_up_front = true,
                             .budget_bytes = config.memory_budget_bytes,
                             .min_budget_bytes = geo.pages_per_request() * geo.granularity}));
  std::unique_ptr<VirtualLayout> cache(new VirtualLayout(config, vmm, geo));
  {
    absl::StatusOr<Reservation> r = Reservation::Make(vmm.get(), geo.reservation_bytes());
    if (!r.ok()) {
      return WithContext(
          r.status(),
          absl::StrFormat("reserving %d bytes of address space (%d rows x %d "
                          "segments x %d bytes per row)",
                          geo.reservation_bytes(), geo.rows, geo.segments, geo.segment_row_stride));
    }
    cache->reservation_ = std::move(*r);
    absl::StatusOr<Reservation> s = Reservation::Make(vmm.get(), geo.granularity);
    if (!s.ok()) return WithContext(s.status(), "reserving the copy-on-write scratch granule");
    cache->scratch_ = std::move(*s);
  }
  absl::MutexLock lock(&cache->mu_);
  const auto start = std::chrono::steady_clock::now();
  int64_t created = 0;
  if (absl::Status s = cache->pool_.Create(vmm.get(), available, &created); !s.ok()) {
    return WithContext(
        s, absl::StrFormat("creating physical page %d of %d (%d bytes each) for "
                           "a budget of %d bytes",
                           created, available, geo.granularity, config.memory_budget_bytes));
  }
  cache->pool_create_nanos_ =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  cache->rows_.Init(cache->reservation_.addr());
  cache->batch_marks_.assign(static_cast<size_t>(geo.rows), 0);
  cache->queued_.assign(static_cast<size_t>(geo.rows), false);
  cache->map_queue_.reserve(static_cast<size_t>(geo.rows));  // WantMapAhead never allocates
  if (config.map_ahead_tokens > 0) {
    VirtualLayout* self = cache.get();
    BackgroundMapper::Steps steps;
    steps.plan = [self]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return self->PlanMapAhead(); };
    steps.run = [self] { return self->RunMapAhead(); };
    steps.finish = [self](absl::Status s)
                       ABSL_NO_THREAD_SAFETY_ANALYSIS { self->FinishMapAhead(std::move(s)); };
    cache->mapper_ = std::make_unique<BackgroundMapper>(&cache->mu_, std::move(steps));
  }
  return cache;
}

VirtualLayout::~VirtualLayout() {
  mapper_.reset();  // joins: no job in flight from here on
  absl::MutexLock lock(&mu_);
  int64_t waiting = 0;
  int64_t failed = 0;
  absl::Status first;
  // Rows do not exist when Create failed half-way.
  for (int32_t row = 0; row < rows_.size(); ++row) {
    const Row& r = rows_.row(row);
    if (!r.live && !rows_.FenceDoneConst(row) && r.mapped > 0) ++waiting;
    std::vector<Granule> granules;
    for (const RowMapping& m : rows_.Mappings(row, 0, /*only_shared=*/false)) {
      if (rows_.DamageAt(m) == Damage::kUnmapped) continue;  // nothing in the backend
      granules.push_back({rows_.Addr(m), pool_.phys(m.handle)});
    }
    SortGranules(&granules);
    if (absl::Status s = UnmapRuns(*vmm_, geo_.granularity, granules); !s.ok()) {
      if (failed++ == 0) first = std::move(s);
    }
  }
  for (const auto& [addr, stray] : pool_.strays()) {
    if (absl::Status s = vmm_->Unmap(addr, geo_.granularity); !s.ok()) {
      if (failed++ == 0) first = std::move(s);
    }
  }
  if (waiting > 0) {
    // Nothing can wait here: a fence that never completes would hang the destructor.
    Logger()->warn("virtual layout destroyed while {} rows wait for their fence", waiting);
  }
  if (failed > 0) {
    Logger()->error(
        "virtual layout: unmapping {} rows or stray mappings on destruction failed (the first: "
        "{})",
        failed, first.ToString());
  }
  pool_.Clear("virtual layout destroyed");
}

void VirtualLayout::RetryQuarantined() {
  if (pool_.strays().empty() && !rows_.any_damage()) return;
  quarantine_error_ = RetryQuarantine(vmm_.get(), geo_.granularity, &pool_, &rows_);
  if (!quarantine_error_.ok()) {
    Logger()->warn(
        "virtual layout: {} stray mapping(s) and damaged pages remain after retrying: {}",
        pool_.strays().size(), quarantine_error_.ToString());
  } else if (mapper_ != nullptr && !map_queue_.empty()) {
    mapper_->Notify();  // handles came back
  }
}

absl::Status VirtualLayout::Fail(Transaction& tx, const absl::Status& cause) {
  absl::Status s = tx.Rollback(cause);
  if (!tx.exact()) {
    // What the undo could not put back: copies kept under their row (which share less
    // than before) and idle pages now free.
    cow_copies_ += tx.kept_copies();
    pages_reclaimed_ += tx.lost_pages();
  }
  return s;
}

void VirtualLayout::UpdatePeaks() {
  peak_held_bytes_ = std::max(peak_held_bytes_, HeldHandles() * geo_.granularity);
  peak_live_bytes_ = std::max(peak_live_bytes_, rows_.live_bytes());
}

// ---- reclamation -------------------------------------------------------------

absl::Status VirtualLayout::Reclaim(int64_t want, int32_t exclude, bool surplus, Transaction* tx) {
  const size_t start = tx->freed().size();
  auto got = [&] { return static_cast<int64_t>(tx->freed().size() - start); };
  // Taking a donor's pages may drop it from the donors: walk them with a cursor.
  std::optional<std::pair<uint64_t, int32_t>> after;
  for (int32_t row = reclaim_.NextIdleDonor(after); row >= 0 && got() < want;
       row = reclaim_.NextIdleDonor(after)) {
    after = std::make_pair(rows_.row(row).idle_since, row);
    const std::vector<RowMapping> items = reclaim_.PickFromRow(row, 0, want - got(), false);
    if (absl::Status s = tx->Unmap(items); !s.ok()) {
      return WithContext(s, absl::StrFormat("taking pages back from row %d", row));
    }
  }
  if (!surplus) return absl::OkStatus();
  for (int32_t row = rows_.surplus_front(); row >= 0 && got() < want;) {
    const int32_t next = rows_.surplus_next(row);  // `row` may leave the list
    if (row != exclude) {
      const std::vector<RowMapping> items =
          reclaim_.PickFromRow(row, geo_.PagesFor(rows_.row(row).len), want - got(), true);
      if (absl::Status s = tx->Unmap(items); !s.ok()) {
        return WithContext(s, absl::StrFormat("taking pages back from row %d", row));
      }
      WantMapAhead(row);
    }
    row = next;
  }
  return absl::OkStatus();
}

absl::Status VirtualLayout::DropPages(int32_t row, int64_t min_page, bool only_shared,
                                      std::vector<RowMapping>* dropped) {
  std::vector<RowMapping> items = rows_.Mappings(row, min_page, only_shared);
  if (items.empty()) return absl::OkStatus();
  Transaction tx = NewTransaction();
  if (absl::Status s = tx.Unmap(items); !s.ok()) {
    return Fail(tx, WithContext(s, absl::StrFormat("unmapping pages of row %d", row)));
  }
  tx.Commit();
  if (dropped != nullptr) *dropped = std::move(items);
  return absl::OkStatus();
}

// ---- rows --------------------------------------------------------------------

absl::StatusOr<int32_t> VirtualLayout::AcquireRow() {
  absl::MutexLock lock(&mu_);
  RetryQuarantined();
  // The ready idle row holding the most pages: the new request reuses them without a
  // driver call. Fences are polled from the oldest release; all of them only when no row
  // is ready otherwise.
  rows_.PollFences(/*all=*/false);
  int32_t best = rows_.BestIdleRow();
  if (best < 0) {
    rows_.PollFences(/*all=*/true);
    best = rows_.BestIdleRow();
  }
  if (best < 0) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "virtual layout: all %d request rows are in use (%d live, %d freed but waiting for "
        "their fence)",
        geo_.rows, rows_.live_rows(), rows_.waiting_rows()));
  }
  // Pages it shares with other rows hold someone else's tokens: drop them (remembered,
  // so that ReturnRow can map them back when a Fork fails).
  std::vector<RowMapping> dropped;
  if (rows_.row(best).shared > 0) {
    KVMEM_RETURN_IF_ERROR(DropPages(best, 0, /*only_shared=*/true, &dropped));
  }
  last_acquire_ = AcquireUndo{.row = best,
                              .epoch = rows_.mapping_epoch(),
                              .idle_since = rows_.row(best).idle_since,
                              .dropped = std::move(dropped)};
  rows_.MakeLive(best);
  // No UpdatePeaks: pages the row kept count as held from now on, but a peak is taken
  // only once memory is put to use (Grow, Share) or stats are read, so that a Fork
  // whose Share fails leaves every number as it was.
  WantMapAhead(best);
  return best;
}

absl::Status VirtualLayout::Release(int32_t row, int64_t len, Fence fence) {
  absl::MutexLock lock(&mu_);
  const ReleaseStep step{.row = row, .len = len};
  return ReleaseRows(absl::MakeConstSpan(&step, 1), fence);
}

absl::Status VirtualLayout::ReleaseBatch(absl::Span<const ReleaseStep> steps, Fence fence) {
  absl::MutexLock lock(&mu_);
  return ReleaseRows(steps, fence);
}

absl::Status VirtualLayout::ReleaseRows(absl::Span<const ReleaseStep> steps, Fence fence) {
  RetryQuarantined();
  // Releasing makes no backend call and cannot fail once every row is checked.
  for (const ReleaseStep& s : steps) {
    KVMEM_RETURN_IF_ERROR(rows_.CheckLiveRow(s.row, s.len, "Release"));
  }
  KVMEM_RETURN_IF_ERROR(CheckDistinct(steps, "ReleaseBatch"));
  for (const ReleaseStep& s : steps) rows_.MakeIdle(s.row, fence);
  if (mapper_ != nullptr && !map_queue_.empty()) mapper_->Notify();
  return absl::OkStatus();
}

template <typename Step>
absl::Status VirtualLayout::CheckDistinct(absl::Span<const Step> steps, const char* op) {
  if (steps.size() < 2) return absl::OkStatus();
  absl::Status status;
  size_t marked = 0;
  for (; marked < steps.size() && status.ok(); ++marked) {
    if (batch_marks_[steps[marked].row]++ != 0) {
      status = absl::InternalError(absl::StrFormat(
          "virtual layout %s: row %d appears twice in one batch", op, steps[marked].row));
    }
  }
  for (size_t i = 0; i < marked; ++i) batch_marks_[steps[i].row] = 0;
  return status;
}

absl::Status VirtualLayout::ReturnRow(int32_t row) {
  absl::MutexLock lock(&mu_);
  KVMEM_RETURN_IF_ERROR(rows_.CheckLiveRow(row, 0, "ReturnRow"));
  AcquireUndo undo = std::exchange(last_acquire_, AcquireUndo{});
  const bool same = undo.row == row;
  // AcquireRow took it with its fence complete; back in its place among the idle rows.
  rows_.MakeIdle(row, Fence{}, same ? std::optional<uint64_t>(undo.idle_since) : std::nullopt);
  // The aliases AcquireRow dropped, back where they were, if no mapping changed since
  // (the background mapper may have taken their handles): a failed Fork then leaves the
  // idle row as it found it. They hold no live token, so when they cannot come back only
  // the row's chance of reuse is lost.
  absl::Status status;
  if (same && undo.epoch == rows_.mapping_epoch() && !undo.dropped.empty()) {
    std::sort(
        undo.dropped.begin(), undo.dropped.end(),
        [&](const RowMapping& a, const RowMapping& b) { return rows_.Addr(a) < rows_.Addr(b); });
    std::vector<uintptr_t> addrs;
    for (const RowMapping& m : undo.dropped) addrs.push_back(rows_.Addr(m));
    Transaction tx = NewTransaction();
    absl::Status s = tx.Map(undo.dropped, /*fresh=*/false);
    if (s.ok()) s = tx.SetAccess(addrs);
    if (s.ok()) {
      tx.Commit();
    } else {
      s = Fail(tx, s);
      status = absl::Status(
          s.code(),
          absl::StrFormat("virtual layout: mapping back the %d pages row %d shared before it was "
                          "taken failed: %s; so the cache is not as before: row %d lost those "
                          "pages (they held none of its tokens)",
                          undo.dropped.size(), row, s.message(), row));
    }
  }
  if (mapper_ != nullptr && !map_queue_.empty()) mapper_->Notify();
  return status;
}

absl::Status VirtualLayout::Shrink(int32_t row, int64_t len, int64_t new_len) {
  absl::MutexLock lock(&mu_);
  const ShrinkStep step{.row = row, .len = len, .new_len = new_len};
  return ShrinkRows(absl::MakeConstSpan(&step, 1));
}

absl::Status VirtualLayout::ShrinkBatch(absl::Span<const ShrinkStep> steps) {
  absl::MutexLock lock(&mu_);
  return ShrinkRows(steps);
}

absl::Status VirtualLayout::ShrinkRows(absl::Span<const ShrinkStep> steps) {
  RetryQuarantined();
  for (const ShrinkStep& s : steps) {
    KVMEM_RETURN_IF_ERROR(rows_.CheckLiveRow(s.row, s.len, "Shrink"));
    if (s.new_len < 0 || s.new_len > s.len) {
      return absl::OutOfRangeError(absl::StrFormat(
          "virtual layout: shrinking row %d from %d to %d tokens", s.row, s.len, s.new_len));
    }
  }
  KVMEM_RETURN_IF_ERROR(CheckDistinct(steps, "ShrinkBatch"));
  // Shared pages beyond a new length hold only other rows' tokens now: unmapped, every
  // row's through one transaction. Exclusive ones stay mapped for cheap regrowth. A live
  // row shares no page beyond its length, so only the pages between the two lengths are
  // looked at.
  std::vector<RowMapping> drop;
  for (const ShrinkStep& s : steps) {
    if (rows_.row(s.row).shared == 0) continue;
    const std::vector<RowMapping> m = rows_.Mappings(s.row, geo_.PagesFor(s.new_len),
                                                     /*only_shared=*/true, geo_.PagesFor(s.len));
    drop.insert(drop.end(), m.begin(), m.end());
  }
  if (!drop.empty()) {
    Transaction tx = NewTransaction();
    if (absl::Status st = tx.Unmap(drop); !st.ok()) {
      return Fail(
          tx, WithContext(
                  st, steps.size() == 1
                          ? absl::StrFormat("unmapping pages of row %d", steps[0].row)
                          : absl::StrFormat("unmapping shared pages of %d rows", steps.size())));
    }
    tx.Commit();
  }
  for (const ShrinkStep& s : steps) {
    rows_.SetLen(s.row, s.new_len);
    rows_.AddLiveTokens(s.new_len - s.len);
    // Pages from the new last chunk on that were private stay so; the range is extended
    // from there, so the cost is that of the pages whose state changed.
    const Row& r = rows_.row(s.row);
    const int64_t lo = geo_.PageOf(s.new_len);
    rows_.SetPrivate(s.row, lo, lo >= r.private_lo && lo <= r.private_hi ? r.private_hi : lo);
    rows_.ExtendPrivate(s.row);
  }
  return absl::OkStatus();
}

absl::Status VirtualLayout::Share(int32_t parent, int64_t len, int32_t child) {
  absl::MutexLock lock(&mu_);
  RetryQuarantined();
  KVMEM_RETURN_IF_ERROR(rows_.CheckLiveRow(parent, len, "Share (parent)"));
  KVMEM_RETURN_IF_ERROR(rows_.CheckLiveRow(child, 0, "Share (child)"));
  if (parent == child) return absl::InternalError("virtual layout: Share of a row with itself");
  const int64_t np = geo_.PagesFor(len);
  // Pages the mapper is mapping ahead in the child are about to be replaced: wait.
  while (mapper_ != nullptr && rows_.row(child).in_flight > 0) {
    bool in_range = false;
    for (int64_t k = 0; k < std::min(np, rows_.PageLimit(child)) && !in_range; ++k) {
      for (int32_t s = 0; s < geo_.segments; ++s) {
        const int32_t h = rows_.Entry(child, k, s);
        if (h != kNoHandle && pool_.get(h).state == HandleState::kInFlight) in_range = true;
      }
    }
    if (!in_range) break;
    mapper_->WaitForJob();
  }
  std::vector<RowMapping> displaced;  // the child's own pages under the prefix
  std::vector<RowMapping> aliases;    // the parent's pages, to map under the child
  for (int64_t k = 0; k < np; ++k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t ph = rows_.Entry(parent, k, s);
      KVMEM_VIRTUAL_CHECK(ph != kNoHandle && pool_.get(ph).state == HandleState::kMapped,
                          "live row {} misses page {}", parent, k);
      aliases.push_back({child, k, s, ph});
      const int32_t ch = rows_.Entry(child, k, s);
      if (ch != kNoHandle) displaced.push_back({child, k, s, ch});
    }
  }
  std::sort(aliases.begin(), aliases.end(), [&](const RowMapping& a, const RowMapping& b) {
    return rows_.Addr(a) < rows_.Addr(b);
  });
  std::vector<uintptr_t> addrs;
  for (const RowMapping& m : aliases) addrs.push_back(rows_.Addr(m));
  Transaction tx = NewTransaction();
  if (absl::Status s = tx.Unmap(displaced); !s.ok()) {
    return Fail(tx, WithContext(s, absl::StrFormat("clearing row %d for a fork", child)));
  }
  absl::Status s = tx.Map(aliases, /*fresh=*/false);
  if (s.ok()) s = tx.SetAccess(addrs);
  if (!s.ok()) {
    return Fail(tx, WithContext(s, absl::StrFormat("mapping %d pages of row %d under row %d",
                                                   aliases.size(), parent, child)));
  }
  tx.Commit();
  rows_.SetLen(child, len);
  rows_.AddLiveTokens(len);
  // The prefix is shared now: neither row may write into it without a copy.
  const Row& p = rows_.row(parent);
  const int64_t lo = std::max(p.private_lo, np);
  rows_.SetPrivate(parent, lo, std::max(p.private_hi, lo));
  rows_.SetPrivate(child, np, np);
  rows_.ExtendPrivate(child);
  UpdatePeaks();
  WantMapAhead(child);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> VirtualLayout::Trim() {
  absl::MutexLock lock(&mu_);
  RetryQuarantined();
  // One all-or-nothing batch over every fence-complete idle row.
  const std::vector<RowMapping> items = reclaim_.TrimPicks();
  if (items.empty()) return 0;
  Transaction tx = NewTransaction();
  if (absl::Status s = tx.Unmap(items); !s.ok()) {
    return Fail(tx, WithContext(s, "trimming idle rows"));
  }
  const int64_t freed = static_cast<int64_t>(tx.freed().size());
  tx.Commit();
  pages_reclaimed_ += freed;
  if (mapper_ != nullptr && freed > 0 && !map_queue_.empty()) mapper_->Notify();
  return freed * geo_.granularity;
}

// ---- growth ------------------------------------------------------------------

absl::Status VirtualLayout::Grow(int32_t row, int64_t len, int64_t n, std::vector<int64_t>* locs) {
  absl::MutexLock lock(&mu_);
  const GrowStep step{.row = row, .len = len, .n = n};
  KVMEM_RETURN_IF_ERROR(GrowRows(absl::MakeConstSpan(&step, 1)));
  const int64_t first = int64_t{row} * geo_.max_context + len;
  for (int64_t i = 0; i < n; ++i) locs->push_back(first + i);
  return absl::OkStatus();
}

absl::Status VirtualLayout::GrowBatch(absl::Span<const GrowStep> steps, int64_t* out) {
  absl::MutexLock lock(&mu_);
  KVMEM_RETURN_IF_ERROR(GrowRows(steps));
  for (const GrowStep& s : steps) {
    const int64_t first = int64_t{s.row} * geo_.max_context + s.len;
    for (int64_t i = 0; i < s.n; ++i) *out++ = first + i;
  }
  return absl::OkStatus();
}

bool VirtualLayout::GrowsInPrivate(const GrowStep& s) const {
  const Row& r = rows_.row(s.row);
  return geo_.PageOf(s.len) >= r.private_lo && geo_.PagesFor(s.len + s.n) <= r.private_hi;
}

absl::Status VirtualLayout::GrowRows(absl::Span<const GrowStep> steps) {
  RetryQuarantined();
  // Every step is checked before anything changes.
  for (const GrowStep& s : steps) {
    KVMEM_RETURN_IF_ERROR(rows_.CheckLiveRow(s.row, s.len, "Grow"));
    if (s.n < 0 || s.n > geo_.max_context - s.len) {
      return absl::OutOfRangeError(
          absl::StrFormat("virtual layout: growing row %d from %d by %d tokens (max_context %d)",
                          s.row, s.len, s.n, geo_.max_context));
    }
  }
  KVMEM_RETURN_IF_ERROR(CheckDistinct(steps, "GrowBatch"));
  // Fast path: every page written is mapped and private: no backend call, no page entry
  // read, no allocation; O(1) per row.
  bool any = false;
  for (const GrowStep& s : steps) {
    if (s.n == 0) continue;
    if (!GrowsInPrivate(s)) return GrowSlowRows(steps);
    any = true;
  }
  if (!any) return absl::OkStatus();  // nothing changes, not even a peak
  for (const GrowStep& s : steps) {
    if (s.n == 0) continue;
    rows_.GrowPrivate(s.row, s.len + s.n);
    rows_.AddLiveTokens(s.n);
  }
  UpdatePeaks();
  for (const GrowStep& s : steps) {
    if (s.n > 0) WantMapAhead(s.row);
  }
  return absl::OkStatus();
}

absl::Status VirtualLayout::GrowSlowRows(absl::Span<const GrowStep> steps) {
  const bool stalled = WaitForGrowth(steps);
  // From here on mu_ stays held, so which rows grow in their private range holds too.
  // Every row takes its new length first: reclamation for one row of the batch then
  // never takes pages another one is about to write into (it takes surplus pages beyond
  // a length only), and the counts it checks against see the same. A failure puts the
  // lengths back before the transaction is undone, whose undo tells pages that hold a
  // row's tokens from the others by the row's length.
  std::vector<GrowBefore>& before = grow_before_;
  before.clear();
  for (const GrowStep& s : steps) {
    if (s.n == 0) continue;
    const Row& r = rows_.row(s.row);
    const bool slow = !GrowsInPrivate(s);
    before.push_back({s.row, s.len, s.n, r.private_lo, r.private_hi, slow});
    if (slow) {
      rows_.SetLen(s.row, s.len + s.n);
    } else {
      rows_.GrowPrivate(s.row, s.len + s.n);
    }
    rows_.AddLiveTokens(s.n);
  }
  Transaction tx = NewTransaction();
  GrowTally tally;
  absl::Status status;
  for (const GrowBefore& b : before) {
    if (!b.slow) continue;
    const int64_t p0 = geo_.PageOf(b.len);
    const int64_t p1 = geo_.PagesFor(b.len + b.n);
    status = GrowSlow(b.row, b.len, p0, p1, stalled, &tx, &tally);
    if (!status.ok()) break;
    rows_.SetPrivate(b.row, p0, p1);
    rows_.ExtendPrivate(b.row);
  }
  if (!status.ok()) {
    for (auto it = before.rbegin(); it != before.rend(); ++it) {
      rows_.SetLen(it->row, it->len);
      rows_.AddLiveTokens(-it->n);
    }
    status = Fail(tx, status);
    // Private ranges as before the batch, as far as their pages are still private (the
    // transaction restores those of the rows it changed pages of; a row whose growth
    // needed no backend call is not among them).
    for (auto it = before.rbegin(); it != before.rend(); ++it) {
      rows_.SetPrivate(it->row, it->private_lo, it->private_hi);
      rows_.RepairPrivate(it->row);
    }
    return status;
  }
  const int64_t reclaimed = static_cast<int64_t>(tx.freed().size());
  tx.Commit();
  pages_reclaimed_ += reclaimed;
  cow_copies_ += tally.cow_copies;
  map_stalls_ += tally.map_stalls;
  UpdatePeaks();
  for (const GrowBefore& b : before) WantMapAhead(b.row);
  return absl::OkStatus();
}

bool VirtualLayout::ScanGrowth(int32_t row, int64_t p0, int64_t p1, std::vector<RowMapping>* fresh,
                               std::vector<RowMapping>* cow) {
  fresh->clear();
  cow->clear();
  bool in_flight = false;
  for (int64_t k = p0; k < p1; ++k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t h = rows_.Entry(row, k, s);
      if (h == kNoHandle) {
        fresh->push_back({row, k, s, kNoHandle});
      } else if (pool_.get(h).state == HandleState::kInFlight) {
        in_flight = true;  // the mapper is mapping it: never map a page twice
      } else if (pool_.ref_count(h) > 1) {
        cow->push_back({row, k, s, h});
      }
    }
  }
  return in_flight;
}

bool VirtualLayout::WaitForGrowth(absl::Span<const GrowStep> steps) {
  if (mapper_ == nullptr) return false;  // nothing is ever in flight
  bool stalled = false;
  std::vector<RowMapping> fresh;
  std::vector<RowMapping> cow;
  for (;;) {
    bool wait = false;
    int64_t needed = 0;
    for (const GrowStep& s : steps) {
      if (s.n == 0 || GrowsInPrivate(s)) continue;
      wait = ScanGrowth(s.row, geo_.PageOf(s.len), geo_.PagesFor(s.len + s.n), &fresh, &cow);
      if (wait) break;
      needed += static_cast<int64_t>(fresh.size() + cow.size());
    }
    // Handles in flight come back mapped (reclaimable) or free: wait rather than fail.
    if (!wait && needed > pool_.free_count() && mapper_->job_in_flight()) wait = true;
    if (!wait) return stalled;
    stalled = true;
    mapper_->WaitForJob();
  }
}

absl::Status VirtualLayout::CheckPagesFor(int32_t row, int64_t len, int64_t fresh, int64_t cow,
                                          int64_t free) {
  const int64_t needed = fresh + cow;
  if (needed <= free) return absl::OkStatus();
  // Idle rows count once their fence is seen complete: first the oldest releases, then,
  // if that is not enough, every one.
  rows_.PollFences(/*all=*/false);
  int64_t idle = reclaim_.ReclaimableIdle();
  const int64_t surplus = reclaim_.ReclaimableSurplus(row);
  if (free + idle + surplus < needed) {
    rows_.PollFences(/*all=*/true);
    idle = reclaim_.ReclaimableIdle();
  }
  if (free + idle + surplus >= needed) return absl::OkStatus();
  int64_t waiting = 0;
  for (int32_t o = rows_.waiting_front(); o >= 0; o = rows_.waiting_next(o)) {
    waiting += rows_.row(o).mapped > 0;
  }
  return absl::ResourceExhaustedError(absl::StrFormat(
      "virtual layout: row %d (%d tokens) needs %d more pages of %d bytes (%d new, %d "
      "copy-on-write) to grow, but only %d are free, %d can be taken from idle rows and %d "
      "from other rows' pages beyond their length (%d pages in all; %d idle rows wait "
      "for a fence)",
      row, len, needed, geo_.granularity, fresh, cow, free, idle, surplus, pool_.size(), waiting));
}

absl::Status VirtualLayout::GrowSlow(int32_t row, int64_t len, int64_t p0, int64_t p1, bool stalled,
                                     Transaction* tx, GrowTally* tally) {
  if (rows_.DamagedIn(row, p0, p1)) {
    // An earlier call could not restore a page this one writes into, nor could
    // RetryQuarantined at the start of this call.
    const absl::Status& why = quarantine_error_;
    return absl::Status(
        why.ok() ? absl::StatusCode::kFailedPrecondition : why.code(),
        absl::StrFormat("virtual layout: row %d cannot grow: a page it writes into is not mapped "
                        "or not accessible since an earlier call failed, and restoring it failed: "
                        "%s",
                        row, why.ToString()));
  }
  std::vector<RowMapping> fresh;  // pages to map: handle to take
  std::vector<RowMapping> cow;    // shared pages to copy: the shared handle
  const bool in_flight = ScanGrowth(row, p0, p1, &fresh, &cow);
  KVMEM_VIRTUAL_CHECK(!in_flight, "row {} grows into a page in flight", row);
  auto drop_unshared = [&] {  // pages whose other owners' aliases were dropped
    cow.erase(std::remove_if(cow.begin(), cow.end(),
                             [&](const RowMapping& m) { return pool_.ref_count(m.handle) < 2; }),
              cow.end());
  };

  // 1. A shared page whose other owners are all idle rows past their fence needs no
  //    copy: their aliases are dropped instead.
  if (absl::Status s = tx->Unmap(reclaim_.IdleAliases(row, cow)); !s.ok()) {
    return WithContext(s, "dropping idle rows' aliases of a shared page");
  }
  drop_unshared();
  // 2. Handles. A new page where a failed undo left a handle mapped under no row (its
  //    unmap failed, and failed again at the start of this call) takes that handle as it
  //    is mapped: the backend would refuse to map over it. The others: the free pool's
  //    and those this call freed and did not use yet, and what reclamation frees if that
  //    is short.
  int64_t adopted = 0;
  for (RowMapping& m : fresh) {
    const HandlePool::Stray* stray = pool_.FindStray(rows_.Addr(m));
    if (stray != nullptr && pool_.OnlyStray(stray->handle)) {
      m.handle = stray->handle;
      ++adopted;
    }
  }
  const int64_t fresh_needed = static_cast<int64_t>(fresh.size()) - adopted;
  const int64_t needed = fresh_needed + static_cast<int64_t>(cow.size());
  const int64_t free = pool_.free_count() + tx->spare();
  if (needed > free) {
    KVMEM_RETURN_IF_ERROR(CheckPagesFor(row, len, fresh_needed, cow.size(), free));
    KVMEM_RETURN_IF_ERROR(Reclaim(needed - free, row, /*surplus=*/true, tx));
    drop_unshared();  // never fewer handles than needed: the need only shrinks
  }
  for (RowMapping& m : fresh) {
    if (m.handle == kNoHandle) m.handle = tx->Take();  // reclaimed ones first
  }
  std::vector<int32_t> copies;
  for (size_t i = 0; i < cow.size(); ++i) copies.push_back(tx->Take());
  // 3. New pages, mapped in address order.
  std::vector<RowMapping> fresh_sorted = fresh;
  std::sort(
      fresh_sorted.begin(), fresh_sorted.end(),
      [&](const RowMapping& a, const RowMapping& b) { return rows_.Addr(a) < rows_.Addr(b); });
  if (absl::Status s = tx->Map(fresh_sorted, /*fresh=*/true); !s.ok()) {
    return WithContext(s, absl::StrFormat("mapping %d pages to grow row %d", fresh.size(), row));
  }
  // 4. Shared pages: copied, and the copy mapped under this row in place of the original.
  absl::Status status;
  for (size_t i = 0; i < cow.size() && status.ok(); ++i) {
    status = tx->CopyViaScratch(rows_.Addr(cow[i]), copies[i]);
    if (status.ok()) status = tx->Remap(cow[i], copies[i]);
  }
  // 5. Access to everything mapped, one call per run.
  if (status.ok()) {
    std::vector<uintptr_t> all;
    for (const RowMapping& m : fresh) all.push_back(rows_.Addr(m));
    for (const RowMapping& m : cow) all.push_back(rows_.Addr(m));
    std::sort(all.begin(), all.end());
    status = tx->SetAccess(all);
  }
  if (!status.ok()) return WithContext(status, absl::StrFormat("growing row %d", row));
  tally->cow_copies += static_cast<int64_t>(cow.size());
  if (stalled || !fresh.empty()) ++tally->map_stalls;
  return absl::OkStatus();
}

// ---- views -------------------------------------------------------------------

absl::StatusOr<std::vector<int32_t>> VirtualLayout::BlockTable(int32_t row, int64_t len) const {
  return absl::FailedPreconditionError(
      "BlockTable: the virtual layout has no block table (token pos of a row is at row * "
      "row_stride + VirtualKv::InRow(pos))");
}

absl::StatusOr<PagedKv> VirtualLayout::PagedView(int layer) const {
  return absl::FailedPreconditionError("PagedView on the virtual layout: use VirtualView");
}

absl::StatusOr<VirtualKv> VirtualLayout::VirtualView(int layer) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::OutOfRangeError(
        absl::StrFormat("layer %d out of range [0, %d)", layer, config_.num_layers));
  }
  const int64_t dt = DTypeBytes(config_.dtype);
  const int64_t layer_bytes = config_.TokenLayerBytes();
  VirtualKv view;
  uintptr_t k = 0;
  uintptr_t v = 0;
  if (config_.arrangement == Arrangement::kAllLayers) {
    // Layer l's K block is block 2l of a chunk, its V block 2l + 1 (one token each
    // without chunks, where the token stride covers the whole chunk).
    const int64_t chunk = geo_.chunk_tokens;
    k = base() + static_cast<uintptr_t>(int64_t{layer} * 2 * chunk * layer_bytes);
    v = k + static_cast<uintptr_t>(chunk * layer_bytes);
    if (chunk == 1) {
      view.token_stride = token_bytes_ / dt;
    } else {
      view.token_stride = layer_bytes / dt;
      view.chunk_shift = std::countr_zero(static_cast<uint64_t>(chunk));
      view.chunk_gap = (geo_.chunk_bytes() - chunk * layer_bytes) / dt;
    }
  } else {
    k = base() + static_cast<uintptr_t>(geo_.Offset(0, 0, 2 * layer));
    v = base() + static_cast<uintptr_t>(geo_.Offset(0, 0, 2 * layer + 1));
    view.token_stride = layer_bytes / dt;
  }
  view.k = reinterpret_cast<void*>(k);
  view.v = reinterpret_cast<void*>(v);
  view.row_stride = geo_.segment_row_stride / dt;
  view.max_context = geo_.max_context;
  return view;
}

// ---- background mapper -------------------------------------------------------

int64_t VirtualLayout::MapAheadTarget(const Row& r) const {
  // As min(len + ahead, max_context), without the sum (ahead may be up to max_context).
  const int64_t ahead = std::min(config_.map_ahead_tokens, geo_.max_context - r.len);
  return geo_.PagesFor(r.len + ahead);
}

void VirtualLayout::WantMapAhead(int32_t row) {
  if (mapper_ == nullptr) return;
  const Row& r = rows_.row(row);
  if (!r.live || r.private_hi >= MapAheadTarget(r)) return;
  if (!queued_[row]) {
    queued_[row] = true;
    map_queue_.push_back(row);
  }
  mapper_->Notify();
}

bool VirtualLayout::PlanMapAhead() {
  while (!map_queue_.empty()) {
    const int32_t row = map_queue_.back();
    const Row& r = rows_.row(row);
    std::vector<std::pair<int64_t, int32_t>> missing;
    if (r.live) {
      const int64_t target = MapAheadTarget(r);
      for (int64_t k = geo_.PagesFor(r.len); k < target; ++k) {
        for (int32_t s = 0; s < geo_.segments; ++s) {
          if (rows_.Entry(row, k, s) == kNoHandle && !pool_.FindStray(rows_.Addr(row, k, s))) {
            missing.emplace_back(k, s);
          }
        }
      }
    }
    if (missing.empty()) {
      map_queue_.pop_back();
      queued_[row] = false;
      continue;
    }
    const int64_t want = static_cast<int64_t>(missing.size());
    if (pool_.free_count() < want) {
      // Pages of fence-complete idle rows, never other live rows' pages: mapping ahead
      // for one row must not take what another has mapped ahead. What a failed batch
      // unmapped stays unmapped: those pages held no token.
      rows_.PollFences(/*all=*/false);
      Transaction tx = NewTransaction();
      absl::Status s = Reclaim(want - pool_.free_count(), -1, /*surplus=*/false, &tx);
      if (!s.ok()) Logger()->warn("background mapper: reclaiming: {}", s.ToString());
      pages_reclaimed_ += static_cast<int64_t>(tx.freed().size());
      tx.Commit();
    }
    const size_t count = std::min<size_t>(missing.size(), pool_.free_count());
    if (count == 0) return false;  // the row stays queued until handles come back
    if (count == missing.size()) {
      map_queue_.pop_back();
      queued_[row] = false;
    }
    missing.resize(count);  // the lowest pages first: they are needed first
    job_ = MapJob{};
    job_.row = row;
    for (const auto& [k, s] : missing) {
      const int32_t h = pool_.Pop();
      rows_.BeginInFlight(h, row, k, s);
      job_.items.push_back({row, k, s, h});
    }
    std::sort(job_.items.begin(), job_.items.end(), [&](const RowMapping& a, const RowMapping& b) {
      return rows_.Addr(a) < rows_.Addr(b);
    });
    job_granules_.clear();
    for (const RowMapping& m : job_.items) {
      job_granules_.push_back({rows_.Addr(m), pool_.phys(m.handle)});
    }
    return true;
  }
  return false;
}

absl::Status VirtualLayout::RunMapAhead() {
  return MapAccessibleTracked(*vmm_, geo_.granularity, job_granules_, &job_state_);
}

void VirtualLayout::FinishMapAhead(absl::Status s) {
  const int32_t row = job_.row;
  bool attached = false;
  for (size_t i = 0; i < job_.items.size(); ++i) {
    const RowMapping& m = job_.items[i];
    const GranuleState state = s.ok() ? GranuleState::kAccessible : job_state_[i];
    switch (state) {
      case GranuleState::kAccessible:
        // Mapped ahead (or its undo failed: a mapped page beyond the row's tokens is
        // just as good).
        rows_.Attach(m);
        attached = true;
        break;
      case GranuleState::kUnmapped:
        rows_.EndInFlight(m.handle, row, m.page, m.seg);
        pool_.Push(m.handle);
        break;
      case GranuleState::kMapped:
        // Mapped without access and the unmap failed: quarantined until a later call
        // unmaps it.
        rows_.EndInFlight(m.handle, row, m.page, m.seg);
        pool_.AddStray(rows_.Addr(m), m.handle, /*accessible=*/false);
        Logger()->warn("background mapper: page {} of row {} stays mapped without access", m.page,
                       row);
        break;
    }
  }
  if (attached) {
    rows_.ExtendPrivate(row);
    UpdatePeaks();
  }
  if (!s.ok() && rows_.row(row).live && !queued_[row]) {
    queued_[row] = true;  // retried after the mapper's back-off
    map_queue_.push_back(row);
  }
  job_ = MapJob{};
}

bool VirtualLayout::WaitForMapperIdle(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  if (mapper_ == nullptr) return true;
  return mapper_->WaitIdle(timeout);
}

int64_t VirtualLayout::mapper_failures() const {
  absl::MutexLock lock(&mu_);
  return mapper_ == nullptr ? 0 : mapper_->failures();
}

}  // namespace kvmem::internal
