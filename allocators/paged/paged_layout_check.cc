// PagedLayout (allocators/paged/paged_layout.h): its Stats and CheckInvariants, which
// compares the records with what the backend says it maps.
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocators/paged/paged_layout.h"
#include "src/core/status_macros.h"

namespace kvmem::internal {
namespace {

// A broken invariant found by CheckInvariants.
template <typename... Args>
absl::Status Corrupt(const absl::FormatSpec<Args...>& format, const Args&... args) {
  return absl::InternalError(absl::StrCat("paged layout: ", absl::StrFormat(format, args...)));
}

}  // namespace

void PagedLayout::FillStats(Stats* s) const {
  const int64_t page_bytes = pt_ * config_.TokenBytes();
  const StrandedMappings::Count left = stranded_.count();
  const int64_t mapped = (mapped_chunks() * geo_.num_pools + left.mapped) * geo_.granularity;
  s->page_bytes = page_bytes;
  s->pages_total = geo_.num_pages;
  // Pages whose fence has completed are free to the next allocation: they count free
  // whether or not a call has reclaimed them yet (a failed Extend may have), so the
  // numbers depend on the state alone, not on which calls ran.
  const int64_t pending =
      pool_.PendingCount([this](const Fence& f) { return vmm_->FenceComplete(f); });
  // Free pages in a chunk that a failed undo left partly mapped wait for a later call to
  // unmap it: quarantined, not free (docs/errors.md, rule 8).
  const int64_t stranded = StrandedPages();
  s->pages_free = pool_.free_count() + (pool_.quarantined_count() - pending) - stranded;
  s->pages_used = HeldPages();
  s->pages_shared = pool_.shared_count();
  s->pages_quarantined = pending + stranded;
  s->stored_tokens = stored_tokens_;
  s->live_bytes = stored_tokens_ * config_.TokenBytes();
  s->held_bytes = HeldPages() * page_bytes;
  s->idle_bytes = (usable_pages_ - HeldPages()) * page_bytes;
  s->mapped_bytes = mapped;
  // Every handle is mapped exactly once, but for ones whose release failed.
  s->physical_bytes = mapped + left.unreleased * geo_.granularity;
  s->peak_held_bytes = peak_held_bytes_;
  s->peak_live_bytes = peak_live_bytes_;
  s->cow_copies = cow_copies_;
  s->pool_create_nanos = pool_create_nanos_;
  s->vmm = vmm_->counters();
}

absl::Status PagedLayout::CheckInvariants(
    const std::vector<std::pair<int32_t, int64_t>>& live) const {
  const int32_t num_rows = config_.max_requests;
  std::vector<int64_t> want(num_rows, -1);
  for (const auto& [row, len] : live) {
    if (row < 0 || row >= num_rows) return Corrupt("live row %d out of range", row);
    if (want[row] >= 0) return Corrupt("row %d listed twice", row);
    want[row] = len;
  }
  std::vector<int32_t> owners(geo_.num_pages, 0);
  std::vector<int32_t> partial(geo_.num_pages, 0);
  std::vector<int64_t> partial_sum(geo_.num_pages, 0);
  std::vector<int64_t> fill(geo_.num_pages, 0);
  int64_t live_rows = 0;
  for (int32_t row = 0; row < num_rows; ++row) {
    const Row& r = rows_[row];
    if (want[row] < 0) {
      if (r.live) return Corrupt("row %d is live in the layout but no request holds it", row);
      if (r.len != 0 || !r.pages.empty()) {
        return Corrupt("idle row %d owns %d tokens in %d pages", row, r.len, r.pages.size());
      }
      if (!free_rows_.Contains(row)) return Corrupt("idle row %d is not in the free row set", row);
      for (int64_t pos = 0; pos < index_.high_water(row); ++pos) {
        if (index_.Get(row, pos) != -1) {
          return Corrupt("idle row %d has slot %d at position %d", row, index_.Get(row, pos), pos);
        }
      }
      continue;
    }
    ++live_rows;
    if (!r.live) return Corrupt("row %d holds a request but the layout has it idle", row);
    if (free_rows_.Contains(row)) return Corrupt("live row %d is in the free row set", row);
    if (r.len != want[row]) {
      return Corrupt("row %d has %d tokens in the layout, %d in the cache", row, r.len, want[row]);
    }
    if (static_cast<int64_t>(r.pages.size()) != PagesFor(r.len)) {
      return Corrupt("row %d with %d tokens has %d pages, want %d", row, r.len, r.pages.size(),
                     PagesFor(r.len));
    }
    for (size_t i = 0; i < r.pages.size(); ++i) {
      const int32_t p = r.pages[i];
      if (p < 0 || p >= geo_.num_pages) return Corrupt("row %d holds page %d out of range", row, p);
      if (p >= usable_pages_) {
        return Corrupt("row %d holds page %d beyond the %d mapped pages", row, p, usable_pages_);
      }
      ++owners[p];
      const bool last = i + 1 == r.pages.size();
      const int64_t f = last && r.len % pt_ != 0 ? r.len % pt_ : pt_;
      fill[p] = std::max(fill[p], f);
      if (f != pt_) {
        ++partial[p];
        partial_sum[p] += f;
      }
    }
    for (int64_t pos = 0; pos < r.len; ++pos) {
      const int64_t slot = Slot(r.pages[pos / pt_], pos % pt_);
      if (index_.Get(row, pos) != slot) {
        return Corrupt("row %d position %d: index has slot %d, block table gives %d", row, pos,
                       index_.Get(row, pos), slot);
      }
    }
    for (int64_t pos = r.len; pos < std::max(index_.high_water(row), r.len + 1); ++pos) {
      if (pos >= config_.max_context) break;
      if (index_.Get(row, pos) != -1) {
        return Corrupt("row %d with %d tokens has slot %d at position %d", row, r.len,
                       index_.Get(row, pos), pos);
      }
    }
  }
  if (live_rows + free_rows_.count() != num_rows) {
    return Corrupt("%d live rows + %d free rows != %d rows", live_rows, free_rows_.count(),
                   num_rows);
  }
  KVMEM_RETURN_IF_ERROR(pool_.CheckConsistency());
  int64_t stored = 0;
  for (int32_t p = 0; p < geo_.num_pages; ++p) {
    if (owners[p] != pool_.owners(p)) {
      return Corrupt("page %d has refcount %d (pinned %d) but %d live rows hold it", p,
                     pool_.refcount(p), pool_.pinned(p), owners[p]);
    }
    const auto shared = shared_fills_.find(p);
    if ((partial[p] >= 2) != (shared != shared_fills_.end())) {
      return Corrupt("page %d: %d rows end in it, but its fills are %stracked", p, partial[p],
                     shared != shared_fills_.end() ? "" : "not ");
    }
    if (shared != shared_fills_.end()) {
      int64_t n = 0;
      int64_t sum = 0;
      for (const auto& [f, count] : shared->second) {
        n += count;
        sum += f * count;
      }
      if (n != partial[p] || sum != partial_sum[p]) {
        return Corrupt("page %d: %d rows end in it filling %d slots; its fills say %d rows, %d", p,
                       partial[p], partial_sum[p], n, sum);
      }
    }
    if (partial[p] != partial_refs_[p] || partial_sum[p] != partial_sum_[p]) {
      return Corrupt("page %d: %d rows end in it filling %d slots; tracked %d rows, %d slots", p,
                     partial[p], partial_sum[p], partial_refs_[p], partial_sum_[p]);
    }
    stored += fill[p];
  }
  if (stored != stored_tokens_) {
    return Corrupt("stored tokens %d, recount %d", stored_tokens_, stored);
  }
  const int64_t highest = pool_.HighestNonFree();
  if (highest >= usable_pages_) {
    return Corrupt("page %d is used or quarantined beyond the %d mapped pages", highest,
                   usable_pages_);
  }
  // Pages beyond the mapped ones must all be free; the rest are free, used or quarantined.
  int64_t free_mapped = 0, free_unmapped = 0;
  for (int32_t p = 0; p < geo_.num_pages; ++p) {
    if (pool_.is_free(p)) (p < usable_pages_ ? free_mapped : free_unmapped)++;
  }
  const int64_t unmapped = geo_.num_pages - usable_pages_;
  if (free_unmapped != unmapped) {
    return Corrupt("%d of the %d unmapped pages are free", free_unmapped, unmapped);
  }
  if (free_mapped + pool_.used_count() + pool_.quarantined_count() + unmapped != geo_.num_pages) {
    return Corrupt("free %d + used %d + quarantined %d + unmapped %d != %d pages", free_mapped,
                   pool_.used_count(), pool_.quarantined_count(), unmapped, geo_.num_pages);
  }
  if (mapped_chunks() > geo_.chunks_total) {
    return Corrupt("%d chunks mapped, the pool has %d", mapped_chunks(), geo_.chunks_total);
  }
  if (!config_.elastic_pool && mapped_chunks() != geo_.chunks_total) {
    return Corrupt("fixed pool has %d of its %d chunks mapped", mapped_chunks(), geo_.chunks_total);
  }
  if (usable_pages_ != UsablePagesFor(mapped_chunks())) {
    return Corrupt("%d usable pages but %d chunks map %d", usable_pages_, mapped_chunks(),
                   UsablePagesFor(mapped_chunks()));
  }
  for (size_t c = 0; c < chunks_.size(); ++c) {
    if (static_cast<int64_t>(chunks_[c].size()) != geo_.num_pools) {
      return Corrupt("chunk %d has %d handles, want %d", c, chunks_[c].size(), geo_.num_pools);
    }
    for (const PhysicalPage& h : chunks_[c]) {
      if (!h.valid()) return Corrupt("chunk %d holds a released handle", c);
    }
  }
  // What failed undos left: granules outside the pool's chunks, handles still owned.
  for (const auto& [addr, g] : stranded_.mapped()) {
    const int64_t offset = static_cast<int64_t>(addr - reservation_.addr());
    const int64_t pool = offset / geo_.region_bytes;
    if (addr < reservation_.addr() || pool >= geo_.num_pools ||
        offset % geo_.region_bytes != g.chunk * geo_.granularity) {
      return Corrupt("a granule left mapped at %#x is recorded as chunk %d, which is not there",
                     addr, g.chunk);
    }
    if (g.chunk < mapped_chunks() || g.chunk >= geo_.chunks_total) {
      return Corrupt("chunk %d of pool %d is left mapped outside the pool, which maps %d of %d",
                     g.chunk, pool, mapped_chunks(), geo_.chunks_total);
    }
    if (!g.page.valid())
      return Corrupt("chunk %d of pool %d left mapped has no handle", g.chunk, pool);
  }
  for (const PhysicalPage& h : stranded_.unreleased()) {
    if (!h.valid()) return Corrupt("a handle waiting to be released is released");
  }
  return CheckBackend();
}

absl::Status PagedLayout::CheckBackend() const {
  const int64_t gran = geo_.granularity;
  bool unsupported = false;
  // What the records say is at granule `chunk` of `pool` (`page` mapped there, or nothing
  // for null) against what the backend says.
  auto expect = [&](int64_t pool, int64_t chunk, const PhysicalPage* page,
                    bool accessible) -> absl::Status {
    absl::StatusOr<MappingState> got = vmm_->Query(PoolBase(pool) + chunk * gran);
    if (absl::IsUnimplemented(got.status())) {
      unsupported = true;  // a backend that cannot tell: the counts below only
      return absl::OkStatus();
    }
    if (!got.ok()) {
      return Corrupt("querying the backend at chunk %d of pool %d: %s", chunk, pool,
                     got.status().ToString());
    }
    const bool mapped = page != nullptr;
    if (got->mapped == mapped &&
        (!mapped || (got->handle == page->handle() && got->accessible == accessible))) {
      return absl::OkStatus();
    }
    auto say = [](bool mapped, PhysHandle h, bool accessible) {
      return mapped ? absl::StrFormat("handle %d mapped%s", h,
                                      accessible ? " and accessible" : " without access")
                    : std::string("nothing mapped");
    };
    return Corrupt("chunk %d of pool %d: the records say %s, the backend has %s", chunk, pool,
                   say(mapped, mapped ? page->handle() : 0, accessible),
                   say(got->mapped, got->handle, got->accessible));
  };
  for (int64_t c = 0; c < mapped_chunks() && !unsupported; ++c) {
    for (int64_t i = 0; i < geo_.num_pools; ++i) {
      KVMEM_RETURN_IF_ERROR(expect(i, c, &chunks_[c][i], /*accessible=*/true));
    }
  }
  for (const auto& [addr, g] : stranded_.mapped()) {
    if (unsupported) break;
    const int64_t pool = static_cast<int64_t>(addr - reservation_.addr()) / geo_.region_bytes;
    KVMEM_RETURN_IF_ERROR(expect(pool, g.chunk, &g.page, g.accessible));
  }
  // Where the pool grows next, nothing but what the records hold.
  const int64_t next = mapped_chunks();
  for (int64_t i = 0; i < geo_.num_pools && next < geo_.chunks_total && !unsupported; ++i) {
    if (stranded_.mapped().contains(PoolBase(i) + next * gran)) continue;
    KVMEM_RETURN_IF_ERROR(expect(i, next, nullptr, false));
  }
  // The backend holds at least these (it may serve others too).
  const StrandedMappings::Count left = stranded_.count();
  const int64_t mapped = mapped_chunks() * geo_.num_pools + left.mapped;
  const VmmCounters counters = vmm_->counters();
  if (counters.mapped_granules < mapped || counters.live_handles < mapped + left.unreleased) {
    return Corrupt(
        "the backend reports %d mapped granules and %d handles; the layout maps %d "
        "and owns %d",
        counters.mapped_granules, counters.live_handles, mapped, mapped + left.unreleased);
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
