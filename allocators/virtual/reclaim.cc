// ReclaimPolicy (allocators/virtual/reclaim.h): the choice of pages to take back.
#include "allocators/virtual/reclaim.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kvmem::internal {

int64_t ReclaimPolicy::ReclaimableIdle(int64_t limit) {
  std::vector<bool> done(static_cast<size_t>(rows_->size()));
  for (int32_t row = 0; row < rows_->size(); ++row) {
    done[row] = !rows_->row(row).live && rows_->FenceDone(row);
  }
  int64_t n = 0;
  for (int32_t row = 0; row < geo_.rows && n < limit; ++row) {
    if (!done[row] || rows_->row(row).mapped == 0) continue;
    for (int32_t h : rows_->row(row).entries) {
      if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped) continue;
      const auto& owners = pool_->get(h).owners;
      // Count a handle once, at its first owner, if every owner gives it up.
      if (*std::min_element(owners.begin(), owners.end()) != row) continue;
      if (std::all_of(owners.begin(), owners.end(), [&](int32_t o) { return done[o]; })) ++n;
    }
  }
  return n;
}

int64_t ReclaimPolicy::ReclaimableSurplus(int32_t exclude, int64_t limit) const {
  int64_t n = 0;
  for (int32_t row = 0; row < geo_.rows && n < limit; ++row) {
    const Row& r = rows_->row(row);
    if (!r.live || row == exclude) continue;
    for (int64_t k = geo_.PagesFor(r.len); k < rows_->PageLimit(row); ++k) {
      for (int32_t s = 0; s < geo_.segments; ++s) {
        const int32_t h = rows_->Entry(row, k, s);
        if (h != kNoHandle && pool_->get(h).state == HandleState::kMapped &&
            pool_->ref_count(h) == 1) {
          ++n;
        }
      }
    }
  }
  return n;
}

std::vector<int32_t> ReclaimPolicy::IdleDonors() {
  std::vector<int32_t> idle;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_->row(row);
    if (!r.live && r.mapped > 0 && rows_->FenceDone(row)) idle.push_back(row);
  }
  std::sort(idle.begin(), idle.end(), [&](int32_t a, int32_t b) {
    return rows_->row(a).idle_since < rows_->row(b).idle_since;
  });
  return idle;
}

std::vector<int32_t> ReclaimPolicy::SurplusDonors(int32_t exclude) const {
  std::vector<int32_t> out;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_->row(row);
    if (r.live && row != exclude && r.mapped > 0) out.push_back(row);
  }
  return out;
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
    const auto& owners = pool_->get(w.handle).owners;
    const bool idle_only = std::all_of(owners.begin(), owners.end(), [&](int32_t o) {
      return o == row || (!rows_->row(o).live && rows_->FenceDone(o));
    });
    if (!idle_only) continue;
    for (int32_t o : owners) {
      if (o != row) aliases.push_back({o, w.page, w.seg, w.handle});
    }
  }
  return aliases;
}

std::vector<RowMapping> ReclaimPolicy::TrimPicks() {
  std::vector<RowMapping> items;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_->row(row);
    if (r.live || r.mapped == 0 || !rows_->FenceDone(row)) continue;
    std::vector<RowMapping> all = rows_->Mappings(row, 0, /*only_shared=*/false);
    items.insert(items.end(), all.begin(), all.end());
  }
  return items;
}

}  // namespace kvmem::internal
