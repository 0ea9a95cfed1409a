// The virtual layout: rows, pages, sharing and reclamation. Stats and invariants are in
// virtual_kv_cache_check.cc, the background mapper's steps at the end of this file.
#include "allocators/virtual/virtual_layout.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvmem/dtype.h"
#include "src/core/host_limits.h"
#include "src/core/int_math.h"
#include "src/core/logging.h"
#include "src/core/status_macros.h"

namespace kvmem::internal {
namespace {

// a * b, or false when it overflows int64 or either is negative.
bool MulOk(int64_t a, int64_t b, int64_t* out) {
  return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

// Keeps the backend's code, adds what the layout was doing.
absl::Status WithContext(const absl::Status& s, const std::string& what) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("virtual layout: ", what, ": ", s.message()));
}

}  // namespace

// A broken internal invariant (a kvmem bug, never bad input): log and abort.
#define KVMEM_VIRTUAL_CHECK(cond, ...)                                             \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      Logger()->critical("virtual layout: check failed: " #cond ": " __VA_ARGS__); \
      std::abort();                                                                \
    }                                                                              \
  } while (0)

namespace {

// KvCacheConfig::chunk_tokens resolved: 0 gives the smallest power of two whose one
// layer's K and V (2 * chunk * layer_bytes) fill a page, at most max_context rounded up
// to a power of two. Why a page: decode reads one layer, and every page it touches costs
// an address-translation entry; with whole pages per layer it touches as few as the
// per-layer arrangement does (docs/kernels.md).
int64_t ChunkTokens(const KvCacheConfig& c, int64_t layer_bytes, int64_t granularity) {
  if (c.chunk_tokens > 0) return c.chunk_tokens;
  int64_t chunk = 1;
  while (2 * chunk * layer_bytes < granularity && chunk < c.max_context) chunk *= 2;
  return chunk;
}

}  // namespace

int64_t VirtualGeometry::CoveredBytes(int64_t tokens, int64_t page) const {
  const int64_t lo = page * granularity;
  const int64_t hi = lo + granularity;
  auto overlap = [&](int64_t a, int64_t b) {  // |[a, b) n [lo, hi)|
    return std::max<int64_t>(0, std::min(b, hi) - std::max(a, lo));
  };
  const int64_t full = ChunkStart(tokens);  // tokens of whole chunks
  int64_t bytes = overlap(0, full * segment_token_bytes);
  const int64_t partial = tokens - full;
  if (partial == 0) return bytes;
  // The partial chunk: the first `partial` tokens of each block that meets the page.
  const int64_t start = full * segment_token_bytes;
  const int64_t bb = block_bytes();
  const int64_t first = std::max<int64_t>(0, (lo - start) / bb);
  for (int64_t j = first; j < chunk_blocks && start + j * bb < hi; ++j) {
    const int64_t a = start + j * bb;
    bytes += overlap(a, a + partial * block_token_bytes());
  }
  return bytes;
}

absl::StatusOr<VirtualGeometry> VirtualGeometry::Make(const KvCacheConfig& c, int64_t granularity) {
  if (granularity <= 0 || (granularity & (granularity - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: backend granularity %d is not a power of two", granularity));
  }
  VirtualGeometry g;
  g.granularity = granularity;
  g.rows = c.max_requests;
  g.max_context = c.max_context;
  // Keep every product below 2^62 so that sums of two offsets cannot overflow either.
  constexpr int64_t kLimit = int64_t{1} << 62;
  int64_t layer_bytes = 0;
  int64_t token_bytes = 0;
  int64_t row_bytes = 0;
  int64_t total = 0;
  if (!MulOk(int64_t{c.num_kv_heads} * c.head_dim, DTypeBytes(c.dtype), &layer_bytes) ||
      !MulOk(layer_bytes, 2 * int64_t{c.num_layers}, &token_bytes) || token_bytes > kLimit) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: %d layers x %d kv heads x %d head_dim overflows 64-bit byte offsets",
        c.num_layers, c.num_kv_heads, c.head_dim));
  }
  const bool all = c.arrangement == Arrangement::kAllLayers;
  const int64_t segments = all ? 1 : 2 * int64_t{c.num_layers};
  if (segments > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("virtual layout: %d layers is too many segments", c.num_layers));
  }
  g.segments = static_cast<int32_t>(segments);
  g.segment_token_bytes = all ? token_bytes : layer_bytes;
  if (all) {
    g.chunk_tokens = ChunkTokens(c, layer_bytes, granularity);
    if (g.chunk_tokens > 1) g.chunk_blocks = 2 * int64_t{c.num_layers};
  }
  // Whole chunks: the last one may reach past max_context.
  const int64_t row_tokens = g.WholeChunks(c.max_context);
  if (!MulOk(row_tokens, g.segment_token_bytes, &row_bytes) || row_bytes > kLimit) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: %d tokens (max_context %d in chunks of %d) x %d bytes per token "
        "overflows 64-bit byte offsets",
        row_tokens, c.max_context, g.chunk_tokens, g.segment_token_bytes));
  }
  g.segment_row_stride = (row_bytes + granularity - 1) / granularity * granularity;
  g.pages_per_segment = g.segment_row_stride / granularity;
  if (!MulOk(segments * g.rows, g.segment_row_stride, &total) || total > kLimit) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: %d rows x %d segments x %d bytes of address space overflows 64-bit "
        "byte offsets",
        g.rows, segments, g.segment_row_stride));
  }
  return g;
}

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
    : config_(config), vmm_(std::move(vmm)), geo_(geo), token_bytes_(config.TokenBytes()) {}

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
  cache->handles_.reserve(static_cast<size_t>(available));
  cache->free_.reserve(static_cast<size_t>(available));
  for (int64_t i = 0; i < available; ++i) {
    absl::StatusOr<PhysicalPage> page = PhysicalPage::Make(vmm.get());
    if (!page.ok()) {
      return WithContext(
          page.status(),
          absl::StrFormat("creating physical page %d of %d (%d bytes each) for "
                          "a budget of %d bytes",
                          i, available, geo.granularity, config.memory_budget_bytes));
    }
    cache->handles_.emplace_back().page = std::move(*page);
  }
  cache->pool_create_nanos_ =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  // Handed out from the back: low indices first.
  for (int64_t i = available - 1; i >= 0; --i) cache->free_.push_back(static_cast<int32_t>(i));
  cache->rows_.resize(static_cast<size_t>(geo.rows));
  cache->queued_.assign(static_cast<size_t>(geo.rows), false);
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
  // rows_ is empty when Create failed half-way.
  for (int32_t row = 0; row < static_cast<int32_t>(rows_.size()); ++row) {
    Row& r = rows_[row];
    if (!r.live && !FenceDone(r) && r.mapped > 0) ++waiting;
    std::vector<Granule> granules;
    for (size_t i = 0; i < r.entries.size(); ++i) {
      const int32_t h = r.entries[i];
      if (h == kNoHandle) continue;
      granules.push_back({Addr(row, static_cast<int64_t>(i) / geo_.segments,
                               static_cast<int32_t>(i % geo_.segments)),
                          handles_[h].page.handle()});
    }
    SortGranules(&granules);
    if (absl::Status s = UnmapGranules(*vmm_, geo_.granularity, granules); !s.ok()) {
      if (failed++ == 0) first = std::move(s);
    }
  }
  if (waiting > 0) {
    // Nothing can wait here: a fence that never completes would hang the destructor.
    Logger()->warn("virtual layout destroyed while {} rows wait for their fence", waiting);
  }
  if (failed > 0) {
    Logger()->error("virtual layout: unmapping {} rows on destruction failed (the first: {})",
                    failed, first.ToString());
  }
  std::vector<PhysicalPage> pages;
  pages.reserve(handles_.size());
  for (Handle& h : handles_) pages.push_back(std::move(h.page));
  handles_.clear();
  ReleaseAllOrLog(&pages, "virtual layout destroyed");
}

int32_t& VirtualLayout::MutableEntry(Row& r, int64_t page, int32_t seg) {
  const size_t i = static_cast<size_t>(page * geo_.segments + seg);
  if (i >= r.entries.size()) {
    size_t n = std::max<size_t>(r.entries.size() * 2, static_cast<size_t>(geo_.segments) * 4);
    n = std::max(n, (i / geo_.segments + 1) * geo_.segments);
    n = std::min(n, static_cast<size_t>(geo_.pages_per_request()));
    r.entries.resize(n, kNoHandle);
  }
  return r.entries[i];
}

absl::Status VirtualLayout::CheckLiveRow(int32_t row, int64_t len, const char* op) const {
  if (row < 0 || row >= geo_.rows) {
    return absl::InternalError(
        absl::StrFormat("virtual layout %s: row %d out of [0, %d)", op, row, geo_.rows));
  }
  const Row& r = rows_[row];
  if (!r.live || r.len != len) {
    return absl::InternalError(absl::StrFormat(
        "virtual layout %s: row %d is %s with %d tokens, the cache says live with %d", op, row,
        r.live ? "live" : "idle", r.len, len));
  }
  return absl::OkStatus();
}

bool VirtualLayout::FenceDone(Row& r) {
  if (r.fence.event == nullptr) return true;
  if (!vmm_->FenceComplete(r.fence)) return false;
  r.fence = Fence{};
  return true;
}

bool VirtualLayout::FenceDoneConst(const Row& r) const {
  return r.fence.event == nullptr || vmm_->FenceComplete(r.fence);
}

// ---- bookkeeping -------------------------------------------------------------

void VirtualLayout::Account(const Handle& h, int sign) {
  if (h.state == HandleState::kInFlight) in_flight_handles_ += sign;
  const int64_t refs = static_cast<int64_t>(h.owners.size());
  if (refs == 0) return;
  mapped_handles_ += sign;
  mapped_granules_ += sign * refs;
  if (h.live_owners > 0) {
    used_handles_ += sign;
  } else {
    idle_handles_ += sign;
  }
}

void VirtualLayout::AddMapping(int32_t h, int32_t row, int64_t page, int32_t seg) {
  ++mapping_epoch_;
  Handle& hd = handles_[h];
  Row& r = rows_[row];
  Account(hd, -1);
  if (hd.state == HandleState::kInFlight) --r.in_flight;
  if (hd.owners.empty()) {
    hd.seg = seg;
    hd.index = page;
  }
  KVMEM_VIRTUAL_CHECK(hd.seg == seg && hd.index == page, "handle {} mapped at two positions", h);
  hd.state = HandleState::kMapped;
  hd.owners.push_back(row);
  if (r.live) ++hd.live_owners;
  Account(hd, +1);
  if (hd.owners.size() == 2) shared_.insert(h);
  MutableEntry(r, page, seg) = h;
  ++r.mapped;
  if (r.live && page >= geo_.PagesFor(r.len)) ++surplus_handles_;
}

void VirtualLayout::RemoveMapping(int32_t h, int32_t row, int64_t page, int32_t seg) {
  ++mapping_epoch_;
  Handle& hd = handles_[h];
  Row& r = rows_[row];
  Account(hd, -1);
  auto it = std::find(hd.owners.begin(), hd.owners.end(), row);
  KVMEM_VIRTUAL_CHECK(it != hd.owners.end(), "row {} does not map handle {}", row, h);
  hd.owners.erase(it);
  if (r.live) --hd.live_owners;
  if (hd.owners.size() == 1) shared_.erase(h);
  if (hd.owners.empty()) {
    hd.state = HandleState::kFree;
    hd.seg = -1;
    hd.index = -1;
  }
  Account(hd, +1);
  MutableEntry(r, page, seg) = kNoHandle;
  --r.mapped;
  if (r.live && page >= geo_.PagesFor(r.len)) --surplus_handles_;
}

int64_t VirtualLayout::MappedFrom(const Row& r, int64_t from) const {
  int64_t n = 0;
  for (int64_t k = from; k < PageLimit(r); ++k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t h = Entry(r, k, s);
      n += h != kNoHandle && handles_[h].state == HandleState::kMapped;
    }
  }
  return n;
}

void VirtualLayout::SetLen(Row& r, int64_t len) {
  if (r.live) {
    const int64_t old_need = geo_.PagesFor(r.len);
    const int64_t new_need = geo_.PagesFor(len);
    if (new_need > old_need) {
      surplus_handles_ -= MappedFrom(r, old_need) - MappedFrom(r, new_need);
    } else if (new_need < old_need) {
      surplus_handles_ += MappedFrom(r, new_need) - MappedFrom(r, old_need);
    }
  }
  r.len = len;
}

void VirtualLayout::SetLive(int32_t row, bool live) {
  Row& r = rows_[row];
  if (r.live == live) return;
  for (int32_t h : r.entries) {
    if (h == kNoHandle || handles_[h].state != HandleState::kMapped) continue;
    Account(handles_[h], -1);
    handles_[h].live_owners += live ? 1 : -1;
    Account(handles_[h], +1);
  }
  const int64_t beyond = MappedFrom(r, geo_.PagesFor(r.len));
  surplus_handles_ += live ? beyond : -beyond;
  r.live = live;
  live_rows_ += live ? 1 : -1;
}

bool VirtualLayout::PagePrivate(const Row& r, int64_t page) const {
  for (int32_t s = 0; s < geo_.segments; ++s) {
    const int32_t h = Entry(r, page, s);
    if (h == kNoHandle) return false;
    const Handle& hd = handles_[h];
    if (hd.state != HandleState::kMapped || hd.owners.size() != 1) return false;
  }
  return true;
}

void VirtualLayout::ExtendPrivate(Row& r) const {
  if (r.private_hi < r.private_lo) r.private_hi = r.private_lo;
  while (r.private_hi < PageLimit(r) && PagePrivate(r, r.private_hi)) ++r.private_hi;
}

int64_t VirtualLayout::LiveBytesSlow() const {
  // Every live row's tokens, minus what shared pages count more than once: a shared
  // page holds max(covered bytes) over its live owners, not their sum.
  int64_t bytes = live_tokens_ * token_bytes_;
  for (int32_t h : shared_) {
    const Handle& hd = handles_[h];
    if (hd.live_owners < 2) continue;
    int64_t sum = 0;
    int64_t max = 0;
    for (int32_t o : hd.owners) {
      if (!rows_[o].live) continue;
      const int64_t c = geo_.CoveredBytes(rows_[o].len, hd.index);
      sum += c;
      max = std::max(max, c);
    }
    bytes -= sum - max;
  }
  return bytes;
}

void VirtualLayout::RecomputeLiveBytes() { live_bytes_ = LiveBytesSlow(); }

void VirtualLayout::UpdatePeaks() {
  peak_held_bytes_ = std::max(peak_held_bytes_, HeldHandles() * geo_.granularity);
  peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
}

// ---- reclamation -------------------------------------------------------------

int64_t VirtualLayout::ReclaimableIdle(int64_t limit) {
  std::vector<bool> done(rows_.size());
  for (size_t i = 0; i < rows_.size(); ++i) done[i] = !rows_[i].live && FenceDone(rows_[i]);
  int64_t n = 0;
  for (int32_t row = 0; row < geo_.rows && n < limit; ++row) {
    if (!done[row] || rows_[row].mapped == 0) continue;
    for (int32_t h : rows_[row].entries) {
      if (h == kNoHandle || handles_[h].state != HandleState::kMapped) continue;
      const auto& owners = handles_[h].owners;
      // Count a handle once, at its first owner, if every owner gives it up.
      if (*std::min_element(owners.begin(), owners.end()) != row) continue;
      if (std::all_of(owners.begin(), owners.end(), [&](int32_t o) { return done[o]; })) ++n;
    }
  }
  return n;
}

int64_t VirtualLayout::ReclaimableSurplus(int32_t exclude, int64_t limit) const {
  int64_t n = 0;
  for (int32_t row = 0; row < geo_.rows && n < limit; ++row) {
    const Row& r = rows_[row];
    if (!r.live || row == exclude) continue;
    for (int64_t k = geo_.PagesFor(r.len); k < PageLimit(r); ++k) {
      for (int32_t s = 0; s < geo_.segments; ++s) {
        const int32_t h = Entry(r, k, s);
        if (h != kNoHandle && handles_[h].state == HandleState::kMapped &&
            handles_[h].owners.size() == 1) {
          ++n;
        }
      }
    }
  }
  return n;
}

absl::Status VirtualLayout::ReclaimRow(int32_t row, int64_t min_page, int64_t want,
                                       bool only_exclusive, std::vector<int32_t>* freed,
                                       std::vector<Reclaimed>* journal) {
  Row& r = rows_[row];
  std::vector<Reclaimed> items;
  int64_t frees = 0;
  // Highest pages first: the row keeps a prefix, which the next request in it reuses.
  for (int64_t k = PageLimit(r) - 1; k >= min_page && frees < want; --k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t h = Entry(r, k, s);
      if (h == kNoHandle || handles_[h].state != HandleState::kMapped) continue;
      const size_t refs = handles_[h].owners.size();
      if (only_exclusive && refs != 1) continue;
      items.push_back({row, k, s, h});
      if (refs == 1) ++frees;
    }
  }
  if (items.empty()) return absl::OkStatus();
  std::vector<Granule> granules;
  granules.reserve(items.size());
  for (const Reclaimed& it : items) {
    granules.push_back({Addr(row, it.page, it.seg), handles_[it.handle].page.handle()});
  }
  SortGranules(&granules);
  KVMEM_RETURN_IF_ERROR(WithContext(UnmapGranules(*vmm_, geo_.granularity, granules),
                                    absl::StrFormat("taking pages back from row %d", row)));
  int64_t lowest = r.private_hi;
  for (const Reclaimed& it : items) {
    RemoveMapping(it.handle, row, it.page, it.seg);
    if (handles_[it.handle].owners.empty()) freed->push_back(it.handle);
    journal->push_back(it);
    lowest = std::min(lowest, it.page);
  }
  r.private_hi = std::max(r.private_lo, std::min(r.private_hi, lowest));
  return absl::OkStatus();
}

absl::Status VirtualLayout::Reclaim(int64_t want, int32_t exclude, bool surplus,
                                    std::vector<int32_t>* freed, std::vector<Reclaimed>* journal) {
  const size_t start = freed->size();
  auto got = [&] { return static_cast<int64_t>(freed->size() - start); };
  // Tier 1: fence-complete idle rows, the longest idle first.
  std::vector<int32_t> idle;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    if (!rows_[row].live && rows_[row].mapped > 0 && FenceDone(rows_[row])) idle.push_back(row);
  }
  std::sort(idle.begin(), idle.end(),
            [&](int32_t a, int32_t b) { return rows_[a].idle_since < rows_[b].idle_since; });
  for (int32_t row : idle) {
    if (got() >= want) return absl::OkStatus();
    KVMEM_RETURN_IF_ERROR(ReclaimRow(row, 0, want - got(), false, freed, journal));
  }
  if (!surplus) return absl::OkStatus();
  // Tier 2: other live rows' exclusive pages beyond their length (mapped ahead or kept
  // after a Shrink). They hold no token, so taking them changes no data.
  for (int32_t row = 0; row < geo_.rows && got() < want; ++row) {
    const Row& r = rows_[row];
    if (!r.live || row == exclude || r.mapped == 0) continue;
    KVMEM_RETURN_IF_ERROR(
        ReclaimRow(row, geo_.PagesFor(r.len), want - got(), true, freed, journal));
    WantMapAhead(row);
  }
  return absl::OkStatus();
}

void VirtualLayout::UndoReclaim(const std::vector<Reclaimed>& journal,
                                std::vector<int32_t>* freed) {
  if (!journal.empty()) {
    std::vector<Granule> granules;
    for (const Reclaimed& it : journal) {
      granules.push_back({Addr(it.row, it.page, it.seg), handles_[it.handle].page.handle()});
    }
    SortGranules(&granules);
    absl::Status s = MapAccessible(*vmm_, geo_.granularity, granules);
    if (s.ok()) {
      for (const Reclaimed& it : journal) AddMapping(it.handle, it.row, it.page, it.seg);
      for (const Reclaimed& it : journal) ExtendPrivate(rows_[it.row]);
      freed->clear();
      return;
    }
    // The pages held no live token: losing them from their rows changes no data.
    Logger()->warn("virtual layout: could not map reclaimed pages back ({}); they stay free",
                   s.ToString());
    pages_reclaimed_ += static_cast<int64_t>(freed->size());
  }
  for (int32_t h : *freed) free_.push_back(h);
  freed->clear();
}

absl::StatusOr<int64_t> VirtualLayout::DropPages(int32_t row, int64_t min_page, bool only_shared,
                                                 std::vector<Reclaimed>* dropped) {
  Row& r = rows_[row];
  std::vector<Reclaimed> items;
  std::vector<Granule> granules;
  for (int64_t k = min_page; k < PageLimit(r); ++k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t h = Entry(r, k, s);
      if (h == kNoHandle || handles_[h].state != HandleState::kMapped) continue;
      if (only_shared && handles_[h].owners.size() < 2) continue;
      items.push_back({row, k, s, h});
      granules.push_back({Addr(row, k, s), handles_[h].page.handle()});
    }
  }
  if (items.empty()) return 0;
  SortGranules(&granules);
  KVMEM_RETURN_IF_ERROR(WithContext(UnmapGranules(*vmm_, geo_.granularity, granules),
                                    absl::StrFormat("unmapping pages of row %d", row)));
  int64_t freed = 0;
  int64_t lowest = r.private_hi;
  for (const Reclaimed& it : items) {
    RemoveMapping(it.handle, row, it.page, it.seg);
    lowest = std::min(lowest, it.page);
    if (handles_[it.handle].owners.empty()) {
      free_.push_back(it.handle);
      ++freed;
    }
  }
  r.private_hi = std::max(r.private_lo, std::min(r.private_hi, lowest));
  if (dropped != nullptr) dropped->insert(dropped->end(), items.begin(), items.end());
  return freed;
}

// ---- rows --------------------------------------------------------------------

absl::StatusOr<int32_t> VirtualLayout::AcquireRow() {
  absl::MutexLock lock(&mu_);
  int32_t best = -1;
  int64_t waiting = 0;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    Row& r = rows_[row];
    if (r.live) continue;
    if (!FenceDone(r)) {
      ++waiting;
      continue;
    }
    // The row holding the most pages: the new request reuses them without a driver call.
    if (best < 0 || r.mapped > rows_[best].mapped) best = row;
  }
  if (best < 0) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "virtual layout: all %d request rows are in use (%d live, %d freed but waiting for "
        "their fence)",
        geo_.rows, live_rows_, waiting));
  }
  // Pages it shares with other rows hold someone else's tokens: drop them (remembered,
  // so that ReturnRow can map them back when a Fork fails).
  std::vector<Reclaimed> dropped;
  KVMEM_RETURN_IF_ERROR(DropPages(best, 0, /*only_shared=*/true, &dropped).status());
  Row& r = rows_[best];
  last_acquire_ = AcquireUndo{.row = best,
                              .epoch = mapping_epoch_,
                              .idle_since = r.idle_since,
                              .dropped = std::move(dropped)};
  SetLive(best, true);
  SetLen(r, 0);
  r.private_lo = 0;
  r.private_hi = 0;
  ExtendPrivate(r);
  // No UpdatePeaks: pages the row kept count as held from now on, but a peak is taken
  // only once memory is put to use (Grow, Share) or stats are read, so that a Fork
  // whose Share fails leaves every number as it was.
  WantMapAhead(best);
  return best;
}

absl::Status VirtualLayout::Release(int32_t row, int64_t len, Fence fence) {
  absl::MutexLock lock(&mu_);
  KVMEM_RETURN_IF_ERROR(CheckLiveRow(row, len, "Release"));
  Row& r = rows_[row];
  SetLive(row, false);
  live_tokens_ -= len;
  SetLen(r, 0);
  r.fence = fence;
  r.idle_since = ++release_seq_;
  r.private_lo = 0;
  r.private_hi = 0;
  RecomputeLiveBytes();
  if (mapper_ != nullptr && !map_queue_.empty()) mapper_->Notify();
  return absl::OkStatus();
}

absl::Status VirtualLayout::ReturnRow(int32_t row) {
  absl::MutexLock lock(&mu_);
  KVMEM_RETURN_IF_ERROR(CheckLiveRow(row, 0, "ReturnRow"));
  Row& r = rows_[row];
  SetLive(row, false);
  r.fence = Fence{};  // AcquireRow took it with its fence complete
  r.private_lo = 0;
  r.private_hi = 0;
  AcquireUndo undo = std::exchange(last_acquire_, AcquireUndo{});
  if (undo.row != row) {
    r.idle_since = ++release_seq_;
  } else {
    r.idle_since = undo.idle_since;
    // The aliases AcquireRow dropped, back where they were, if no mapping changed since
    // (the background mapper may have taken their handles): a failed Fork then leaves
    // the idle row as it found it. They hold no live token, so when they cannot come
    // back only the row's chance of reuse is lost.
    if (undo.epoch == mapping_epoch_ && !undo.dropped.empty()) {
      std::vector<Granule> granules;
      for (const Reclaimed& d : undo.dropped) {
        granules.push_back({Addr(row, d.page, d.seg), handles_[d.handle].page.handle()});
      }
      SortGranules(&granules);
      if (absl::Status s = MapAccessible(*vmm_, geo_.granularity, granules); s.ok()) {
        for (const Reclaimed& d : undo.dropped) AddMapping(d.handle, row, d.page, d.seg);
      } else {
        Logger()->warn("virtual layout: could not map row {}'s shared pages back: {}", row,
                       s.ToString());
      }
    }
  }
  RecomputeLiveBytes();
  if (mapper_ != nullptr && !map_queue_.empty()) mapper_->Notify();
  return absl::OkStatus();
}

absl::Status VirtualLayout::Shrink(int32_t row, int64_t len, int64_t new_len) {
  absl::MutexLock lock(&mu_);
  KVMEM_RETURN_IF_ERROR(CheckLiveRow(row, len, "Shrink"));
  if (new_len < 0 || new_len > len) {
    return absl::OutOfRangeError(absl::StrFormat(
        "virtual layout: shrinking row %d from %d to %d tokens", row, len, new_len));
  }
  // Shared pages beyond the new length hold only other rows' tokens now; exclusive ones
  // stay mapped for cheap regrowth.
  KVMEM_ASSIGN_OR_RETURN(int64_t freed,
                         DropPages(row, geo_.PagesFor(new_len), /*only_shared=*/true));
  (void)freed;
  Row& r = rows_[row];
  SetLen(r, new_len);
  live_tokens_ -= len - new_len;
  r.private_lo = geo_.PageOf(new_len);
  r.private_hi = r.private_lo;
  ExtendPrivate(r);
  RecomputeLiveBytes();
  return absl::OkStatus();
}

absl::Status VirtualLayout::Share(int32_t parent, int64_t len, int32_t child) {
  absl::MutexLock lock(&mu_);
  KVMEM_RETURN_IF_ERROR(CheckLiveRow(parent, len, "Share (parent)"));
  KVMEM_RETURN_IF_ERROR(CheckLiveRow(child, 0, "Share (child)"));
  if (parent == child) return absl::InternalError("virtual layout: Share of a row with itself");
  const int64_t np = geo_.PagesFor(len);
  Row& p = rows_[parent];
  Row& c = rows_[child];
  // Pages the mapper is mapping ahead in the child are about to be replaced: wait.
  while (mapper_ != nullptr && c.in_flight > 0) {
    bool in_range = false;
    for (int64_t k = 0; k < std::min(np, PageLimit(c)) && !in_range; ++k) {
      for (int32_t s = 0; s < geo_.segments; ++s) {
        const int32_t h = Entry(c, k, s);
        if (h != kNoHandle && handles_[h].state == HandleState::kInFlight) in_range = true;
      }
    }
    if (!in_range) break;
    mapper_->WaitForJob();
  }
  std::vector<Reclaimed> displaced;  // the child's own pages under the prefix
  std::vector<Granule> old_granules;
  std::vector<Granule> new_granules;
  for (int64_t k = 0; k < np; ++k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t ph = Entry(p, k, s);
      KVMEM_VIRTUAL_CHECK(ph != kNoHandle && handles_[ph].state == HandleState::kMapped,
                          "live row {} misses page {}", parent, k);
      new_granules.push_back({Addr(child, k, s), handles_[ph].page.handle()});
      const int32_t ch = Entry(c, k, s);
      if (ch != kNoHandle) {
        displaced.push_back({child, k, s, ch});
        old_granules.push_back({Addr(child, k, s), handles_[ch].page.handle()});
      }
    }
  }
  SortGranules(&old_granules);
  SortGranules(&new_granules);
  KVMEM_RETURN_IF_ERROR(WithContext(UnmapGranules(*vmm_, geo_.granularity, old_granules),
                                    absl::StrFormat("clearing row %d for a fork", child)));
  if (absl::Status s = MapAccessible(*vmm_, geo_.granularity, new_granules); !s.ok()) {
    if (absl::Status u = MapAccessible(*vmm_, geo_.granularity, old_granules); !u.ok()) {
      // The displaced pages held no token of the (empty) child: they go to the pool.
      Logger()->warn("virtual layout: could not map row {}'s pages back: {}", child, u.ToString());
      for (const Reclaimed& d : displaced) {
        RemoveMapping(d.handle, child, d.page, d.seg);
        if (handles_[d.handle].owners.empty()) free_.push_back(d.handle);
      }
    }
    return WithContext(s, absl::StrFormat("mapping %d pages of row %d under row %d",
                                          new_granules.size(), parent, child));
  }
  for (const Reclaimed& d : displaced) {
    RemoveMapping(d.handle, child, d.page, d.seg);
    if (handles_[d.handle].owners.empty()) free_.push_back(d.handle);
  }
  for (int64_t k = 0; k < np; ++k) {
    for (int32_t s = 0; s < geo_.segments; ++s) AddMapping(Entry(p, k, s), child, k, s);
  }
  SetLen(c, len);
  live_tokens_ += len;
  // The prefix is shared now: neither row may write into it without a copy.
  p.private_lo = std::max(p.private_lo, np);
  p.private_hi = std::max(p.private_hi, p.private_lo);
  c.private_lo = np;
  c.private_hi = np;
  ExtendPrivate(c);
  RecomputeLiveBytes();
  UpdatePeaks();
  WantMapAhead(child);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> VirtualLayout::Trim() {
  absl::MutexLock lock(&mu_);
  // One all-or-nothing batch over every fence-complete idle row.
  std::vector<Reclaimed> items;
  std::vector<Granule> granules;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    Row& r = rows_[row];
    if (r.live || r.mapped == 0 || !FenceDone(r)) continue;
    for (int64_t k = 0; k < PageLimit(r); ++k) {
      for (int32_t s = 0; s < geo_.segments; ++s) {
        const int32_t h = Entry(r, k, s);
        if (h == kNoHandle || handles_[h].state != HandleState::kMapped) continue;
        items.push_back({row, k, s, h});
        granules.push_back({Addr(row, k, s), handles_[h].page.handle()});
      }
    }
  }
  if (items.empty()) return 0;
  SortGranules(&granules);
  KVMEM_RETURN_IF_ERROR(
      WithContext(UnmapGranules(*vmm_, geo_.granularity, granules), "trimming idle rows"));
  int64_t freed = 0;
  for (const Reclaimed& it : items) {
    RemoveMapping(it.handle, it.row, it.page, it.seg);
    if (handles_[it.handle].owners.empty()) {
      free_.push_back(it.handle);
      ++freed;
    }
  }
  pages_reclaimed_ += freed;
  if (mapper_ != nullptr && freed > 0 && !map_queue_.empty()) mapper_->Notify();
  return freed * geo_.granularity;
}

// ---- growth ------------------------------------------------------------------

absl::Status VirtualLayout::Grow(int32_t row, int64_t len, int64_t n, std::vector<int64_t>* locs) {
  absl::MutexLock lock(&mu_);
  KVMEM_RETURN_IF_ERROR(CheckLiveRow(row, len, "Grow"));
  if (n < 0 || n > geo_.max_context - len) {
    return absl::OutOfRangeError(
        absl::StrFormat("virtual layout: growing row %d from %d by %d tokens (max_context %d)", row,
                        len, n, geo_.max_context));
  }
  if (n == 0) return absl::OkStatus();
  Row& r = rows_[row];
  const int64_t p0 = geo_.PageOf(len);
  const int64_t p1 = geo_.PagesFor(len + n);
  // Fast path: every page written is mapped and private: no driver call, O(1).
  const bool fast = p0 >= r.private_lo && p1 <= r.private_hi;
  if (!fast) KVMEM_RETURN_IF_ERROR(GrowSlow(row, p0, p1));
  SetLen(r, len + n);
  live_tokens_ += n;
  if (fast) {
    live_bytes_ += n * token_bytes_;  // only private pages changed
  } else {
    RecomputeLiveBytes();
  }
  UpdatePeaks();
  WantMapAhead(row);
  const int64_t first = int64_t{row} * geo_.max_context + len;
  for (int64_t i = 0; i < n; ++i) locs->push_back(first + i);
  return absl::OkStatus();
}

absl::Status VirtualLayout::GrowSlow(int32_t row, int64_t p0, int64_t p1) {
  Row& r = rows_[row];
  struct Item {
    uintptr_t addr;
    int64_t page;
    int32_t seg;
    int32_t old;     // kNoHandle: a fresh page; else the shared handle to copy
    int32_t handle;  // the new handle
  };
  std::vector<Item> fresh;
  std::vector<Item> cow;
  bool stalled = false;
  for (;;) {
    fresh.clear();
    cow.clear();
    bool wait = false;
    for (int64_t k = p0; k < p1; ++k) {
      for (int32_t s = 0; s < geo_.segments; ++s) {
        const int32_t h = Entry(r, k, s);
        if (h == kNoHandle) {
          fresh.push_back({Addr(row, k, s), k, s, kNoHandle, kNoHandle});
        } else if (handles_[h].state == HandleState::kInFlight) {
          wait = true;  // the mapper is mapping it: never map a page twice
        } else if (handles_[h].owners.size() > 1) {
          cow.push_back({Addr(row, k, s), k, s, h, kNoHandle});
        }
      }
    }
    const size_t needed = fresh.size() + cow.size();
    // Handles in flight come back mapped (reclaimable) or free: wait rather than fail.
    if (!wait && needed > free_.size() && mapper_ != nullptr && mapper_->job_in_flight()) {
      wait = true;
    }
    if (!wait) break;
    stalled = true;
    mapper_->WaitForJob();
  }
  std::vector<int32_t> reclaimed;
  std::vector<Reclaimed> journal;
  // A shared page whose other owners are all idle rows past their fence needs no copy:
  // their aliases are dropped instead (journaled: mapped back if this call fails).
  {
    std::vector<Reclaimed> aliases;
    for (const Item& it : cow) {
      const auto& owners = handles_[it.old].owners;
      const bool idle_only = std::all_of(owners.begin(), owners.end(), [&](int32_t o) {
        return o == row || (!rows_[o].live && FenceDone(rows_[o]));
      });
      if (!idle_only) continue;
      for (int32_t o : owners) {
        if (o != row) aliases.push_back({o, it.page, it.seg, it.old});
      }
    }
    if (!aliases.empty()) {
      std::vector<Granule> granules;
      for (const Reclaimed& a : aliases) {
        granules.push_back({Addr(a.row, a.page, a.seg), handles_[a.handle].page.handle()});
      }
      SortGranules(&granules);
      KVMEM_RETURN_IF_ERROR(WithContext(UnmapGranules(*vmm_, geo_.granularity, granules),
                                        "dropping idle rows' aliases of a shared page"));
      for (const Reclaimed& a : aliases) {
        RemoveMapping(a.handle, a.row, a.page, a.seg);
        journal.push_back(a);
      }
    }
  }
  // Pages no longer shared (their other owners' aliases were dropped) need no copy.
  auto drop_private = [&] {
    cow.erase(std::remove_if(cow.begin(), cow.end(),
                             [&](const Item& it) { return handles_[it.old].owners.size() < 2; }),
              cow.end());
  };
  drop_private();
  const int64_t needed = static_cast<int64_t>(fresh.size() + cow.size());
  if (needed > static_cast<int64_t>(free_.size())) {
    const int64_t free = static_cast<int64_t>(free_.size());
    const int64_t short_by = needed - free;
    const int64_t idle = ReclaimableIdle(short_by);
    const int64_t surplus = idle >= short_by ? 0 : ReclaimableSurplus(row, short_by - idle);
    if (free + idle + surplus < needed) {
      UndoReclaim(journal, &reclaimed);
      int64_t waiting = 0;
      for (const Row& o : rows_) waiting += (!o.live && o.mapped > 0 && !FenceDoneConst(o));
      return absl::ResourceExhaustedError(absl::StrFormat(
          "virtual layout: row %d (%d tokens) needs %d more pages of %d bytes (%d new, %d "
          "copy-on-write) to grow, but only %d are free, %d can be taken from idle rows and %d "
          "from other rows' pages beyond their length (%d pages in all; %d idle rows wait "
          "for a fence)",
          row, r.len, needed, geo_.granularity, fresh.size(), cow.size(), free, idle, surplus,
          handles_.size(), waiting));
    }
    absl::Status s = Reclaim(needed - free, row, /*surplus=*/true, &reclaimed, &journal);
    if (!s.ok()) {
      UndoReclaim(journal, &reclaimed);
      return s;
    }
    drop_private();  // never fewer handles than needed: the need only shrinks
  }
  // Handles: the reclaimed ones first, then the pool's.
  std::vector<int32_t> taken;
  size_t next_reclaimed = 0;
  int64_t popped = 0;
  auto take = [&] {
    if (next_reclaimed < reclaimed.size()) return reclaimed[next_reclaimed++];
    const int32_t h = free_.back();
    free_.pop_back();
    ++popped;
    return h;
  };
  for (Item& it : fresh) it.handle = take();
  for (Item& it : cow) it.handle = take();
  auto give_back = [&] {
    std::vector<int32_t> from_pool;
    for (Item& it : fresh) from_pool.push_back(it.handle);
    for (Item& it : cow) from_pool.push_back(it.handle);
    // The last `popped` taken came from the pool, in pop order: push back in reverse.
    for (int64_t i = 0; i < popped; ++i) free_.push_back(from_pool[from_pool.size() - 1 - i]);
    UndoReclaim(journal, &reclaimed);
  };
  auto phys = [&](int32_t h) { return handles_[h].page.handle(); };

  std::vector<Granule> fresh_granules;
  for (const Item& it : fresh) fresh_granules.push_back({it.addr, phys(it.handle)});
  SortGranules(&fresh_granules);
  if (absl::Status s = MapGranules(*vmm_, geo_.granularity, fresh_granules); !s.ok()) {
    give_back();
    return WithContext(s, absl::StrFormat("mapping %d pages to grow row %d", fresh.size(), row));
  }
  auto unmap_fresh = [&]() -> absl::Status {
    for (const Granule& g : fresh_granules)
      KVMEM_RETURN_IF_ERROR(vmm_->Unmap(g.addr, geo_.granularity));
    return absl::OkStatus();
  };
  size_t copied = 0;
  absl::Status status;
  for (; copied < cow.size(); ++copied) {
    const Item& it = cow[copied];
    status = CopyOnWrite(it.addr, phys(it.old), phys(it.handle));
    if (!status.ok()) break;
  }
  std::vector<Granule> all = fresh_granules;
  if (status.ok()) {
    for (const Item& it : cow) all.push_back({it.addr, phys(it.handle)});
    SortGranules(&all);
    status = SetAccessRuns(*vmm_, geo_.granularity, all);
  }
  if (!status.ok()) {
    absl::Status undo;
    for (size_t i = 0; i < copied && undo.ok(); ++i) {
      undo = UndoCopyOnWrite(cow[i].addr, phys(cow[i].old));
    }
    if (undo.ok()) undo = unmap_fresh();
    give_back();
    if (!undo.ok()) {
      return absl::InternalError(absl::StrFormat(
          "virtual layout: growing row %d failed (%s) and undoing it failed too: %s", row,
          status.ToString(), undo.ToString()));
    }
    return WithContext(status, absl::StrFormat("growing row %d", row));
  }
  // Commit.
  for (const Item& it : fresh) AddMapping(it.handle, row, it.page, it.seg);
  for (const Item& it : cow) {
    RemoveMapping(it.old, row, it.page, it.seg);
    AddMapping(it.handle, row, it.page, it.seg);
  }
  for (size_t i = next_reclaimed; i < reclaimed.size(); ++i) free_.push_back(reclaimed[i]);
  pages_reclaimed_ += static_cast<int64_t>(reclaimed.size());
  cow_copies_ += static_cast<int64_t>(cow.size());
  if (stalled || !fresh.empty()) ++map_stalls_;
  r.private_lo = p0;
  r.private_hi = p1;
  ExtendPrivate(r);
  return absl::OkStatus();
}

absl::Status VirtualLayout::CopyOnWrite(uintptr_t addr, PhysHandle old_phys, PhysHandle new_phys) {
  const int64_t g = geo_.granularity;
  const uintptr_t scratch = scratch_.addr();
  KVMEM_RETURN_IF_ERROR(vmm_->Map(scratch, new_phys));
  absl::Status s = vmm_->SetAccess(scratch, g);
  if (s.ok()) s = vmm_->Copy(scratch, addr, g);
  // The scratch mapping must go, or the new handle would stay mapped where no record
  // knows it: one retry covers a transient failure; a second one is a broken backend.
  absl::Status u = vmm_->Unmap(scratch, g);
  if (!u.ok()) u = vmm_->Unmap(scratch, g);
  if (!u.ok()) {
    return absl::InternalError(
        absl::StrFormat("virtual layout: copy on write: unmapping the scratch granule failed: %s%s",
                        u.ToString(), s.ok() ? "" : " (after " + s.ToString() + ")"));
  }
  KVMEM_RETURN_IF_ERROR(s);
  KVMEM_RETURN_IF_ERROR(vmm_->Unmap(addr, g));
  s = vmm_->Map(addr, new_phys);
  if (!s.ok()) {
    absl::Status r = vmm_->Map(addr, old_phys);
    if (r.ok()) r = vmm_->SetAccess(addr, g);
    if (!r.ok()) {
      return absl::InternalError(absl::StrFormat(
          "virtual layout: copy on write: mapping the copy failed (%s) and mapping the "
          "original back failed too: %s",
          s.ToString(), r.ToString()));
    }
  }
  return s;
}

absl::Status VirtualLayout::UndoCopyOnWrite(uintptr_t addr, PhysHandle old_phys) {
  KVMEM_RETURN_IF_ERROR(vmm_->Unmap(addr, geo_.granularity));
  KVMEM_RETURN_IF_ERROR(vmm_->Map(addr, old_phys));
  return vmm_->SetAccess(addr, geo_.granularity);
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
  const Row& r = rows_[row];
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
    Row& r = rows_[row];
    std::vector<std::pair<int64_t, int32_t>> missing;
    if (r.live) {
      const int64_t target = MapAheadTarget(r);
      for (int64_t k = geo_.PagesFor(r.len); k < target; ++k) {
        for (int32_t s = 0; s < geo_.segments; ++s) {
          if (Entry(r, k, s) == kNoHandle) missing.emplace_back(k, s);
        }
      }
    }
    if (missing.empty()) {
      map_queue_.pop_back();
      queued_[row] = false;
      continue;
    }
    const int64_t want = static_cast<int64_t>(missing.size());
    if (static_cast<int64_t>(free_.size()) < want) {
      // Pages of fence-complete idle rows, never other live rows' pages: mapping ahead
      // for one row must not take what another has mapped ahead.
      std::vector<int32_t> freed;
      std::vector<Reclaimed> journal;
      absl::Status s = Reclaim(want - static_cast<int64_t>(free_.size()), -1,
                               /*surplus=*/false, &freed, &journal);
      if (!s.ok()) Logger()->warn("background mapper: reclaiming: {}", s.ToString());
      for (int32_t h : freed) free_.push_back(h);
      pages_reclaimed_ += static_cast<int64_t>(freed.size());
    }
    const size_t count = std::min(missing.size(), free_.size());
    if (count == 0) return false;  // the row stays queued until handles come back
    if (count == missing.size()) {
      map_queue_.pop_back();
      queued_[row] = false;
    }
    missing.resize(count);  // the lowest pages first: they are needed first
    job_ = MapJob{};
    job_.row = row;
    job_granules_.clear();
    for (const auto& [k, s] : missing) {
      const int32_t h = free_.back();
      free_.pop_back();
      Handle& hd = handles_[h];
      hd.state = HandleState::kInFlight;
      hd.seg = s;
      hd.index = k;
      Account(hd, +1);
      MutableEntry(r, k, s) = h;
      ++r.in_flight;
      job_.pos.emplace_back(k, s);
      job_.handles.push_back(h);
      job_granules_.push_back({Addr(row, k, s), hd.page.handle()});
    }
    SortGranules(&job_granules_);
    return true;
  }
  return false;
}

absl::Status VirtualLayout::RunMapAhead() {
  return MapAccessible(*vmm_, geo_.granularity, job_granules_);
}

void VirtualLayout::FinishMapAhead(absl::Status s) {
  Row& r = rows_[job_.row];
  for (size_t i = 0; i < job_.handles.size(); ++i) {
    const int32_t h = job_.handles[i];
    const auto [k, seg] = job_.pos[i];
    if (s.ok()) {
      AddMapping(h, job_.row, k, seg);
      continue;
    }
    Handle& hd = handles_[h];
    Account(hd, -1);
    hd.state = HandleState::kFree;
    hd.seg = -1;
    hd.index = -1;
    MutableEntry(r, k, seg) = kNoHandle;
    --r.in_flight;
    free_.push_back(h);
  }
  if (s.ok()) {
    ExtendPrivate(r);
    UpdatePeaks();
  } else if (r.live && !queued_[job_.row]) {
    queued_[job_.row] = true;  // retried after the mapper's back-off
    map_queue_.push_back(job_.row);
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
