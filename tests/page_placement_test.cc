// Tests of page placement (PagePlacement, PagePool::AllocateNear): the id bitmap's words
// and AllocateNear against brute-force models, and through KvCache that
// kContiguous keeps a request's pages adjacent while holding exactly the pages, and
// mapping exactly the chunks, that kLowestFirst does.
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "src/core/page_pool.h"
#include "tests/cache_test_util.h"

namespace kvmem {
namespace {

using internal::IdBitmap;
using internal::PagePool;

TEST(IdBitmapTest, WordsMatchABruteForceModel) {
  for (int64_t size : {1, 63, 64, 65, 200, 4096, 4160, 9000}) {
    IdBitmap b(size);
    std::vector<bool> model(size, false);
    std::mt19937 rng(static_cast<uint32_t>(size));
    // Mostly inserts at first so whole words fill, then a random walk.
    for (int i = 0; i < 6000; ++i) {
      const int64_t id = std::uniform_int_distribution<int64_t>(0, size - 1)(rng);
      const bool insert = i < 3000 ? rng() % 8 != 0 : rng() % 2 == 0;
      if (insert) {
        b.Insert(id);
        model[id] = true;
      } else {
        b.Erase(id);
        model[id] = false;
      }
      const int64_t w0 = id & ~int64_t{63};
      uint64_t want = 0;
      for (int64_t j = w0; j < std::min(size, w0 + 64); ++j) {
        want |= uint64_t{model[j]} << (j - w0);
      }
      ASSERT_EQ(b.word(id >> 6), want) << "size " << size << " id " << id;
    }
  }
}

// The rules of PagePool::AllocateNear written out over a vector of free flags.
int32_t ModelAllocateNear(std::vector<bool>& free, int32_t near, int64_t limit) {
  const int64_t n = static_cast<int64_t>(free.size());
  limit = std::min(limit, n);
  auto take = [&](int64_t page) {
    if (page >= 0) free[page] = false;
    return static_cast<int32_t>(page);
  };
  if (near >= 0 && near + 1 < limit && free[near + 1]) return take(near + 1);
  auto free_in = [&](int64_t g) {
    int count = 0;
    for (int64_t j = g * 64; j < std::min(limit, g * 64 + 64); ++j) count += free[j];
    return count;
  };
  int64_t group = -1;
  if (near >= 0 && free_in(near / 64) > 0) group = near / 64;
  for (int64_t g = 0; group < 0 && g * 64 + 64 <= limit; ++g) {
    if (free_in(g) == 64) group = g;
  }
  int most = 0;
  for (int64_t g = 0; group < 0 && g * 64 < limit; ++g) most = std::max(most, free_in(g));
  for (int64_t g = 0; group < 0 && most > 0 && g * 64 < limit; ++g) {
    if (free_in(g) == most) group = g;
  }
  if (group < 0) {
    for (int64_t j = 0; j < n; ++j) {
      if (free[j]) return take(j);
    }
    return -1;
  }
  // The longest run of free pages below the limit in the group (the first of equals).
  int64_t best = -1, best_len = 0;
  for (int64_t j = group * 64; j < std::min(limit, group * 64 + 64);) {
    if (!free[j]) {
      ++j;
      continue;
    }
    int64_t e = j;
    while (e < std::min(limit, group * 64 + 64) && free[e]) ++e;
    if (e - j > best_len) {
      best = j;
      best_len = e - j;
    }
    j = e;
  }
  return take(best % 64 == 0 ? best : best + best_len / 2);
}

TEST(PagePlacementTest, AllocateNearMatchesTheModel) {
  for (int32_t pages : {5, 64, 130, 700}) {
    PagePool pool(pages);
    std::vector<bool> free(pages, true);
    std::vector<int32_t> used;
    std::mt19937 rng(static_cast<uint32_t>(pages));
    for (int i = 0; i < 4000; ++i) {
      if (used.empty() || rng() % 3 != 0) {
        const int32_t near = used.empty() || rng() % 4 == 0 ? -1 : used[rng() % used.size()];
        const int64_t limit = std::uniform_int_distribution<int64_t>(0, pages + 8)(rng);
        const int32_t want = ModelAllocateNear(free, near, limit);
        ASSERT_EQ(pool.AllocateNear(near, limit), want)
            << "pages " << pages << " op " << i << " near " << near << " limit " << limit;
        if (want >= 0) used.push_back(want);
      } else {
        const size_t k = rng() % used.size();
        ASSERT_TRUE(pool.Unref(used[k]));
        free[used[k]] = true;
        used[k] = used.back();
        used.pop_back();
      }
      ASSERT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
      ASSERT_EQ(pool.used_count(), static_cast<int64_t>(used.size()));
    }
  }
}

TEST(PagePlacementTest, AllocateNearRules) {
  PagePool pool(256);
  EXPECT_EQ(pool.AllocateNear(-1, 256), 0);   // a wholly free group: the lowest, group 0
  EXPECT_EQ(pool.AllocateNear(-1, 256), 64);  // the next request opens group 1
  EXPECT_EQ(pool.AllocateNear(0, 256), 1);    // the page after the last one
  EXPECT_EQ(pool.AllocateNear(64, 256), 65);
  // No wholly free group below 100: the group with the most free pages below 100 (group 0,
  // 62 free against 34), in the middle of its longest free run [2, 64).
  EXPECT_EQ(pool.AllocateNear(-1, 100), 33);
  EXPECT_EQ(pool.AllocateNear(1, 256), 2);  // the page after the last one
  // 66 is not below the limit and group 1 has nothing free below it: group 0 (60 free),
  // whose longest runs are [3, 33) and [34, 64): the middle of the first.
  EXPECT_EQ(pool.AllocateNear(65, 66), 18);
  EXPECT_EQ(pool.AllocateNear(255, 256), 192);  // 256 is past the pool: group 3 opens
  // Everything below the limit taken: the lowest free page, beyond the limit.
  PagePool small(70);
  for (int i = 0; i < 64; ++i) ASSERT_EQ(small.AllocateNear(i - 1, 64), i);
  EXPECT_EQ(small.AllocateNear(10, 64), 64);
  EXPECT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
  EXPECT_TRUE(small.CheckConsistency().ok()) << small.CheckConsistency();
  // Every page taken: -1.
  PagePool two(2);
  EXPECT_EQ(two.AllocateNear(-1, 2), 0);
  EXPECT_EQ(two.AllocateNear(0, 2), 1);
  EXPECT_EQ(two.AllocateNear(1, 2), -1);
}

KvCacheConfig PlacementConfig(PagePlacement placement, bool elastic) {
  KvCacheConfig c =
      test::SmallConfig(test::LayoutCase{"paged", Layout::kPaged, Arrangement::kAllLayers, 16});
  c.page_placement = placement;
  c.elastic_pool = elastic;
  c.max_requests = 16;
  return c;
}

// Four requests grown one token at a time, round robin (decode steps), to 256 tokens (16
// pages each) in a pool of 256 pages of 16 tokens (4 groups of 64) mapped whole: page i
// of request r must be want(r, i).
void ExpectRoundRobinTables(PagePlacement placement, int (*want)(int r, int i)) {
  auto cache = KvCache::Create(PlacementConfig(placement, false));
  KVMEM_ASSERT_OK(cache);
  for (int r = 0; r < 4; ++r) KVMEM_ASSERT_OK((*cache)->AddRequest(r));
  for (int64_t t = 0; t < 256; ++t) {
    for (int r = 0; r < 4; ++r) {
      KVMEM_ASSERT_OK((*cache)->Extend(r, 1));
      KVMEM_ASSERT_OK((*cache)->CheckInvariants());
    }
  }
  for (int r = 0; r < 4; ++r) {
    auto table = (*cache)->BlockTable(r);
    KVMEM_ASSERT_OK(table);
    ASSERT_EQ(table->size(), 16u);
    for (int i = 0; i < 16; ++i) EXPECT_EQ((*table)[i], want(r, i)) << "request " << r;
  }
}

TEST(PagePlacementTest, ContiguousKeepsEachRequestsPagesAdjacent) {
  ExpectRoundRobinTables(PagePlacement::kContiguous, [](int r, int i) { return 64 * r + i; });
}

TEST(PagePlacementTest, LowestFirstInterleavesRequestsThatGrowTogether) {
  ExpectRoundRobinTables(PagePlacement::kLowestFirst, [](int r, int i) { return 4 * i + r; });
}

// The same random operations on both placements: the same pages held and the same
// chunks mapped after every call (placement moves pages, never adds any), and each
// cache's invariants hold throughout.
TEST(PagePlacementTest, PlacementChangesNeitherHeldPagesNorPoolGrowth) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    auto a = KvCache::Create(PlacementConfig(PagePlacement::kContiguous, true));
    auto b = KvCache::Create(PlacementConfig(PagePlacement::kLowestFirst, true));
    KVMEM_ASSERT_OK(a);
    KVMEM_ASSERT_OK(b);
    std::mt19937 rng(seed);
    std::set<RequestId> live;
    RequestId next = 0;
    for (int op = 0; op < test::Scaled(1500); ++op) {
      const int kind = static_cast<int>(rng() % 10);
      if (live.size() < 4 || kind < 2) {
        ASSERT_EQ((*a)->AddRequest(next).ok(), (*b)->AddRequest(next).ok());
        if ((*a)->Contains(next)) live.insert(next);
        ++next;
      } else if (kind < 8) {
        const RequestId id = *std::next(live.begin(), rng() % live.size());
        const int64_t n = 1 + rng() % 40;
        ASSERT_EQ((*a)->Extend(id, n).ok(), (*b)->Extend(id, n).ok()) << "op " << op;
      } else if (kind < 9) {
        const RequestId id = *std::next(live.begin(), rng() % live.size());
        auto len = (*a)->Length(id);
        KVMEM_ASSERT_OK(len);
        const int64_t to = *len == 0 ? 0 : static_cast<int64_t>(rng() % (*len + 1));
        KVMEM_ASSERT_OK((*a)->Truncate(id, to));
        KVMEM_ASSERT_OK((*b)->Truncate(id, to));
      } else {
        const RequestId id = *std::next(live.begin(), rng() % live.size());
        KVMEM_ASSERT_OK((*a)->Free(id));
        KVMEM_ASSERT_OK((*b)->Free(id));
        live.erase(id);
      }
      KVMEM_ASSERT_OK((*a)->CheckInvariants());
      KVMEM_ASSERT_OK((*b)->CheckInvariants());
      const Stats sa = (*a)->GetStats();
      const Stats sb = (*b)->GetStats();
      ASSERT_EQ(sa.held_bytes, sb.held_bytes) << "op " << op;
      ASSERT_EQ(sa.mapped_bytes, sb.mapped_bytes) << "op " << op;
    }
  }
}

}  // namespace
}  // namespace kvmem
