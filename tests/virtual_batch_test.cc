// Tests of the virtual layout's batch calls (GrowBatch, ShrinkBatch, ReleaseBatch) driven
// directly through internal::KvLayout on the host backend, in every arrangement: the
// slots in step order, decode steps that make no backend call and no heap allocation,
// all or nothing for the whole batch (a bad step, a repeated row, out of memory, and a
// backend failure at every call of a batch that maps new pages, copies on write and
// reclaims from an idle row, once and persistently), then recovery. Also the incremental
// live-byte count against the recounts CheckInvariants makes (after randomized operations
// with sharing and truncation into shared prefixes), and AcquireRow's choice of row with
// fences.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "allocators/virtual/virtual_layout.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/stats.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/virtual_layout_harness.h"

namespace kvmem::internal {
namespace {

// Heap allocations made by this thread while `counting` (operator new is replaced at the
// end of this file).
thread_local bool counting = false;
thread_local int64_t allocations = 0;

}  // namespace

void CountAllocation() {
  if (counting) ++allocations;
}

namespace {

using namespace testing_virtual;  // NOLINT: the harness of these tests

struct ArrangementCase {
  std::string name;
  Arrangement arrangement;
  int chunk;  // KvCacheConfig::chunk_tokens
};

std::vector<ArrangementCase> Arrangements() {
  return {{"AllLayersChunked", Arrangement::kAllLayers, 0},
          {"AllLayersUnchunked", Arrangement::kAllLayers, 1},
          {"PerLayer", Arrangement::kPerLayer, 0}};
}

void PrintTo(const ArrangementCase& c, std::ostream* os) { *os << c.name; }

KvCacheConfig Config(const ArrangementCase& a, int rows, int64_t max_context) {
  KvCacheConfig c = SmallConfig(a.arrangement, k4K);
  c.chunk_tokens = a.chunk;
  c.max_requests = rows;
  c.max_context = max_context;
  c.memory_budget_bytes = BudgetFor(c, k4K, rows);
  return c;
}

// Pages (all segments) a live row of `len` tokens maps under config `c`.
int64_t PagesOf(const KvCacheConfig& c, int64_t len) {
  const VirtualGeometry g = *VirtualGeometry::Make(c, k4K);
  return g.segments * g.PagesFor(len);
}

// Everything a caller can observe: the stats and the backend's live resources.
struct Snapshot {
  Stats stats;
  int64_t mapped_granules = 0;
  int64_t live_handles = 0;
  std::vector<std::pair<int32_t, int64_t>> rows;  // (row, length) of every live row
};

Snapshot Take(Harness& h) {
  Snapshot s;
  s.stats = h.GetStats();
  s.mapped_granules = h.vmm().counters().mapped_granules;
  s.live_handles = h.vmm().counters().live_handles;
  for (int32_t row : h.LiveRows()) s.rows.emplace_back(row, h.len(row));
  return s;
}

// "" when equal, else what differs.
std::string Diff(const Snapshot& a, const Snapshot& b) {
  std::string out;
  auto cmp = [&](const char* what, int64_t x, int64_t y) {
    if (x != y) absl::StrAppend(&out, what, " ", x, " -> ", y, "; ");
  };
  const Stats& p = a.stats;
  const Stats& q = b.stats;
  cmp("stored_tokens", p.stored_tokens, q.stored_tokens);
  cmp("live_bytes", p.live_bytes, q.live_bytes);
  cmp("held_bytes", p.held_bytes, q.held_bytes);
  cmp("idle_bytes", p.idle_bytes, q.idle_bytes);
  cmp("mapped_bytes", p.mapped_bytes, q.mapped_bytes);
  cmp("pages_free", p.pages_free, q.pages_free);
  cmp("pages_used", p.pages_used, q.pages_used);
  cmp("pages_shared", p.pages_shared, q.pages_shared);
  cmp("pages_quarantined", p.pages_quarantined, q.pages_quarantined);
  cmp("peak_held_bytes", p.peak_held_bytes, q.peak_held_bytes);
  cmp("peak_live_bytes", p.peak_live_bytes, q.peak_live_bytes);
  cmp("cow_copies", p.cow_copies, q.cow_copies);
  cmp("pages_reclaimed", p.pages_reclaimed, q.pages_reclaimed);
  cmp("map_stalls", p.map_stalls, q.map_stalls);
  cmp("vmm mapped_granules", a.mapped_granules, b.mapped_granules);
  cmp("vmm live_handles", a.live_handles, b.live_handles);
  if (a.rows != b.rows) out += "live rows or lengths changed; ";
  return out;
}

constexpr int kNumOps = static_cast<int>(VmmOp::kCount);

class VirtualBatch : public ::testing::TestWithParam<ArrangementCase> {};

// ---- success paths ---------------------------------------------------------------------

TEST_P(VirtualBatch, GrowBatchWritesSlotsInStepOrderAndMixesFastAndSlowRows) {
  const KvCacheConfig c = Config(GetParam(), 6, 64);
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  const int32_t p = *h->Add();
  ASSERT_OK(h->Grow(a, 3, 1));
  ASSERT_OK(h->Grow(p, 37, 2));  // a partly filled last page (or chunk) in every arrangement
  const int32_t child = *h->Fork(p);
  ASSERT_OK(h->Check());
  // Steps out of row order, one of them empty: a grows in its first page, b maps its
  // first pages, the child copies the shared last chunk, the parent grows nothing.
  ASSERT_OK(h->GrowBatch({{b, 7}, {a, 1}, {p, 0}, {child, 5}}, 3));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->len(a), 4);
  EXPECT_EQ(h->len(b), 7);
  EXPECT_EQ(h->len(p), 37);
  EXPECT_EQ(h->len(child), 42);
  EXPECT_EQ(h->AllMismatches(), 0);
  const Stats s = h->GetStats();
  EXPECT_GT(s.cow_copies, 0);
  // The parent and the child still share their first full chunks.
  EXPECT_GT(s.pages_shared, 0);
  EXPECT_EQ(s.stored_tokens * c.TokenBytes(), s.live_bytes);

  // Then the parent writes into what it shared: its copy comes from the batch too.
  ASSERT_OK(h->GrowBatch({{p, 2}, {child, 1}, {a, 1}}, 4));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

TEST_P(VirtualBatch, DecodeStepBatchMakesNoBackendCall) {
  const KvCacheConfig c = Config(GetParam(), 4, 64);
  auto h = *Harness::Make(c);
  std::vector<int32_t> rows;
  for (int i = 0; i < 4; ++i) {
    rows.push_back(*h->Add());
    ASSERT_OK(h->Grow(rows.back(), 1, i));
  }
  // Grow each row by 1 while that stays inside the pages its first growth mapped.
  const VirtualGeometry& g = h->layout().geometry();
  const VmmCounters before = h->vmm().counters();
  int tag = 10;
  for (;;) {
    std::vector<std::pair<int32_t, int64_t>> step;
    bool inside = true;
    for (int32_t row : rows) {
      inside &= g.PagesFor(h->len(row) + 1) == g.PagesFor(h->len(row));
      step.emplace_back(row, 1);
    }
    if (!inside) break;
    ASSERT_OK(h->GrowBatch(step, tag++));
  }
  EXPECT_GT(tag, 10) << "no decode step fitted in the first pages";
  const VmmCounters after = h->vmm().counters();
  for (int op = 0; op < kNumOps; ++op) {
    EXPECT_EQ(after.calls[op], before.calls[op]) << VmmOpName(static_cast<VmmOp>(op));
  }
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

// The decode step of an engine: every row grows by one token inside the pages it maps.
TEST_P(VirtualBatch, DecodeStepAllocatesNothing) {
  const KvCacheConfig c = Config(GetParam(), 4, 64);
  auto h = *Harness::Make(c);
  std::vector<KvLayout::GrowStep> steps;
  for (int i = 0; i < 4; ++i) {
    const int32_t row = *h->Add();
    ASSERT_OK(h->Grow(row, 1, i));
    steps.push_back({.row = row, .len = 1, .n = 1});
  }
  std::vector<int64_t> out(steps.size());
  std::vector<int64_t> locs;
  locs.reserve(1);
  counting = true;
  allocations = 0;
  const absl::Status batch = h->layout().GrowBatch(steps, out.data());
  const absl::Status single = h->layout().Grow(steps[0].row, 2, 1, &locs);
  const int64_t made = allocations;
  auto probe = std::make_unique<int>(1);  // the count works
  const int64_t probed = allocations - made;
  counting = false;
  ASSERT_OK(batch);
  ASSERT_OK(single);
  EXPECT_EQ(made, 0);
  EXPECT_EQ(probed, 1);
  EXPECT_EQ(out[3], steps[3].row * c.max_context + 1);
  EXPECT_EQ(locs[0], steps[0].row * c.max_context + 2);
}

TEST_P(VirtualBatch, ShrinkBatchDropsSharedPagesOfEveryRow) {
  const KvCacheConfig c = Config(GetParam(), 6, 64);
  auto h = *Harness::Make(c);
  const int32_t p = *h->Add();
  ASSERT_OK(h->Grow(p, 30, 1));
  const int32_t c1 = *h->Fork(p);
  const int32_t c2 = *h->Fork(p);
  ASSERT_OK(h->GrowBatch({{c1, 3}, {c2, 5}}, 2));
  const int64_t shared_before = h->GetStats().pages_shared;
  ASSERT_GT(shared_before, 0);
  const int64_t granules_before = h->vmm().counters().mapped_granules;
  // Into the shared prefix, to its start, and within the private tail.
  ASSERT_OK(h->ShrinkBatch({{c1, 7}, {c2, 0}, {p, 29}}));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->len(c1), 7);
  EXPECT_EQ(h->len(c2), 0);
  EXPECT_EQ(h->len(p), 29);
  EXPECT_LE(h->GetStats().pages_shared, shared_before);
  EXPECT_LT(h->vmm().counters().mapped_granules, granules_before);  // c2's aliases went
  EXPECT_EQ(h->AllMismatches(), 0);
  // Regrowth after it: the parent writes into a page it may still share with c1.
  ASSERT_OK(h->GrowBatch({{c1, 9}, {c2, 4}, {p, 3}}, 3));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

TEST_P(VirtualBatch, ReleaseBatchUnderOneFence) {
  const KvCacheConfig c = Config(GetParam(), 4, 64);
  std::atomic<bool> done{false};  // outlives the layout, which reads it
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  const int32_t d = *h->Add();
  ASSERT_OK(h->Grow(a, 20, 1));
  ASSERT_OK(h->Grow(b, 40, 2));
  const int32_t child = *h->Fork(b);
  ASSERT_OK(h->Grow(child, 10, 3));  // past b's pages in every arrangement
  const VmmCounters before = h->vmm().counters();
  ASSERT_OK(h->FreeBatch({b, child, a}, Fence{&done}));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->vmm().counters().calls[static_cast<int>(VmmOp::kUnmap)],
            before.calls[static_cast<int>(VmmOp::kUnmap)]);
  EXPECT_GT(h->GetStats().pages_quarantined, 0);
  // Only d is live, and every other row waits for the fence.
  EXPECT_EQ(h->Add().status().code(), absl::StatusCode::kResourceExhausted);
  done.store(true);
  EXPECT_EQ(h->GetStats().pages_quarantined, 0);  // a completed fence counts at once
  // The child's row holds the most pages (its aliases of b's pages and its own).
  EXPECT_EQ(*h->Add(), child);
  ASSERT_OK(h->Check());
  (void)d;
}

// ---- all or nothing without the backend -------------------------------------------------

TEST_P(VirtualBatch, BadStepOrRepeatedRowChangesNothing) {
  const KvCacheConfig c = Config(GetParam(), 4, 64);
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  ASSERT_OK(h->Grow(a, 5, 1));
  ASSERT_OK(h->Grow(b, 9, 2));
  const Snapshot before = Take(*h);
  const VmmCounters calls = h->vmm().counters();
  // A step past max_context after a valid one that needs new pages.
  EXPECT_EQ(h->GrowBatch({{a, 20}, {b, 60}}, 3).code(), absl::StatusCode::kOutOfRange);
  // A row twice.
  EXPECT_EQ(h->GrowBatch({{a, 1}, {b, 1}, {a, 1}}, 3).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(h->ShrinkBatch({{b, 1}, {b, 0}}).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(h->ShrinkBatch({{a, 1}, {b, 10}}).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(h->FreeBatch({a, b, a}).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(Diff(before, Take(*h)), "");
  const VmmCounters after = h->vmm().counters();
  for (int op = 0; op < kNumOps; ++op) {
    EXPECT_EQ(after.calls[op], calls.calls[op]) << VmmOpName(static_cast<VmmOp>(op));
  }
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
  // The rows still work.
  ASSERT_OK(h->GrowBatch({{a, 1}, {b, 1}}, 4));
  ASSERT_OK(h->FreeBatch({a, b}));
  ASSERT_OK(h->Check());
}

TEST_P(VirtualBatch, OutOfMemoryForOneRowChangesNoRow) {
  KvCacheConfig c = Config(GetParam(), 4, 64);
  c.memory_budget_bytes = PagesOf(c, 64) * k4K + PagesOf(c, 16) * k4K;
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  ASSERT_OK(h->Grow(a, 2, 1));
  ASSERT_OK(h->Grow(b, 40, 2));
  const Snapshot before = Take(*h);
  // a fits on its own, but not beside b's growth to max_context.
  EXPECT_EQ(h->GrowBatch({{a, 30}, {b, 24}}, 3).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(h->Check());
  EXPECT_EQ(Diff(before, Take(*h)), "");
  EXPECT_EQ(h->AllMismatches(), 0);
  ASSERT_OK(h->GrowBatch({{a, 10}, {b, 24}}, 4));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

// ---- backend failures -------------------------------------------------------------------

// Rows of the fault scenarios.
struct Rows {
  int32_t parent = -1, child = -1, fast = -1, fresh = -1, idle = -1, bystander = -1;
  int32_t fork2 = -1;  // ScenarioPrepareShrink's
};

// A layout over `faulty` whose next batch needs everything at once: `fast` grows inside
// its private range, `child` writes into the chunk it shares with `parent` (a copy),
// `fresh` maps new pages, and no page is free: they come from the idle row `idle`
// (reclamation). `bystander` is not in the batch.
std::unique_ptr<Harness> MakeScenario(const ArrangementCase& a,
                                      const std::shared_ptr<FaultInjectingVmm>& faulty, Rows* r) {
  KvCacheConfig c = Config(a, 6, 32);
  // Exactly what the rows below map, so that the pool is empty once they have.
  c.memory_budget_bytes =
      (PagesOf(c, 10) + PagesOf(c, 5) + PagesOf(c, 1) + PagesOf(c, 32) + PagesOf(c, 3)) * k4K;
  absl::StatusOr<std::unique_ptr<Harness>> made = Harness::Make(c, faulty);
  EXPECT_TRUE(made.ok()) << made.status();
  if (!made.ok()) return nullptr;
  std::unique_ptr<Harness> h = std::move(*made);
  r->parent = *h->Add();
  EXPECT_TRUE(h->Grow(r->parent, 10, 1).ok());
  r->child = *h->Fork(r->parent);
  r->fast = *h->Add();
  EXPECT_TRUE(h->Grow(r->fast, 5, 2).ok());
  r->fresh = *h->Add();
  EXPECT_TRUE(h->Grow(r->fresh, 1, 3).ok());
  r->idle = *h->Add();
  EXPECT_TRUE(h->Grow(r->idle, 32, 4).ok());
  r->bystander = *h->Add();
  EXPECT_TRUE(h->Grow(r->bystander, 3, 5).ok());
  EXPECT_TRUE(h->Free(r->idle).ok());
  EXPECT_EQ(h->GetStats().pages_free, 0);
  EXPECT_TRUE(h->Check().ok()) << h->Check();
  return h;
}

absl::Status ScenarioGrow(Harness& h, const Rows& r) {
  const int64_t fast_room = 2;  // inside its first chunk in every arrangement
  return h.GrowBatch({{r.fresh, 12}, {r.fast, fast_room}, {r.child, 3}, {r.parent, 0}}, 9);
}

// After ScenarioGrow: one more fork of the parent (into the idle row), so that the
// shrink below drops shared pages in every arrangement.
absl::Status ScenarioPrepareShrink(Harness& h, Rows* r) {
  if (absl::Status s = ScenarioGrow(h, *r); !s.ok()) return s;
  absl::StatusOr<int32_t> fork = h.Fork(r->parent);
  if (!fork.ok()) return fork.status();
  r->fork2 = *fork;
  return absl::OkStatus();
}

absl::Status ScenarioShrink(Harness& h, const Rows& r) {
  // Every owner of the parent's shared pages drops them: the handles leave the rows one
  // by one in one transaction, and an undo must bring each back under all of them.
  return h.ShrinkBatch({{r.child, 0}, {r.fork2, 0}, {r.fast, 1}, {r.parent, 1}});
}

TEST_P(VirtualBatch, ScenarioNeedsCopyFreshPagesAndReclamation) {
  auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
  Rows r;
  auto h = MakeScenario(GetParam(), faulty, &r);
  ASSERT_NE(h, nullptr);
  ASSERT_FALSE(HasFailure());
  const Stats before = h->GetStats();
  const int64_t copies = faulty->calls(VmmOp::kCopy);
  ASSERT_OK(ScenarioGrow(*h, r));
  ASSERT_OK(h->Check());
  const Stats after = h->GetStats();
  EXPECT_GT(after.cow_copies, before.cow_copies);
  EXPECT_GT(faulty->calls(VmmOp::kCopy), copies);
  EXPECT_GT(after.pages_reclaimed, before.pages_reclaimed);
  EXPECT_EQ(h->AllMismatches(), 0);
}

// Every backend call of the batch failing once (its undo then succeeds): the layout is
// exactly as before every time, then the batch succeeds.
TEST_P(VirtualBatch, GrowBatchEveryFailingCallIsRolledBack) {
  auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
  {
    Rows r;
    auto h = MakeScenario(GetParam(), faulty, &r);
    ASSERT_NE(h, nullptr);
    ASSERT_FALSE(HasFailure());
    int64_t i = 1;
    for (;; ++i) {
      ASSERT_LT(i, 1000);
      SCOPED_TRACE(absl::StrCat("failing backend call ", i));
      const Snapshot before = Take(*h);
      faulty->FailNthAny(i);
      const absl::Status s = ScenarioGrow(*h, r);
      faulty->DisarmAll();
      if (s.ok()) break;
      EXPECT_NE(s.code(), absl::StatusCode::kInternal) << s;
      EXPECT_TRUE(absl::StrContains(s.message(), "injected")) << s;
      EXPECT_FALSE(absl::StrContains(s.message(), "not as before")) << s;
      ASSERT_OK(h->Check());
      EXPECT_EQ(Diff(before, Take(*h)), "") << s;
      EXPECT_EQ(h->AllMismatches(), 0);
    }
    EXPECT_GT(i, 3) << "the batch made too few backend calls to test much";
    ASSERT_OK(h->Check());
    EXPECT_EQ(h->AllMismatches(), 0);
    // And the shrink batch, which unmaps shared pages of two rows.
    absl::StatusOr<int32_t> fork = h->Fork(r.parent);
    ASSERT_OK(fork.status());
    r.fork2 = *fork;
    for (int64_t j = 1;; ++j) {
      ASSERT_LT(j, 1000);
      SCOPED_TRACE(absl::StrCat("shrink: failing backend call ", j));
      const Snapshot before = Take(*h);
      faulty->FailNthAny(j);
      const absl::Status s = ScenarioShrink(*h, r);
      faulty->DisarmAll();
      if (s.ok()) break;
      EXPECT_NE(s.code(), absl::StatusCode::kInternal) << s;
      ASSERT_OK(h->Check());
      EXPECT_EQ(Diff(before, Take(*h)), "") << s;
      EXPECT_EQ(h->AllMismatches(), 0);
    }
    ASSERT_OK(h->Check());
    EXPECT_EQ(h->AllMismatches(), 0);
  }
  const VmmCounters end = faulty->counters();
  EXPECT_EQ(end.live_handles, 0);
  EXPECT_EQ(end.live_reservations, 0);
  EXPECT_EQ(end.mapped_granules, 0);
}

// A batch that unmaps a page from every row sharing it: the last unmap frees the handle.
// A failure after that (the next segment's unmap, per layer) must bring the page back
// under every row, the earlier ones included.
TEST_P(VirtualBatch, ShrinkBatchOfEveryOwnerOfASharedPageRollsBack) {
  auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
  {
    auto h = *Harness::Make(Config(GetParam(), 4, 64), faulty);
    const int32_t p = *h->Add();
    ASSERT_OK(h->Grow(p, 40, 1));
    const int32_t c1 = *h->Fork(p);
    const int32_t c2 = *h->Fork(p);
    ASSERT_OK(h->Check());
    int64_t i = 1;
    for (;; ++i) {
      ASSERT_LT(i, 1000);
      SCOPED_TRACE(absl::StrCat("failing backend call ", i));
      const Snapshot before = Take(*h);
      faulty->FailNthAny(i);
      const absl::Status s = h->ShrinkBatch({{c1, 0}, {c2, 1}, {p, 1}});
      faulty->DisarmAll();
      if (s.ok()) break;
      EXPECT_FALSE(absl::StrContains(s.message(), "not as before")) << s;
      ASSERT_OK(h->Check());
      EXPECT_EQ(Diff(before, Take(*h)), "") << s;
      EXPECT_EQ(h->AllMismatches(), 0);
    }
    EXPECT_GT(i, 1);
    ASSERT_OK(h->Check());
    EXPECT_EQ(h->AllMismatches(), 0);
  }
  EXPECT_EQ(faulty->counters().mapped_granules, 0);
}

// A backend that keeps failing from the k-th map, set-access, unmap or copy on: the undo
// fails too. The records must still match the backend (CheckInvariants), the rows outside
// the batch read back, nothing changed where the status says so, and once the backend
// recovers the same batch succeeds and everything reads back.
void RunPersistent(const ArrangementCase& a, VmmOp op, bool shrink) {
  int64_t count = 0;
  {
    auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
    Rows r;
    auto h = MakeScenario(a, faulty, &r);
    ASSERT_NE(h, nullptr);
    if (shrink) ASSERT_OK(ScenarioPrepareShrink(*h, &r));
    const int64_t calls = faulty->calls(op);
    ASSERT_OK(shrink ? ScenarioShrink(*h, r) : ScenarioGrow(*h, r));
    count = faulty->calls(op) - calls;
  }
  // The grow batch makes every kind of call (reclamation unmaps); the shrink batch unmaps.
  if (!shrink || op == VmmOp::kUnmap) {
    EXPECT_GT(count, 0) << VmmOpName(op);
  }
  for (int64_t k = 1; k <= count + 1; ++k) {
    SCOPED_TRACE(absl::StrCat(shrink ? "shrink" : "grow", ": every ", std::string(VmmOpName(op)),
                              " fails from call ", k, " of ", count));
    auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
    {
      Rows r;
      auto h = MakeScenario(a, faulty, &r);
      ASSERT_NE(h, nullptr);
      if (shrink) ASSERT_OK(ScenarioPrepareShrink(*h, &r));
      const Snapshot before = Take(*h);
      faulty->FailFrom(op, k, absl::StatusCode::kUnavailable);
      const absl::Status s = shrink ? ScenarioShrink(*h, r) : ScenarioGrow(*h, r);
      ASSERT_OK(h->Check());
      bool unreadable = false;
      if (!s.ok()) {
        EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
        const bool changed = absl::StrContains(s.message(), "not as before");
        unreadable = absl::StrContains(s.message(), "cannot be read");
        if (!changed) {
          EXPECT_EQ(Diff(before, Take(*h)), "") << s;
        }
      }
      // Rows outside the batch are never touched; rows in it read back unless the status
      // said they cannot be.
      EXPECT_EQ(h->RowMismatches(r.bystander), 0);
      if (!unreadable) {
        EXPECT_EQ(h->AllMismatches(), 0) << s;
      }
      faulty->DisarmAll();
      if (!s.ok()) ASSERT_OK(shrink ? ScenarioShrink(*h, r) : ScenarioGrow(*h, r));
      ASSERT_OK(h->Check());
      EXPECT_EQ(h->GetStats().pages_quarantined, 0);
      EXPECT_EQ(h->AllMismatches(), 0);
      // More work runs, and the whole budget is usable again.
      ASSERT_OK(h->FreeBatch(h->LiveRows()));
      ASSERT_OK(h->layout().Trim().status());
      const int32_t x = *h->Add();
      ASSERT_OK(h->Grow(x, h->config().max_context, 7));
      ASSERT_OK(h->Check());
      EXPECT_EQ(h->AllMismatches(), 0);
    }
    const VmmCounters end = faulty->counters();
    EXPECT_EQ(end.live_handles, 0);
    EXPECT_EQ(end.mapped_granules, 0);
    if (::testing::Test::HasFailure()) return;
  }
}

TEST_P(VirtualBatch, GrowBatchPersistentFailuresThenRecovery) {
  for (VmmOp op : {VmmOp::kMap, VmmOp::kSetAccess, VmmOp::kUnmap, VmmOp::kCopy}) {
    RunPersistent(GetParam(), op, /*shrink=*/false);
    if (HasFailure()) return;
  }
}

TEST_P(VirtualBatch, ShrinkBatchPersistentFailuresThenRecovery) {
  for (VmmOp op : {VmmOp::kMap, VmmOp::kSetAccess, VmmOp::kUnmap}) {
    RunPersistent(GetParam(), op, /*shrink=*/true);
    if (HasFailure()) return;
  }
}

// ---- incremental live bytes --------------------------------------------------------------

// Random single-row and batch calls with forks and truncation into shared prefixes;
// CheckInvariants compares the incremental live bytes with both recounts after each.
TEST_P(VirtualBatch, IncrementalLiveBytesMatchRecountsAfterRandomOperations) {
  for (uint32_t seed = 1; seed <= 4; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    const KvCacheConfig c = Config(GetParam(), 8, 48);
    std::vector<std::atomic<bool>> fences(8);  // outlives the layout, which reads them
    auto h = *Harness::Make(c);
    std::mt19937 rng(seed);
    auto pick = [&](int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint32_t>(n)); };
    int tag = 1;
    for (int step = 0; step < 300; ++step) {
      const std::vector<int32_t> live = h->LiveRows();
      const int64_t what = pick(9);
      absl::Status s;
      if (live.empty() || what == 0) {
        s = h->Add().status();
      } else if (what == 1) {
        s = h->Fork(live[pick(live.size())]).status();
      } else if (what <= 3) {
        std::vector<std::pair<int32_t, int64_t>> grow;
        for (int32_t row : live) {
          if (pick(2) == 0) continue;
          grow.emplace_back(row, std::min<int64_t>(pick(6), c.max_context - h->len(row)));
        }
        s = h->GrowBatch(grow, tag++);
      } else if (what <= 5) {
        std::vector<std::pair<int32_t, int64_t>> shrink;
        for (int32_t row : live) {
          if (pick(2) == 0) continue;
          shrink.emplace_back(row, h->len(row) - pick(std::min<int64_t>(h->len(row), 9) + 1));
        }
        s = h->ShrinkBatch(shrink);
      } else if (what == 6) {
        const int32_t row = live[pick(live.size())];
        s = h->Grow(row, std::min<int64_t>(1 + pick(3), c.max_context - h->len(row)), tag++);
      } else if (what == 7) {
        std::vector<int32_t> free;
        for (int32_t row : live) {
          if (pick(3) == 0) free.push_back(row);
        }
        const int64_t f = pick(3);
        if (f == 0) {
          s = h->FreeBatch(free);
        } else {
          std::atomic<bool>& fence = fences[pick(fences.size())];
          fence.store(false);
          s = h->FreeBatch(free, Fence{&fence});
        }
      } else {
        for (auto& f : fences) {
          if (pick(2) == 0) f.store(true);
        }
        s = h->layout().Trim().status();
      }
      // Out of rows or pages is the only acceptable failure.
      if (!s.ok()) {
        ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
      }
      ASSERT_OK(h->Check());
    }
    EXPECT_EQ(h->AllMismatches(), 0);
    for (auto& f : fences) f.store(true);
    ASSERT_OK(h->FreeBatch(h->LiveRows()));
    ASSERT_OK(h->Check());
  }
}

INSTANTIATE_TEST_SUITE_P(Arrangements, VirtualBatch, ::testing::ValuesIn(Arrangements()),
                         [](const ::testing::TestParamInfo<ArrangementCase>& info) {
                           return info.param.name;
                         });

// ---- AcquireRow's choice -----------------------------------------------------------------

TEST(VirtualAcquireRow, PrefersTheReadyRowHoldingTheMostPagesAndPollsFencesWhenNeeded) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.chunk_tokens = 1;  // 4 tokens per page
  c.max_requests = 5;
  c.memory_budget_bytes = BudgetFor(c, k4K, 5);
  std::atomic<bool> f1{false};  // outlive the layout, which reads them
  std::atomic<bool> f2{false};
  auto h = *Harness::Make(c);
  std::vector<int32_t> rows;
  for (int i = 0; i < 5; ++i) rows.push_back(*h->Add());
  const int64_t lens[] = {4, 20, 8, 20, 12};  // pages: 1, 5, 2, 5, 3
  for (int i = 0; i < 5; ++i) ASSERT_OK(h->Grow(rows[i], lens[i], i));
  // Released in the order 1 (fenced), 3 (fenced), 0, 2, 4.
  ASSERT_OK(h->Free(rows[1], Fence{&f1}));
  ASSERT_OK(h->Free(rows[3], Fence{&f2}));
  ASSERT_OK(h->FreeBatch({rows[0], rows[2], rows[4]}));
  ASSERT_OK(h->Check());
  // Rows 1 and 3 hold the most but wait: row 4 (3 pages) comes first.
  EXPECT_EQ(*h->Add(), rows[4]);
  // Row 3's fence completes behind row 1's, which has not: row 2 is ready and preferred
  // over a row whose fence no call has seen complete yet.
  f2.store(true);
  EXPECT_EQ(*h->Add(), rows[2]);
  // Only row 0 is ready now; then none is, and every fence is polled: row 3.
  EXPECT_EQ(*h->Add(), rows[0]);
  EXPECT_EQ(*h->Add(), rows[3]);
  EXPECT_EQ(h->Add().status().code(), absl::StatusCode::kResourceExhausted);
  f1.store(true);
  EXPECT_EQ(*h->Add(), rows[1]);
  ASSERT_OK(h->Check());
  // Ties go to the lowest row.
  ASSERT_OK(h->FreeBatch({rows[3], rows[1]}));  // both 5 pages
  EXPECT_EQ(*h->Add(), std::min(rows[1], rows[3]));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

}  // namespace
}  // namespace kvmem::internal

// Counts this thread's heap allocations for DecodeStepAllocatesNothing; the rest of the
// program allocates as usual. GCC takes free() of what this operator new returns for a
// mismatch; it is the replacement's own malloc.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpragmas"
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  kvmem::internal::CountAllocation();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
