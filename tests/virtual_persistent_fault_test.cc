// Persistent backend failures on the virtual layout. A FaultInjectingVmm (passed in
// config.vmm) makes every Map, SetAccess, Unmap or Copy fail from the k-th on, for every
// k up to the number such calls an operation makes (Extend that maps new memory, takes
// pages back from freed or other requests, copies on write or drops idle aliases; Fork,
// AddRequest into a row that kept pages, Truncate, Free, Trim), in every arrangement,
// with the background mapper off and on. Undos then fail too. After the failing call:
// the status carries the injected error and says when the cache is not as before,
// CheckInvariants (which compares the layout's records with the backend's mappings)
// passes, every request's data is intact (a request the status says cannot be read
// excepted), and, where the status says nothing changed, so do the stats. A second call
// while the backend still fails must keep all that. Once the backend recovers, the same
// call succeeds, nothing stays quarantined, every request reads back, more work runs,
// the whole budget is usable again, and the destroyed cache leaves nothing in the
// backend. Also: the two copy-on-write cases of the issue that the old layout left
// broken (a scratch granule left mapped; a page left mapped without access), a growth
// or Fork over the mappings a failed undo left behind (taken as they are, or unmapped
// first, never mapped over), and CheckInvariants catching a mapping changed behind the
// layout's back.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/cache_test_util.h"
#include "tests/fault_test_env.h"

namespace kvmem::test {
namespace {

constexpr absl::StatusCode kCode = absl::StatusCode::kUnavailable;
constexpr VmmOp kOps[] = {VmmOp::kMap, VmmOp::kSetAccess, VmmOp::kUnmap, VmmOp::kCopy};

std::vector<LayoutCase> VirtualLayouts() {
  std::vector<LayoutCase> out;
  for (const LayoutCase& c : AllLayouts()) {
    if (c.layout == Layout::kVirtual) out.push_back(c);
  }
  return out;
}


struct Scenario {
  std::string name;
  bool minimal_budget = false;      // the smallest budget that holds one request at max_context
  std::function<void(Env&)> setup;  // gtest assertions inside
  std::function<absl::Status(Env&)> op;
  std::vector<RequestId> touched;  // requests whose state the op changes (or creates)
};

void Forked(Env& e) {
  KVMEM_ASSERT_OK(e.model->Add(1));
  KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + (e.tpp + 1) / 2));
  KVMEM_ASSERT_OK(e.model->Fork(1, 2));
}

std::vector<Scenario> Scenarios() {
  std::vector<Scenario> out;
  out.push_back({.name = "ExtendMapsNewMemory",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 1));
                       KVMEM_ASSERT_OK(e.model->Add(2));
                       KVMEM_ASSERT_OK(e.model->Extend(2, e.tpp));
                     },
                 .op =
                     [](Env& e) {
                       const KvCacheConfig& c = e.config();
                       const int64_t n = std::max<int64_t>(
                           3 * e.tpp + 2, c.host_granularity / c.TokenLayerBytes() + e.tpp + 1);
                       return StatusOf(e.model->Extend(1, std::min(n, c.max_context - 1)));
                     },
                 .touched = {1}});
  out.push_back(
      {.name = "ExtendTakesPagesFromFreedRequests",
       .minimal_budget = true,
       .setup =
           [](Env& e) {
             const int64_t half = e.config().max_context / 2;
             KVMEM_ASSERT_OK(e.model->Add(1));
             KVMEM_ASSERT_OK(e.model->Extend(1, half + 1));
             KVMEM_ASSERT_OK(e.model->Add(2));
             KVMEM_ASSERT_OK(e.model->Extend(2, half / 2));
             KVMEM_ASSERT_OK(e.model->Free(1));
           },
       .op = [](Env& e) { return StatusOf(e.model->Extend(2, e.config().max_context / 2)); },
       .touched = {2}});
  out.push_back(
      {.name = "ExtendTakesPagesBeyondAnotherRequest",
       .minimal_budget = true,
       .setup =
           [](Env& e) {
             KVMEM_ASSERT_OK(e.model->Add(1));
             KVMEM_ASSERT_OK(e.model->Extend(1, e.config().max_context));
             KVMEM_ASSERT_OK(e.model->Truncate(1, e.tpp));
             KVMEM_ASSERT_OK(e.model->Add(2));
           },
       .op = [](Env& e) { return StatusOf(e.model->Extend(2, e.config().max_context / 2)); },
       .touched = {2}});
  out.push_back({.name = "CopyOnWriteByTheChild",
                 .setup = Forked,
                 .op = [](Env& e) { return StatusOf(e.model->Extend(2, e.tpp + 1)); },
                 .touched = {2}});
  out.push_back({.name = "CopyOnWriteByTheParent",
                 .setup = Forked,
                 .op = [](Env& e) { return StatusOf(e.model->Extend(1, 1)); },
                 .touched = {1}});
  out.push_back({.name = "WriteDropsAFreedRequestsAliases",
                 .setup =
                     [](Env& e) {
                       Forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Free(2));
                     },
                 // Past the shared page too: a new page is mapped after the aliases are
                 // dropped, so failing maps reach the undo of the drop.
                 .op = [](Env& e) { return StatusOf(e.model->Extend(1, e.tpp + 1)); },
                 .touched = {1}});
  out.push_back({.name = "Fork",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + (e.tpp + 1) / 2));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Fork(1, 2)); },
                 .touched = {2}});
  // The child lands in the row request 3 kept its pages in: they are displaced.
  out.push_back({.name = "ForkIntoARowThatKeptPages",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + 1));
                       KVMEM_ASSERT_OK(e.model->Add(3));
                       KVMEM_ASSERT_OK(e.model->Extend(3, 4 * e.tpp));
                       KVMEM_ASSERT_OK(e.model->Free(3));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Fork(1, 2)); },
                 .touched = {2}});
  // The child lands in the row request 3 left, whose aliases of request 1's pages are
  // dropped; a failed Share maps them back.
  out.push_back({.name = "ForkIntoARowWithSharedPages",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + 1));
                       KVMEM_ASSERT_OK(e.model->Fork(1, 3));
                       KVMEM_ASSERT_OK(e.model->Free(3));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Fork(1, 2)); },
                 .touched = {2}});
  // The new request lands in the row request 1 left, which shares pages with 2.
  out.push_back({.name = "AddIntoARowWithSharedPages",
                 .setup =
                     [](Env& e) {
                       Forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Free(1));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Add(3)); },
                 .touched = {3}});
  out.push_back({.name = "TruncateIntoTheSharedPrefix",
                 .setup = Forked,
                 .op = [](Env& e) { return e.model->Truncate(2, 1); },
                 .touched = {2}});
  out.push_back({.name = "TruncateExclusive",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 3 * e.tpp + 1));
                     },
                 .op = [](Env& e) { return e.model->Truncate(1, 1); },
                 .touched = {1}});
  out.push_back({.name = "FreeShared",
                 .setup =
                     [](Env& e) {
                       Forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Extend(2, 1));
                     },
                 .op = [](Env& e) { return e.model->Free(1); },
                 .touched = {1}});
  out.push_back({.name = "Trim",
                 .setup =
                     [](Env& e) {
                       Forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Add(3));
                       KVMEM_ASSERT_OK(e.model->Extend(3, 3 * e.tpp));
                       KVMEM_ASSERT_OK(e.model->Add(4));
                       KVMEM_ASSERT_OK(
                           e.model->Extend(4, std::min(5 * e.tpp, e.config().max_context)));
                       KVMEM_ASSERT_OK(e.model->Free(4));
                       KVMEM_ASSERT_OK(e.model->Free(3));
                       KVMEM_ASSERT_OK(e.model->Free(2));
                     },
                 .op = [](Env& e) { return StatusOf(e.cache->Trim()); },
                 .touched = {}});
  return out;
}

KvCacheConfig ConfigFor(const LayoutCase& layout, bool mapper, const Scenario& s) {
  KvCacheConfig config = SmallConfig(layout);
  config.max_requests = 6;
  config.memory_budget_bytes = int64_t{512} << 10;
  if (s.minimal_budget) config.memory_budget_bytes = MinimalBudget(config);
  if (mapper) config.map_ahead_tokens = 2 * TokensPerPage(config);
  return config;
}

void Start(const KvCacheConfig& config, const Scenario& s, Env* env) {
  MakeEnv(config, env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  s.setup(*env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  KVMEM_ASSERT_OK(env->cache->CheckInvariants());
  KVMEM_ASSERT_OK(env->model->VerifyAll());
}

bool Contains(const std::vector<RequestId>& ids, RequestId id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

// After a call that failed (or not) while the backend keeps failing: the status, the
// invariants, the stats where nothing may have changed (`before`, without data), and
// every request's data except those a status said cannot be read (*unreadable: sticky
// until the backend recovers).
void CheckAfterArmedCall(Env& env, const Scenario& s, const absl::Status& status,
                         const Snapshot& before, const std::vector<RequestId>& ids, bool mapper,
                         bool* unreadable) {
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  if (!status.ok()) {
    EXPECT_EQ(status.code(), kCode) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), "injected")) << status;
    const bool changed = absl::StrContains(status.message(), "not as before");
    if (absl::StrContains(status.message(), "cannot be read")) {
      EXPECT_TRUE(changed) << status;
      *unreadable = true;
    }
    // All or nothing holds wherever the undo succeeded (the mapper changes the numbers
    // on its own).
    if (!changed && !mapper) {
      EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*env.cache, ids, /*with_data=*/false)), "");
    }
  }
  for (RequestId id : env.model->ids()) {
    if (*unreadable && Contains(s.touched, id)) continue;
    KVMEM_EXPECT_OK(env.model->Verify(id));
  }
}

void RunScenario(const LayoutCase& layout, bool mapper, const Scenario& s) {
  const KvCacheConfig config = ConfigFor(layout, mapper, s);
  for (VmmOp op : kOps) {
    SCOPED_TRACE(std::string(VmmOpName(op)));
    int64_t count = 0;
    {
      Env env;
      Start(config, s, &env);
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
      const int64_t before = env.fault->calls(op);
      KVMEM_ASSERT_OK(s.op(env));
      count = env.fault->calls(op) - before;
      env.DestroyAndExpectNoLeak();
    }
    // k = count + 1: the call makes none that fail, but the backend is broken after it.
    for (int64_t k = 1; k <= count + 1; ++k) {
      SCOPED_TRACE(absl::StrCat(s.name, ": every ", std::string(VmmOpName(op)), " fails from call ",
                                k, " of ", count));
      Env env;
      Start(config, s, &env);
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
      std::vector<RequestId> ids = SnapshotIds(*env.model, s.touched);
      const Snapshot before = TakeSnapshot(*env.cache, ids, /*with_data=*/false);
      env.fault->FailFrom(op, k, kCode);
      const absl::Status status = s.op(env);
      bool unreadable = false;
      CheckAfterArmedCall(env, s, status, before, ids, mapper, &unreadable);
      bool done = status.ok();
      if (!done) {
        // Still failing: the next call fails or succeeds just as cleanly.
        ids = SnapshotIds(*env.model, s.touched);
        const Snapshot again_before = TakeSnapshot(*env.cache, ids, /*with_data=*/false);
        const absl::Status again = s.op(env);
        CheckAfterArmedCall(env, s, again, again_before, ids, mapper, &unreadable);
        done = again.ok();
      }
      env.fault->DisarmAll();
      // The backend recovered: the same call succeeds, and what failed undos left behind
      // is restored by it.
      if (!done) KVMEM_EXPECT_OK(s.op(env));
      KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      EXPECT_EQ(env.cache->GetStats().pages_quarantined, 0);
      KVMEM_EXPECT_OK(env.model->VerifyAll());
      if (::testing::Test::HasFailure()) return;  // the data below may not be readable
      // More work runs: every request grows (copying what it shares), Trim, then the
      // whole budget holds one request at max_context again.
      for (RequestId id : env.model->ids()) {
        const int64_t room = env.config().max_context - env.model->LengthOf(id);
        const absl::Status grown = StatusOf(env.model->Extend(id, std::min(room, env.tpp + 1)));
        // A minimal budget may not hold both requests grown.
        if (grown.code() != absl::StatusCode::kResourceExhausted) KVMEM_EXPECT_OK(grown);
      }
      KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      KVMEM_EXPECT_OK(env.model->VerifyAll());
      KVMEM_EXPECT_OK(env.cache->Trim());
      for (RequestId id : env.model->ids()) KVMEM_EXPECT_OK(env.model->Free(id));
      KVMEM_EXPECT_OK(env.model->Add(100));
      KVMEM_EXPECT_OK(env.model->Extend(100, env.config().max_context));
      KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      KVMEM_EXPECT_OK(env.model->VerifyAll());
      env.DestroyAndExpectNoLeak();
      if (::testing::Test::HasFailure()) return;  // one failing call is enough to read
    }
  }
}

class VirtualPersistentFaultTest
    : public ::testing::TestWithParam<std::tuple<LayoutCase, bool, std::string>> {};

TEST_P(VirtualPersistentFaultTest, FailFromEveryCallThenRecover) {
  const auto& [layout, mapper, name] = GetParam();
  for (const Scenario& s : Scenarios()) {
    if (s.name == name) RunScenario(layout, mapper, s);
  }
}

std::vector<std::string> ScenarioNames() {
  std::vector<std::string> names;
  for (const Scenario& s : Scenarios()) names.push_back(s.name);
  return names;
}

INSTANTIATE_TEST_SUITE_P(
    Virtual, VirtualPersistentFaultTest,
    ::testing::Combine(::testing::ValuesIn(VirtualLayouts()), ::testing::Bool(),
                       ::testing::ValuesIn(ScenarioNames())),
    [](const ::testing::TestParamInfo<std::tuple<LayoutCase, bool, std::string>>& info) {
      return std::get<0>(info.param).name + (std::get<1>(info.param) ? "_Mapper_" : "_") +
             std::get<2>(info.param);
    });

// ---- the two copy-on-write cases of the issue ----------------------------------------

// A parent with a partly filled last page, forked: the child's next token copies that
// page (all layers without chunks: one page, no new one).
void ForkWithSharedPartialPage(Env* env) {
  LayoutCase unchunked;
  for (const LayoutCase& c : VirtualLayouts()) {
    if (c.name == "VirtualAllLayersUnchunked") unchunked = c;
  }
  KvCacheConfig config = SmallConfig(unchunked);
  MakeEnv(config, env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  KVMEM_ASSERT_OK(env->model->Add(1));
  KVMEM_ASSERT_OK(env->model->Extend(1, env->tpp + env->tpp / 2));
  KVMEM_ASSERT_OK(env->model->Fork(1, 2));
}

// Two failed unmaps of the scratch granule used to leave it mapped with no record of it:
// every later copy on write then failed ("already mapped") after the backend recovered,
// while CheckInvariants reported OK.
TEST(VirtualCopyOnWrite, ScratchGranuleThatCannotBeUnmappedIsRetriedLater) {
  Env env;
  ForkWithSharedPartialPage(&env);
  ASSERT_FALSE(HasFatalFailure());
  const int64_t unmaps = env.fault->calls(VmmOp::kUnmap);
  env.fault->FailFrom(VmmOp::kUnmap, 1, kCode);  // the first unmap is the scratch granule's
  const absl::Status status = StatusOf(env.model->Extend(2, 1));
  EXPECT_EQ(env.fault->calls(VmmOp::kUnmap), unmaps + 2);  // tried and retried
  EXPECT_EQ(status.code(), kCode) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "scratch")) << status;
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  KVMEM_EXPECT_OK(env.model->VerifyAll());
  env.fault->DisarmAll();
  KVMEM_ASSERT_OK(env.model->Extend(2, 1));
  KVMEM_ASSERT_OK(env.model->Extend(1, 1));
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  KVMEM_EXPECT_OK(env.model->VerifyAll());
  EXPECT_EQ(env.cache->GetStats().cow_copies, 1);
  EXPECT_EQ(env.cache->GetStats().pages_quarantined, 0);
  env.DestroyAndExpectNoLeak();
}

// A failed SetAccess of the copy, whose undo needs SetAccess too, used to leave the
// child's page mapped without access (a read faults) while CheckInvariants reported OK;
// the next copy on write then failed for good.
TEST(VirtualCopyOnWrite, PageLeftWithoutAccessIsRecordedAndRestoredLater) {
  Env env;
  ForkWithSharedPartialPage(&env);
  ASSERT_FALSE(HasFatalFailure());
  // SetAccess 1 is the scratch granule's, 2 the copy's at the child's address, 3 the
  // undo's (the original mapped back).
  env.fault->FailFrom(VmmOp::kSetAccess, 2, kCode);
  const absl::Status status = StatusOf(env.model->Extend(2, 1));
  EXPECT_EQ(status.code(), kCode) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "cannot be read")) << status;
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  KVMEM_EXPECT_OK(env.model->Verify(1));  // the parent is untouched
  EXPECT_GT(env.cache->GetStats().pages_quarantined, 0);
  // While SetAccess still fails, writing there fails cleanly.
  EXPECT_EQ(StatusOf(env.model->Extend(2, 1)).code(), kCode);
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  env.fault->DisarmAll();
  KVMEM_ASSERT_OK(env.model->Extend(2, 1));
  EXPECT_EQ(env.cache->GetStats().pages_quarantined, 0);
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  KVMEM_EXPECT_OK(env.model->VerifyAll());
  KVMEM_ASSERT_OK(env.model->Extend(1, 1));
  KVMEM_EXPECT_OK(env.model->VerifyAll());
  env.DestroyAndExpectNoLeak();
}

// ---- a later call over what a failed undo left mapped ---------------------------------

// A growth whose SetAccess fails, and whose undo's Unmap and SetAccess fail too, leaves
// its new pages mapped where no request uses them (quarantined). The next growth over
// them, with the backend still failing, used to map over them and fail with
// FailedPrecondition "already mapped". It takes those pages as they are mapped instead:
// while SetAccess fails it fails with that code, maps nothing and leaves the cache as it
// was; once SetAccess works it succeeds although Unmap still fails.
TEST(VirtualUndoFailsToo, GrowthTakesThePagesAFailedUndoLeftMapped) {
  for (const LayoutCase& layout : VirtualLayouts()) {
    SCOPED_TRACE(layout.name);
    Env env;
    MakeEnv(SmallConfig(layout), &env);
    ASSERT_FALSE(HasFatalFailure());
    KVMEM_ASSERT_OK(env.model->Add(1));
    KVMEM_ASSERT_OK(env.model->Extend(1, 1));
    KVMEM_ASSERT_OK(env.model->Add(2));
    KVMEM_ASSERT_OK(env.model->Extend(2, env.tpp + 1));
    const int64_t n = 2 * env.tpp + 1;  // past the last page: new pages
    env.fault->FailFrom(VmmOp::kSetAccess, 1, kCode);
    env.fault->FailFrom(VmmOp::kUnmap, 1, kCode);
    const absl::Status first = StatusOf(env.model->Extend(1, n));
    EXPECT_EQ(first.code(), kCode) << first;
    EXPECT_TRUE(absl::StrContains(first.message(), "not as before")) << first;
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    const Stats left = env.cache->GetStats();
    ASSERT_GT(left.pages_quarantined, 0);

    const int64_t maps = env.fault->calls(VmmOp::kMap);
    const absl::Status second = StatusOf(env.model->Extend(1, n));
    EXPECT_EQ(second.code(), kCode) << second;
    EXPECT_TRUE(absl::StrContains(second.message(), "injected")) << second;
    EXPECT_FALSE(absl::StrContains(second.message(), "not as before")) << second;
    EXPECT_EQ(env.fault->calls(VmmOp::kMap), maps);  // nothing mapped over them
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    const Stats again = env.cache->GetStats();
    EXPECT_EQ(again.pages_quarantined, left.pages_quarantined);
    EXPECT_EQ(again.pages_free, left.pages_free);
    EXPECT_EQ(again.mapped_bytes, left.mapped_bytes);
    EXPECT_EQ(again.held_bytes, left.held_bytes);

    // SetAccess works again, Unmap still fails: the growth needs no unmap, and no map.
    env.fault->DisarmAll();
    env.fault->FailFrom(VmmOp::kUnmap, 1, kCode);
    KVMEM_EXPECT_OK(env.model->Extend(1, n));
    EXPECT_EQ(env.fault->calls(VmmOp::kMap), maps);
    EXPECT_EQ(env.cache->GetStats().pages_quarantined, 0);
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());

    env.fault->DisarmAll();
    KVMEM_EXPECT_OK(env.model->Extend(2, n));
    KVMEM_EXPECT_OK(env.model->Free(1));
    KVMEM_EXPECT_OK(env.model->Free(2));
    KVMEM_EXPECT_OK(env.model->Add(3));
    KVMEM_EXPECT_OK(env.model->Extend(3, env.config().max_context));
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    env.DestroyAndExpectNoLeak();
    if (HasFailure()) return;
  }
}

// Request 1 of 2 * tpp + 1 tokens forked into 2 while every SetAccess and Unmap fails
// (and goes on failing): the undo cannot unmap the parent's pages from the child's row,
// where they stay mapped with no request using them. *aliases: the backend's mapped
// granules then.
void FailForkLeavingAliases(const KvCacheConfig& config, Env* env, int64_t* aliases) {
  MakeEnv(config, env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  KVMEM_ASSERT_OK(env->model->Add(1));
  KVMEM_ASSERT_OK(env->model->Extend(1, 2 * env->tpp + 1));
  const int64_t granules = env->host->counters().mapped_granules;
  env->fault->FailFrom(VmmOp::kSetAccess, 1, kCode);
  env->fault->FailFrom(VmmOp::kUnmap, 1, kCode);
  const absl::Status first = StatusOf(env->model->Fork(1, 2));
  EXPECT_EQ(first.code(), kCode) << first;
  EXPECT_TRUE(absl::StrContains(first.message(), "not as before")) << first;
  KVMEM_EXPECT_OK(env->cache->CheckInvariants());
  KVMEM_EXPECT_OK(env->model->VerifyAll());
  *aliases = env->host->counters().mapped_granules;
  ASSERT_GT(*aliases, granules);
}

// The same through a Fork (FailForkLeavingAliases). Forking again takes those mappings as
// they are (the same handles at the same places). A request that grows in that row
// instead needs other pages there: it retries the unmap, and while that fails it fails
// with the backend's code, not "already mapped", leaving the cache as it was.
TEST(VirtualUndoFailsToo, ForkAndGrowthOverAliasesAFailedUndoLeftMapped) {
  for (const LayoutCase& layout : VirtualLayouts()) {
    SCOPED_TRACE(layout.name);
    KvCacheConfig config = SmallConfig(layout);
    config.max_requests = 2;  // the failed child's row is the only one left
    Env env;
    int64_t aliases = 0;
    FailForkLeavingAliases(config, &env, &aliases);
    ASSERT_FALSE(HasFatalFailure());
    const Stats left = env.cache->GetStats();

    const int64_t maps = env.fault->calls(VmmOp::kMap);
    const absl::Status second = StatusOf(env.model->Fork(1, 2));
    EXPECT_EQ(second.code(), kCode) << second;
    EXPECT_TRUE(absl::StrContains(second.message(), "injected")) << second;
    EXPECT_FALSE(absl::StrContains(second.message(), "not as before")) << second;
    EXPECT_EQ(env.fault->calls(VmmOp::kMap), maps);  // the aliases are there already
    EXPECT_EQ(env.host->counters().mapped_granules, aliases);
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    EXPECT_EQ(env.cache->GetStats().pages_free, left.pages_free);

    // A request of its own in the child's row: its new pages cannot go where the
    // parent's are still mapped.
    KVMEM_ASSERT_OK(env.model->Add(3));
    const absl::Status grow = StatusOf(env.model->Extend(3, env.tpp + 1));
    EXPECT_EQ(grow.code(), kCode) << grow;
    EXPECT_TRUE(absl::StrContains(grow.message(), "still mapped")) << grow;
    EXPECT_FALSE(absl::StrContains(grow.message(), "not as before")) << grow;
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    const Stats after = env.cache->GetStats();
    EXPECT_EQ(after.pages_free, left.pages_free);
    EXPECT_EQ(after.mapped_bytes, left.mapped_bytes);
    EXPECT_EQ(env.host->counters().mapped_granules, aliases);

    // Unmap works again: the growth first unmaps the parent's pages from the row.
    env.fault->DisarmAll();
    KVMEM_EXPECT_OK(env.model->Extend(3, env.tpp + 1));
    EXPECT_EQ(env.cache->GetStats().pages_quarantined, 0);
    KVMEM_EXPECT_OK(env.model->Free(3));
    KVMEM_EXPECT_OK(env.model->Fork(1, 2));
    KVMEM_EXPECT_OK(env.model->Extend(2, 1));
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    env.DestroyAndExpectNoLeak();
    if (HasFailure()) return;
  }
}

// The same failed Fork, then SetAccess works again while Unmap still fails: the retried
// Fork needs neither a map nor an unmap, and succeeds.
TEST(VirtualUndoFailsToo, ForkTakesTheAliasesAFailedUndoLeftMapped) {
  for (const LayoutCase& layout : VirtualLayouts()) {
    SCOPED_TRACE(layout.name);
    Env env;
    int64_t aliases = 0;
    FailForkLeavingAliases(SmallConfig(layout), &env, &aliases);
    ASSERT_FALSE(HasFatalFailure());
    env.fault->DisarmAll();
    env.fault->FailFrom(VmmOp::kUnmap, 1, kCode);
    const int64_t maps = env.fault->calls(VmmOp::kMap);
    KVMEM_EXPECT_OK(StatusOf(env.model->Fork(1, 2)));
    EXPECT_EQ(env.fault->calls(VmmOp::kMap), maps);
    EXPECT_EQ(env.host->counters().mapped_granules, aliases);  // now the child's
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    env.fault->DisarmAll();
    KVMEM_EXPECT_OK(env.model->Extend(2, 1));
    KVMEM_EXPECT_OK(env.model->Extend(1, 1));
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    env.DestroyAndExpectNoLeak();
    if (HasFailure()) return;
  }
}

// ---- CheckInvariants against the backend ---------------------------------------------

// A mapping changed behind the layout's back (unmapped, or mapped again without access)
// is a violated invariant.
TEST(VirtualCheckInvariants, ComparesTheRecordsWithTheBackendsMappings) {
  for (const LayoutCase& layout : VirtualLayouts()) {
    SCOPED_TRACE(layout.name);
    Env env;
    MakeEnv(SmallConfig(layout), &env);
    ASSERT_FALSE(HasFatalFailure());
    KVMEM_ASSERT_OK(env.model->Add(1));
    KVMEM_ASSERT_OK(env.model->Extend(1, 3));
    BatchMetadata meta;
    KVMEM_ASSERT_OK(env.cache->BuildBatchMetadata({1}, &meta));
    absl::StatusOr<VirtualKv> view = env.cache->VirtualView(0, meta);
    KVMEM_ASSERT_OK(view);
    const int64_t g = env.config().host_granularity;
    const uintptr_t token0 =
        reinterpret_cast<uintptr_t>(view->k) + view->Offset(0, 0) * DTypeBytes(env.config().dtype);
    const uintptr_t page = token0 / g * g;
    absl::StatusOr<MappingState> q = env.host->Query(page);
    KVMEM_ASSERT_OK(q);
    ASSERT_TRUE(q->mapped && q->accessible);
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());

    KVMEM_ASSERT_OK(env.host->Unmap(page, g));
    absl::Status s = env.cache->CheckInvariants();
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "nothing mapped")) << s;

    KVMEM_ASSERT_OK(env.host->Map(page, q->handle));
    s = env.cache->CheckInvariants();
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "without access")) << s;

    KVMEM_ASSERT_OK(env.host->SetAccess(page, g));
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    env.DestroyAndExpectNoLeak();
  }
}

}  // namespace
}  // namespace kvmem::test
