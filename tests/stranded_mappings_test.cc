// StrandedMappings (allocators/paged/stranded_mappings.h): the paged layout's record of
// what failed undos leave in the backend. Its retry unmaps each run of adjacent granules
// with one call, then releases the handles; what fails again stays recorded, exactly as
// the backend holds it; and what is left is given back at destruction.
#include "allocators/paged/stranded_mappings.h"

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/cache_test_util.h"

namespace kvmem::internal {
namespace {

constexpr int64_t kGran = 4096;
constexpr absl::StatusCode kCode = absl::StatusCode::kUnavailable;

// A host backend behind a fault-injecting one, and a reservation of 8 granules in it.
struct Backend {
  std::shared_ptr<Vmm> host;
  std::shared_ptr<FaultInjectingVmm> fault;
  Reservation reservation;

  uintptr_t Addr(int64_t i) const { return reservation.addr() + i * kGran; }
  VmmCounters counters() const { return host->counters(); }
};

void MakeBackend(Backend* b) {
  absl::StatusOr<std::unique_ptr<Vmm>> host = MakeHostVmm(kGran);
  ASSERT_TRUE(host.ok()) << host.status();
  b->host = *std::move(host);
  b->fault = std::make_shared<FaultInjectingVmm>(b->host);
  absl::StatusOr<Reservation> r = Reservation::Make(b->fault.get(), 8 * kGran);
  ASSERT_TRUE(r.ok()) << r.status();
  b->reservation = *std::move(r);
}

// A new handle, mapped at granule i (and made accessible when `access`) unless i < 0.
PhysicalPage NewPage(Backend& b, int64_t i, bool access) {
  absl::StatusOr<PhysicalPage> page = PhysicalPage::Make(b.fault.get());
  EXPECT_TRUE(page.ok()) << page.status();
  if (!page.ok()) return {};
  if (i >= 0) {
    KVMEM_EXPECT_OK(b.fault->Map(b.Addr(i), page->handle()));
    if (access) KVMEM_EXPECT_OK(b.fault->SetAccess(b.Addr(i), kGran));
  }
  return *std::move(page);
}

class StrandedMappingsTest : public ::testing::Test {
 protected:
  void SetUp() override { MakeBackend(&b_); }
  // Nothing is recorded any more, and the backend holds no mapping and no handle.
  void ExpectAllGivenBack() const {
    EXPECT_TRUE(s_.empty());
    EXPECT_EQ(b_.counters().mapped_granules, 0);
    EXPECT_EQ(b_.counters().live_handles, 0);
  }

  Backend b_;
  StrandedMappings s_;  // destroyed before the backend it holds handles of
};

TEST_F(StrandedMappingsTest, RetryUnmapsEachRunOnceThenReleases) {
  // Granules 1, 2 and 3 (one run; 3 without access) and 6.
  for (int64_t i : {1, 2, 3, 6}) s_.AddMapped(b_.Addr(i), i, NewPage(b_, i, i != 3), i != 3);
  EXPECT_EQ(s_.count().mapped, 4);
  EXPECT_EQ(s_.Chunks(), (std::vector<int64_t>{1, 2, 3, 6}));
  EXPECT_TRUE(s_.AnyMappedIn(3, 4));
  EXPECT_FALSE(s_.AnyMappedIn(4, 6));
  EXPECT_FALSE(s_.AnyMappedIn(7, 8));

  b_.fault->FailFrom(VmmOp::kUnmap, 1, kCode);
  const int64_t unmaps = b_.fault->calls(VmmOp::kUnmap);
  const absl::Status failed = s_.Retry(b_.fault.get(), kGran);
  EXPECT_EQ(failed.code(), kCode) << failed;
  EXPECT_EQ(b_.fault->calls(VmmOp::kUnmap) - unmaps, 2);  // one per run
  EXPECT_EQ(s_.count().mapped, 4);                        // still mapped, as the backend says
  EXPECT_EQ(b_.counters().mapped_granules, 4);
  EXPECT_EQ(b_.counters().live_handles, 4);

  b_.fault->DisarmAll();
  const int64_t releases = b_.fault->calls(VmmOp::kRelease);
  KVMEM_EXPECT_OK(s_.Retry(b_.fault.get(), kGran));
  EXPECT_EQ(b_.fault->calls(VmmOp::kUnmap) - unmaps, 4);
  EXPECT_EQ(b_.fault->calls(VmmOp::kRelease) - releases, 4);
  ExpectAllGivenBack();
}

TEST_F(StrandedMappingsTest, AHandleWhoseReleaseFailsIsKeptAndSaid) {
  const StrandedMappings::Count before = s_.count();
  std::vector<PhysicalPage> pages;
  for (int i = 0; i < 3; ++i) pages.push_back(NewPage(b_, -1, false));
  b_.fault->FailFrom(VmmOp::kRelease, 2, kCode);  // the first release works
  const absl::Status failed = s_.Release(&pages);
  EXPECT_EQ(failed.code(), kCode) << failed;
  EXPECT_TRUE(pages.empty());
  EXPECT_EQ(s_.count().unreleased, 2);
  EXPECT_EQ(s_.count().mapped, 0);
  EXPECT_EQ(b_.counters().live_handles, 2);
  std::vector<std::string> notes;
  s_.DescribeSince(before, &notes);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_TRUE(absl::StrContains(notes[0], "2 physical handle(s)")) << notes[0];
  notes.clear();
  s_.DescribeSince(s_.count(), &notes);
  EXPECT_TRUE(notes.empty());

  // Still failing: kept, not leaked.
  EXPECT_EQ(s_.Retry(b_.fault.get(), kGran).code(), kCode);
  EXPECT_EQ(s_.count().unreleased, 2);
  b_.fault->DisarmAll();
  KVMEM_EXPECT_OK(s_.Retry(b_.fault.get(), kGran));
  ExpectAllGivenBack();
}

TEST_F(StrandedMappingsTest, GiveBackLeavesNothingInAWorkingBackend) {
  s_.AddMapped(b_.Addr(4), 4, NewPage(b_, 4, true), true);
  s_.AddMapped(b_.Addr(5), 5, NewPage(b_, 5, false), false);
  std::vector<PhysicalPage> pages;
  pages.push_back(NewPage(b_, -1, false));
  b_.fault->FailFrom(VmmOp::kRelease, 1, kCode);
  EXPECT_EQ(s_.Release(&pages).code(), kCode);
  b_.fault->DisarmAll();
  EXPECT_EQ(b_.counters().live_handles, 3);
  s_.GiveBackOrLog(b_.fault.get(), kGran, "stranded_mappings_test");
  ExpectAllGivenBack();
}

}  // namespace
}  // namespace kvmem::internal
