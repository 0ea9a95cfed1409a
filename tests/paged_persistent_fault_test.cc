// Persistent backend failures on the paged layout, and two failure kinds at once on every
// layout. A FaultInjectingVmm (passed in config.vmm) makes every Create, Release, Map,
// SetAccess, Unmap or Copy fail from the k-th on, for every k up to the number of such
// calls an operation makes (Extend that grows the pool, Extend that grows the pool and
// copies a shared page, copy on write by the child and by the parent of a Fork, Fork
// itself, Trim), for page_tokens 1, 3 and 16, elastic and fixed pools. After the failing
// call: the status is the injected error, CheckInvariants passes, the backend holds
// exactly what the stats say (mapped and physical bytes; every pool mapped and accessible
// up to the mapped chunks and nothing beyond them), and GetStats, the backend's live
// counts and every request's index and K/V data (written with ReferenceAppendKv and read
// back) are as before the call. A second call while the backend still fails must keep
// all that. Once the backend recovers, the same call succeeds, every request reads back,
// more work runs, the whole budget is usable again and the destroyed cache leaves nothing
// in the backend.
//
// Then two kinds at once, through the KvCache API only, on both layouts: a call fails
// (Map, SetAccess, Create, Copy or Unmap) and the call its undo needs (Unmap, Release or
// Map) fails too. The contract of docs/errors.md: the status carries the backend's code
// (never Internal, which means a kvmem bug) and says when the cache is not as before;
// the records stay true to what the backend holds; untouched requests keep their data; a
// second call while both kinds still fail retries what the first left (on the virtual
// layout, a growth over pages the first left mapped takes them as they are) and fails as
// cleanly; once the backend recovers the cache works as before and nothing leaks.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/cache_test_util.h"
#include "tests/fault_test_env.h"

namespace kvmem::test {
namespace {

constexpr absl::StatusCode kCode = absl::StatusCode::kUnavailable;
constexpr VmmOp kOps[] = {VmmOp::kCreate,    VmmOp::kRelease, VmmOp::kMap,
                          VmmOp::kSetAccess, VmmOp::kUnmap,   VmmOp::kCopy};

std::vector<LayoutCase> PagedLayouts() {
  std::vector<LayoutCase> out;
  for (const LayoutCase& c : AllLayouts()) {
    if (c.layout == Layout::kPaged) out.push_back(c);
  }
  return out;
}

// Paged only: the backend holds exactly what the stats say. The pool's chunks: every pool
// (K and V of each layer, each in its region of the reservation) mapped and accessible
// over the same first granules, exactly the ones that hold the pages the stats count
// usable (held + idle). Beyond them, only what a failed undo left (docs/errors.md, rule
// 8): granules mapped outside the chunks, whose free pages the stats count quarantined
// (no fence is pending here), and handles whose release failed; mapped_bytes and
// physical_bytes count those too. CheckInvariants of the paged layout compares its own
// records with the backend; this compares the public numbers with it.
absl::Status PagedBackendMatches(const Env& env) {
  const KvCacheConfig& c = env.config();
  const Stats s = env.cache->GetStats();
  const VmmCounters v = env.host->counters();
  const int64_t g = c.host_granularity;
  if (v.mapped_granules * g != s.mapped_bytes) {
    return absl::InternalError(
        absl::StrFormat("the backend maps %d granules (%d bytes), stats "
                        "say %d bytes are mapped",
                        v.mapped_granules, v.mapped_granules * g, s.mapped_bytes));
  }
  if (v.live_handles * g != s.physical_bytes) {
    return absl::InternalError(
        absl::StrFormat("the backend holds %d handles (%d bytes), stats say %d physical bytes",
                        v.live_handles, v.live_handles * g, s.physical_bytes));
  }
  const int64_t pool_page_bytes = c.page_tokens * c.TokenLayerBytes();
  const int64_t region_granules = (s.pages_total * pool_page_bytes + g - 1) / g;
  // Per granule of the regions: mapped and accessible in every pool; mapped in some.
  std::vector<bool> whole(region_granules, true);
  std::vector<bool> some(region_granules, false);
  const BatchMetadata empty;
  for (int layer = 0; layer < c.num_layers; ++layer) {
    absl::StatusOr<PagedKv> view = env.cache->PagedView(layer, empty);
    if (!view.ok()) return view.status();
    for (int kv = 0; kv < 2; ++kv) {
      const uintptr_t base = reinterpret_cast<uintptr_t>(kv == 0 ? view->k : view->v);
      for (int64_t i = 0; i < region_granules; ++i) {
        absl::StatusOr<MappingState> q = env.host->Query(base + i * g);
        if (!q.ok()) return q.status();
        if (!q->mapped || !q->accessible) whole[i] = false;
        if (q->mapped) some[i] = true;
      }
    }
  }
  const int64_t chunks = std::find(whole.begin(), whole.end(), false) - whole.begin();
  const int64_t usable = (s.held_bytes + s.idle_bytes) / s.page_bytes;
  const int64_t mapped_pages = std::min(s.pages_total, chunks * g / pool_page_bytes);
  if (usable != mapped_pages) {
    return absl::InternalError(absl::StrFormat(
        "stats count %d usable pages; the backend maps granules [0, %d) of every pool, which "
        "hold %d",
        usable, chunks, mapped_pages));
  }
  // The pages (all beyond the usable ones) of granules mapped outside the chunks.
  int64_t held_back = 0;
  int64_t next = usable;
  std::string outside;
  for (int64_t i = chunks; i < region_granules; ++i) {
    if (!some[i]) continue;
    absl::StrAppend(&outside, outside.empty() ? "" : ", ", i);
    const int64_t lo = std::max(next, i * g / pool_page_bytes);
    const int64_t hi =
        std::min(s.pages_total, ((i + 1) * g + pool_page_bytes - 1) / pool_page_bytes);
    if (hi > lo) {
      held_back += hi - lo;
      next = hi;
    }
  }
  if (s.pages_quarantined != held_back) {
    return absl::InternalError(absl::StrFormat(
        "stats count %d pages quarantined; the backend maps granules [%s] outside the %d "
        "chunks, which hold %d pages",
        s.pages_quarantined, outside, chunks, held_back));
  }
  return absl::OkStatus();
}

// What a failed call may have changed: nothing, for the paged layout (all or nothing),
// except pages whose fence completed (none here: every fence is null).
void ExpectUnchanged(const Snapshot& before, const Env& env, const std::vector<RequestId>& ids) {
  EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*env.cache, ids)), "");
}

struct Scenario {
  std::string name;
  std::function<void(Env&)> setup;  // gtest assertions inside
  std::function<absl::Status(Env&)> op;
  std::vector<RequestId> touched;  // requests whose state the op changes (or creates)
};

// A growth that needs new memory in an elastic pool: several pages, and past the first
// granule of every pool (where many small pages share one granule).
int64_t GrowthTokens(const Env& e) {
  const KvCacheConfig& c = e.config();
  return std::max<int64_t>(3 * e.tpp + 2, c.host_granularity / c.TokenLayerBytes() + e.tpp + 1);
}

// Request 1 with two full pages and a partly filled third (page_tokens 1: three full
// ones), forked into request 2: both share every page.
void Forked(Env& e) {
  KVMEM_ASSERT_OK(e.model->Add(1));
  KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + (e.tpp + 1) / 2));
  KVMEM_ASSERT_OK(e.model->Fork(1, 2));
}

std::vector<Scenario> Scenarios() {
  std::vector<Scenario> out;
  out.push_back({.name = "ExtendGrowsThePool",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 1));
                       KVMEM_ASSERT_OK(e.model->Add(2));
                       KVMEM_ASSERT_OK(e.model->Extend(2, e.tpp));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Extend(1, GrowthTokens(e))); },
                 .touched = {1}});
  // The child writes into the shared, partly filled last page (a copy) and grows the
  // pool in the same call: a failed copy undoes the growth.
  out.push_back({.name = "ExtendGrowsThePoolAndCopiesOnWrite",
                 .setup = Forked,
                 .op =
                     [](Env& e) {
                       const int64_t room = e.config().max_context - e.model->LengthOf(2);
                       return StatusOf(e.model->Extend(2, std::min(GrowthTokens(e), room)));
                     },
                 .touched = {2}});
  out.push_back({.name = "CopyOnWriteByTheChild",
                 .setup = Forked,
                 .op = [](Env& e) { return StatusOf(e.model->Extend(2, 1)); },
                 .touched = {2}});
  out.push_back({.name = "CopyOnWriteByTheParent",
                 .setup = Forked,
                 .op = [](Env& e) { return StatusOf(e.model->Extend(1, 1)); },
                 .touched = {1}});
  // The child of a fork rewinds into the shared prefix and writes there.
  out.push_back({.name = "TruncatedChildWritesIntoTheSharedPrefix",
                 .setup =
                     [](Env& e) {
                       Forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Truncate(2, e.tpp + (e.tpp + 1) / 2));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Extend(2, e.tpp)); },
                 .touched = {2}});
  out.push_back({.name = "Fork",
                 .setup =
                     [](Env& e) {
                       KVMEM_ASSERT_OK(e.model->Add(1));
                       KVMEM_ASSERT_OK(e.model->Extend(1, 2 * e.tpp + (e.tpp + 1) / 2));
                     },
                 .op = [](Env& e) { return StatusOf(e.model->Fork(1, 2)); },
                 .touched = {2}});
  // Requests 3 and 4 grew the pool, then ended: Trim gives back the chunks past the
  // shared pages of 1 and 2.
  out.push_back({.name = "Trim",
                 .setup =
                     [](Env& e) {
                       Forked(e);
                       ASSERT_FALSE(::testing::Test::HasFatalFailure());
                       KVMEM_ASSERT_OK(e.model->Add(3));
                       KVMEM_ASSERT_OK(e.model->Extend(3, GrowthTokens(e)));
                       KVMEM_ASSERT_OK(e.model->Add(4));
                       KVMEM_ASSERT_OK(e.model->Extend(
                           4, std::min(2 * GrowthTokens(e), e.config().max_context)));
                       KVMEM_ASSERT_OK(e.model->Free(4));
                       KVMEM_ASSERT_OK(e.model->Free(3));
                     },
                 .op = [](Env& e) { return StatusOf(e.cache->Trim()); },
                 .touched = {}});
  return out;
}

KvCacheConfig ConfigFor(const LayoutCase& layout, bool elastic) {
  KvCacheConfig config = SmallConfig(layout);
  config.max_requests = 6;
  config.memory_budget_bytes = int64_t{512} << 10;
  config.elastic_pool = elastic;
  return config;
}

void Start(const KvCacheConfig& config, const Scenario& s, Env* env) {
  MakeEnv(config, env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  s.setup(*env);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  KVMEM_ASSERT_OK(env->cache->CheckInvariants());
  if (config.layout == Layout::kPaged) KVMEM_ASSERT_OK(PagedBackendMatches(*env));
  KVMEM_ASSERT_OK(env->model->VerifyAll());
}

// After a call made while the backend keeps failing: the status, the invariants, the
// backend against the stats, and, if the call failed, everything as before it.
void CheckAfterArmedCall(const Env& env, const absl::Status& status, const Snapshot& before,
                         const std::vector<RequestId>& ids) {
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  KVMEM_EXPECT_OK(PagedBackendMatches(env));
  if (!status.ok()) {
    EXPECT_EQ(status.code(), kCode) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), "injected")) << status;
    ExpectUnchanged(before, env, ids);
  }
  // Reading is safe only where the backend maps what the layout hands out.
  if (PagedBackendMatches(env).ok()) KVMEM_EXPECT_OK(env.model->VerifyAll());
}

// After the backend recovered: more work runs everywhere, Trim, then the whole budget
// holds one request at max_context again, and the destroyed cache leaves nothing.
void CheckRecovered(Env& env) {
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  const absl::Status matches = PagedBackendMatches(env);
  KVMEM_EXPECT_OK(matches);
  if (!matches.ok()) {
    // Pages the layout would hand out may not be mapped: no more work, but destruction
    // must still leave nothing behind.
    env.DestroyAndExpectNoLeak();
    return;
  }
  KVMEM_EXPECT_OK(env.model->VerifyAll());
  for (RequestId id : env.model->ids()) {
    const int64_t room = env.config().max_context - env.model->LengthOf(id);
    KVMEM_EXPECT_OK(env.model->Extend(id, std::min(room, env.tpp + 1)));
  }
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  KVMEM_EXPECT_OK(PagedBackendMatches(env));
  KVMEM_EXPECT_OK(env.model->VerifyAll());
  KVMEM_EXPECT_OK(env.cache->Trim());
  KVMEM_EXPECT_OK(PagedBackendMatches(env));
  for (RequestId id : env.model->ids()) KVMEM_EXPECT_OK(env.model->Free(id));
  KVMEM_EXPECT_OK(env.cache->Trim());
  const Stats s = env.cache->GetStats();
  EXPECT_EQ(s.pages_free, s.pages_total);
  KVMEM_EXPECT_OK(env.model->Add(100));
  KVMEM_EXPECT_OK(env.model->Extend(100, env.config().max_context));
  KVMEM_EXPECT_OK(env.cache->CheckInvariants());
  KVMEM_EXPECT_OK(PagedBackendMatches(env));
  KVMEM_EXPECT_OK(env.model->VerifyAll());
  env.DestroyAndExpectNoLeak();
}

void RunScenario(const LayoutCase& layout, bool elastic, const Scenario& s) {
  const KvCacheConfig config = ConfigFor(layout, elastic);
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
      const Snapshot before = TakeSnapshot(*env.cache, ids);
      env.fault->FailFrom(op, k, kCode);
      const absl::Status status = s.op(env);
      CheckAfterArmedCall(env, status, before, ids);
      bool done = status.ok();
      if (!done) {
        // Still failing: the next call fails or succeeds just as cleanly.
        ids = SnapshotIds(*env.model, s.touched);
        const Snapshot again_before = TakeSnapshot(*env.cache, ids);
        const absl::Status again = s.op(env);
        CheckAfterArmedCall(env, again, again_before, ids);
        done = again.ok();
      }
      env.fault->DisarmAll();
      if (!done) KVMEM_EXPECT_OK(s.op(env));
      CheckRecovered(env);
      if (::testing::Test::HasFailure()) return;  // one failing case is enough to read
    }
  }
}

class PagedPersistentFaultTest
    : public ::testing::TestWithParam<std::tuple<LayoutCase, bool, std::string>> {};

TEST_P(PagedPersistentFaultTest, FailFromEveryCallThenRecover) {
  const auto& [layout, elastic, name] = GetParam();
  for (const Scenario& s : Scenarios()) {
    if (s.name == name) RunScenario(layout, elastic, s);
  }
}

std::vector<std::string> ScenarioNames() {
  std::vector<std::string> names;
  for (const Scenario& s : Scenarios()) names.push_back(s.name);
  return names;
}

INSTANTIATE_TEST_SUITE_P(
    Paged, PagedPersistentFaultTest,
    ::testing::Combine(::testing::ValuesIn(PagedLayouts()), ::testing::Bool(),
                       ::testing::ValuesIn(ScenarioNames())),
    [](const ::testing::TestParamInfo<std::tuple<LayoutCase, bool, std::string>>& info) {
      return std::get<0>(info.param).name + (std::get<1>(info.param) ? "_Elastic_" : "_Fixed_") +
             std::get<2>(info.param);
    });

// ---- two failure kinds at once, every layout, through the KvCache API -----------------

// A call fails at `first` (from its k-th call of that kind on, for every k it makes) while
// every `undo` call fails as well: the calls the layout needs to take back what it did.
struct TwoKinds {
  std::string scenario;
  VmmOp first;
  VmmOp undo;
};

std::vector<TwoKinds> TwoKindCases() {
  return {
      {"ExtendGrowsThePool", VmmOp::kMap, VmmOp::kUnmap},
      {"ExtendGrowsThePool", VmmOp::kMap, VmmOp::kRelease},
      {"ExtendGrowsThePool", VmmOp::kSetAccess, VmmOp::kUnmap},
      {"ExtendGrowsThePool", VmmOp::kCreate, VmmOp::kRelease},
      {"ExtendGrowsThePoolAndCopiesOnWrite", VmmOp::kCopy, VmmOp::kUnmap},
      {"ExtendGrowsThePoolAndCopiesOnWrite", VmmOp::kCopy, VmmOp::kRelease},
      {"CopyOnWriteByTheChild", VmmOp::kCopy, VmmOp::kUnmap},
      {"CopyOnWriteByTheChild", VmmOp::kMap, VmmOp::kUnmap},
      {"CopyOnWriteByTheChild", VmmOp::kSetAccess, VmmOp::kUnmap},
      {"Trim", VmmOp::kUnmap, VmmOp::kMap},
      {"Trim", VmmOp::kUnmap, VmmOp::kSetAccess},
  };
}

void PrintTo(const TwoKinds& t, std::ostream* os) {
  *os << t.scenario << ": " << VmmOpName(t.first) << ", then " << VmmOpName(t.undo);
}

std::string TwoKindsName(const TwoKinds& t) {
  std::string first(VmmOpName(t.first)), undo(VmmOpName(t.undo));
  first.erase(std::remove(first.begin(), first.end(), '_'), first.end());
  undo.erase(std::remove(undo.begin(), undo.end(), '_'), undo.end());
  return absl::StrCat(t.scenario, "_", first, "_ThenUndo", undo);
}

void RunTwoKinds(const LayoutCase& layout, const TwoKinds& t) {
  const Scenario* found = nullptr;
  const std::vector<Scenario> scenarios = Scenarios();
  for (const Scenario& s : scenarios) {
    if (s.name == t.scenario) found = &s;
  }
  ASSERT_NE(found, nullptr) << t.scenario;
  const Scenario& s = *found;
  const KvCacheConfig config = ConfigFor(layout, /*elastic=*/true);
  const bool paged = layout.layout == Layout::kPaged;
  int64_t count = 0;
  {
    Env env;
    Start(config, s, &env);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    const int64_t before = env.fault->calls(t.first);
    KVMEM_ASSERT_OK(s.op(env));
    count = env.fault->calls(t.first) - before;
    env.DestroyAndExpectNoLeak();
  }
  for (int64_t k = 1; k <= count; ++k) {
    SCOPED_TRACE(absl::StrCat(layout.name, " ", s.name, ": every ", std::string(VmmOpName(t.first)),
                              " fails from call ", k, " of ", count, ", every ",
                              std::string(VmmOpName(t.undo)), " too"));
    Env env;
    Start(config, s, &env);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    const std::vector<RequestId> ids = SnapshotIds(*env.model, s.touched);
    const Snapshot before = TakeSnapshot(*env.cache, ids);
    env.fault->FailFrom(t.first, k, kCode);
    env.fault->FailFrom(t.undo, 1, kCode);
    const absl::Status status = s.op(env);
    KVMEM_EXPECT_OK(env.cache->CheckInvariants());
    bool changed = false;
    bool unreadable = false;
    if (!status.ok()) {
      EXPECT_EQ(status.code(), kCode) << status;
      EXPECT_TRUE(absl::StrContains(status.message(), "injected")) << status;
      changed = absl::StrContains(status.message(), "not as before");
      unreadable = absl::StrContains(status.message(), "cannot be read");
      if (!changed) ExpectUnchanged(before, env, ids);
    }
    bool safe_to_read = true;
    if (paged) {
      const absl::Status matches = PagedBackendMatches(env);
      KVMEM_EXPECT_OK(matches);
      safe_to_read = matches.ok();
    }
    // Requests the call did not touch keep their data; touched ones too unless the
    // status says they cannot be read.
    if (safe_to_read) {
      for (RequestId id : env.model->ids()) {
        if (unreadable && std::find(s.touched.begin(), s.touched.end(), id) != s.touched.end()) {
          continue;
        }
        KVMEM_EXPECT_OK(env.model->Verify(id));
      }
    }
    absl::Status last = status;
    if (!status.ok()) {
      // Still failing: the next call first retries what the failed one left, then fails
      // or succeeds just as cleanly, and the records stay true to the backend.
      const std::vector<RequestId> again_ids = SnapshotIds(*env.model, s.touched);
      const Snapshot again_before = TakeSnapshot(*env.cache, again_ids);
      last = s.op(env);
      KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      if (!last.ok()) {
        EXPECT_EQ(last.code(), kCode) << last;
        EXPECT_TRUE(absl::StrContains(last.message(), "injected")) << last;
        if (!absl::StrContains(last.message(), "not as before")) {
          ExpectUnchanged(again_before, env, again_ids);
        }
      }
      if (paged) KVMEM_EXPECT_OK(PagedBackendMatches(env));
    }
    env.fault->DisarmAll();
    if (!last.ok()) KVMEM_EXPECT_OK(s.op(env));
    if (paged) {
      CheckRecovered(env);
    } else {
      KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      EXPECT_EQ(env.cache->GetStats().pages_quarantined, 0);
      KVMEM_EXPECT_OK(env.model->VerifyAll());
      if (::testing::Test::HasFailure()) return;
      KVMEM_EXPECT_OK(env.cache->Trim());
      for (RequestId id : env.model->ids()) KVMEM_EXPECT_OK(env.model->Free(id));
      KVMEM_EXPECT_OK(env.model->Add(100));
      KVMEM_EXPECT_OK(env.model->Extend(100, env.config().max_context));
      KVMEM_EXPECT_OK(env.cache->CheckInvariants());
      KVMEM_EXPECT_OK(env.model->VerifyAll());
      env.DestroyAndExpectNoLeak();
    }
    if (::testing::Test::HasFailure()) return;  // one failing case is enough to read
  }
}

class TwoFailureKindsTest : public ::testing::TestWithParam<std::tuple<LayoutCase, TwoKinds>> {};

TEST_P(TwoFailureKindsTest, UndoFailsTooThenRecover) {
  const auto& [layout, kinds] = GetParam();
  RunTwoKinds(layout, kinds);
}

INSTANTIATE_TEST_SUITE_P(
    AllLayouts, TwoFailureKindsTest,
    ::testing::Combine(::testing::ValuesIn(AllLayouts()), ::testing::ValuesIn(TwoKindCases())),
    [](const ::testing::TestParamInfo<std::tuple<LayoutCase, TwoKinds>>& info) {
      return std::get<0>(info.param).name + "_" + TwoKindsName(std::get<1>(info.param));
    });

}  // namespace
}  // namespace kvmem::test
