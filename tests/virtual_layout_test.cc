// Tests of the virtual layout (allocators/virtual_kv_cache.h) driven directly through
// internal::KvLayout on the host backend: geometry (both arrangements, tokens that
// straddle pages, 4 KiB and 2 MiB granules), K/V data written through VirtualView and
// read back, aliasing after a fork, copy on write, deferred reclamation, reclamation
// from idle rows, fenced frees, and all-or-nothing behaviour on out-of-memory and on
// every failing backend call. CheckInvariants runs after every operation.
#include "allocators/virtual/virtual_layout.h"

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/virtual_layout_harness.h"

namespace kvmem::internal {
namespace {

using namespace testing_virtual;  // NOLINT: the harness of these tests

// ---- geometry and data, over shapes, arrangements and granularities ----------------

class VirtualShapes : public ::testing::TestWithParam<ShapeCase> {
 protected:
  KvCacheConfig Config() const { return ShapeConfig(GetParam(), 3, 2); }
};

TEST_P(VirtualShapes, GrowWriteReadBackPageCountsAndRegrowth) {
  const KvCacheConfig config = Config();
  auto h = *Harness::Make(config);
  const VirtualGeometry& g = h->layout().geometry();
  EXPECT_EQ(g.segments, config.arrangement == Arrangement::kAllLayers ? 1 : 2 * config.num_layers);
  EXPECT_EQ(g.segment_row_stride % g.granularity, 0);
  EXPECT_GE(g.segment_row_stride, config.max_context * g.segment_token_bytes);

  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  ASSERT_OK(h->Check());
  // Uneven steps so that tokens start and end inside pages.
  const std::vector<int64_t> steps = {1, 3, 7, 2, 13, 1, 29};
  int tag = 1;
  for (int64_t n : steps) {
    for (int32_t row : {a, b}) {
      if (h->len(row) + n > config.max_context) continue;
      ASSERT_OK(h->Grow(row, n, tag++));
      ASSERT_OK(h->Check());
      // Exactly the pages of the tokens' whole chunks are mapped, nothing more.
      EXPECT_EQ(h->vmm().counters().mapped_granules,
                h->PagesFor(h->len(a)) + h->PagesFor(h->len(b)));
      const Stats s = h->GetStats();
      EXPECT_EQ(s.live_bytes, (h->len(a) + h->len(b)) * config.TokenBytes());
      EXPECT_EQ(s.held_bytes, s.pages_used * g.granularity);
      EXPECT_EQ(s.pages_used, h->PagesFor(h->len(a)) + h->PagesFor(h->len(b)));
      EXPECT_EQ(s.pages_free, s.pages_total - s.pages_used);
      EXPECT_GE(s.peak_held_bytes, s.held_bytes);
    }
  }
  EXPECT_EQ(h->AllMismatches(), 0);

  // Shrink keeps exclusive pages mapped: growing back needs no driver call.
  const int64_t len_a = h->len(a);
  const int64_t maps = Calls(h->vmm(), VmmOp::kMap);
  ASSERT_OK(h->Shrink(a, len_a / 3));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().live_bytes, (h->len(a) + h->len(b)) * config.TokenBytes());
  ASSERT_OK(h->Grow(a, len_a - len_a / 3, 99));
  ASSERT_OK(h->Check());
  EXPECT_EQ(Calls(h->vmm(), VmmOp::kMap), maps);
  EXPECT_EQ(h->AllMismatches(), 0);

  // A row grown to max_context maps every page of its segments.
  const int32_t c = *h->Add();
  ASSERT_OK(h->Free(a));
  ASSERT_OK(h->Grow(c, config.max_context, 5));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->Mismatches(c, config.max_context - 1, 5), 0);
  EXPECT_EQ(h->Mismatches(b, h->len(b) - 1, tag - 1), 0);
  ASSERT_OK(h->Free(b));
  ASSERT_OK(h->Free(c));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().pages_used, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, VirtualShapes,
    ::testing::Values(
        ShapeCase{"AllLayers4K", Arrangement::kAllLayers, k4K, 2, 2, 64, DType::kBFloat16, 64},
        ShapeCase{"AllLayersUnchunked4K", Arrangement::kAllLayers, k4K, 2, 2, 64, DType::kBFloat16,
                  64, 1},
        ShapeCase{"PerLayer4K", Arrangement::kPerLayer, k4K, 2, 2, 64, DType::kBFloat16, 64},
        ShapeCase{"AllLayers2M", Arrangement::kAllLayers, k2M, 2, 2, 64, DType::kBFloat16, 4096},
        // Unchunked on 2 MiB: growth page by page (the default chunk is the whole row here).
        ShapeCase{"AllLayersUnchunked2M", Arrangement::kAllLayers, k2M, 2, 2, 64, DType::kBFloat16,
                  4096, 1},
        ShapeCase{"PerLayer2M", Arrangement::kPerLayer, k2M, 2, 2, 64, DType::kBFloat16, 64},
        // 3 x 3 x 40 x bf16: 1440 B per token: tokens straddle 4 KiB pages.
        ShapeCase{"OddAllLayers4K", Arrangement::kAllLayers, k4K, 3, 3, 40, DType::kBFloat16, 50},
        ShapeCase{"OddAllLayersUnchunked4K", Arrangement::kAllLayers, k4K, 3, 3, 40,
                  DType::kBFloat16, 50, 1},
        ShapeCase{"OddPerLayer4K", Arrangement::kPerLayer, k4K, 3, 3, 40, DType::kFloat32, 50},
        // 28 layers x 4 heads x 128 x bf16 = 56 KiB per token, 36.6 tokens per 2 MiB
        // unchunked (the default chunk, capped at 128 tokens here, is the whole row).
        ShapeCase{"Llama28AllLayers2M", Arrangement::kAllLayers, k2M, 28, 4, 128, DType::kBFloat16,
                  80},
        ShapeCase{"Llama28AllLayersUnchunked2M", Arrangement::kAllLayers, k2M, 28, 4, 128,
                  DType::kBFloat16, 80, 1},
        ShapeCase{"Llama28AllLayers4K", Arrangement::kAllLayers, k4K, 28, 4, 128, DType::kBFloat16,
                  40},
        ShapeCase{"Llama28PerLayer4K", Arrangement::kPerLayer, k4K, 28, 4, 128, DType::kBFloat16,
                  40}),
    [](const ::testing::TestParamInfo<ShapeCase>& info) { return info.param.name; });

TEST(VirtualLayout, OddShapeTokensStraddlePages) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k2M);
  c.chunk_tokens = 1;  // chunks: tests/virtual_chunk_test.cc
  c.num_layers = 28;
  c.num_kv_heads = 4;
  c.head_dim = 128;
  absl::StatusOr<VirtualGeometry> g = VirtualGeometry::Make(c, k2M);
  ASSERT_OK(g.status());
  EXPECT_EQ(g->segment_token_bytes, 57344);
  // Token 36 spans bytes [2064384, 2121728): it starts in page 0 and ends in page 1.
  EXPECT_EQ(g->PageOf(36), 0);
  EXPECT_EQ(g->PagesFor(36), 1);
  EXPECT_EQ(g->PagesFor(37), 2);
  EXPECT_EQ(g->CoveredBytes(37, 0), k2M);
  EXPECT_EQ(g->CoveredBytes(37, 1), 37 * 57344 - k2M);
}

TEST(VirtualLayout, CreateRejectsBudgetBelowOneRequest) {
  KvCacheConfig c = SmallConfig(Arrangement::kPerLayer, k4K);
  // Per layer: 4 segments x 64 tokens x 256 B = 4 pages each: 16 pages per request.
  c.memory_budget_bytes = 15 * k4K;
  absl::StatusOr<std::unique_ptr<Harness>> h = Harness::Make(c);
  ASSERT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument) << h.status();
  const std::string msg(h.status().message());
  EXPECT_NE(msg.find("61440"), std::string::npos) << msg;     // the budget
  EXPECT_NE(msg.find("4096"), std::string::npos) << msg;      // the granularity
  EXPECT_NE(msg.find("15 pages"), std::string::npos) << msg;  // available
  EXPECT_NE(msg.find("16 pages"), std::string::npos) << msg;  // needed
  c.memory_budget_bytes = 16 * k4K;
  EXPECT_OK(Harness::Make(c).status());
}

TEST(VirtualLayout, ReserveFailureIsPassedThroughWithContext) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.memory_budget_bytes = BudgetFor(c, k4K, 1);
  auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
  faulty->FailNth(VmmOp::kReserve, 1, absl::StatusCode::kResourceExhausted);
  absl::StatusOr<std::unique_ptr<Harness>> h = Harness::Make(c, faulty);
  ASSERT_EQ(h.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(h.status().message().find("virtual layout: reserving"), std::string::npos)
      << h.status();
  // Handle creation failing half-way releases what was created.
  faulty->FailNth(VmmOp::kCreate, 3);
  h = Harness::Make(c, faulty);
  ASSERT_EQ(h.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(faulty->counters().live_handles, 0);
  EXPECT_EQ(faulty->counters().live_reservations, 0);
}

TEST(VirtualLayout, ViewsStridesAndSlots) {
  for (Arrangement arr : {Arrangement::kAllLayers, Arrangement::kPerLayer}) {
    KvCacheConfig c = SmallConfig(arr, k4K);
    c.chunk_tokens = 1;  // chunks: tests/virtual_chunk_test.cc
    c.memory_budget_bytes = BudgetFor(c, k4K, 1);
    auto h = *Harness::Make(c);
    VirtualLayout& layout = h->layout();
    const VirtualGeometry& g = layout.geometry();
    const uintptr_t base = layout.base();
    for (int l = 0; l < c.num_layers; ++l) {
      VirtualKv v = *layout.VirtualView(l);
      EXPECT_EQ(v.max_context, c.max_context);
      EXPECT_EQ(v.row_stride * 2, g.segment_row_stride);  // bf16: elements = bytes / 2
      if (arr == Arrangement::kAllLayers) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(v.k), base + l * 2 * c.TokenLayerBytes());
        EXPECT_EQ(reinterpret_cast<uintptr_t>(v.v),
                  reinterpret_cast<uintptr_t>(v.k) + c.TokenLayerBytes());
        EXPECT_EQ(v.token_stride * 2, c.TokenBytes());
      } else {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(v.k),
                  base + (2 * l) * c.max_requests * g.segment_row_stride);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(v.v),
                  base + (2 * l + 1) * c.max_requests * g.segment_row_stride);
        EXPECT_EQ(v.token_stride, c.num_kv_heads * c.head_dim);
      }
    }
    EXPECT_EQ(layout.VirtualView(c.num_layers).status().code(), absl::StatusCode::kOutOfRange);
    EXPECT_EQ(layout.PagedView(0).status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(layout.BlockTable(0, 1).status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(layout.SlotOf(3, 5), 3 * c.max_context + 5);
  }
}

TEST(VirtualLayout, RowsRunOut) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.max_requests = 2;
  c.memory_budget_bytes = BudgetFor(c, k4K, 1);
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  EXPECT_NE(a, b);
  EXPECT_EQ(h->Add().status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(h->Check());
  ASSERT_OK(h->Free(a));
  EXPECT_EQ(*h->Add(), a);
  ASSERT_OK(h->Check());
}

// ---- sharing -------------------------------------------------------------------------

class VirtualSharing : public ::testing::TestWithParam<Arrangement> {};

TEST_P(VirtualSharing, ForkAliasesTheParentsPages) {
  KvCacheConfig c = SmallConfig(GetParam(), k4K);
  c.memory_budget_bytes = BudgetFor(c, k4K, 2);
  auto h = *Harness::Make(c);
  const int32_t parent = *h->Add();
  ASSERT_OK(h->Grow(parent, 11, 1));  // not a page boundary in either arrangement
  const Stats before = h->GetStats();
  const int64_t creates = Calls(h->vmm(), VmmOp::kCreate);
  const int32_t child = *h->Fork(parent);
  ASSERT_OK(h->Check());
  const Stats after = h->GetStats();
  // No new physical page: the child maps the parent's.
  EXPECT_EQ(after.pages_free, before.pages_free);
  EXPECT_EQ(after.pages_used, before.pages_used);
  EXPECT_EQ(after.pages_shared, h->PagesFor(11));
  EXPECT_EQ(Calls(h->vmm(), VmmOp::kCreate), creates);
  EXPECT_EQ(after.live_bytes, before.live_bytes);  // shared tokens count once
  EXPECT_EQ(after.stored_tokens, 11);
  // The child's row shows the parent's data...
  for (int64_t pos = 0; pos < 11; ++pos) EXPECT_EQ(h->Mismatches(child, pos, 1), 0) << pos;
  // ...because it is the same memory: a write through the parent shows under the child.
  h->Write(parent, 4, 77);
  EXPECT_EQ(h->Mismatches(child, 4, 77), 0);
  h->Write(parent, 4, 1);
  ASSERT_OK(h->Free(child));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().pages_shared, 0);  // shared with an idle row only
  // The idle child still maps the parent's last page: writing there drops that alias
  // instead of copying.
  const int64_t unmaps = Calls(h->vmm(), VmmOp::kUnmap);
  ASSERT_OK(h->Grow(parent, 1, 2));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().cow_copies, 0);
  // One run of aliases per segment (segments are not adjacent).
  EXPECT_EQ(Calls(h->vmm(), VmmOp::kUnmap), unmaps + h->layout().geometry().segments);
  EXPECT_EQ(h->AllMismatches(), 0);
}

TEST_P(VirtualSharing, CopyOnWriteKeepsBothSidesIntact) {
  KvCacheConfig c = SmallConfig(GetParam(), k4K);
  c.chunk_tokens = 1;  // the page counts below; chunks: tests/virtual_chunk_test.cc
  c.memory_budget_bytes = BudgetFor(c, k4K, 2);
  auto h = *Harness::Make(c);
  const int32_t parent = *h->Add();
  // 21 tokens: 5.25 pages (all layers) or 1.3 pages per segment (per layer).
  ASSERT_OK(h->Grow(parent, 21, 1));
  const int32_t child = *h->Fork(parent);
  const int64_t segments = h->layout().geometry().segments;

  // The child writes token 21, inside the shared, partly filled last page.
  ASSERT_OK(h->Grow(child, 1, 2));
  ASSERT_OK(h->Check());
  Stats s = h->GetStats();
  EXPECT_EQ(s.cow_copies, segments);  // that page, in every segment
  EXPECT_EQ(s.pages_shared, h->PagesFor(21) - segments);
  EXPECT_EQ(h->Mismatches(child, 21, 2), 0);
  for (int64_t pos = 0; pos < 21; ++pos) {
    EXPECT_EQ(h->Mismatches(parent, pos, 1), 0) << pos;
    EXPECT_EQ(h->Mismatches(child, pos, 1), 0) << pos;  // copied
  }
  // The parent's memory at position 21 did not receive the child's token.
  EXPECT_NE(h->Mismatches(parent, 21, 2), 0);

  // The parent now owns its page alone: writing there copies nothing.
  ASSERT_OK(h->Grow(parent, 2, 3));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().cow_copies, segments);
  EXPECT_EQ(h->AllMismatches(), 0);
  EXPECT_EQ(h->Mismatches(child, 21, 2), 0);

  // Truncating the child into the shared prefix drops the shared pages beyond it; writing
  // into the still shared first page then copies it.
  ASSERT_OK(h->Shrink(child, 3));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().pages_shared, h->PagesFor(3));
  ASSERT_OK(h->Grow(child, 5, 4));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().cow_copies, 2 * segments);
  EXPECT_EQ(h->GetStats().pages_shared, 0);
  EXPECT_EQ(h->AllMismatches(), 0);
  // A fork of a fork shares with both.
  const int32_t grandchild = *h->Fork(child);
  ASSERT_OK(h->Grow(grandchild, 2, 5));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
  for (int32_t row : {grandchild, child, parent}) {
    ASSERT_OK(h->Free(row));
    ASSERT_OK(h->Check());
  }
}

INSTANTIATE_TEST_SUITE_P(Arrangements, VirtualSharing,
                         ::testing::Values(Arrangement::kAllLayers, Arrangement::kPerLayer),
                         [](const ::testing::TestParamInfo<Arrangement>& info) {
                           return info.param == Arrangement::kAllLayers ? "AllLayers" : "PerLayer";
                         });

// ---- reclamation ---------------------------------------------------------------------

TEST(VirtualLayout, DeferredReclamationReusesPagesWithoutDriverCalls) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.memory_budget_bytes = BudgetFor(c, k4K, 2);
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t other = *h->Add();
  ASSERT_OK(h->Grow(other, 3, 9));
  ASSERT_OK(h->Grow(a, 50, 1));
  ASSERT_OK(h->Free(a));
  ASSERT_OK(h->Check());
  Stats s = h->GetStats();
  EXPECT_EQ(s.idle_bytes, h->PagesFor(50) * k4K);
  EXPECT_EQ(s.pages_used, h->PagesFor(3));
  const VmmCounters before = h->vmm().counters();
  const int32_t b = *h->Add();
  EXPECT_EQ(b, a);  // the row that kept its pages
  ASSERT_OK(h->Check());
  // A short request on that row: the kept pages beyond its length hold no token, so they
  // stay idle (reclaimable), and only the pages its tokens touch are held.
  ASSERT_OK(h->Grow(b, 5, 2));
  ASSERT_OK(h->Check());
  s = h->GetStats();
  EXPECT_EQ(s.held_bytes, (h->PagesFor(3) + h->PagesFor(5)) * k4K);
  EXPECT_EQ(s.idle_bytes, (h->PagesFor(50) - h->PagesFor(5)) * k4K);
  EXPECT_EQ(s.mapped_bytes, (h->PagesFor(3) + h->PagesFor(50)) * k4K);
  ASSERT_OK(h->Grow(b, 45, 2));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().idle_bytes, 0);
  ASSERT_OK(h->Check());
  const VmmCounters after = h->vmm().counters();
  for (VmmOp op : {VmmOp::kMap, VmmOp::kSetAccess, VmmOp::kUnmap, VmmOp::kCreate}) {
    EXPECT_EQ(after.calls[static_cast<int>(op)], before.calls[static_cast<int>(op)])
        << VmmOpName(op);
  }
  EXPECT_EQ(h->AllMismatches(), 0);
}

TEST(VirtualLayout, ReclaimsFromIdleRowsWhenThePoolIsEmpty) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);  // 4 tokens per page
  c.memory_budget_bytes = BudgetFor(c, k4K, 1);                 // 16 pages
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  ASSERT_OK(h->Grow(a, 40, 1));  // 10 pages
  ASSERT_OK(h->Grow(b, 24, 2));  // 6 pages: the pool is empty
  EXPECT_EQ(h->GetStats().pages_free, 0);
  ASSERT_OK(h->Free(b));
  ASSERT_OK(h->Free(a));
  const int32_t r = *h->Add();
  EXPECT_EQ(r, a);  // the idle row holding the most pages
  ASSERT_OK(h->Check());
  const int64_t unmaps = Calls(h->vmm(), VmmOp::kUnmap);
  ASSERT_OK(h->Grow(r, 64, 3));  // 16 pages: 10 kept + 6 taken from b's idle row
  ASSERT_OK(h->Check());
  const Stats s = h->GetStats();
  EXPECT_EQ(s.pages_reclaimed, 6);
  EXPECT_EQ(s.idle_bytes, 0);
  EXPECT_EQ(Calls(h->vmm(), VmmOp::kUnmap), unmaps + 1);  // one run of adjacent pages
  EXPECT_EQ(h->AllMismatches(), 0);
}

TEST(VirtualLayout, ReclaimsPagesBeyondAnotherLiveRowsLength) {
  KvCacheConfig c = SmallConfig(Arrangement::kPerLayer, k4K);
  c.memory_budget_bytes = BudgetFor(c, k4K, 1);
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  ASSERT_OK(h->Grow(a, 64, 1));
  ASSERT_OK(h->Shrink(a, 10));  // keeps all its pages
  ASSERT_OK(h->Check());
  const int32_t b = *h->Add();
  ASSERT_OK(h->Grow(b, 30, 2));  // takes a's pages beyond its 10 tokens
  ASSERT_OK(h->Check());
  EXPECT_GT(h->GetStats().pages_reclaimed, 0);
  EXPECT_EQ(h->AllMismatches(), 0);
  // What a holds beyond its length and what is free do not make 64 tokens for b.
  EXPECT_EQ(h->Grow(b, 34, 3).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

TEST(VirtualLayout, FencedFreeLeavesRowAndPagesUntouchedUntilTheFenceCompletes) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.chunk_tokens = 1;  // the page counts below; chunks: tests/virtual_chunk_test.cc
  c.max_requests = 2;
  c.memory_budget_bytes = BudgetFor(c, k4K, 1);  // 16 pages
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  ASSERT_OK(h->Grow(a, 64, 1));
  std::atomic<bool> done{false};
  ASSERT_OK(h->Free(a, Fence{&done}));
  ASSERT_OK(h->Check());
  Stats s = h->GetStats();
  EXPECT_EQ(s.pages_quarantined, 16);
  EXPECT_EQ(s.idle_bytes, 16 * k4K);
  const VmmCounters before = h->vmm().counters();

  const int32_t b = *h->Add();
  EXPECT_NE(b, a);  // a's row waits for its fence
  EXPECT_EQ(h->Add().status().code(), absl::StatusCode::kResourceExhausted);
  absl::Status grow = h->Grow(b, 1, 2);
  EXPECT_EQ(grow.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(grow.message().find("fence"), std::string::npos) << grow;
  EXPECT_EQ(*h->layout().Trim(), 0);
  ASSERT_OK(h->Check());
  // Nothing of row a was unmapped or reused: its memory still holds its tokens.
  EXPECT_EQ(h->vmm().counters().calls[static_cast<int>(VmmOp::kUnmap)],
            before.calls[static_cast<int>(VmmOp::kUnmap)]);
  EXPECT_EQ(h->vmm().counters().mapped_granules, before.mapped_granules);
  for (int64_t pos = 0; pos < 64; ++pos) EXPECT_EQ(h->Mismatches(a, pos, 1), 0) << pos;

  done.store(true);
  ASSERT_OK(h->Grow(b, 1, 2));
  ASSERT_OK(h->Check());
  s = h->GetStats();
  EXPECT_EQ(s.pages_reclaimed, 1);
  EXPECT_EQ(s.pages_quarantined, 0);
  const int64_t trimmed = *h->layout().Trim();
  EXPECT_EQ(trimmed, 15 * k4K);
  ASSERT_OK(h->Check());
  s = h->GetStats();
  EXPECT_EQ(s.pages_free, 15);
  EXPECT_EQ(s.physical_bytes, 16 * k4K);  // handles are kept for reuse
  EXPECT_EQ(h->vmm().counters().live_handles, 16);
  EXPECT_EQ(h->AllMismatches(), 0);
}

// ---- all or nothing ------------------------------------------------------------------

// Everything a caller can observe, minus the backend's call counters.
struct Snapshot {
  Stats stats;
  int64_t mapped_granules;
  int64_t live_handles;
  bool operator==(const Snapshot& o) const {
    const Stats& a = stats;
    const Stats& b = o.stats;
    return a.stored_tokens == b.stored_tokens && a.live_bytes == b.live_bytes &&
           a.held_bytes == b.held_bytes && a.idle_bytes == b.idle_bytes &&
           a.mapped_bytes == b.mapped_bytes && a.physical_bytes == b.physical_bytes &&
           a.pages_total == b.pages_total && a.pages_free == b.pages_free &&
           a.pages_used == b.pages_used && a.pages_shared == b.pages_shared &&
           a.pages_quarantined == b.pages_quarantined && a.peak_held_bytes == b.peak_held_bytes &&
           a.peak_live_bytes == b.peak_live_bytes && a.cow_copies == b.cow_copies &&
           a.pages_reclaimed == b.pages_reclaimed && a.map_stalls == b.map_stalls &&
           mapped_granules == o.mapped_granules && live_handles == o.live_handles;
  }
};

Snapshot Take(Harness& h) {
  return {h.GetStats(), h.vmm().counters().mapped_granules, h.vmm().counters().live_handles};
}

TEST(VirtualLayout, OutOfMemoryChangesNothing) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.chunk_tokens = 1;  // the page counts below; chunks: tests/virtual_chunk_test.cc
  c.memory_budget_bytes = BudgetFor(c, k4K, 1);  // 16 pages of 4 tokens
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int32_t b = *h->Add();
  const int32_t idle = *h->Add();
  ASSERT_OK(h->Grow(a, 30, 1));  // 8 pages, the last one half full
  const int32_t child = *h->Fork(a);
  ASSERT_OK(h->Grow(idle, 12, 3));  // 3 pages, reclaimable once freed
  ASSERT_OK(h->Free(idle));
  ASSERT_OK(h->Grow(b, 9, 2));  // 3 pages: 2 stay free
  const Snapshot before = Take(*h);
  // b needs 6 more pages for 24 more tokens: 2 free + 3 reclaimable is not enough.
  EXPECT_EQ(h->Grow(b, 24, 4).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(h->Check());
  EXPECT_TRUE(Take(*h) == before);
  EXPECT_EQ(h->AllMismatches(), 0);
  // The child writing into its shared page needs a copy too: 1 + 5 pages.
  EXPECT_EQ(h->Grow(child, 22, 5).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(h->Check());
  EXPECT_TRUE(Take(*h) == before);
  EXPECT_EQ(h->AllMismatches(), 0);
  // What fits still works, reclaiming the idle row.
  ASSERT_OK(h->Grow(b, 20, 4));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().pages_reclaimed, 3);
  EXPECT_EQ(h->AllMismatches(), 0);
}

// Makes the i-th backend call of `op` fail for i = 1, 2, ... until `op` succeeds; after
// every failure the layout must be exactly as before (snapshot, data, invariants).
void FailEveryCall(Harness& h, FaultInjectingVmm& faulty, const std::string& what,
                   const std::function<absl::Status()>& op) {
  for (int64_t i = 1;; ++i) {
    ASSERT_LT(i, 1000) << what;
    const Snapshot before = Take(h);
    faulty.FailNthAny(i);
    const absl::Status s = op();
    faulty.DisarmAll();
    if (s.ok()) {
      EXPECT_GT(i, 1) << what << ": made no backend call, so nothing was tested";
      break;
    }
    EXPECT_NE(s.code(), absl::StatusCode::kInternal) << what << " call " << i << ": " << s;
    ASSERT_OK(h.Check());
    EXPECT_TRUE(Take(h) == before) << what << ": failing call " << i << " changed the layout";
    EXPECT_EQ(h.AllMismatches(), 0) << what << " call " << i;
  }
  ASSERT_OK(h.Check());
  EXPECT_EQ(h.AllMismatches(), 0) << what;
}

TEST(VirtualLayout, EveryFailingBackendCallIsRolledBack) {
  for (Arrangement arr : {Arrangement::kAllLayers, Arrangement::kPerLayer}) {
    SCOPED_TRACE(arr == Arrangement::kAllLayers ? "all layers" : "per layer");
    KvCacheConfig c = SmallConfig(arr, k4K);
    c.memory_budget_bytes = BudgetFor(c, k4K, 2);
    auto faulty = std::make_shared<FaultInjectingVmm>(std::shared_ptr<Vmm>(*MakeHostVmm(k4K)));
    {
      auto h = *Harness::Make(c, faulty);
      const int32_t a = *h->Add();
      ASSERT_OK(h->Grow(a, 21, 1));
      // Share: maps the prefix under the child's row.
      int32_t child = -1;
      FailEveryCall(*h, *faulty, "fork", [&]() -> absl::Status {
        absl::StatusOr<int32_t> r = h->Fork(a);
        if (r.ok()) child = *r;
        return r.status();
      });
      // AcquireRow reusing an idle row that shares pages: it unmaps them.
      const int32_t sharer = *h->Fork(a);
      ASSERT_OK(h->Free(sharer));
      int32_t reused = -1;
      FailEveryCall(*h, *faulty, "acquire", [&]() -> absl::Status {
        absl::StatusOr<int32_t> r = h->Add();
        if (r.ok()) reused = *r;
        return r.status();
      });
      EXPECT_EQ(reused, sharer);
      ASSERT_OK(h->Free(reused));
      // Grow with copy on write and fresh pages.
      FailEveryCall(*h, *faulty, "grow with copy on write", [&] { return h->Grow(child, 20, 2); });
      // Grow that reclaims from an idle row: fill the pool, free a row, grow another.
      const int32_t filler = *h->Add();
      ASSERT_OK(h->Grow(filler, 64, 3));
      const int32_t b = *h->Add();
      const VirtualGeometry& g = h->layout().geometry();
      const int64_t free_tokens =
          h->GetStats().pages_free / g.segments * g.granularity / g.segment_token_bytes;
      ASSERT_OK(h->Free(filler));
      FailEveryCall(*h, *faulty, "grow with reclamation",
                    [&] { return h->Grow(b, std::min<int64_t>(64, free_tokens + 20), 4); });
      EXPECT_GT(h->GetStats().pages_reclaimed, 0);
      // Shrink dropping shared pages.
      FailEveryCall(*h, *faulty, "shrink", [&] { return h->Shrink(child, 0); });
      ASSERT_OK(h->Free(child));
      ASSERT_OK(h->Free(b));
      ASSERT_OK(h->layout().Trim().status());
      ASSERT_OK(h->Check());
      // Trim of one idle row.
      const int32_t x = *h->Add();
      ASSERT_OK(h->Grow(x, 10, 5));
      ASSERT_OK(h->Free(x));
      FailEveryCall(*h, *faulty, "trim", [&] { return h->layout().Trim().status(); });
    }
    // The layout gave everything back.
    const VmmCounters end = faulty->counters();
    EXPECT_EQ(end.live_handles, 0);
    EXPECT_EQ(end.live_reservations, 0);
    EXPECT_EQ(end.mapped_granules, 0);
  }
}

TEST(VirtualLayout, DestructionReleasesEverything) {
  KvCacheConfig c = SmallConfig(Arrangement::kPerLayer, k4K);
  c.memory_budget_bytes = BudgetFor(c, k4K, 2);
  std::shared_ptr<Vmm> vmm(*MakeHostVmm(k4K));
  {
    auto h = *Harness::Make(c, vmm);
    const int32_t a = *h->Add();
    ASSERT_OK(h->Grow(a, 30, 1));
    ASSERT_OK(h->Fork(a).status());
    EXPECT_GT(vmm->counters().mapped_granules, 0);
  }
  EXPECT_EQ(vmm->counters().live_handles, 0);
  EXPECT_EQ(vmm->counters().live_reservations, 0);
  EXPECT_EQ(vmm->counters().mapped_granules, 0);
}

// ---- through the KvCache facade -----------------------------------------------------

TEST(VirtualLayout, KvCacheForkExtendAndViewsOverTheVirtualLayout) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.chunk_tokens = 1;  // the page counts below; chunks: tests/virtual_chunk_test.cc
  c.memory_budget_bytes = BudgetFor(c, k4K, 2);
  absl::StatusOr<std::unique_ptr<KvCache>> made = KvCache::Create(c);
  ASSERT_OK(made.status());
  KvCache& cache = **made;
  ASSERT_OK(cache.AddRequest(1).status());
  absl::StatusOr<std::vector<int64_t>> slots = cache.Extend(1, 13);
  ASSERT_OK(slots.status());
  const int32_t parent_row = *cache.Row(1);
  // Write layer 0's K of every token at the slots Extend returned.
  BatchMetadata meta;
  ASSERT_OK(cache.BuildBatchMetadata({1}, &meta));
  VirtualKv view = *cache.VirtualView(0, meta);
  for (int64_t i = 0; i < 13; ++i) {
    EXPECT_EQ((*slots)[i], parent_row * c.max_context + i);
    StoreFromFloat(view.k, view.SlotOffset((*slots)[i]), c.dtype, static_cast<float>(i + 1));
  }
  ASSERT_OK(cache.Fork(1, 2).status());
  ASSERT_OK(cache.CheckInvariants());
  ASSERT_OK(cache.BuildBatchMetadata({1, 2}, &meta));
  view = *cache.VirtualView(0, meta);
  for (int64_t pos = 0; pos < 13; ++pos) {
    EXPECT_EQ(LoadAsFloat(view.k, view.Offset(1, pos), c.dtype), pos + 1) << pos;
  }
  Stats s = cache.GetStats();
  EXPECT_EQ(s.forks, 1);
  EXPECT_EQ(s.stored_tokens, 13);
  EXPECT_EQ(s.logical_tokens, 26);
  EXPECT_GT(s.pages_shared, 0);
  // The child's next token copies the shared last page; the parent keeps its data.
  absl::StatusOr<std::vector<int64_t>> child_slot = cache.Extend(2, 1);
  ASSERT_OK(child_slot.status());
  StoreFromFloat(view.k, view.SlotOffset((*child_slot)[0]), c.dtype, 99.f);
  EXPECT_NE(LoadAsFloat(view.k, view.Offset(0, 13), c.dtype), 99.f);
  EXPECT_EQ(cache.GetStats().cow_copies, 1);
  EXPECT_EQ(cache.BlockTable(1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache.PagedView(0, meta).status().code(), absl::StatusCode::kFailedPrecondition);
  std::atomic<bool> done{false};
  ASSERT_OK(cache.Free(1, Fence{&done}));
  ASSERT_OK(cache.CheckInvariants());
  EXPECT_GT(cache.GetStats().pages_quarantined, 0);
  done.store(true);
  ASSERT_OK(cache.Free(2));
  ASSERT_OK(cache.CheckInvariants());
  EXPECT_EQ(*cache.Trim() % k4K, 0);
  ASSERT_OK(cache.CheckInvariants());
}

}  // namespace
}  // namespace kvmem::internal
