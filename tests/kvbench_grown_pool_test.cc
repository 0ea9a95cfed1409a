// Tests of kvbench's grown pools (tools/kvbench/grown_pool.h), the paged page tables that
// `kvbench decode` times by default: valid tables (every page in the pool, none shared,
// a full row per request), deterministic for a seed, and the placement they are there to
// show: contiguous pages under PagePlacement::kContiguous, interleaved under kLowestFirst.
#include <cstdint>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "tools/kvbench/grown_pool.h"

namespace kvbench {
namespace {

using kvmem::PagePlacement;

void ExpectValid(const GrownPool& pool, int batch, int64_t ctx, int page_tokens) {
  EXPECT_EQ(pool.stride, (ctx + page_tokens - 1) / page_tokens);
  ASSERT_EQ(static_cast<int64_t>(pool.table.size()), pool.stride * batch);
  EXPECT_GE(pool.num_pages, pool.stride * batch);
  std::set<int32_t> seen;
  for (int32_t page : pool.table) {
    ASSERT_GE(page, 0);
    ASSERT_LT(page, pool.num_pages);
    ASSERT_TRUE(seen.insert(page).second) << "page " << page << " held twice";
  }
}

TEST(GrownPoolTest, TablesAreValidForEveryPlacementAndPool) {
  for (PagePlacement placement : {PagePlacement::kContiguous, PagePlacement::kLowestFirst}) {
    for (bool elastic : {false, true}) {
      for (int page_tokens : {1, 3, 16, 256}) {
        SCOPED_TRACE(testing::Message() << "placement " << static_cast<int>(placement)
                                        << " elastic " << elastic << " page " << page_tokens);
        absl::StatusOr<GrownPool> pool = GrowPool(8, 1000, page_tokens, placement, elastic, 3);
        ASSERT_TRUE(pool.ok()) << pool.status();
        ExpectValid(*pool, 8, 1000, page_tokens);
      }
    }
  }
}

TEST(GrownPoolTest, DeterministicForASeed) {
  absl::StatusOr<GrownPool> a = GrowPool(16, 2048, 16, PagePlacement::kContiguous, true, 7);
  absl::StatusOr<GrownPool> b = GrowPool(16, 2048, 16, PagePlacement::kContiguous, true, 7);
  absl::StatusOr<GrownPool> c = GrowPool(16, 2048, 16, PagePlacement::kContiguous, true, 8);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->table, b->table);
  EXPECT_EQ(a->num_pages, b->num_pages);
  EXPECT_NE(a->table, c->table);
}

// What docs/kernels.md reports for the default pool (a fixed one): 98.9 % of consecutive
// pages adjacent under kContiguous at B=16..128, 10-18 % under kLowestFirst.
TEST(GrownPoolTest, ContiguousPlacementKeepsRequestsPagesAdjacent) {
  absl::StatusOr<GrownPool> contiguous =
      GrowPool(16, 4096, 16, PagePlacement::kContiguous, /*elastic=*/false, 1);
  absl::StatusOr<GrownPool> lowest =
      GrowPool(16, 4096, 16, PagePlacement::kLowestFirst, /*elastic=*/false, 1);
  ASSERT_TRUE(contiguous.ok()) << contiguous.status();
  ASSERT_TRUE(lowest.ok()) << lowest.status();
  EXPECT_GT(AdjacentShare(contiguous->table, contiguous->stride), 0.95);
  EXPECT_LT(AdjacentShare(lowest->table, lowest->stride), 0.3);
}

TEST(GrownPoolTest, AdjacentShareCountsWithinRows) {
  // Rows of 3: (4 5 6) two adjacent pairs, (7 9 8) none; 6 -> 7 crosses rows.
  EXPECT_DOUBLE_EQ(AdjacentShare({4, 5, 6, 7, 9, 8}, 3), 0.5);
  EXPECT_DOUBLE_EQ(AdjacentShare({1, 2}, 1), 1.0);  // no pairs within a row
  // Rows of 4 using 3 and 2 pages: the unused entries (0) are not pairs.
  EXPECT_DOUBLE_EQ(AdjacentShare({4, 5, 6, 0, 8, 7, 0, 0}, 4, {3, 2}), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(AdjacentShare({4, 5, 6, 0, 8, 7, 0, 0}, 4), 2.0 / 6.0);
}

TEST(GrownPoolTest, RejectsEmptyShapes) {
  EXPECT_EQ(GrowPool(0, 16, 16, PagePlacement::kContiguous, false, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GrowPool(4, 0, 16, PagePlacement::kContiguous, false, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GrowPool(4, 16, 0, PagePlacement::kContiguous, false, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvbench
