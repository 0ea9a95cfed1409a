// Backend failures on every layout: a FaultInjectingVmm wraps the host backend (passed
// in config.vmm). For Create, AddRequest, Extend (growth that maps memory, growth that
// takes pages back from idle requests), Fork, the copy-on-write Extend after a fork,
// Truncate, Free and Trim: count the backend calls the operation makes, then re-run it
// from the same starting state once for every call i, with call i failing. The
// operation returns the injected error (or succeeds, if the layout legitimately works
// around it), the cache is exactly as before (snapshot with K/V data), its invariants
// hold, the same operation then succeeds, and once the cache is destroyed the backend
// holds nothing (no reservation, handle or mapping leaked). Also: every call of one kind
// failing from some point on (FailFrom), then disarmed: the cache recovers.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
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

using absl::StatusCode;

// Codes injected: the realistic out-of-memory one, and one a layout has no reason to
// handle (it must come back as it is, with context).
constexpr StatusCode kInjectedCodes[] = {StatusCode::kResourceExhausted, StatusCode::kUnavailable};

KvCacheConfig FaultConfig(const LayoutCase& c) {
  KvCacheConfig config = SmallConfig(c);
  config.max_requests = 6;
  config.memory_budget_bytes = int64_t{512} << 10;
  return config;
}

// The fault-injecting backend of `env` alone (the Create scenarios make the cache).
void MakeBackend(const KvCacheConfig& config, Env* env) {
  absl::StatusOr<std::unique_ptr<Vmm>> host = MakeHostVmm(config.host_granularity);
  ASSERT_TRUE(host.ok()) << host.status();
  env->host = *std::move(host);
  env->fault = std::make_shared<FaultInjectingVmm>(env->host);
}

// A growth that needs new memory on every layout: several pages, and past the first
// granule of a paged pool (where many small pages share one granule).
int64_t GrowthTokens(const Env& e) {
  const KvCacheConfig& c = e.cache->config();
  return std::max<int64_t>(3 * e.tpp + 2, c.host_granularity / c.TokenLayerBytes() + e.tpp + 1);
}

struct Scenario {
  std::string name;
  // Budget: 0 keeps FaultConfig's; -1 the minimum that holds one request at max_context.
  int64_t budget = 0;
  std::function<void(Env&)> setup;  // gtest assertions inside
  std::function<absl::Status(Env&)> op;
  std::vector<RequestId> extra_ids = {};  // ids the op creates
};

std::vector<Scenario> Scenarios() {
  std::vector<Scenario> out;
  out.push_back({.name = "AddRequestIntoIdleRowWithSharedPage",
                 .setup =
                     [](Env& e) {
                       CacheModel& m = *e.model;
                       KVMEM_ASSERT_OK(m.Add(1));
                       KVMEM_ASSERT_OK(m.Extend(1, 2 * e.tpp + 1));
                       KVMEM_ASSERT_OK(m.Fork(1, 2));
                       KVMEM_ASSERT_OK(m.Free(1));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Add(3)); },
                 .extra_ids = {3}});
  out.push_back({.name = "ExtendMapsNewMemory",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 1));
                       KVMEM_ASSERT_OK(e.model->Add(2));
                       KVMEM_ASSERT_OK(e.model->Extend(2, e.tpp));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Extend(1, GrowthTokens(e))); }});
  out.push_back(
      {.name = "ExtendTakesMemoryFromFreedRequests",
       .budget = -1,
       .setup =
           [](Env& e) {
             CacheModel& m = *e.model;
             const int64_t half = e.cache->config().max_context / 2;
             KVMEM_ASSERT_OK(m.Add(1));
             KVMEM_ASSERT_OK(m.Extend(1, half + 1));
             KVMEM_ASSERT_OK(m.Add(2));
             KVMEM_ASSERT_OK(m.Extend(2, half / 2));
             KVMEM_ASSERT_OK(m.Free(1));
           },
       .op =
           [](Env& e) { return StatusOf(e.model->Extend(2, e.cache->config().max_context / 2)); }});
  out.push_back({.name = "Fork",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + (e.tpp + 1) / 2));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Fork(1, 2)); },
                 .extra_ids = {2}});
  // AcquireRow takes the idle row that kept its pages (aliases of request 1's) and drops
  // them; when Share then fails, the row must get them back: nothing moved.
  out.push_back({.name = "ForkIntoIdleRowWithSharedPages",
                 .setup =
                     [](Env& e) {
                       CacheModel& m = *e.model;
                       KVMEM_ASSERT_OK(m.Add(1));
                       KVMEM_ASSERT_OK(m.Extend(1, 2 * e.tpp + 1));
                       KVMEM_ASSERT_OK(m.Fork(1, 2));
                       KVMEM_ASSERT_OK(m.Free(2));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Fork(1, 3)); },
                 .extra_ids = {3}});
  auto forked = [](Env& e) {
    KVMEM_ASSERT_OK(e.model->Add(1));
    KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + (e.tpp + 1) / 2));
    KVMEM_ASSERT_OK(e.model->Fork(1, 2));
  };
  out.push_back({.name = "CopyOnWriteExtendOfChild", .setup = forked, .op = [](Env& e) {
                   return StatusOf(e.model->Extend(2, e.tpp + 1));
                 }});
  out.push_back({.name = "CopyOnWriteExtendOfParent", .setup = forked, .op = [](Env& e) {
                   return StatusOf(e.model->Extend(1, 1));
                 }});
  out.push_back({.name = "RewriteSharedPrefixAfterTruncate",
                 .setup =
                     [forked](Env& e) {
                       forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Truncate(2, 1));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Extend(2, 2 * e.tpp)); }});
  out.push_back({.name = "TruncateShared", .setup = forked, .op = [](Env& e) {
                   return e.model->Truncate(2, 1);
                 }});
  out.push_back({.name = "TruncateExclusive",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 3 * e.tpp + 1));
                     },
                 .op = [](Env& e) { return e.model->Truncate(1, 1); }});
  out.push_back({.name = "FreeShared",
                 .setup =
                     [forked](Env& e) {
                       forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Extend(2, 1));
                     },
                 .op = [](Env& e) { return e.model->Free(1); }});
  out.push_back({.name = "FreeExclusive",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 3 * e.tpp + 1));
                       KVMEM_ASSERT_OK(e.model->Add(2));
                       KVMEM_ASSERT_OK(e.model->Extend(2, 1));
                     },
                 .op = [](Env& e) { return e.model->Free(1); }});
  // A batch whose rows need a copy on write, new memory and nothing, together: a
  // failure at any backend call leaves every row of the batch as it was.
  out.push_back({.name = "ExtendBatchCopiesAndMaps",
                 .setup =
                     [forked](Env& e) {
                       forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Add(3));
                       KVMEM_ASSERT_OK(e.model->Extend(3, 1));
                       KVMEM_ASSERT_OK(e.cache->SetRunningBatch({3, 1, 2}));
                     },
                 .op = [](Env& e) {
                   const RequestId ids[] = {1, 2, 3};
                   const int64_t counts[] = {1, e.tpp + 1, GrowthTokens(e)};
                   return StatusOf(e.model->ExtendBatch(ids, counts));
                 }});
  out.push_back({.name = "TruncateBatchShared", .setup = forked, .op = [](Env& e) {
                   const RequestId ids[] = {2, 1};
                   const int64_t lengths[] = {1, e.tpp};
                   return e.model->TruncateBatch(ids, lengths);
                 }});
  out.push_back({.name = "FreeBatchShared",
                 .setup =
                     [forked](Env& e) {
                       forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Add(3));
                       KVMEM_ASSERT_OK(e.model->Extend(3, 2 * e.tpp));
                     },
                 .op = [](Env& e) {
                   const RequestId ids[] = {1, 3};
                   return e.model->FreeBatch(ids);
                 }});
  out.push_back({.name = "Trim",
                 .setup =
                     [forked](Env& e) {
                       forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Add(3));
                       KVMEM_ASSERT_OK(e.model->Extend(3, 3 * e.tpp));
                       KVMEM_ASSERT_OK(e.model->Add(4));
                       KVMEM_ASSERT_OK(e.model->Extend(4, GrowthTokens(e)));
                       KVMEM_ASSERT_OK(e.model->Free(4));
                       KVMEM_ASSERT_OK(e.model->Free(3));
                       KVMEM_ASSERT_OK(e.model->Free(2));
                     },
                 .op = [](Env& e) { return StatusOf(e.cache->Trim()); }});
  return out;
}

KvCacheConfig ConfigFor(const LayoutCase& layout, const Scenario& s) {
  KvCacheConfig config = FaultConfig(layout);
  if (s.budget == -1) config.memory_budget_bytes = MinimalBudget(config);
  if (s.budget > 0) config.memory_budget_bytes = s.budget;
  return config;
}

// Builds the scenario's starting state in *env.
void Start(const LayoutCase& layout, const Scenario& s, Env* env) {
  MakeEnv(ConfigFor(layout, s), env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  s.setup(*env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  KVMEM_ASSERT_OK(env->cache->CheckInvariants());
  KVMEM_ASSERT_OK(env->model->VerifyAll());
}

void RunScenario(const LayoutCase& layout, const Scenario& s) {
  SCOPED_TRACE(s.name);
  // Count the backend calls of the operation.
  int64_t count = 0;
  {
    Env env;
    Start(layout, s, &env);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    const int64_t before = env.fault->total_calls();
    KVMEM_ASSERT_OK(s.op(env));
    count = env.fault->total_calls() - before;
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    KVMEM_EXPECT_OK(env.model->VerifyAll());
    env.DestroyAndExpectNoLeak("clean run");
  }
  ::testing::Test::RecordProperty(s.name + "_backend_calls", static_cast<int>(count));
  for (StatusCode code : kInjectedCodes) {
    for (int64_t i = 1; i <= count; ++i) {
      const std::string where = absl::StrCat(s.name, ": call ", i, " of ", count, " fails with ",
                                             absl::StatusCodeToString(code));
      SCOPED_TRACE(where);
      Env env;
      Start(layout, s, &env);
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
      const std::vector<RequestId> ids = SnapshotIds(*env.model, s.extra_ids);
      const Snapshot before = TakeSnapshot(*env.cache, ids);
      env.fault->FailNthAny(i, code);
      const absl::Status status = s.op(env);
      env.fault->DisarmAll();
      EXPECT_EQ(env.fault->injected_failures(), 1);
      KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      if (!status.ok()) {
        EXPECT_EQ(status.code(), code) << status;
        if (code != StatusCode::kResourceExhausted) {
          EXPECT_TRUE(absl::StrContains(status.message(), "injected")) << status;
        }
        EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*env.cache, ids)), "");
        KVMEM_EXPECT_OK(env.model->VerifyAll());
        // The same operation now succeeds.
        KVMEM_EXPECT_OK(s.op(env));
        KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      }
      KVMEM_EXPECT_OK(env.model->VerifyAll());
      env.DestroyAndExpectNoLeak(where);
      if (::testing::Test::HasFailure()) return;  // one failing call is enough to read
    }
  }
}

class KvCacheFaultTest : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(KvCacheFaultTest, Create) {
  const KvCacheConfig base = FaultConfig(GetParam());
  int64_t count = 0;
  {
    Env env;
    MakeBackend(base, &env);
    ASSERT_FALSE(HasFatalFailure());
    KvCacheConfig config = base;
    config.vmm = env.fault;
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    KVMEM_ASSERT_OK(cache);
    count = env.fault->total_calls();
    EXPECT_GT(count, 0);
    cache->reset();
    env.DestroyAndExpectNoLeak("clean Create");
  }
  for (StatusCode code : kInjectedCodes) {
    for (int64_t i = 1; i <= count; ++i) {
      SCOPED_TRACE(absl::StrCat("Create: call ", i, " of ", count, " fails with ",
                                absl::StatusCodeToString(code)));
      Env env;
      MakeBackend(base, &env);
      ASSERT_FALSE(HasFatalFailure());
      KvCacheConfig config = base;
      config.vmm = env.fault;
      env.fault->FailNthAny(i, code);
      absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
      env.fault->DisarmAll();
      EXPECT_EQ(env.fault->injected_failures(), 1);
      if (cache.ok()) {
        KVMEM_EXPECT_OK((*cache)->CheckInvariants());
        env.cache = *std::move(cache);
      } else {
        EXPECT_EQ(cache.status().code(), code) << cache.status();
        // Nothing is left behind by a failed Create.
        const VmmCounters c = env.host->counters();
        EXPECT_EQ(c.live_reservations, 0);
        EXPECT_EQ(c.live_handles, 0);
        EXPECT_EQ(c.mapped_granules, 0);
      }
      env.DestroyAndExpectNoLeak("after Create");
      if (HasFailure()) return;
    }
  }
}

// Every call of one kind fails from the next on; operations fail cleanly (or succeed
// without that kind of call); disarmed, the cache works again.
TEST_P(KvCacheFaultTest, FailFromThenRecover) {
  const VmmOp kOps[] = {VmmOp::kCreate, VmmOp::kMap,  VmmOp::kSetAccess,
                        VmmOp::kUnmap,  VmmOp::kCopy, VmmOp::kRelease};
  for (VmmOp op : kOps) {
    SCOPED_TRACE(std::string(VmmOpName(op)));
    Env env;
    MakeEnv(FaultConfig(GetParam()), &env);
    ASSERT_FALSE(HasFatalFailure());
    CacheModel& m = *env.model;
    std::mt19937_64 rng(static_cast<int>(op) + 17);
    RequestId next = 1;
    auto step = [&](bool armed) {
      const std::vector<RequestId> ids = SnapshotIds(m, {next});
      const Snapshot before = TakeSnapshot(*env.cache, ids, /*with_data=*/false);
      const int r = std::uniform_int_distribution<int>(0, 99)(rng);
      absl::Status s;
      std::string what;
      if (m.size() == 0 || (r < 20 && m.size() < 5)) {
        what = "AddRequest";
        s = StatusOf(m.Add(next));
        if (s.ok()) ++next;
      } else {
        const std::vector<RequestId> live = m.ids();
        const RequestId id = live[std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng)];
        const int64_t len = m.LengthOf(id);
        if (r < 55) {
          const int64_t room = env.cache->config().max_context - len;
          const int64_t n =
              std::min<int64_t>(room, std::uniform_int_distribution<int64_t>(
                                          0, std::max<int64_t>(2 * env.tpp + 3, 40))(rng));
          what = absl::StrCat("Extend by ", n);
          s = StatusOf(m.Extend(id, n));
        } else if (r < 65) {
          what = "Truncate";
          s = m.Truncate(id, std::uniform_int_distribution<int64_t>(0, len)(rng));
        } else if (r < 80 && m.size() < 5) {
          what = "Fork";
          s = StatusOf(m.Fork(id, next));
          if (s.ok()) ++next;
        } else if (r < 95) {
          what = "Free";
          s = m.Free(id);
        } else {
          what = "Trim";
          s = StatusOf(env.cache->Trim());
        }
      }
      SCOPED_TRACE(what);
      KVMEM_ASSERT_OK(env.cache->CheckInvariants());
      if (!armed) {
        KVMEM_ASSERT_OK(s);
      } else if (!s.ok()) {
        EXPECT_TRUE(absl::StrContains(s.message(), "injected") ||
                    s.code() == StatusCode::kResourceExhausted)
            << s;
        EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*env.cache, ids, /*with_data=*/false)), "");
      }
      KVMEM_ASSERT_OK(m.VerifyAll());
    };
    for (int i = 0; i < 20; ++i) step(false);
    env.fault->FailFrom(op, 1);
    for (int i = 0; i < 40 && !HasFailure(); ++i) step(true);
    RecordProperty("injected_" + std::string(VmmOpName(op)),
                   static_cast<int>(env.fault->injected_failures()));
    env.fault->DisarmAll();
    for (int i = 0; i < 40 && !HasFailure(); ++i) step(false);
    // Everything still works: a full-length request fits once all others are gone.
    for (RequestId id : m.ids()) KVMEM_ASSERT_OK(m.Free(id));
    KVMEM_ASSERT_OK(m.Add(next));
    KVMEM_ASSERT_OK(m.Extend(next, env.cache->config().max_context));
    KVMEM_ASSERT_OK(m.VerifyAll());
    KVMEM_ASSERT_OK(env.cache->CheckInvariants());
    env.DestroyAndExpectNoLeak("FailFrom");
    if (HasFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, KvCacheFaultTest, ::testing::ValuesIn(AllLayouts()),
                         LayoutCaseName);

// One test per layout and operation; each stops at the first failing call it finds.
class KvCacheFaultScenarioTest
    : public ::testing::TestWithParam<std::tuple<LayoutCase, std::string>> {};

TEST_P(KvCacheFaultScenarioTest, EachBackendCallFails) {
  const auto& [layout, name] = GetParam();
  for (const Scenario& s : Scenarios()) {
    if (s.name == name) RunScenario(layout, s);
  }
}

std::vector<std::string> ScenarioNames() {
  std::vector<std::string> names;
  for (const Scenario& s : Scenarios()) names.push_back(s.name);
  return names;
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, KvCacheFaultScenarioTest,
    ::testing::Combine(::testing::ValuesIn(AllLayouts()), ::testing::ValuesIn(ScenarioNames())),
    [](const ::testing::TestParamInfo<std::tuple<LayoutCase, std::string>>& info) {
      return std::get<0>(info.param).name + "_" + std::get<1>(info.param);
    });

}  // namespace
}  // namespace kvmem::test
