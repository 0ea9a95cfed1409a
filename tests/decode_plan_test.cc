// Tests of the decode split plan (attention/decode_plan.h), on the host: every plan covers
// each request's attended range exactly, once, in whole tiles; slots and chunk counts are
// consistent; the dispatch order is longest first; the work list never exceeds
// MaxDecodeWork; and the plan's shape rules hold (one wave for a small batch, no piece
// over the cap for one that fills the device, uniform batches of two waves or more whole);
// and the virtual layout's work items carry their row ids.
#include "attention/decode_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace kvmem::internal {
namespace {

struct Case {
  std::vector<int32_t> lens;
  int window_left = -1;
  int kv_heads = 8;
  int tile = 128;
  int resident = 132;
  DecodeSplitPolicy policy;
};

struct Plan {
  std::vector<int32_t> work_begin;
  std::vector<DecodeWork> work;  // the first n
};

absl::StatusOr<Plan> Build(const Case& c, int max_work) {
  Plan p;
  p.work_begin.assign(c.lens.size() + 1, -1);
  p.work.assign(max_work, DecodeWork{-1, -1, -1, -1, -1, {-1, -1, -1}});
  const absl::StatusOr<int> n =
      BuildDecodePlan(c.lens, c.window_left, c.kv_heads, c.tile, c.resident, max_work, c.policy,
                      p.work_begin.data(), p.work.data());
  if (!n.ok()) return n.status();
  p.work.resize(*n);
  return p;
}

int64_t First(const Case& c, int b) {
  return c.window_left >= 0 ? std::max<int64_t>(0, int64_t{c.lens[b]} - 1 - c.window_left) : 0;
}

// The invariants every plan keeps, whatever its policy.
void CheckPlan(const Case& c, const Plan& p) {
  const int batch = static_cast<int>(c.lens.size());
  ASSERT_EQ(p.work_begin[0], 0);
  ASSERT_EQ(p.work_begin[batch], static_cast<int>(p.work.size()));
  std::vector<std::vector<const DecodeWork*>> by_index(batch);
  for (int b = 0; b < batch; ++b) {
    ASSERT_LT(p.work_begin[b], p.work_begin[b + 1]) << "request " << b << " has no work item";
    by_index[b].assign(p.work_begin[b + 1] - p.work_begin[b], nullptr);
  }
  for (const DecodeWork& w : p.work) {
    ASSERT_GE(w.b, 0);
    ASSERT_LT(w.b, batch);
    const int chunks = DecodeChunks(w.meta);
    const int index = DecodeIndex(w.meta);
    ASSERT_EQ(chunks, p.work_begin[w.b + 1] - p.work_begin[w.b]) << "request " << w.b;
    ASSERT_GE(index, 0);
    ASSERT_LT(index, chunks);
    ASSERT_EQ(by_index[w.b][index], nullptr) << "slot " << index << " of " << w.b << " twice";
    by_index[w.b][index] = &w;
  }
  for (int b = 0; b < batch; ++b) {
    // The pieces, sorted by start, tile the attended range [First, len) exactly.
    std::vector<const DecodeWork*> pieces = by_index[b];
    std::sort(pieces.begin(), pieces.end(),
              [](const DecodeWork* x, const DecodeWork* y) { return x->start < y->start; });
    int64_t at = First(c, b);
    for (const DecodeWork* w : pieces) {
      ASSERT_EQ(w->start, at) << "request " << b << ": gap or overlap";
      ASSERT_EQ((w->start - First(c, b)) % c.tile, 0) << "request " << b << ": not whole tiles";
      ASSERT_TRUE(w->end > w->start || (pieces.size() == 1 && w->end == w->start))
          << "request " << b << ": an empty piece among others";
      at = w->end;
    }
    ASSERT_EQ(at, c.lens[b]) << "request " << b << ": range not covered";
  }
}

// Whether the pieces [from, to) of the dispatch order are longest first.
bool NonIncreasingWithin(const Plan& p, int from, int to) {
  for (int i = from + 1; i < to; ++i) {
    if (p.work[i].end - p.work[i].start > p.work[i - 1].end - p.work[i - 1].start) return false;
  }
  return true;
}

// The chunk of a plan whose batch fills the device: piece_load of a slot's average load.
int64_t CapTiles(const Case& c) {
  int64_t total_tiles = 0;
  for (int b = 0; b < static_cast<int>(c.lens.size()); ++b) {
    total_tiles += (c.lens[b] - First(c, b) + c.tile - 1) / c.tile;
  }
  const double load = std::max(c.policy.piece_load, kMinPieceLoad) *
                      static_cast<double>(total_tiles * c.kv_heads) / c.resident;
  return std::max<int64_t>(kMinChunkTiles, static_cast<int64_t>(std::ceil(load)));
}

TEST(DecodePlanTest, UniformBatchOfTwoWavesOrMoreIsNotCut) {
  // D1's B = 64 and 128: 512 and 1024 CTAs over 132 resident ones. (A piece may take half
  // a slot's load, so requests are cut only below two waves.)
  for (int batch : {34, 64, 100, 128, 256}) {
    Case c;
    c.lens.assign(batch, 4096);
    const absl::StatusOr<Plan> p = Build(c, MaxDecodeWork(batch, c.kv_heads, c.resident));
    ASSERT_TRUE(p.ok()) << p.status();
    CheckPlan(c, *p);
    ASSERT_EQ(static_cast<int>(p->work.size()), batch);
    for (int i = 0; i < batch; ++i) EXPECT_EQ(p->work[i].b, i) << "request order kept";
  }
}

TEST(DecodePlanTest, UniformBatchOfOneToTwoWavesIsCutInTwo) {
  // 20 x 8 = 160 CTAs over 132 slots: whole requests would leave 28 CTAs for a second
  // wave on their own; halves make 320 CTAs of half the length.
  Case c;
  c.lens.assign(20, 4096);
  const absl::StatusOr<Plan> p = Build(c, MaxDecodeWork(20, c.kv_heads, c.resident));
  ASSERT_TRUE(p.ok()) << p.status();
  CheckPlan(c, *p);
  ASSERT_EQ(p->work.size(), 40u);
  for (const DecodeWork& w : p->work) EXPECT_EQ(w.end - w.start, 2048);
}

TEST(DecodePlanTest, SmallBatchIsCutIntoOneWaveOfEqualPieces) {
  // D1's 8 x 32768 and 1 x 131072: 64 and 8 (request, head) pairs for 132 slots.
  for (const auto& [batch, len] : {std::pair{8, 32768}, {1, 131072}, {1, 4096}, {16, 4096}}) {
    Case c;
    c.lens.assign(batch, len);
    const absl::StatusOr<Plan> p = Build(c, MaxDecodeWork(batch, c.kv_heads, c.resident));
    ASSERT_TRUE(p.ok()) << p.status();
    CheckPlan(c, *p);
    const int ctas = static_cast<int>(p->work.size()) * c.kv_heads;
    EXPECT_LE(ctas, c.resident) << batch << " x " << len;
    // The smallest chunk that fits: one more piece per request would not.
    const int per_request = static_cast<int>(p->work.size()) / batch;
    if (len / c.tile / (per_request + 1) >= kMinChunkTiles) {
      EXPECT_GT(batch * (per_request + 1) * c.kv_heads, c.resident) << batch << " x " << len;
    }
    for (const DecodeWork& w : p->work) EXPECT_EQ(w.end - w.start, len / per_request);
  }
}

TEST(DecodePlanTest, LongRequestAmongShortOnesIsCutToASlotsLoad) {
  // 63 requests of 1024 tokens and one of 131072 over 132 slots: unsplit, the long one
  // would run 1024 tiles on one SM while the rest of the batch takes ~93 per slot.
  Case c;
  c.lens.assign(64, 1024);
  c.lens[40] = 131072;
  const absl::StatusOr<Plan> p = Build(c, MaxDecodeWork(64, c.kv_heads, c.resident));
  ASSERT_TRUE(p.ok()) << p.status();
  CheckPlan(c, *p);
  const int64_t cap = CapTiles(c);
  EXPECT_EQ(cap, 47);  // half of (63 x 8 + 1024) x 8 / 132 tiles
  for (const DecodeWork& w : p->work) EXPECT_LE(w.end - w.start, cap * c.tile);
  EXPECT_EQ(DecodeChunks(p->work[0].meta), 22);  // 1024 tiles in pieces of at most 47
  // Its pieces go first (longest first), the short requests after, in request order.
  EXPECT_EQ(p->work[0].b, 40);
  EXPECT_TRUE(NonIncreasingWithin(*p, 0, static_cast<int>(p->work.size())));
  EXPECT_EQ(p->work.back().b, 63);
}

// The virtual layout's work items carry their request's row id, pieces of a split request
// included, whatever the dispatch order; the plan leaves the field 0.
TEST(DecodePlanTest, WorkItemsCarryTheirRequestsRowId) {
  Case c;
  c.lens.assign(63, 2048);
  c.lens.push_back(65536);  // cut into pieces, dispatched first
  absl::StatusOr<Plan> p = Build(c, MaxDecodeWork(64, c.kv_heads, c.resident));
  ASSERT_TRUE(p.ok()) << p.status();
  for (const DecodeWork& w : p->work) EXPECT_EQ(w.index, 0);
  std::vector<int32_t> rows(c.lens.size());
  for (size_t b = 0; b < rows.size(); ++b) rows[b] = static_cast<int32_t>(1000 + 7 * (63 - b));
  SetDecodeRowIds(rows, absl::MakeSpan(p->work));
  ASSERT_GT(p->work.size(), c.lens.size());
  for (const DecodeWork& w : p->work) EXPECT_EQ(w.index, rows[w.b]) << "request " << w.b;
}

TEST(DecodePlanTest, EmptyAndWindowedRequests) {
  Case c;
  c.lens = {0, 1, 129, 5000, 0, 70000};
  c.window_left = 1000;
  const absl::StatusOr<Plan> p = Build(c, MaxDecodeWork(6, c.kv_heads, c.resident));
  ASSERT_TRUE(p.ok()) << p.status();
  CheckPlan(c, *p);
  for (const DecodeWork& w : p->work) {
    if (c.lens[w.b] == 0) {
      EXPECT_EQ(DecodeChunks(w.meta), 1);
      EXPECT_EQ(w.start, 0);
      EXPECT_EQ(w.end, 0);
    }
    EXPECT_LE(w.end - w.start, 1001) << "the window bounds every range";
  }
}

TEST(DecodePlanTest, TooSmallAWorkListIsAnInternalError) {
  Case c;
  c.lens.assign(4, 65536);
  const absl::StatusOr<Plan> p = Build(c, 4);  // the split needs more than 4 items
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInternal);
}

TEST(DecodePlanTest, RandomPlansStayWithinCapacityAndKeepTheirInvariants) {
  std::mt19937 rng(7);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int trial = 0; trial < 3000; ++trial) {
    Case c;
    const int max_batch = pick(1, 300);
    c.lens.resize(pick(0, max_batch));
    const int max_len = std::vector<int>{1, 200, 4096, 40000, 1 << 20}[pick(0, 4)];
    for (int32_t& len : c.lens)
      len = pick(0, 3) == 0 ? pick(0, max_len) : std::max(0, max_len - pick(0, 10));
    if (!c.lens.empty() && pick(0, 4) == 0) c.lens[pick(0, c.lens.size() - 1)] = 1 << 22;
    c.window_left = pick(0, 3) == 0 ? pick(0, 5000) : -1;
    c.kv_heads = std::vector<int>{1, 2, 8, 32}[pick(0, 3)];
    c.tile = std::vector<int>{32, 64, 128}[pick(0, 2)];
    c.resident = std::vector<int>{1, 7, 132, 264, 528}[pick(0, 4)];
    c.policy.piece_load = std::vector<double>{0, 0.1, 0.25, 0.5, 1, 3}[pick(0, 5)];
    const int max_work = MaxDecodeWork(max_batch, c.kv_heads, c.resident);
    const absl::StatusOr<Plan> p = Build(c, max_work);
    ASSERT_TRUE(p.ok()) << "trial " << trial << ": " << p.status();
    CheckPlan(c, *p);
    if (HasFailure()) FAIL() << "trial " << trial;
    const bool one_wave = int64_t{c.kv_heads} * static_cast<int64_t>(c.lens.size()) < c.resident;
    EXPECT_TRUE(NonIncreasingWithin(*p, 0, static_cast<int>(p->work.size())))
        << "trial " << trial << ": not longest first";
    if (one_wave) {
      EXPECT_LE(p->work.size() * c.kv_heads, static_cast<size_t>(c.resident))
          << "trial " << trial << ": not one wave";
    } else if (c.policy.piece_load > 0) {
      for (const DecodeWork& w : p->work) {
        EXPECT_LE(w.end - w.start, CapTiles(c) * c.tile) << "trial " << trial << ": a straggler";
      }
    } else {
      EXPECT_EQ(p->work.size(), c.lens.size()) << "trial " << trial << ": cut without a cap";
    }
  }
}

}  // namespace
}  // namespace kvmem::internal
