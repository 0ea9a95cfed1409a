// ReclaimPolicy: which pages the virtual layout takes back, and from whom, when a row
// needs more than the free pool holds (or Trim gives memory back). It only chooses; the
// layout unmaps what it chose through a Transaction.
//
// Tier 1: fence-complete idle rows, the longest idle first, each from its highest page
// down (the row keeps a prefix, which the next request in it reuses). Tier 2 (for a
// Grow, never for the background mapper): other live rows' exclusive pages beyond their
// length (mapped ahead or kept after a Shrink); they hold no token, so taking them
// changes no data. A shared page a row writes into needs no copy when every other owner
// is a fence-complete idle row: their aliases are dropped instead.
//
// The row table keeps the donors of both tiers and the counts of what they could give
// (row_table.h, HandlePool::reclaimable_idle_handles), so nothing here scans every row:
// the cost is that of the pages chosen.
//
// Not thread-safe: the layout calls it under its mutex.
#ifndef KVMEM_ALLOCATORS_VIRTUAL_RECLAIM_H_
#define KVMEM_ALLOCATORS_VIRTUAL_RECLAIM_H_

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "allocators/virtual/handle_pool.h"
#include "allocators/virtual/row_table.h"
#include "allocators/virtual/virtual_geometry.h"

namespace kvmem::internal {

class ReclaimPolicy {
 public:
  // Asking whether an idle row's fence completed may forget the fence, hence `rows` is
  // mutable.
  ReclaimPolicy(const VirtualGeometry& geo, RowTable* rows, const HandlePool* pool)
      : geo_(geo), rows_(rows), pool_(pool) {}

  // Handles tier 1 could free: those of idle rows past their fence as far as fences have
  // been polled (RowTable::PollFences).
  int64_t ReclaimableIdle() const { return pool_->reclaimable_idle_handles(); }
  // Handles tier 2 could free without touching `exclude` (-1: none).
  int64_t ReclaimableSurplus(int32_t exclude) const {
    return rows_->surplus_handles() - (exclude >= 0 ? rows_->row(exclude).surplus : 0);
  }

  // Tier 1's donors in the order they are taken from: the first after `after` (an
  // (idle_since, row) of an earlier donor, or none for the first); -1 at the end. Taking
  // pages from a donor may drop it from the set, hence the cursor.
  int32_t NextIdleDonor(std::optional<std::pair<uint64_t, int32_t>> after) const;
  // Mappings of `row` at pages >= min_page to unmap, highest page first, whole pages,
  // until `want` handles would be freed (only exclusive ones if `only_exclusive`).
  std::vector<RowMapping> PickFromRow(int32_t row, int64_t min_page, int64_t want,
                                      bool only_exclusive) const;

  // Of the shared pages `writes` that `row` is about to write into, the other owners'
  // aliases to drop instead of copying: all of a page's, when every other owner of it is
  // a fence-complete idle row.
  std::vector<RowMapping> IdleAliases(int32_t row, absl::Span<const RowMapping> writes);

  // What Trim gives back: every mapping of every fence-complete idle row (every fence
  // polled).
  std::vector<RowMapping> TrimPicks();

 private:
  const VirtualGeometry geo_;
  RowTable* const rows_;
  const HandlePool* const pool_;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_RECLAIM_H_
