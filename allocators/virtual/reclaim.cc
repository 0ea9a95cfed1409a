// ReclaimPolicy (allocators/virtual/reclaim.h): the choice of pages to take back.
#include "allocators/virtual/reclaim.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kvmem::internal {

int32_t ReclaimPolicy::NextIdleDonor(std::optional<std::pair<uint64_t, int32_t>> after) const {
  const auto& donors = rows_->idle_donors();
  auto it = after.has_value() ? donors.upper_bound(*after) : donors.begin();
  return it == donors.end() ? -1 : it->second;
}

std::vector<RowMapping> ReclaimPolicy::PickFromRow(int32_t row, int64_t min_page, int64_t want,
                                                   bool only_exclusive) const {
  std::vector<RowMapping> items;
  int64_t frees = 0;
  for (int64_t k = rows_->PageLimit(row) - 1; k >= min_page && frees < want; --k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t h = rows_->Entry(row, k, s);
      if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped) continue;
      const int64_t refs = pool_->ref_count(h);
      if (only_exclusive && refs != 1) continue;
      items.push_back({row, k, s, h});
      if (refs == 1) ++frees;
    }
  }
  return items;
}

std::vector<RowMapping> ReclaimPolicy::IdleAliases(int32_t row,
                                                   absl::Span<const RowMapping> writes) {
  std::vector<RowMapping> aliases;
  for (const RowMapping& w : writes) {
    const Handle& hd = pool_->get(w.handle);
    // `row` is live: any other live owner keeps the page (O(1) for the common case of a
    // prefix shared by live requests).
    if (hd.live_owners != 1) continue;
    if (hd.waiting_owners > 0) {
      const bool all_done = std::all_of(hd.owners.begin(), hd.owners.end(),
                                        [&](int32_t o) { return o == row || rows_->FenceDone(o); });
      if (!all_done) continue;
    }
    for (int32_t o : hd.owners) {
      if (o != row) aliases.push_back({o, w.page, w.seg, w.handle});
    }
  }
  return aliases;
}

std::vector<RowMapping> ReclaimPolicy::TrimPicks() {
  rows_->PollFences(/*all=*/true);
  std::vector<RowMapping> items;
  for (const auto& [since, row] : rows_->idle_donors()) {
    std::vector<RowMapping> all = rows_->Mappings(row, 0, /*only_shared=*/false);
    items.insert(items.end(), all.begin(), all.end());
  }
  return items;
}

}  // namespace kvmem::internal
