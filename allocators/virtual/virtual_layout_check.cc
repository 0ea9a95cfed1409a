// The virtual layout's numbers (FillStats) and its invariants (CheckInvariants): the
// invariants recount everything from the rows' page entries and compare with the
// incrementally kept counters.
#include <algorithm>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocators/virtual/virtual_layout.h"

namespace kvmem::internal {

void VirtualLayout::FillStats(Stats* stats) const {
  absl::MutexLock lock(&mu_);  // exclusive: reading stats samples the peaks
  peak_held_bytes_ = std::max(peak_held_bytes_, HeldHandles() * geo_.granularity);
  peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
  const int64_t g = geo_.granularity;
  stats->page_bytes = g;
  stats->pages_total = static_cast<int64_t>(handles_.size());
  stats->pages_free = static_cast<int64_t>(free_.size());
  // Pages holding live tokens; a live row's pages beyond its length count as idle.
  stats->pages_used = HeldHandles();
  // Shared by live requests (an idle row's alias is kept only for reuse).
  int64_t shared_live = 0;
  for (int32_t h : shared_) shared_live += handles_[h].live_owners > 1;
  stats->pages_shared = shared_live;
  // Pages that only rows still waiting for their fence hold.
  absl::flat_hash_set<int32_t> quarantined;
  for (const Row& r : rows_) {
    if (r.live || r.mapped == 0 || FenceDoneConst(r)) continue;
    for (int32_t h : r.entries) {
      if (h != kNoHandle && handles_[h].state == HandleState::kMapped &&
          handles_[h].live_owners == 0) {
        quarantined.insert(h);
      }
    }
  }
  stats->pages_quarantined = static_cast<int64_t>(quarantined.size());
  stats->live_bytes = live_bytes_;
  stats->stored_tokens = token_bytes_ == 0 ? 0 : live_bytes_ / token_bytes_;
  stats->held_bytes = HeldHandles() * g;
  stats->idle_bytes = (idle_handles_ + surplus_handles_) * g;
  stats->mapped_bytes = mapped_handles_ * g;  // physical memory mapped (aliases once)
  stats->physical_bytes = static_cast<int64_t>(handles_.size()) * g;
  stats->peak_held_bytes = peak_held_bytes_;
  stats->peak_live_bytes = peak_live_bytes_;
  stats->cow_copies = cow_copies_;
  stats->pages_reclaimed = pages_reclaimed_;
  stats->map_stalls = map_stalls_;
  stats->pool_create_nanos = pool_create_nanos_;
  stats->vmm = vmm_->counters();
}

absl::Status VirtualLayout::CheckInvariants(
    const std::vector<std::pair<int32_t, int64_t>>& live) const {
  absl::ReaderMutexLock lock(&mu_);
  auto fail = [](const std::string& what) {
    return absl::InternalError(absl::StrCat("virtual layout invariant: ", what));
  };
  const size_t num_handles = handles_.size();
  const int32_t S = geo_.segments;

  // Live rows agree with the cache.
  std::vector<int64_t> live_len(rows_.size(), -1);
  for (const auto& [row, len] : live) {
    if (row < 0 || row >= geo_.rows) return fail(absl::StrFormat("live row %d out of range", row));
    if (live_len[row] >= 0) return fail(absl::StrFormat("row %d listed live twice", row));
    if (len < 0 || len > geo_.max_context) {
      return fail(absl::StrFormat("row %d has length %d", row, len));
    }
    live_len[row] = len;
  }
  int64_t num_live = 0;
  int64_t tokens = 0;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_[row];
    if (r.live != (live_len[row] >= 0)) {
      return fail(absl::StrFormat("row %d is %s here but %s for the cache", row,
                                  r.live ? "live" : "idle", r.live ? "not live" : "live"));
    }
    if (r.live && r.len != live_len[row]) {
      return fail(absl::StrFormat("row %d has %d tokens here, %d for the cache", row, r.len,
                                  live_len[row]));
    }
    if (!r.live && r.len != 0) {
      return fail(absl::StrFormat("idle row %d still has length %d", row, r.len));
    }
    if (r.live) {
      ++num_live;
      tokens += r.len;
    }
  }
  if (num_live != live_rows_ || tokens != live_tokens_) {
    return fail(absl::StrFormat("%d live rows with %d tokens, counters say %d and %d", num_live,
                                tokens, live_rows_, live_tokens_));
  }

  // The free pool.
  std::vector<char> in_free(num_handles, 0);
  for (int32_t h : free_) {
    if (h < 0 || static_cast<size_t>(h) >= num_handles) {
      return fail(absl::StrFormat("free pool holds handle %d of %d", h, num_handles));
    }
    if (in_free[h]++) return fail(absl::StrFormat("handle %d is in the free pool twice", h));
    if (handles_[h].state != HandleState::kFree) {
      return fail(absl::StrFormat("handle %d is in the free pool but not free", h));
    }
  }

  // Recount every mapping from the rows.
  std::vector<int32_t> refs(num_handles, 0);
  std::vector<int32_t> live_refs(num_handles, 0);
  std::vector<int32_t> in_flight(num_handles, 0);
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_[row];
    int64_t mapped = 0;
    int64_t flying = 0;
    const int64_t need = r.live ? geo_.PagesFor(r.len) : 0;
    if (r.entries.size() % S != 0 ||
        static_cast<int64_t>(r.entries.size()) > geo_.pages_per_request()) {
      return fail(absl::StrFormat("row %d has %d page entries", row, r.entries.size()));
    }
    for (size_t i = 0; i < r.entries.size(); ++i) {
      const int32_t h = r.entries[i];
      if (h == kNoHandle) continue;
      const int64_t k = static_cast<int64_t>(i) / S;
      const int32_t s = static_cast<int32_t>(i % S);
      if (h < 0 || static_cast<size_t>(h) >= num_handles) {
        return fail(absl::StrFormat("row %d page %d segment %d holds handle %d", row, k, s, h));
      }
      const Handle& hd = handles_[h];
      if (hd.seg != s || hd.index != k) {
        return fail(absl::StrFormat(
            "handle %d is under row %d at (segment %d, page %d) but recorded at (%d, %d)", h, row,
            s, k, hd.seg, hd.index));
      }
      switch (hd.state) {
        case HandleState::kFree:
          return fail(
              absl::StrFormat("row %d page %d segment %d maps free handle %d", row, k, s, h));
        case HandleState::kInFlight:
          if (job_.row != row) {
            return fail(absl::StrFormat("handle %d is in flight under row %d, not the job's %d", h,
                                        row, job_.row));
          }
          ++in_flight[h];
          ++flying;
          break;
        case HandleState::kMapped:
          if (std::count(hd.owners.begin(), hd.owners.end(), row) != 1) {
            return fail(
                absl::StrFormat("row %d maps handle %d but is not once among its owners", row, h));
          }
          ++refs[h];
          if (r.live) ++live_refs[h];
          ++mapped;
          if (r.live && k >= need && hd.owners.size() > 1) {
            return fail(absl::StrFormat(
                "live row %d of %d tokens maps shared handle %d at page %d beyond its %d pages",
                row, r.len, h, k, need));
          }
          break;
      }
    }
    if (mapped != r.mapped || flying != r.in_flight) {
      return fail(absl::StrFormat("row %d maps %d pages (%d in flight), its counters say %d (%d)",
                                  row, mapped, flying, r.mapped, r.in_flight));
    }
    if (r.live) {
      for (int64_t k = 0; k < need; ++k) {
        for (int32_t s = 0; s < S; ++s) {
          const int32_t h = Entry(r, k, s);
          if (h == kNoHandle || handles_[h].state != HandleState::kMapped) {
            return fail(absl::StrFormat(
                "live row %d of %d tokens: page %d of segment %d is not mapped", row, r.len, k, s));
          }
        }
      }
      if (r.private_lo > r.private_hi) {
        return fail(
            absl::StrFormat("row %d private range [%d, %d)", row, r.private_lo, r.private_hi));
      }
      for (int64_t k = r.private_lo; k < r.private_hi; ++k) {
        if (!PagePrivate(r, k)) {
          return fail(
              absl::StrFormat("row %d page %d is in its private range [%d, %d) but is not "
                              "mapped exclusively in every segment",
                              row, k, r.private_lo, r.private_hi));
        }
      }
    }
  }

  // Every handle in exactly one place; counters agree with the recount.
  int64_t n_mapped = 0, n_granules = 0, n_used = 0, n_idle = 0, n_flight = 0, n_shared = 0;
  int64_t live_bytes = 0;
  for (size_t h = 0; h < num_handles; ++h) {
    const Handle& hd = handles_[h];
    const int64_t owners = static_cast<int64_t>(hd.owners.size());
    switch (hd.state) {
      case HandleState::kFree:
        if (!in_free[h] || owners != 0 || in_flight[h] != 0) {
          return fail(absl::StrFormat("free handle %d: in pool %d, %d owners, %d in-flight entries",
                                      h, in_free[h], owners, in_flight[h]));
        }
        break;
      case HandleState::kInFlight:
        if (in_free[h] || owners != 0 || in_flight[h] != 1) {
          return fail(
              absl::StrFormat("in-flight handle %d: in pool %d, %d owners, %d in-flight entries", h,
                              in_free[h], owners, in_flight[h]));
        }
        ++n_flight;
        break;
      case HandleState::kMapped:
        if (in_free[h] || owners < 1 || owners != refs[h] || in_flight[h] != 0) {
          return fail(absl::StrFormat(
              "mapped handle %d: in pool %d, ref count %d but %d mappings under rows", h,
              in_free[h], owners, refs[h]));
        }
        if (hd.live_owners != live_refs[h]) {
          return fail(absl::StrFormat("handle %d has %d live owners recorded, %d counted", h,
                                      hd.live_owners, live_refs[h]));
        }
        ++n_mapped;
        n_granules += owners;
        if (hd.live_owners > 0) {
          ++n_used;
          int64_t covered = 0;
          for (int32_t o : hd.owners) {
            if (rows_[o].live)
              covered = std::max(covered, geo_.CoveredBytes(rows_[o].len, hd.index));
          }
          live_bytes += covered;
        } else {
          ++n_idle;
        }
        if (owners > 1) {
          ++n_shared;
          if (!shared_.contains(static_cast<int32_t>(h))) {
            return fail(
                absl::StrFormat("handle %d has %d owners but is not in the shared set", h, owners));
          }
        }
        break;
    }
  }
  // Pages of live rows beyond their length: counted, and never shared (Stats subtracts
  // them from held bytes one handle each).
  int64_t n_surplus = 0;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_[row];
    if (!r.live) continue;
    for (int64_t k = geo_.PagesFor(r.len); k < PageLimit(r); ++k) {
      for (int32_t s = 0; s < S; ++s) {
        const int32_t h = Entry(r, k, s);
        if (h == kNoHandle || handles_[h].state != HandleState::kMapped) continue;
        if (handles_[h].owners.size() != 1) {
          return fail(
              absl::StrFormat("row %d maps shared handle %d at page %d, beyond its %d "
                              "tokens",
                              row, h, k, r.len));
        }
        ++n_surplus;
      }
    }
  }
  if (n_surplus != surplus_handles_) {
    return fail(absl::StrFormat("%d pages mapped beyond live rows' lengths, counter says %d",
                                n_surplus, surplus_handles_));
  }
  if (n_shared != static_cast<int64_t>(shared_.size())) {
    return fail(
        absl::StrFormat("shared set has %d handles, %d are shared", shared_.size(), n_shared));
  }
  if (n_mapped != mapped_handles_ || n_granules != mapped_granules_ || n_used != used_handles_ ||
      n_idle != idle_handles_ || n_flight != in_flight_handles_) {
    return fail(absl::StrFormat(
        "recount: mapped %d granules %d used %d idle %d in flight %d; counters: %d %d %d %d %d",
        n_mapped, n_granules, n_used, n_idle, n_flight, mapped_handles_, mapped_granules_,
        used_handles_, idle_handles_, in_flight_handles_));
  }
  if (static_cast<int64_t>(free_.size()) + n_mapped + n_flight !=
      static_cast<int64_t>(num_handles)) {
    return fail(absl::StrFormat("free %d + mapped %d + in flight %d != %d handles", free_.size(),
                                n_mapped, n_flight, num_handles));
  }
  if (live_bytes != live_bytes_) {
    return fail(absl::StrFormat("live bytes recounted %d, counter %d", live_bytes, live_bytes_));
  }
  // The backend sees at least our mappings and handles (it may serve others too, and
  // the mapper's job may be mapped already).
  const VmmCounters c = vmm_->counters();
  if (c.mapped_granules < n_granules || c.live_handles < static_cast<int64_t>(num_handles)) {
    return fail(absl::StrFormat(
        "backend reports %d mapped granules and %d handles; the layout maps %d and owns %d",
        c.mapped_granules, c.live_handles, n_granules, num_handles));
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
