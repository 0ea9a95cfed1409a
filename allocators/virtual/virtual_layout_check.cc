// The virtual layout's numbers (FillStats) and its invariants (CheckInvariants): the
// row table and the handle pool each check their half (recounting everything from the
// rows' page entries and comparing with the incrementally kept counters), and every
// mapping the records describe is compared with what the backend says is mapped there.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocators/virtual/virtual_layout.h"
#include "src/core/status_macros.h"

namespace kvmem::internal {

void VirtualLayout::FillStats(Stats* stats) const {
  absl::MutexLock lock(&mu_);  // exclusive: reading stats samples the peaks
  peak_held_bytes_ = std::max(peak_held_bytes_, HeldHandles() * geo_.granularity);
  peak_live_bytes_ = std::max(peak_live_bytes_, rows_.live_bytes());
  const int64_t g = geo_.granularity;
  stats->page_bytes = g;
  stats->pages_total = pool_.size();
  stats->pages_free = pool_.free_count();
  // Pages holding live tokens; a live row's pages beyond its length count as idle.
  stats->pages_used = HeldHandles();
  // Shared by live requests (an idle row's alias is kept only for reuse).
  stats->pages_shared = pool_.live_shared_handles();
  // Pages that only rows still waiting for their fence hold, and pages a failed undo
  // left unmapped, inaccessible or stray until a later call restores or unmaps them.
  // A fence that completed counts as such even before a call polls it (docs/errors.md).
  absl::flat_hash_set<int32_t> quarantined;
  for (const auto& [m, d] : rows_.Damaged()) quarantined.insert(m.handle);
  for (int32_t row = rows_.waiting_front(); row >= 0; row = rows_.waiting_next(row)) {
    const Row& r = rows_.row(row);
    if (r.mapped == 0 || rows_.FenceDoneConst(row)) continue;
    for (int32_t h : r.entries) {
      if (h != kNoHandle && pool_.get(h).state == HandleState::kMapped &&
          pool_.get(h).live_owners == 0) {
        quarantined.insert(h);
      }
    }
  }
  stats->pages_quarantined = static_cast<int64_t>(quarantined.size()) + pool_.quarantined_handles();
  stats->live_bytes = rows_.live_bytes();
  stats->stored_tokens = token_bytes_ == 0 ? 0 : rows_.live_bytes() / token_bytes_;
  stats->held_bytes = HeldHandles() * g;
  stats->idle_bytes = (pool_.idle_handles() + rows_.surplus_handles()) * g;
  stats->mapped_bytes = pool_.mapped_handles() * g;  // physical memory mapped (aliases once)
  stats->physical_bytes = pool_.size() * g;
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
  std::vector<int32_t> refs;
  std::vector<int32_t> live_refs;
  std::vector<int32_t> waiting_refs;
  std::vector<int32_t> in_flight;
  KVMEM_RETURN_IF_ERROR(
      rows_.CheckInvariants(live, job_.row, &refs, &live_refs, &waiting_refs, &in_flight));
  KVMEM_RETURN_IF_ERROR(pool_.CheckInvariants(refs, live_refs, waiting_refs, in_flight));
  // The incremental count against both recounts (the mutating calls never recount).
  const int64_t slow = rows_.LiveBytesSlow();
  const int64_t recount = rows_.LiveBytesRecount();
  if (slow != rows_.live_bytes() || recount != rows_.live_bytes()) {
    return absl::InternalError(absl::StrFormat(
        "virtual layout invariant: live bytes %d (incremental), %d recounted over shared pages, "
        "%d recounted per page",
        rows_.live_bytes(), slow, recount));
  }
  return CheckBackend();
}

absl::Status VirtualLayout::CheckBackend() const {
  auto fail = [](const std::string& what) {
    return absl::InternalError(absl::StrCat("virtual layout invariant: ", what));
  };
  // What the records say is at `addr` against what the backend says.
  bool unsupported = false;
  auto expect = [&](uintptr_t addr, bool mapped, int32_t h, bool accessible,
                    const std::string& where) -> absl::Status {
    absl::StatusOr<MappingState> got = vmm_->Query(addr);
    if (absl::IsUnimplemented(got.status())) {
      unsupported = true;  // a backend that cannot tell: the counts below only
      return absl::OkStatus();
    }
    if (!got.ok()) {
      return fail(absl::StrCat("querying the backend at ", where, ": ", got.status().ToString()));
    }
    const PhysHandle phys = mapped ? pool_.phys(h) : 0;
    if (got->mapped != mapped || (mapped && got->handle != phys) ||
        (mapped && got->accessible != accessible)) {
      return fail(absl::StrFormat(
          "%s: the records say %s, the backend has %s", where,
          mapped ? absl::StrFormat("handle %d (backend handle %d) mapped%s", h, phys,
                                   accessible ? " and accessible" : " without access")
                 : std::string("nothing mapped"),
          got->mapped ? absl::StrFormat("backend handle %d mapped%s", got->handle,
                                        got->accessible ? " and accessible" : " without access")
                      : std::string("nothing mapped")));
    }
    return absl::OkStatus();
  };
  const int32_t S = geo_.segments;
  for (int32_t row = 0; row < rows_.size() && !unsupported; ++row) {
    const Row& r = rows_.row(row);
    for (size_t i = 0; i < r.entries.size() && !unsupported; ++i) {
      const int64_t k = static_cast<int64_t>(i) / S;
      const int32_t s = static_cast<int32_t>(i % S);
      const uintptr_t addr = rows_.Addr(row, k, s);
      const std::string where = absl::StrFormat("row %d page %d segment %d", row, k, s);
      const int32_t h = r.entries[i];
      if (h == kNoHandle) {
        const HandlePool::Stray* stray = pool_.FindStray(addr);
        KVMEM_RETURN_IF_ERROR(expect(addr, stray != nullptr, stray ? stray->handle : kNoHandle,
                                     stray != nullptr && stray->accessible, where));
        continue;
      }
      if (pool_.get(h).state != HandleState::kMapped) continue;  // in flight: being mapped
      const Damage d = rows_.DamageAt(row, k, s);
      KVMEM_RETURN_IF_ERROR(expect(addr, d != Damage::kUnmapped, h, d == Damage::kNone, where));
    }
  }
  int64_t stray_granules = 0;
  for (const auto& [addr, stray] : pool_.strays()) {
    ++stray_granules;
    if (unsupported) break;
    KVMEM_RETURN_IF_ERROR(expect(addr, true, stray.handle, stray.accessible,
                                 absl::StrFormat("stray mapping at %#x", addr)));
  }
  if (!unsupported && pool_.FindStray(scratch_.addr()) == nullptr) {
    KVMEM_RETURN_IF_ERROR(expect(scratch_.addr(), false, kNoHandle, false, "the scratch granule"));
  }
  // The backend sees at least our mappings and handles (it may serve others too, and
  // the mapper's job may be mapped already).
  int64_t unmapped_damage = 0;
  for (const auto& [m, d] : rows_.Damaged()) unmapped_damage += d == Damage::kUnmapped;
  const int64_t ours = pool_.mapped_granules() - unmapped_damage + stray_granules;
  const VmmCounters c = vmm_->counters();
  if (c.mapped_granules < ours || c.live_handles < pool_.size()) {
    return fail(absl::StrFormat(
        "backend reports %d mapped granules and %d handles; the layout maps %d and owns %d",
        c.mapped_granules, c.live_handles, ours, pool_.size()));
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
