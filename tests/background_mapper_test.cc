// Tests of the background mapper: the thread mechanics of BackgroundMapper with fake
// steps (wake-up, idle wait, retry after a failure, joining with a job in flight), and
// the virtual layout with map_ahead_tokens > 0 (decode steps find their pages mapped,
// invariants hold while the mapper runs, failing jobs are retried, map-ahead pages never
// make another row run out of memory).
#include "allocators/virtual/background_mapper.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "allocators/virtual/virtual_layout.h"
#include "gtest/gtest.h"
#include "tests/virtual_layout_harness.h"

namespace kvmem::internal {
namespace {

using namespace testing_virtual;  // NOLINT: the harness of these tests

// ---- BackgroundMapper with fake steps ------------------------------------------------

// A queue of work items guarded by the mapper's mutex; run() fails while fail_runs > 0.
struct FakeWork {
  absl::Mutex mu;
  int pending ABSL_GUARDED_BY(mu) = 0;
  int taken ABSL_GUARDED_BY(mu) = 0;  // planned, not finished
  int done ABSL_GUARDED_BY(mu) = 0;
  int finished_with_error ABSL_GUARDED_BY(mu) = 0;
  std::atomic<int> fail_runs{0};
  std::atomic<int> runs{0};
  absl::Notification* started = nullptr;  // run() notifies, then waits for `go`
  absl::Notification* go = nullptr;

  BackgroundMapper::Steps Steps() {
    BackgroundMapper::Steps s;
    s.plan = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      if (pending == 0) return false;
      --pending;
      ++taken;
      return true;
    };
    s.run = [this]() -> absl::Status {
      runs.fetch_add(1);
      if (started != nullptr && !started->HasBeenNotified()) {
        started->Notify();
        go->WaitForNotification();
      }
      if (fail_runs.load() > 0) {
        fail_runs.fetch_sub(1);
        return absl::UnavailableError("injected");
      }
      return absl::OkStatus();
    };
    s.finish = [this](absl::Status st) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      --taken;
      if (st.ok()) {
        ++done;
      } else {
        ++finished_with_error;
        ++pending;  // put the item back: retried later
      }
    };
    return s;
  }
};

TEST(BackgroundMapper, DoesWhatIsNotifiedAndGoesIdle) {
  FakeWork work;
  BackgroundMapper mapper(&work.mu, work.Steps());
  {
    absl::MutexLock lock(&work.mu);
    EXPECT_TRUE(mapper.WaitIdle(absl::Seconds(30)));
    EXPECT_EQ(work.done, 0);
    work.pending = 5;
    mapper.Notify();
    ASSERT_TRUE(mapper.WaitIdle(absl::Seconds(30)));
    EXPECT_EQ(work.done, 5);
    EXPECT_EQ(work.pending, 0);
    EXPECT_EQ(work.taken, 0);
    EXPECT_FALSE(mapper.job_in_flight());
    EXPECT_EQ(mapper.jobs_done(), 5);
    EXPECT_EQ(mapper.failures(), 0);
  }
  EXPECT_EQ(work.runs.load(), 5);
}

TEST(BackgroundMapper, RetriesFailedJobsAfterTheBackOff) {
  FakeWork work;
  work.fail_runs = 2;
  BackgroundMapper mapper(&work.mu, work.Steps(), absl::Milliseconds(1));
  absl::MutexLock lock(&work.mu);
  work.pending = 3;
  mapper.Notify();
  ASSERT_TRUE(mapper.WaitIdle(absl::Seconds(30)));
  EXPECT_EQ(work.done, 3);
  EXPECT_EQ(work.finished_with_error, 2);
  EXPECT_EQ(mapper.failures(), 2);
  EXPECT_EQ(work.runs.load(), 5);
}

TEST(BackgroundMapper, WaitForJobAndDestructionFinishTheJobInFlight) {
  FakeWork work;
  absl::Notification started;
  absl::Notification go;
  work.started = &started;
  work.go = &go;
  auto mapper = std::make_unique<BackgroundMapper>(&work.mu, work.Steps());
  {
    absl::MutexLock lock(&work.mu);
    work.pending = 1;
    mapper->Notify();
  }
  started.WaitForNotification();
  {
    absl::MutexLock lock(&work.mu);
    EXPECT_TRUE(mapper->job_in_flight());
    EXPECT_EQ(work.taken, 1);
  }
  std::thread releaser([&] { go.Notify(); });
  {
    absl::MutexLock lock(&work.mu);
    mapper->WaitForJob();  // releases the lock while waiting
    EXPECT_FALSE(mapper->job_in_flight());
    EXPECT_EQ(work.done, 1);
    work.pending = 1;
    mapper->Notify();
  }
  mapper.reset();  // joins; whatever was planned has been finished
  releaser.join();
  absl::MutexLock lock(&work.mu);
  EXPECT_EQ(work.taken, 0);
}

// ---- the virtual layout with a mapper ------------------------------------------------

KvCacheConfig MapperConfig(Arrangement arrangement, int64_t requests_in_budget) {
  KvCacheConfig c = SmallConfig(arrangement, k4K);
  c.max_context = 512;
  c.map_ahead_tokens = 64;
  c.memory_budget_bytes = BudgetFor(c, k4K, requests_in_budget);
  return c;
}

class MapperLayout : public ::testing::TestWithParam<Arrangement> {};

TEST_P(MapperLayout, DecodeStepsFindTheirPagesMappedOnceTheMapperCaughtUp) {
  auto h = *Harness::Make(MapperConfig(GetParam(), 2));
  VirtualLayout& layout = h->layout();
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  ASSERT_TRUE(layout.WaitForMapperIdle());
  ASSERT_OK(h->Check());
  // The mapper mapped 64 tokens ahead of both empty rows. Those pages hold no token:
  // they count as mapped and idle (reclaimable), not as used / held.
  const Stats ahead = h->GetStats();
  EXPECT_EQ(ahead.mapped_bytes, 2 * h->PagesFor(64) * ahead.page_bytes);
  EXPECT_EQ(ahead.idle_bytes, 2 * h->PagesFor(64) * ahead.page_bytes);
  EXPECT_EQ(ahead.pages_used, 0);
  EXPECT_EQ(ahead.held_bytes, 0);
  const int64_t stalls = h->GetStats().map_stalls;
  const int64_t grow_maps_before = Calls(h->vmm(), VmmOp::kMap);
  for (int step = 0; step < 300; ++step) {
    for (int32_t row : {a, b}) {
      ASSERT_OK(h->Grow(row, 1, row + 1));
      ASSERT_TRUE(layout.WaitForMapperIdle());
      ASSERT_OK(h->Check());
      // The rule: mapped exactly up to length + map_ahead_tokens.
      const VirtualGeometry& g = layout.geometry();
      ASSERT_EQ(h->vmm().counters().mapped_granules,
                g.segments * (g.PagesFor(h->len(a) + 64) + g.PagesFor(h->len(b) + 64)));
    }
  }
  EXPECT_EQ(h->GetStats().map_stalls, stalls);                // no Grow mapped anything itself
  EXPECT_GT(Calls(h->vmm(), VmmOp::kMap), grow_maps_before);  // the mapper did
  EXPECT_EQ(layout.mapper_failures(), 0);
  EXPECT_EQ(h->AllMismatches(), 0);
  ASSERT_OK(h->Free(a));
  ASSERT_OK(h->Free(b));
  ASSERT_OK(h->Check());
}

TEST_P(MapperLayout, InvariantsHoldWhileTheMapperRuns) {
  auto h = *Harness::Make(MapperConfig(GetParam(), 3));
  VirtualLayout& layout = h->layout();
  std::vector<int32_t> rows = {*h->Add(), *h->Add()};
  int tag = 1;
  for (int step = 0; step < 200; ++step) {
    // No waiting for the mapper: Grow races it for the same pages.
    for (int32_t row : rows) {
      if (h->len(row) + 3 <= h->config().max_context) ASSERT_OK(h->Grow(row, 1 + step % 3, tag++));
      ASSERT_OK(h->Check());
    }
    if (step % 50 == 25) {
      absl::StatusOr<int32_t> child = h->Fork(rows[0]);
      ASSERT_OK(child.status());
      ASSERT_OK(h->Check());
      ASSERT_OK(h->Shrink(rows[1], h->len(rows[1]) / 2));
      ASSERT_OK(h->Check());
      ASSERT_OK(h->Free(rows[1]));
      ASSERT_OK(h->Check());
      rows[1] = *child;
    }
  }
  ASSERT_TRUE(layout.WaitForMapperIdle());
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
  EXPECT_EQ(layout.mapper_failures(), 0);
}

TEST_P(MapperLayout, FailedMapperJobsAreRetried) {
  const KvCacheConfig c = MapperConfig(GetParam(), 1);
  auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
  faulty->FailNth(VmmOp::kMap, 2);  // inside the mapper's first job: undone, retried
  {
    auto h = *Harness::Make(c, faulty);
    const int32_t a = *h->Add();
    ASSERT_TRUE(h->layout().WaitForMapperIdle());
    ASSERT_OK(h->Check());
    EXPECT_EQ(h->layout().mapper_failures(), 1);
    EXPECT_EQ(faulty->injected_failures(), 1);
    EXPECT_EQ(faulty->counters().mapped_granules, h->PagesFor(64));
    const int64_t stalls = h->GetStats().map_stalls;
    ASSERT_OK(h->Grow(a, 60, 1));
    EXPECT_EQ(h->GetStats().map_stalls, stalls);
    ASSERT_TRUE(h->layout().WaitForMapperIdle());
    ASSERT_OK(h->Check());
    EXPECT_EQ(h->AllMismatches(), 0);
  }
  EXPECT_EQ(faulty->counters().live_handles, 0);
  EXPECT_EQ(faulty->counters().mapped_granules, 0);
}

TEST_P(MapperLayout, PagesMappedAheadGoToARowThatNeedsThem) {
  // One request's worth of pages: the mapper maps ahead for a, then b needs them.
  auto h = *Harness::Make(MapperConfig(GetParam(), 1));
  VirtualLayout& layout = h->layout();
  const int32_t a = *h->Add();
  ASSERT_OK(h->Grow(a, 400, 1));
  ASSERT_TRUE(layout.WaitForMapperIdle());
  ASSERT_OK(h->Check());
  const int32_t b = *h->Add();
  ASSERT_TRUE(layout.WaitForMapperIdle());
  // 512 - 400 tokens of pages remain; a holds 64 of them mapped ahead (and b may hold
  // some): b can still have all 112.
  ASSERT_OK(h->Grow(b, 112, 2));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->Grow(b, 1, 2).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(h->Check());
  ASSERT_TRUE(layout.WaitForMapperIdle());
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
  // Freeing a gives its pages to b's map-ahead.
  ASSERT_OK(h->Free(a));
  ASSERT_OK(h->Grow(b, 100, 3));
  ASSERT_TRUE(layout.WaitForMapperIdle());
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

INSTANTIATE_TEST_SUITE_P(Arrangements, MapperLayout,
                         ::testing::Values(Arrangement::kAllLayers, Arrangement::kPerLayer),
                         [](const ::testing::TestParamInfo<Arrangement>& info) {
                           return info.param == Arrangement::kAllLayers ? "AllLayers" : "PerLayer";
                         });

}  // namespace
}  // namespace kvmem::internal
