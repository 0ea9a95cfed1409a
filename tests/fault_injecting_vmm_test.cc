// Tests of FaultInjectingVmm: exactly the armed call fails (and is not forwarded),
// every other call reaches the inner backend, counts are exact, and arming is
// thread-safe.
#include "kvmem/testing/fault_injecting_vmm.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvmem/vmm.h"

namespace kvmem {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kGran = 4096;

int Op(VmmOp op) { return static_cast<int>(op); }

class FaultInjectingVmmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Vmm>> host = MakeHostVmm(kGran);
    ASSERT_TRUE(host.ok()) << host.status();
    inner_ = std::shared_ptr<Vmm>(std::move(*host));
    vmm_ = std::make_unique<FaultInjectingVmm>(inner_);
  }
  std::shared_ptr<Vmm> inner_;
  std::unique_ptr<FaultInjectingVmm> vmm_;
};

TEST_F(FaultInjectingVmmTest, ForwardsProperties) {
  EXPECT_EQ(vmm_->name(), inner_->name());
  EXPECT_EQ(vmm_->granularity(), kGran);
  EXPECT_EQ(vmm_->is_device(), inner_->is_device());
  EXPECT_TRUE(vmm_->FenceComplete(Fence{}));
  std::atomic<bool> done{false};
  EXPECT_FALSE(vmm_->FenceComplete(Fence{.event = &done}));
  done = true;
  EXPECT_TRUE(vmm_->FenceComplete(Fence{.event = &done}));
  EXPECT_EQ(vmm_->total_calls(), 0);  // FenceComplete is not counted
}

TEST_F(FaultInjectingVmmTest, ForwardsEverythingWhenDisarmed) {
  absl::StatusOr<uintptr_t> r = vmm_->Reserve(2 * kGran);
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<PhysHandle> h = vmm_->Create();
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_TRUE(vmm_->Map(*r, *h).ok());
  ASSERT_TRUE(vmm_->Map(*r + kGran, *h).ok());
  ASSERT_TRUE(vmm_->SetAccess(*r, 2 * kGran).ok());
  *reinterpret_cast<int*>(*r) = 9;
  ASSERT_TRUE(vmm_->Copy(*r + 8, *r, sizeof(int)).ok());
  EXPECT_EQ(*reinterpret_cast<int*>(*r + kGran + 8), 9);
  // Errors from the inner backend come through unchanged.
  EXPECT_EQ(vmm_->Release(*h).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(vmm_->Unmap(*r, 2 * kGran).ok());
  ASSERT_TRUE(vmm_->Release(*h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(*r, 2 * kGran).ok());

  const VmmCounters c = vmm_->counters();
  const VmmCounters ic = inner_->counters();
  for (int i = 0; i < Op(VmmOp::kCount); ++i) {
    EXPECT_EQ(c.calls[i], ic.calls[i]);
    EXPECT_EQ(vmm_->calls(static_cast<VmmOp>(i)), ic.calls[i]) << VmmOpName(VmmOp(i));
  }
  EXPECT_EQ(vmm_->total_calls(), 10);
  EXPECT_EQ(vmm_->injected_failures(), 0);
}

TEST_F(FaultInjectingVmmTest, QueryIsForwardedAndNeverFails) {
  absl::StatusOr<uintptr_t> r = vmm_->Reserve(kGran);
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<PhysHandle> h = vmm_->Create();
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_TRUE(vmm_->Map(*r, *h).ok());
  vmm_->FailNthAny(1);
  for (VmmOp op : {VmmOp::kMap, VmmOp::kSetAccess, VmmOp::kUnmap}) vmm_->FailFrom(op, 1);
  const int64_t calls = vmm_->total_calls();
  absl::StatusOr<MappingState> q = vmm_->Query(*r);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->mapped);
  EXPECT_EQ(q->handle, *h);
  EXPECT_FALSE(q->accessible);
  EXPECT_EQ(vmm_->total_calls(), calls);
  EXPECT_EQ(vmm_->injected_failures(), 0);
  vmm_->DisarmAll();
  ASSERT_TRUE(vmm_->Unmap(*r, kGran).ok());
  ASSERT_TRUE(vmm_->Release(*h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(*r, kGran).ok());
}

TEST_F(FaultInjectingVmmTest, FailNthFailsExactlyThatCallAndDoesNotForwardIt) {
  vmm_->FailNth(VmmOp::kCreate, 3, absl::StatusCode::kUnavailable);
  std::vector<PhysHandle> hs;
  for (int i = 1; i <= 6; ++i) {
    absl::StatusOr<PhysHandle> h = vmm_->Create();
    if (i == 3) {
      EXPECT_EQ(h.status().code(), absl::StatusCode::kUnavailable);
      EXPECT_THAT(h.status().message(), HasSubstr("injected failure of create call #3"));
      // Not forwarded: the inner backend saw one call fewer and holds one handle fewer.
      EXPECT_EQ(inner_->counters().calls[Op(VmmOp::kCreate)], 2);
      EXPECT_EQ(inner_->counters().live_handles, 2);
    } else {
      ASSERT_TRUE(h.ok()) << "call " << i << ": " << h.status();
      hs.push_back(*h);
    }
  }
  EXPECT_EQ(vmm_->calls(VmmOp::kCreate), 6);
  EXPECT_EQ(inner_->counters().calls[Op(VmmOp::kCreate)], 5);
  EXPECT_EQ(vmm_->injected_failures(), 1);

  // Counting starts when armed, and other ops do not advance it.
  vmm_->FailNth(VmmOp::kRelease, 2);
  absl::StatusOr<PhysHandle> extra = vmm_->Create();  // other ops do not advance it
  ASSERT_TRUE(extra.ok()) << extra.status();
  EXPECT_TRUE(vmm_->Release(hs[0]).ok());
  const absl::Status s = vmm_->Release(hs[1]);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);  // the default code
  EXPECT_THAT(s.message(), HasSubstr("injected failure of release call #2"));
  EXPECT_TRUE(vmm_->Release(hs[1]).ok());  // one-shot: the retry goes through
  for (size_t i = 2; i < hs.size(); ++i) EXPECT_TRUE(vmm_->Release(hs[i]).ok());
  EXPECT_EQ(vmm_->injected_failures(), 2);
  EXPECT_EQ(inner_->counters().live_handles, 1);  // the one created in between
  EXPECT_TRUE(vmm_->Release(*extra).ok());
}

TEST_F(FaultInjectingVmmTest, FailNthZeroDisarms) {
  vmm_->FailNth(VmmOp::kReserve, 1);
  vmm_->FailNth(VmmOp::kReserve, 0);
  absl::StatusOr<uintptr_t> r = vmm_->Reserve(kGran);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(vmm_->FreeReservation(*r, kGran).ok());
  EXPECT_EQ(vmm_->injected_failures(), 0);
}

TEST_F(FaultInjectingVmmTest, FailFromFailsEveryLaterCallUntilDisarmed) {
  absl::StatusOr<uintptr_t> r = vmm_->Reserve(4 * kGran);
  ASSERT_TRUE(r.ok());
  absl::StatusOr<PhysHandle> h = vmm_->Create();
  ASSERT_TRUE(h.ok());
  vmm_->FailFrom(VmmOp::kMap, 2, absl::StatusCode::kInternal);
  EXPECT_TRUE(vmm_->Map(*r, *h).ok());
  for (int i = 1; i <= 3; ++i) {
    const absl::Status s = vmm_->Map(*r + i * kGran, *h);
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
    EXPECT_THAT(s.message(), HasSubstr("injected failure of map call #" + std::to_string(i + 1)));
  }
  EXPECT_EQ(inner_->counters().mapped_granules, 1);
  EXPECT_TRUE(vmm_->SetAccess(*r, kGran).ok());  // other ops unaffected
  EXPECT_EQ(vmm_->injected_failures(), 3);
  vmm_->DisarmAll();
  EXPECT_TRUE(vmm_->Map(*r + kGran, *h).ok());
  EXPECT_EQ(vmm_->calls(VmmOp::kMap), 5);
  EXPECT_TRUE(vmm_->Unmap(*r, 2 * kGran).ok());
  EXPECT_TRUE(vmm_->Release(*h).ok());
  EXPECT_TRUE(vmm_->FreeReservation(*r, 4 * kGran).ok());
}

TEST_F(FaultInjectingVmmTest, FailNthAnyCountsAcrossOpsExceptFences) {
  absl::StatusOr<uintptr_t> r = vmm_->Reserve(kGran);  // the first call overall
  ASSERT_TRUE(r.ok());
  vmm_->FailNthAny(3, absl::StatusCode::kAborted);
  absl::StatusOr<PhysHandle> h = vmm_->Create();  // any #1
  ASSERT_TRUE(h.ok());
  EXPECT_TRUE(vmm_->FenceComplete(Fence{}));          // not counted
  EXPECT_TRUE(vmm_->Map(*r, *h).ok());                // any #2
  const absl::Status s = vmm_->SetAccess(*r, kGran);  // any #3
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(s.message(), HasSubstr("injected failure of set_access"));
  EXPECT_EQ(inner_->counters().calls[Op(VmmOp::kSetAccess)], 0);
  EXPECT_TRUE(vmm_->SetAccess(*r, kGran).ok());  // one-shot
  EXPECT_EQ(vmm_->total_calls(), 5);
  EXPECT_EQ(vmm_->injected_failures(), 1);
  EXPECT_TRUE(vmm_->Unmap(*r, kGran).ok());
  EXPECT_TRUE(vmm_->Release(*h).ok());
  EXPECT_TRUE(vmm_->FreeReservation(*r, kGran).ok());
}

// Sweeping the failure over every call of a fixed sequence: exactly one call fails
// each time, and it is the chosen one.
TEST_F(FaultInjectingVmmTest, SweepFailsOnlyTheChosenCall) {
  auto run_sequence = [&](std::vector<bool>* failed) {
    failed->clear();
    absl::StatusOr<uintptr_t> r = vmm_->Reserve(kGran);
    failed->push_back(!r.ok());
    absl::StatusOr<PhysHandle> h = vmm_->Create();
    failed->push_back(!h.ok());
    if (r.ok() && h.ok()) {
      const bool map_failed = !vmm_->Map(*r, *h).ok();
      failed->push_back(map_failed);
      if (!map_failed) failed->push_back(!vmm_->Unmap(*r, kGran).ok());
    }
    // Clean up directly on the inner backend so a failed cleanup call cannot leak.
    if (h.ok() && !inner_->Release(*h).ok()) {
      EXPECT_TRUE(inner_->Unmap(*r, kGran).ok());
      EXPECT_TRUE(inner_->Release(*h).ok());
    }
    if (r.ok()) {
      EXPECT_TRUE(inner_->FreeReservation(*r, kGran).ok());
    }
  };
  std::vector<bool> failed;
  for (int n = 1; n <= 4; ++n) {
    vmm_->FailNthAny(n);
    run_sequence(&failed);
    int count = 0;
    for (size_t i = 0; i < failed.size(); ++i) {
      if (failed[i]) {
        ++count;
        EXPECT_EQ(static_cast<int>(i) + 1, n);
      }
    }
    EXPECT_EQ(count, 1) << "n = " << n;
    vmm_->DisarmAll();
  }
  EXPECT_EQ(vmm_->injected_failures(), 4);
  EXPECT_EQ(inner_->counters().live_handles, 0);
  EXPECT_EQ(inner_->counters().live_reservations, 0);
}

TEST_F(FaultInjectingVmmTest, ThreadSafeCounting) {
  constexpr int kThreads = 4, kIters = 500;
  vmm_->FailNth(VmmOp::kCreate, 777);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kIters; ++i) {
        absl::StatusOr<PhysHandle> h = vmm_->Create();
        if (!h.ok()) {
          EXPECT_THAT(h.status().message(), HasSubstr("create call #777"));
          ++failures;
          continue;
        }
        EXPECT_TRUE(vmm_->Release(*h).ok());
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(failures.load(), 1);
  EXPECT_EQ(vmm_->calls(VmmOp::kCreate), kThreads * kIters);
  EXPECT_EQ(vmm_->calls(VmmOp::kRelease), kThreads * kIters - 1);
  EXPECT_EQ(vmm_->total_calls(), 2 * kThreads * kIters - 1);
  EXPECT_EQ(vmm_->injected_failures(), 1);
  EXPECT_EQ(inner_->counters().live_handles, 0);
}

}  // namespace
}  // namespace kvmem
