// Tests of the page bookkeeping (src/page_pool.h): the id bitmap, lowest-first
// allocation, ref counts and the fenced quarantine. Plain C++, no memory backend.
#include "src/core/page_pool.h"

#include <atomic>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem::internal {
namespace {

TEST(IdBitmapTest, LowestAndHighestAbsentAcrossWords) {
  for (int64_t size : {1, 63, 64, 65, 200, 4096, 4097, 10000}) {
    IdBitmap b(size);
    EXPECT_EQ(b.Lowest(), -1);
    EXPECT_EQ(b.HighestAbsent(), size - 1);
    std::set<int64_t> model;
    std::mt19937 rng(size);
    for (int i = 0; i < 3000; ++i) {
      const int64_t id = std::uniform_int_distribution<int64_t>(0, size - 1)(rng);
      if (rng() % 2) {
        EXPECT_EQ(b.Insert(id), model.insert(id).second);
      } else {
        EXPECT_EQ(b.Erase(id), model.erase(id) == 1);
      }
      ASSERT_EQ(b.count(), static_cast<int64_t>(model.size()));
      ASSERT_EQ(b.Lowest(), model.empty() ? -1 : *model.begin()) << "size " << size;
      int64_t absent = size - 1;
      while (absent >= 0 && model.count(absent)) --absent;
      ASSERT_EQ(b.HighestAbsent(), absent) << "size " << size;
      ASSERT_EQ(b.Contains(id), model.count(id) == 1);
    }
  }
}

TEST(PagePoolTest, AllocatesLowestFirstAndReusesLowest) {
  PagePool pool(100);
  EXPECT_EQ(pool.free_count(), 100);
  for (int32_t want = 0; want < 10; ++want) EXPECT_EQ(pool.Allocate(), want);
  EXPECT_EQ(pool.used_count(), 10);
  EXPECT_EQ(pool.HighestNonFree(), 9);
  EXPECT_TRUE(pool.Unref(7));
  EXPECT_TRUE(pool.Unref(3));
  EXPECT_EQ(pool.LowestFree(), 3);
  EXPECT_EQ(pool.Allocate(), 3);
  EXPECT_EQ(pool.Allocate(), 7);
  EXPECT_EQ(pool.Allocate(), 10);
  EXPECT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
}

TEST(PagePoolTest, ExhaustionReturnsMinusOne) {
  PagePool pool(3);
  EXPECT_EQ(pool.Allocate(), 0);
  EXPECT_EQ(pool.Allocate(), 1);
  EXPECT_EQ(pool.Allocate(), 2);
  EXPECT_EQ(pool.Allocate(), -1);
  EXPECT_EQ(pool.free_count(), 0);
  EXPECT_EQ(pool.used_count(), 3);
  EXPECT_TRUE(pool.CheckConsistency().ok());
  PagePool empty(0);
  EXPECT_EQ(empty.Allocate(), -1);
  EXPECT_EQ(empty.HighestNonFree(), -1);
}

TEST(PagePoolTest, RefCountsAndSharedCount) {
  PagePool pool(8);
  const int32_t p = pool.Allocate();
  pool.AddRef(p);
  pool.AddRef(p);
  EXPECT_EQ(pool.refcount(p), 3);
  EXPECT_EQ(pool.shared_count(), 1);
  EXPECT_FALSE(pool.Unref(p));
  EXPECT_EQ(pool.shared_count(), 1);
  EXPECT_FALSE(pool.Unref(p));
  EXPECT_EQ(pool.shared_count(), 0);
  EXPECT_EQ(pool.used_count(), 1);
  EXPECT_FALSE(pool.is_free(p));
  EXPECT_TRUE(pool.Unref(p));
  EXPECT_TRUE(pool.is_free(p));
  EXPECT_EQ(pool.used_count(), 0);
  EXPECT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
}

TEST(PagePoolTest, QuarantinedPagesWaitForTheirFence) {
  PagePool pool(6);
  for (int i = 0; i < 6; ++i) pool.Allocate();
  std::atomic<bool> a{false}, b{false};
  const Fence fa{&a}, fb{&b};
  auto complete = [](const Fence& f) {
    return f.event == nullptr || static_cast<std::atomic<bool>*>(f.event)->load();
  };
  EXPECT_TRUE(pool.Unref(0, fa));
  EXPECT_TRUE(pool.Unref(1, fa));
  EXPECT_TRUE(pool.Unref(2, fb));
  EXPECT_TRUE(pool.Unref(3));  // no fence: free at once
  EXPECT_EQ(pool.quarantined_count(), 3);
  EXPECT_EQ(pool.free_count(), 1);
  EXPECT_FALSE(pool.is_free(0));
  EXPECT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
  // Quarantined pages are not handed out.
  EXPECT_EQ(pool.Allocate(), 3);
  EXPECT_EQ(pool.Allocate(), -1);
  EXPECT_EQ(pool.Reclaim(complete, /*scan_all=*/true), 0);
  // b completes first: the cheap scan stops at a (pending, older); the full one finds b.
  b = true;
  EXPECT_EQ(pool.Reclaim(complete, /*scan_all=*/false), 0);
  EXPECT_EQ(pool.Reclaim(complete, /*scan_all=*/true), 1);
  EXPECT_TRUE(pool.is_free(2));
  EXPECT_EQ(pool.quarantined_count(), 2);
  EXPECT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
  a = true;
  EXPECT_EQ(pool.Reclaim(complete, /*scan_all=*/false), 2);
  EXPECT_EQ(pool.quarantined_count(), 0);
  EXPECT_EQ(pool.Allocate(), 0);
  EXPECT_EQ(pool.Allocate(), 1);
  EXPECT_EQ(pool.Allocate(), 2);
  EXPECT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
}

// A page one owner dropped under a pending fence counts as shared for writers until the
// fence completes, even when the remaining owner is alone on it.
TEST(PagePoolTest, WriteNeedsCopyWhileADroppedOwnersFenceIsPending) {
  PagePool pool(4);
  std::atomic<bool> done{false};
  auto complete = [](const Fence& f) { return static_cast<std::atomic<bool>*>(f.event)->load(); };
  const int32_t p = pool.Allocate();
  EXPECT_FALSE(pool.WriteNeedsCopy(p, complete));
  pool.AddRef(p);
  EXPECT_TRUE(pool.WriteNeedsCopy(p, complete));
  pool.Unref(p, Fence{&done});
  EXPECT_EQ(pool.refcount(p), 1);
  EXPECT_TRUE(pool.WriteNeedsCopy(p, complete));
  done = true;
  EXPECT_FALSE(pool.WriteNeedsCopy(p, complete));
  // Dropped without a fence: nothing to wait for.
  pool.AddRef(p);
  pool.Unref(p);
  EXPECT_FALSE(pool.WriteNeedsCopy(p, complete));
  EXPECT_TRUE(pool.CheckConsistency().ok());
}

TEST(PagePoolTest, HighestNonFreeCountsQuarantine) {
  PagePool pool(130);
  for (int i = 0; i < 100; ++i) pool.Allocate();
  std::atomic<bool> done{false};
  for (int32_t p = 99; p >= 50; --p) pool.Unref(p, Fence{&done});
  EXPECT_EQ(pool.HighestNonFree(), 99);  // quarantined pages must stay mapped
  done = true;
  pool.Reclaim([](const Fence& f) { return static_cast<std::atomic<bool>*>(f.event)->load(); },
               false);
  EXPECT_EQ(pool.HighestNonFree(), 49);
}

TEST(PagePoolTest, RandomOpsKeepCountersConsistent) {
  PagePool pool(300);
  std::mt19937 rng(7);
  std::vector<int32_t> refs;  // one entry per reference held
  std::vector<std::atomic<bool>> fences(4);
  for (int i = 0; i < 5000; ++i) {
    const int op = rng() % 5;
    if (op <= 1) {
      const int32_t p = pool.Allocate();
      if (p >= 0) refs.push_back(p);
    } else if (op == 2 && !refs.empty()) {
      const int32_t p = refs[rng() % refs.size()];
      pool.AddRef(p);
      refs.push_back(p);
    } else if (op == 3 && !refs.empty()) {
      const size_t k = rng() % refs.size();
      const int f = rng() % 5;
      pool.Unref(refs[k], f < 4 ? Fence{&fences[f]} : Fence{});
      refs.erase(refs.begin() + k);
    } else if (op == 4) {
      fences[rng() % 4] = (rng() % 2) != 0;
      pool.Reclaim([](const Fence& f) { return static_cast<std::atomic<bool>*>(f.event)->load(); },
                   rng() % 2);
    }
    std::vector<int32_t> count(300, 0);
    for (int32_t p : refs) ++count[p];
    for (int32_t p = 0; p < 300; ++p) ASSERT_EQ(pool.refcount(p), count[p]);
    ASSERT_TRUE(pool.CheckConsistency().ok()) << pool.CheckConsistency();
  }
}

}  // namespace
}  // namespace kvmem::internal
