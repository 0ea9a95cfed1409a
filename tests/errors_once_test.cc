// Errors are reported once (docs/errors.md): FailureTally, which turns the failures of
// one call made for many resources into one phrase, a backend destroyed with thousands
// of leaked resources, which logs one summary line, and a cache destroyed with freed
// requests behind fences, which reports only those whose fence has not completed.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "kvmem/vmm.h"
#include "spdlog/sinks/ostream_sink.h"
#include "src/core/logging.h"
#include "tests/cache_test_util.h"

namespace kvmem {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kGran = 4096;

// Lines the kvmem logger writes while it lives.
class LogCapture {
 public:
  LogCapture() : sink_(std::make_shared<spdlog::sinks::ostream_sink_mt>(out_)) {
    internal::Logger()->sinks().push_back(sink_);
  }
  ~LogCapture() { internal::Logger()->sinks().pop_back(); }
  std::string text() const { return out_.str(); }
  int64_t lines() const {
    const std::string t = out_.str();
    return std::count(t.begin(), t.end(), '\n');
  }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::sinks::ostream_sink_mt> sink_;
};

TEST(FailureTally, SummarisesCountsAndTheFirstError) {
  internal::FailureTally t("cuMemRelease of physical handles");
  EXPECT_EQ(t.Summary(), "");
  t.Succeeded();
  t.Failed("handle 7: boom");
  t.Failed("handle 9: bang");
  t.Succeeded();
  EXPECT_EQ(t.Summary(),
            "cuMemRelease of physical handles: 2 of 4 failed (the first: handle 7: boom)");
  internal::FailureTally none("x");
  none.Succeeded();
  EXPECT_EQ(internal::JoinFailures({&none}, "released them"), "released them");
  EXPECT_EQ(internal::JoinFailures({&none, &t, &t}, "-"),
            absl::StrCat(t.Summary(), "; ", t.Summary()));
}

// A backend destroyed with thousands of leaked resources logs one line, not one each.
TEST(LeakSummary, HostBackendDestroyedWithManyLeaksLogsOneLine) {
  LogCapture log;
  {
    absl::StatusOr<std::unique_ptr<Vmm>> made = MakeHostVmm(kGran);
    ASSERT_TRUE(made.ok()) << made.status();
    std::unique_ptr<Vmm> vmm = *std::move(made);
    constexpr int kHandles = 2000;
    absl::StatusOr<uintptr_t> r = vmm->Reserve(kHandles * kGran);
    ASSERT_TRUE(r.ok()) << r.status();
    for (int i = 0; i < kHandles; ++i) {
      absl::StatusOr<PhysHandle> h = vmm->Create();
      ASSERT_TRUE(h.ok()) << h.status();
      if (i % 2 == 0) {
        ASSERT_TRUE(vmm->Map(*r + i * kGran, *h).ok());
      }
    }
  }
  EXPECT_EQ(log.lines(), 1) << log.text();
  EXPECT_THAT(
      log.text(),
      HasSubstr("1 reservations, 2000 physical handles, 1000 mapped granules; releasing them"));
}

// A cache destroyed while a freed request's fence is pending says so in one line. Once
// the fence has completed (the engine synchronised its stream) nothing is waiting, though
// no call has looked at the fence since: the destruction logs nothing.
TEST(FenceSummary, CacheDestroyedAfterItsFencesCompletedReportsNoneWaiting) {
  for (const test::LayoutCase& layout : test::AllLayouts()) {
    for (const bool completed : {false, true}) {
      SCOPED_TRACE(absl::StrCat(layout.name, completed ? ", fence completed" : ", fence pending"));
      std::atomic<bool> done{false};
      int64_t quarantined = 0;
      LogCapture log;
      {
        absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(test::SmallConfig(layout));
        ASSERT_TRUE(cache.ok()) << cache.status();
        ASSERT_TRUE((*cache)->AddRequest(1).ok());
        ASSERT_TRUE((*cache)->Extend(1, 40).ok());
        const absl::Status freed = (*cache)->Free(1, Fence{&done});
        ASSERT_TRUE(freed.ok()) << freed;
        quarantined = (*cache)->GetStats().pages_quarantined;
        done = completed;
      }
      if (completed) {
        EXPECT_EQ(log.lines(), 0) << log.text();
      } else if (layout.layout == Layout::kPaged) {
        ASSERT_GT(quarantined, 0);
        EXPECT_EQ(log.lines(), 1) << log.text();
        EXPECT_THAT(log.text(),
                    HasSubstr(absl::StrCat(quarantined, " pages still waiting on fences")));
      } else {
        EXPECT_EQ(log.lines(), 1) << log.text();
        EXPECT_THAT(log.text(), HasSubstr("1 rows wait for their fence"));
      }
    }
  }
}

}  // namespace
}  // namespace kvmem
