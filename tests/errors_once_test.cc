// Errors are reported once (docs/errors.md): FailureTally, which turns the failures of
// one call made for many resources into one phrase, and a backend destroyed with
// thousands of leaked resources, which logs one summary line.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvmem/vmm.h"
#include "spdlog/sinks/ostream_sink.h"
#include "src/core/logging.h"

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

}  // namespace
}  // namespace kvmem
