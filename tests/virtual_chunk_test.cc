// The chunked all-layer arrangement of the virtual layout: the geometry's page arithmetic
// (PagesFor, PageOf, CoveredBytes) against the bytes the views actually address, the
// chunk that KvCacheConfig::chunk_tokens resolves to, and the view's fields.
#include <algorithm>
#include <bit>
#include <cstdint>
#include <string>
#include <vector>

#include "allocators/virtual/virtual_layout.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "tests/virtual_layout_harness.h"

namespace kvmem::internal {
namespace {

using namespace testing_virtual;  // NOLINT: the harness of these tests

class VirtualChunks : public ::testing::TestWithParam<ShapeCase> {};

KvCacheConfig ConfigOf(const ShapeCase& p) { return ShapeConfig(p, 2, 2); }

// Every byte that tokens [0, n) of row 0 occupy, over every layer's K and V, as the views
// address it: per page, how many, and the highest page touched. The geometry must agree
// for every n: CoveredBytes exactly, PagesFor covering every touched page and being whole
// chunks, PageOf no later than the first page token n touches.
TEST_P(VirtualChunks, GeometryMatchesTheBytesTheViewsAddress) {
  const KvCacheConfig c = ConfigOf(GetParam());
  auto h = *Harness::Make(c);
  const VirtualGeometry& g = h->layout().geometry();
  const int64_t elem = DTypeBytes(c.dtype);
  const int64_t token_bytes = c.TokenLayerBytes();
  const int64_t row_bytes = g.segment_row_stride;
  std::vector<int32_t> row_ids = {0};
  std::vector<std::vector<int64_t>> starts(c.max_context);  // byte offsets of token pos
  for (int l = 0; l < c.num_layers; ++l) {
    VirtualKv v = *h->layout().VirtualView(l);
    v.row_ids = row_ids.data();
    const auto base = reinterpret_cast<uintptr_t>(h->layout().base());
    for (int kv = 0; kv < 2; ++kv) {
      const auto b = reinterpret_cast<uintptr_t>(kv == 0 ? v.k : v.v) - base;
      for (int64_t pos = 0; pos < c.max_context; ++pos) {
        starts[pos].push_back(static_cast<int64_t>(b) + v.Offset(0, pos) * elem);
      }
    }
  }
  std::vector<int64_t> covered(g.pages_per_segment, 0);
  std::vector<uint8_t> used(row_bytes, 0);
  int64_t highest = -1;
  for (int64_t n = 0; n <= c.max_context; ++n) {
    SCOPED_TRACE("tokens " + std::to_string(n));
    for (int64_t p = 0; p < g.pages_per_segment; ++p) {
      ASSERT_EQ(g.CoveredBytes(n, p), covered[p]) << "page " << p;
    }
    const int64_t pages = g.PagesFor(n);
    EXPECT_GT(pages, highest);
    EXPECT_LE(pages, g.pages_per_segment);
    // Whole chunks: the pages of ceil(n / chunk) chunks.
    const int64_t chunks = (n + g.chunk_tokens - 1) / g.chunk_tokens;
    EXPECT_EQ(pages, (chunks * g.chunk_bytes() + g.granularity - 1) / g.granularity);
    if (n == c.max_context) break;
    int64_t first = g.pages_per_segment;
    for (int64_t s : starts[n]) {
      ASSERT_GE(s, 0);
      ASSERT_LE(s + token_bytes, row_bytes);
      first = std::min(first, s / g.granularity);
      for (int64_t i = s; i < s + token_bytes; ++i) {
        ASSERT_EQ(used[i], 0) << "byte " << i << " addressed twice";
        used[i] = 1;
        ++covered[i / g.granularity];
        highest = std::max(highest, i / g.granularity);
      }
    }
    EXPECT_LE(g.PageOf(n), first);
    EXPECT_EQ(g.PageOf(n), g.ChunkStart(n) * g.segment_token_bytes / g.granularity);
  }
}

// Grow, fork, write and read back, shrink and regrow over the chunked rows: the data of
// every token survives, and the invariants hold after every call.
TEST_P(VirtualChunks, ForkCopyOnWriteAndShrinkKeepEveryToken) {
  const KvCacheConfig c = ShapeConfig(GetParam(), 3, 3);
  auto h = *Harness::Make(c);
  const int32_t a = *h->Add();
  const int64_t half = std::max<int64_t>(1, c.max_context / 2 - 3);
  ASSERT_OK(h->Grow(a, half, 1));
  ASSERT_OK(h->Check());
  const int32_t b = *h->Fork(a);
  ASSERT_OK(h->Check());
  // Both sides write past the shared prefix, into the shared partial chunk: the first
  // writer copies every page from its chunk's first to the prefix's last (each holds some
  // layer's part of it), the second then owns the originals alone.
  const VirtualGeometry& g = h->layout().geometry();
  const int64_t partial_pages = g.PagesFor(half) - g.PageOf(half);
  ASSERT_OK(h->Grow(b, 5, 2));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().cow_copies, partial_pages);
  ASSERT_OK(h->Grow(a, 4, 3));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->GetStats().cow_copies, partial_pages);
  EXPECT_EQ(h->AllMismatches(), 0);
  ASSERT_OK(h->Shrink(a, half / 2));
  ASSERT_OK(h->Check());
  ASSERT_OK(h->Grow(a, 7, 4));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
  ASSERT_OK(h->Free(b));
  ASSERT_OK(h->Check());
  EXPECT_EQ(h->AllMismatches(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, VirtualChunks,
    ::testing::Values(
        // 2 x 2 x 64 bf16: 256 B per layer token; auto: 8 tokens (4 KiB of one layer).
        ShapeCase{"Auto4K", Arrangement::kAllLayers, k4K, 2, 2, 64, DType::kBFloat16, 64, 0},
        ShapeCase{"Unchunked4K", Arrangement::kAllLayers, k4K, 2, 2, 64, DType::kBFloat16, 64, 1},
        ShapeCase{"Chunk2", Arrangement::kAllLayers, k4K, 2, 2, 64, DType::kBFloat16, 64, 2},
        // A chunk past max_context: the row is one chunk.
        ShapeCase{"ChunkPastContext", Arrangement::kAllLayers, k4K, 2, 2, 64, DType::kBFloat16, 50,
                  64},
        // 3 x 3 x 40 bf16: 240 B per layer token; blocks of 8 tokens (1920 B) straddle
        // 4 KiB pages, and max_context is not a whole number of chunks.
        ShapeCase{"OddBlocksStraddle", Arrangement::kAllLayers, k4K, 3, 3, 40, DType::kBFloat16, 50,
                  8},
        ShapeCase{"OddAuto", Arrangement::kAllLayers, k4K, 3, 3, 40, DType::kFloat32, 50, 0},
        // 28 x 4 x 128 bf16 (Llama-3 odd counts), 2 MiB pages: auto is 1024 tokens.
        ShapeCase{"Llama28Auto2M", Arrangement::kAllLayers, k2M, 28, 4, 128, DType::kBFloat16, 1100,
                  0}),
    [](const ::testing::TestParamInfo<ShapeCase>& info) { return info.param.name; });

// What chunk_tokens = 0 resolves to, and that an explicit value is kept.
TEST(VirtualChunkTokens, AutoGivesOneLayerAWholePage) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k2M);
  c.num_layers = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.max_context = 32768;
  // 2 KiB per layer token: K and V of 512 tokens fill 2 MiB.
  EXPECT_EQ(VirtualGeometry::Make(c, k2M)->chunk_tokens, 512);
  EXPECT_EQ(VirtualGeometry::Make(c, k4K)->chunk_tokens, 1);
  c.num_kv_heads = 5;  // 1280 B: 819.2 tokens per page, so 1024
  EXPECT_EQ(VirtualGeometry::Make(c, k2M)->chunk_tokens, 1024);
  c.max_context = 300;  // capped at max_context rounded up to a power of two
  EXPECT_EQ(VirtualGeometry::Make(c, k2M)->chunk_tokens, 512);
  c.chunk_tokens = 16;
  EXPECT_EQ(VirtualGeometry::Make(c, k2M)->chunk_tokens, 16);
  c.arrangement = Arrangement::kPerLayer;  // per-layer rows are contiguous already
  EXPECT_EQ(VirtualGeometry::Make(c, k2M)->chunk_tokens, 1);
}

TEST(VirtualChunkTokens, ValidateShapeRejectsNonPowersOfTwo) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.memory_budget_bytes = int64_t{1} << 20;
  for (int bad : {-1, 3, 12, 1000}) {
    c.chunk_tokens = bad;
    const absl::Status s = ValidateShape(c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("chunk_tokens"), std::string::npos) << s;
  }
  for (int good : {0, 1, 2, 256, 1 << 30}) {
    c.chunk_tokens = good;
    EXPECT_TRUE(ValidateShape(c).ok()) << good;
  }
}

// The view of layer l: K is block 2l of a chunk, V block 2l + 1; tokens of a block are one
// layer token apart, and the chunk's other blocks lie in the gap.
TEST(VirtualChunkTokens, ViewFields) {
  KvCacheConfig c = SmallConfig(Arrangement::kAllLayers, k4K);
  c.chunk_tokens = 8;
  c.memory_budget_bytes = BudgetFor(c, k4K, 1);
  auto h = *Harness::Make(c);
  const int64_t te = int64_t{c.num_kv_heads} * c.head_dim;  // elements per layer token
  const auto base = static_cast<uintptr_t>(h->layout().base());
  for (int l = 0; l < c.num_layers; ++l) {
    const VirtualKv v = *h->layout().VirtualView(l);
    EXPECT_EQ(v.chunk_shift, 3);
    EXPECT_EQ(v.token_stride, te);
    EXPECT_EQ(v.chunk_gap, 8 * te * (2 * c.num_layers - 1));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.k), base + l * 2 * 8 * c.TokenLayerBytes());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.v),
              reinterpret_cast<uintptr_t>(v.k) + 8 * c.TokenLayerBytes());
    EXPECT_EQ(v.InRow(9), 8 * 2 * c.num_layers * te + te);  // chunk 1, token 1
    EXPECT_EQ(v.row_stride * 2, h->layout().geometry().segment_row_stride);
  }
}

}  // namespace
}  // namespace kvmem::internal
