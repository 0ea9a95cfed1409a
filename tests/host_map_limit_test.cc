// The host backend at the process's real mapping limit (vm.max_map_count; it cannot be
// lowered without root). Each scenario runs in a forked child, which uses up the
// limit with mappings of its own (one PROT_NONE region whose pages alternate in
// protection: a mapping per page) and exits with a code the parent checks, so the test
// process itself never runs out. Proves that Create rejects a pool that cannot fit, with
// the numbers and the fixes; that at the limit Map fails with ResourceExhausted and
// Unmap still works (it needs no new mapping), so a cache that meets the limit fails
// cleanly, changes nothing, and gives everything back through Free, Trim and its
// destructor. Skips (saying why) where the limit is unreadable or too large to reach in
// a few seconds.
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "kvmem/vmm.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {
namespace {

using absl::StatusCode;

constexpr int64_t kPage = 4096;
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kUnderAsan = true;
#else
constexpr bool kUnderAsan = false;
#endif
// Limits above this take too long to fill in a unit test.
constexpr int64_t kMaxLimit = int64_t{1} << 20;

int64_t MaxMapCount() {
  std::ifstream in("/proc/sys/vm/max_map_count");
  int64_t v = -1;
  if (!(in >> v)) return -1;
  return v;
}

int64_t Mappings() {
  std::ifstream maps("/proc/self/maps");
  int64_t n = 0;
  for (std::string line; std::getline(maps, line);) ++n;
  return n;
}

// Whether one more mapping can be made now (a page, unmapped again at once).
bool CanMap() {
  void* p = mmap(nullptr, kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  munmap(p, kPage);
  return true;
}

// Mappings of the child's own that use up the limit: pages of one PROT_NONE region,
// every other one made readable, so that each page is a mapping of its own.
class Filler {
 public:
  explicit Filler(int64_t limit) : pages_(limit + 64) {
    base_ = static_cast<char*>(mmap(nullptr, pages_ * kPage, PROT_NONE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  }
  bool ok() const { return base_ != MAP_FAILED; }

  // Adds mappings until the process has at most `free` left below the limit, or, with
  // free < 0, until the kernel refuses one (the process is at its limit).
  bool FillTo(int64_t limit, int64_t free) {
    const int64_t target = limit - free;
    int64_t count = Mappings();
    while (next_ + 1 < pages_) {
      if (free >= 0 && count >= target) return true;
      // A page in the middle of a mapping: it splits in three, two more mappings.
      if (mprotect(base_ + next_ * kPage, kPage, PROT_READ) != 0) return free < 0;
      next_ += 2;
      count += next_ == 2 ? 1 : 2;
      if (free >= 0 && count > target) count = Mappings();  // the estimate overshot
    }
    return false;
  }

  // Gives `n` mappings back (the last pages made readable become PROT_NONE again and
  // merge with their neighbours).
  void Release(int64_t n) {
    for (int64_t i = 0; i < n && next_ >= 2; ++i) {
      next_ -= 2;
      mprotect(base_ + next_ * kPage, kPage, PROT_NONE);
    }
  }

 private:
  int64_t pages_;
  int64_t next_ = 0;
  char* base_ = nullptr;
};

// Runs `body` in a forked child and returns its exit code (128 + signal if killed). The
// child reports what failed on stderr; the parent's output shows it.
int RunInChild(const std::function<int()>& body) {
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(60);  // a hang fails the test instead of blocking it
    int code = 100;
    // Never back into GoogleTest: the child is a copy of the test process.
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "child threw\n");
    }
    fflush(stderr);
    _exit(code);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

#define CHILD_CHECK(cond, code, ...)                           \
  do {                                                         \
    if (!(cond)) {                                             \
      std::fprintf(stderr, "child check failed: %s: ", #cond); \
      std::fprintf(stderr, __VA_ARGS__);                       \
      std::fprintf(stderr, "\n");                              \
      return code;                                             \
    }                                                          \
  } while (0)

class HostMapLimitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    limit_ = MaxMapCount();
    if (limit_ < 0) GTEST_SKIP() << "/proc/sys/vm/max_map_count is unreadable";
    if (limit_ > kMaxLimit) {
      GTEST_SKIP() << "vm.max_map_count = " << limit_ << " is more than " << kMaxLimit
                   << " mappings: too many to use up in a unit test";
    }
  }
  int64_t limit_ = -1;
};

// The backend alone: at the limit Map fails with ResourceExhausted naming the limit, and
// Unmap, Release and FreeReservation all still work, giving mappings back.
TEST_F(HostMapLimitTest, BackendUnmapsAtTheLimit) {
  const int64_t limit = limit_;
  const int code = RunInChild([limit]() -> int {
    absl::StatusOr<std::unique_ptr<Vmm>> made = MakeHostVmm(kPage);
    CHILD_CHECK(made.ok(), 2, "%s", made.status().ToString().c_str());
    Vmm& vmm = **made;
    constexpr int64_t kGranules = 512;
    absl::StatusOr<uintptr_t> base = vmm.Reserve(2 * kGranules * kPage);
    CHILD_CHECK(base.ok(), 3, "%s", base.status().ToString().c_str());
    std::vector<PhysHandle> handles;
    // Every other granule: each mapping stands alone, none merges with another.
    for (int64_t i = 0; i < kGranules; ++i) {
      absl::StatusOr<PhysHandle> h = vmm.Create();
      CHILD_CHECK(h.ok(), 4, "%s", h.status().ToString().c_str());
      handles.push_back(*h);
      const uintptr_t at = *base + 2 * i * kPage;
      absl::Status s = vmm.Map(at, *h);
      if (s.ok()) s = vmm.SetAccess(at, kPage);
      CHILD_CHECK(s.ok(), 5, "%s", s.ToString().c_str());
    }
    absl::StatusOr<PhysHandle> spare = vmm.Create();
    CHILD_CHECK(spare.ok(), 6, "%s", spare.status().ToString().c_str());

    Filler filler(limit);
    CHILD_CHECK(filler.ok(), 7, "filler mmap failed");
    CHILD_CHECK(filler.FillTo(limit, -1), 8, "could not reach the limit");
    while (CanMap()) {  // a split may still fit below the limit: use the last ones up
      void* p = mmap(nullptr, kPage, PROT_READ, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) break;
    }
    CHILD_CHECK(!CanMap(), 9, "still below the limit");

    // Map at the limit: ResourceExhausted, nothing changed.
    const VmmCounters before = vmm.counters();
    absl::Status m = vmm.Map(*base + kPage, *spare);
    CHILD_CHECK(m.code() == StatusCode::kResourceExhausted, 10, "%s", m.ToString().c_str());
    CHILD_CHECK(absl::StrContains(m.message(), "vm.max_map_count"), 11, "%s", m.ToString().c_str());
    CHILD_CHECK(vmm.counters().mapped_granules == before.mapped_granules, 12, "map moved");

    // Unmap at the limit works, and gives mappings back: one can be made again.
    absl::Status u = vmm.Unmap(*base, kPage);
    CHILD_CHECK(u.ok(), 13, "%s", u.ToString().c_str());
    CHILD_CHECK(vmm.counters().mapped_granules == kGranules - 1, 14, "granule still counted");
    CHILD_CHECK(CanMap(), 15, "unmapping gave no mapping back");

    // At the limit again, every other granule goes, then the handles and the reservation.
    CHILD_CHECK(filler.FillTo(limit, -1), 16, "could not reach the limit again");
    for (int64_t i = 1; i < kGranules; ++i) {
      absl::Status s = vmm.Unmap(*base + 2 * i * kPage, kPage);
      CHILD_CHECK(s.ok(), 17, "granule %ld: %s", static_cast<long>(i), s.ToString().c_str());
    }
    for (PhysHandle h : handles) {
      absl::Status s = vmm.Release(h);
      CHILD_CHECK(s.ok(), 18, "%s", s.ToString().c_str());
    }
    CHILD_CHECK(vmm.Release(*spare).ok(), 19, "release of the spare handle");
    absl::Status f = vmm.FreeReservation(*base, 2 * kGranules * kPage);
    CHILD_CHECK(f.ok(), 20, "%s", f.ToString().c_str());
    const VmmCounters after = vmm.counters();
    CHILD_CHECK(
        after.live_reservations == 0 && after.live_handles == 0 && after.mapped_granules == 0, 21,
        "leaked");
    CHILD_CHECK(CanMap(), 22, "the mappings did not come back");
    return 0;
  });
  EXPECT_EQ(code, 0) << "see the child's message above";
}

// Create checks a pool against the limit: one that cannot fit any process is
// InvalidArgument; one that fits, but not beside the mappings the process has now,
// ResourceExhausted. Both messages give the numbers and the three fixes.
TEST_F(HostMapLimitTest, CreateRejectsAPoolPastTheLimit) {
  for (const LayoutCase& layout : AllLayouts()) {
    SCOPED_TRACE(layout.name);
    KvCacheConfig config = SmallConfig(layout);
    config.max_requests = 64;
    config.max_context = 65536;  // every row at max_context maps far more than the limit
    config.memory_budget_bytes = (limit_ + 1024) * config.host_granularity;
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    ASSERT_EQ(cache.status().code(), StatusCode::kInvalidArgument) << cache.status();
    const std::string message(cache.status().message());
    for (const std::string& want :
         {std::string("vm.max_map_count"), absl::StrCat(limit_), std::string("sysctl"),
          std::string("host_granularity"), std::string("memory_budget_bytes")}) {
      EXPECT_TRUE(absl::StrContains(message, want)) << "want '" << want << "' in: " << message;
    }
  }
  const int64_t limit = limit_;
  const int code = RunInChild([limit]() -> int {
    Filler filler(limit);
    CHILD_CHECK(filler.ok(), 2, "filler mmap failed");
    // Leave 3000 mappings (2744 for a cache, with the 256 kept for the process).
    CHILD_CHECK(filler.FillTo(limit, 3000), 3, "could not fill");
    for (const LayoutCase& layout : AllLayouts()) {
      KvCacheConfig config = SmallConfig(layout);
      config.max_requests = 64;
      config.max_context = 8192;
      config.memory_budget_bytes = 4000 * config.host_granularity;  // ~4000 mappings
      absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
      CHILD_CHECK(cache.status().code() == StatusCode::kResourceExhausted, 4, "%s: %s",
                  layout.name.c_str(), cache.status().ToString().c_str());
      const std::string message(cache.status().message());
      CHILD_CHECK(absl::StrContains(message, "vm.max_map_count") &&
                      absl::StrContains(message, "sysctl") &&
                      absl::StrContains(message, "memory_budget_bytes <="),
                  5, "%s", message.c_str());
      // A smaller budget fits beside them.
      config.memory_budget_bytes = 1000 * config.host_granularity;
      absl::StatusOr<std::unique_ptr<KvCache>> small = KvCache::Create(config);
      CHILD_CHECK(small.ok(), 6, "%s: %s", layout.name.c_str(), small.status().ToString().c_str());
    }
    return 0;
  });
  EXPECT_EQ(code, 0) << "see the child's message above";
}

// A cache that meets the limit while it grows: the failing Extend is ResourceExhausted
// and changes nothing; Free, Trim and the destructor still give everything back.
TEST_F(HostMapLimitTest, CacheMeetsTheLimitCleanly) {
  if (kUnderAsan) {
    // Meeting the limit leaves no mapping free, and AddressSanitizer's allocator maps
    // memory for itself: any allocation of the failing call (its status message) may
    // then abort the process. The normal build runs this test.
    GTEST_SKIP() << "AddressSanitizer's allocator cannot allocate at the process's mapping "
                    "limit; the build without sanitizers runs this test";
  }
  for (const LayoutCase& layout : AllLayouts()) {
    SCOPED_TRACE(layout.name);
    const int64_t limit = limit_;
    const int code = RunInChild([limit, layout]() -> int {
      KvCacheConfig config = SmallConfig(layout);
      config.max_requests = 4;
      config.max_context = 8192;
      config.memory_budget_bytes = 2000 * config.host_granularity;
      absl::StatusOr<std::unique_ptr<Vmm>> made = MakeHostVmm(config.host_granularity);
      CHILD_CHECK(made.ok(), 2, "%s", made.status().ToString().c_str());
      std::shared_ptr<Vmm> vmm = *std::move(made);
      config.vmm = vmm;
      absl::StatusOr<std::unique_ptr<KvCache>> created = KvCache::Create(config);
      CHILD_CHECK(created.ok(), 3, "%s", created.status().ToString().c_str());
      std::unique_ptr<KvCache> cache = *std::move(created);
      CacheModel model(cache.get());
      CHILD_CHECK(model.Add(1).ok() && model.Add(2).ok(), 4, "AddRequest");

      // Leave 300 mappings, less than the budget needs: the cache meets the limit first.
      Filler filler(limit);
      CHILD_CHECK(filler.ok() && filler.FillTo(limit, 300), 5, "could not fill");
      // Two requests growing in turn: their pages interleave, so no two adjacent ones
      // merge into one mapping.
      // A granule of every pool or row per step (a paged pool maps a granule of each).
      const int64_t step =
          layout.layout == Layout::kPaged
              ? std::max<int64_t>(1, config.host_granularity / config.TokenLayerBytes())
              : TokensPerPage(config);
      const std::vector<RequestId> ids = {1, 2};
      bool met = false;
      for (int i = 0; i < 4000 && !met; ++i) {
        const RequestId id = 1 + i % 2;
        if (model.LengthOf(id) + step > config.max_context) break;
        const Snapshot before = TakeSnapshot(*cache, ids, /*with_data=*/false);
        absl::StatusOr<std::vector<int64_t>> s = model.Extend(id, step);
        if (s.ok()) continue;
        met = true;
        CHILD_CHECK(s.status().code() == StatusCode::kResourceExhausted, 6, "%s",
                    s.status().ToString().c_str());
        CHILD_CHECK(absl::StrContains(s.status().message(), "vm.max_map_count"), 7, "%s",
                    s.status().ToString().c_str());
        const std::string diff =
            SnapshotDiff(before, TakeSnapshot(*cache, ids, /*with_data=*/false));
        CHILD_CHECK(diff.empty(), 8, "the failed Extend changed: %s", diff.c_str());
      }
      CHILD_CHECK(met, 9, "the cache never met the limit");
      absl::Status inv = cache->CheckInvariants();
      CHILD_CHECK(inv.ok(), 10, "%s", inv.ToString().c_str());
      absl::Status data = model.VerifyAll();
      CHILD_CHECK(data.ok(), 11, "%s", data.ToString().c_str());

      // Everything goes back, at the limit.
      CHILD_CHECK(model.Free(1).ok() && model.Free(2).ok(), 12, "Free");
      absl::StatusOr<int64_t> trimmed = cache->Trim();
      CHILD_CHECK(trimmed.ok(), 13, "%s", trimmed.status().ToString().c_str());
      CHILD_CHECK(vmm->counters().mapped_granules == 0, 14, "%ld granules still mapped",
                  static_cast<long>(vmm->counters().mapped_granules));
      CHILD_CHECK(CanMap(), 15, "no mapping came back");
      inv = cache->CheckInvariants();
      CHILD_CHECK(inv.ok(), 16, "%s", inv.ToString().c_str());
      // And it works again.
      CHILD_CHECK(model.Add(3).ok(), 17, "AddRequest after Trim");
      absl::StatusOr<std::vector<int64_t>> again = model.Extend(3, 8 * step);
      CHILD_CHECK(again.ok(), 18, "%s", again.status().ToString().c_str());
      cache.reset();
      const VmmCounters c = vmm->counters();
      CHILD_CHECK(c.live_reservations == 0 && c.live_handles == 0 && c.mapped_granules == 0, 19,
                  "leaked: %ld reservations, %ld handles, %ld granules",
                  static_cast<long>(c.live_reservations), static_cast<long>(c.live_handles),
                  static_cast<long>(c.mapped_granules));
      return 0;
    });
    EXPECT_EQ(code, 0) << "see the child's message above";
  }
}

}  // namespace
}  // namespace kvmem::test
