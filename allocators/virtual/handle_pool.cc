// HandlePool (allocators/virtual/handle_pool.h): the physical handles, their states and
// the counters kept over them.
#include "allocators/virtual/handle_pool.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvmem::internal {

absl::Status HandlePool::Create(Vmm* vmm, int64_t count, int64_t* created) {
  handles_.reserve(static_cast<size_t>(count));
  free_.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    absl::StatusOr<PhysicalPage> page = PhysicalPage::Make(vmm);
    if (!page.ok()) {
      *created = i;
      return page.status();
    }
    handles_.emplace_back().page = std::move(*page);
  }
  *created = count;
  // Handed out from the back: low indices first.
  for (int64_t i = count - 1; i >= 0; --i) free_.push_back(static_cast<int32_t>(i));
  return absl::OkStatus();
}

void HandlePool::Clear(std::string_view owner) {
  std::vector<PhysicalPage> pages;
  pages.reserve(handles_.size());
  for (Handle& h : handles_) pages.push_back(std::move(h.page));
  handles_.clear();
  free_.clear();
  ReleaseAllOrLog(&pages, owner);
}

int32_t HandlePool::Pop() {
  const int32_t h = free_.back();
  free_.pop_back();
  return h;
}

void HandlePool::Push(int32_t h) {
  KVMEM_VIRTUAL_CHECK(Unused(h), "handle {} goes to the free list while in use", h);
  free_.push_back(h);
}

void HandlePool::Account(const Handle& hd, int sign) {
  if (hd.state == HandleState::kInFlight) in_flight_handles_ += sign;
  if (hd.state == HandleState::kQuarantined) quarantined_handles_ += sign;
  const int64_t refs = static_cast<int64_t>(hd.owners.size());
  if (refs == 0) return;
  mapped_handles_ += sign;
  mapped_granules_ += sign * refs;
  if (hd.live_owners > 0) {
    used_handles_ += sign;
  } else {
    idle_handles_ += sign;
  }
  if (hd.live_owners > 1) live_shared_handles_ += sign;
  if (hd.live_owners == 0 && hd.waiting_owners == 0 && hd.strays == 0) {
    reclaimable_idle_handles_ += sign;
  }
}

void HandlePool::Settle(Handle& hd) {
  if (!hd.owners.empty() || hd.state == HandleState::kInFlight) return;
  hd.state = hd.strays > 0 ? HandleState::kQuarantined : HandleState::kFree;
  hd.seg = -1;
  hd.index = -1;
}

void HandlePool::AddOwner(int32_t h, int32_t row, bool live, bool waiting, int64_t page,
                          int32_t seg) {
  Handle& hd = handles_[h];
  Account(hd, -1);
  if (hd.owners.empty()) {
    hd.seg = seg;
    hd.index = page;
  }
  KVMEM_VIRTUAL_CHECK(hd.seg == seg && hd.index == page, "handle {} mapped at two positions", h);
  hd.state = HandleState::kMapped;
  hd.owners.push_back(row);
  if (live) ++hd.live_owners;
  if (waiting) ++hd.waiting_owners;
  Account(hd, +1);
  if (hd.owners.size() == 2) shared_.insert(h);
}

void HandlePool::RemoveOwner(int32_t h, int32_t row, bool live, bool waiting) {
  Handle& hd = handles_[h];
  Account(hd, -1);
  auto it = std::find(hd.owners.begin(), hd.owners.end(), row);
  KVMEM_VIRTUAL_CHECK(it != hd.owners.end(), "row {} does not map handle {}", row, h);
  hd.owners.erase(it);
  if (live) --hd.live_owners;
  if (waiting) --hd.waiting_owners;
  if (hd.owners.size() == 1) shared_.erase(h);
  Settle(hd);
  Account(hd, +1);
}

void HandlePool::OwnerTurned(int32_t h, int live_delta, int waiting_delta) {
  Handle& hd = handles_[h];
  Account(hd, -1);
  hd.live_owners += live_delta;
  hd.waiting_owners += waiting_delta;
  Account(hd, +1);
}

void HandlePool::MarkInFlight(int32_t h, int64_t page, int32_t seg) {
  Handle& hd = handles_[h];
  KVMEM_VIRTUAL_CHECK(hd.state == HandleState::kFree, "handle {} taken for the mapper twice", h);
  hd.state = HandleState::kInFlight;
  hd.seg = seg;
  hd.index = page;
  Account(hd, +1);
}

void HandlePool::EndInFlight(int32_t h) {
  Handle& hd = handles_[h];
  Account(hd, -1);
  hd.state = HandleState::kFree;
  Settle(hd);
  Account(hd, +1);
}

void HandlePool::AddStray(uintptr_t addr, int32_t h, bool accessible) {
  KVMEM_VIRTUAL_CHECK(!strays_.contains(addr), "two stray mappings at {:#x}", addr);
  Handle& hd = handles_[h];
  Account(hd, -1);
  strays_[addr] = Stray{h, accessible};
  ++hd.strays;
  if (hd.state == HandleState::kFree) hd.state = HandleState::kQuarantined;
  Account(hd, +1);
}

int32_t HandlePool::RemoveStray(uintptr_t addr) {
  auto it = strays_.find(addr);
  KVMEM_VIRTUAL_CHECK(it != strays_.end(), "no stray mapping at {:#x}", addr);
  const int32_t h = it->second.handle;
  strays_.erase(it);
  Handle& hd = handles_[h];
  Account(hd, -1);
  --hd.strays;
  if (hd.state == HandleState::kQuarantined && hd.strays == 0) hd.state = HandleState::kFree;
  Account(hd, +1);
  return h;
}

absl::Status HandlePool::CheckInvariants(absl::Span<const int32_t> refs,
                                         absl::Span<const int32_t> live_refs,
                                         absl::Span<const int32_t> waiting_refs,
                                         absl::Span<const int32_t> in_flight) const {
  auto fail = [](const std::string& what) {
    return absl::InternalError(absl::StrCat("virtual layout invariant: ", what));
  };
  const size_t n = handles_.size();
  std::vector<char> in_free(n, 0);
  for (int32_t h : free_) {
    if (h < 0 || static_cast<size_t>(h) >= n) {
      return fail(absl::StrFormat("free pool holds handle %d of %d", h, n));
    }
    if (in_free[h]++) return fail(absl::StrFormat("handle %d is in the free pool twice", h));
    if (handles_[h].state != HandleState::kFree) {
      return fail(absl::StrFormat("handle %d is in the free pool but not free", h));
    }
  }
  std::vector<int32_t> strays(n, 0);
  for (const auto& [addr, s] : strays_) {
    if (s.handle < 0 || static_cast<size_t>(s.handle) >= n) {
      return fail(absl::StrFormat("stray mapping at %#x holds handle %d", addr, s.handle));
    }
    ++strays[s.handle];
  }
  int64_t n_mapped = 0, n_granules = 0, n_used = 0, n_idle = 0, n_flight = 0, n_shared = 0;
  int64_t n_quarantined = 0, n_live_shared = 0, n_reclaimable = 0;
  for (size_t h = 0; h < n; ++h) {
    const Handle& hd = handles_[h];
    const int64_t owners = static_cast<int64_t>(hd.owners.size());
    if (hd.strays != strays[h]) {
      return fail(absl::StrFormat("handle %d counts %d stray mappings, %d are recorded", h,
                                  hd.strays, strays[h]));
    }
    switch (hd.state) {
      case HandleState::kFree:
        if (!in_free[h] || owners != 0 || in_flight[h] != 0 || hd.strays != 0) {
          return fail(absl::StrFormat(
              "free handle %d: in pool %d, %d owners, %d in-flight entries, %d strays", h,
              in_free[h], owners, in_flight[h], hd.strays));
        }
        break;
      case HandleState::kInFlight:
        if (in_free[h] || owners != 0 || in_flight[h] != 1 || hd.strays != 0) {
          return fail(
              absl::StrFormat("in-flight handle %d: in pool %d, %d owners, %d in-flight entries", h,
                              in_free[h], owners, in_flight[h]));
        }
        ++n_flight;
        break;
      case HandleState::kQuarantined:
        if (in_free[h] || owners != 0 || in_flight[h] != 0 || hd.strays == 0) {
          return fail(absl::StrFormat(
              "quarantined handle %d: in pool %d, %d owners, %d in-flight entries, %d strays", h,
              in_free[h], owners, in_flight[h], hd.strays));
        }
        ++n_quarantined;
        break;
      case HandleState::kMapped:
        if (in_free[h] || owners < 1 || owners != refs[h] || in_flight[h] != 0) {
          return fail(absl::StrFormat(
              "mapped handle %d: in pool %d, ref count %d but %d mappings under rows", h,
              in_free[h], owners, refs[h]));
        }
        if (hd.live_owners != live_refs[h] || hd.waiting_owners != waiting_refs[h]) {
          return fail(absl::StrFormat(
              "handle %d has %d live and %d waiting owners recorded, %d and %d counted", h,
              hd.live_owners, hd.waiting_owners, live_refs[h], waiting_refs[h]));
        }
        ++n_mapped;
        n_granules += owners;
        if (hd.live_owners > 0) {
          ++n_used;
        } else {
          ++n_idle;
        }
        n_live_shared += hd.live_owners > 1;
        n_reclaimable += hd.live_owners == 0 && hd.waiting_owners == 0 && hd.strays == 0;
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
  if (n_live_shared != live_shared_handles_ || n_reclaimable != reclaimable_idle_handles_) {
    return fail(absl::StrFormat(
        "recount: %d handles shared by live rows, %d reclaimable from idle rows; counters: %d %d",
        n_live_shared, n_reclaimable, live_shared_handles_, reclaimable_idle_handles_));
  }
  if (n_shared != static_cast<int64_t>(shared_.size())) {
    return fail(
        absl::StrFormat("shared set has %d handles, %d are shared", shared_.size(), n_shared));
  }
  if (n_mapped != mapped_handles_ || n_granules != mapped_granules_ || n_used != used_handles_ ||
      n_idle != idle_handles_ || n_flight != in_flight_handles_ ||
      n_quarantined != quarantined_handles_) {
    return fail(absl::StrFormat(
        "recount: mapped %d granules %d used %d idle %d in flight %d quarantined %d; counters: %d "
        "%d %d %d %d %d",
        n_mapped, n_granules, n_used, n_idle, n_flight, n_quarantined, mapped_handles_,
        mapped_granules_, used_handles_, idle_handles_, in_flight_handles_, quarantined_handles_));
  }
  if (static_cast<int64_t>(free_.size()) + n_mapped + n_flight + n_quarantined !=
      static_cast<int64_t>(n)) {
    return fail(absl::StrFormat("free %d + mapped %d + in flight %d + quarantined %d != %d handles",
                                free_.size(), n_mapped, n_flight, n_quarantined, n));
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
