// Tests of the KV accessors (kvmem/kv_accessor.h): element offsets of PagedKv and
// VirtualKv against values computed by hand, agreement of Offset(b, pos) with
// SlotOffset(slot) for the slot the layouts hand out, and 64-bit offsets far beyond 2^31
// elements (int32 page-offset overflow is a known bug in peers).
#include <cstdint>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "kvmem/kv_accessor.h"

namespace kvmem {
namespace {

// 3 tokens per page, 2 KV heads x 4 dims: token_stride 8, page_stride 24.
TEST(PagedKvTest, HandComputedOffsets) {
  const std::vector<int32_t> table = {5, 2, 7, /*entry 1:*/ 1, 0, 9};
  PagedKv kv;
  kv.page_tokens = 3;
  kv.token_stride = 8;
  kv.page_stride = 24;
  kv.page_table = table.data();
  kv.page_table_stride = 3;

  EXPECT_EQ(kv.PageOffset(0), 0);
  EXPECT_EQ(kv.PageOffset(7), 168);
  EXPECT_EQ(kv.Offset(0, 0), 120);  // page 5, token 0
  EXPECT_EQ(kv.Offset(0, 2), 136);  // page 5, token 2
  EXPECT_EQ(kv.Offset(0, 3), 48);   // page 2, token 0
  EXPECT_EQ(kv.Offset(0, 4), 56);   // page 2, token 1
  EXPECT_EQ(kv.Offset(0, 8), 184);  // page 7, token 2
  EXPECT_EQ(kv.Offset(1, 0), 24);   // page 1
  EXPECT_EQ(kv.Offset(1, 5), 16);   // page 0, token 2
  EXPECT_EQ(kv.Offset(1, 8), 232);  // page 9, token 2
  EXPECT_EQ(kv.SlotOffset(0), 0);
  EXPECT_EQ(kv.SlotOffset(7), 56);    // page 2, token 1
  EXPECT_EQ(kv.SlotOffset(29), 232);  // page 9, token 2
}

// With page_tokens 1 (SGLang's token granularity) the slot is the page.
TEST(PagedKvTest, PageTokensOne) {
  const std::vector<int32_t> table = {4, 0, 3};
  PagedKv kv;
  kv.page_tokens = 1;
  kv.token_stride = 16;
  kv.page_stride = 16;
  kv.page_table = table.data();
  kv.page_table_stride = 3;
  EXPECT_EQ(kv.Offset(0, 0), 64);
  EXPECT_EQ(kv.Offset(0, 1), 0);
  EXPECT_EQ(kv.Offset(0, 2), 48);
  EXPECT_EQ(kv.SlotOffset(3), 48);
}

// For every token of every entry, the slot a layout would hand out
// (page * page_tokens + pos % page_tokens) resolves to the same element as Offset(b, pos).
TEST(PagedKvTest, OffsetAgreesWithSlotOffset) {
  for (int32_t page_tokens : {1, 3, 16}) {
    const int64_t stride = 5;
    std::vector<int32_t> table(2 * stride);
    for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>((i * 7 + 3) % 11);
    PagedKv kv;
    kv.page_tokens = page_tokens;
    kv.token_stride = 6;
    kv.page_stride = page_tokens * 6;
    kv.page_table = table.data();
    kv.page_table_stride = stride;
    for (int32_t b = 0; b < 2; ++b) {
      for (int64_t pos = 0; pos < stride * page_tokens; ++pos) {
        const int64_t page = table[b * stride + pos / page_tokens];
        const int64_t slot = page * page_tokens + pos % page_tokens;
        EXPECT_EQ(kv.Offset(b, pos), kv.SlotOffset(slot)) << page_tokens << " " << b << " " << pos;
        EXPECT_EQ(kv.Offset(b, pos), page * page_tokens * 6 + (pos % page_tokens) * 6);
      }
    }
  }
}

// Llama-3-8B-like pages (16 tokens x 8 heads x 128 dims = 16384 elements per page) with page
// ids near INT32_MAX / page_stride and near INT32_MAX itself: offsets up to ~3.5e13 elements.
TEST(PagedKvTest, SixtyFourBitOffsets) {
  const int64_t token_stride = 8 * 128;
  const int64_t page_stride = 16 * token_stride;
  const int32_t near_overflow =
      static_cast<int32_t>(std::numeric_limits<int32_t>::max() / page_stride);
  const std::vector<int32_t> table = {near_overflow, near_overflow + 1,
                                      std::numeric_limits<int32_t>::max()};
  PagedKv kv;
  kv.page_tokens = 16;
  kv.token_stride = token_stride;
  kv.page_stride = page_stride;
  kv.page_table = table.data();
  kv.page_table_stride = 3;

  // 131071 * 16384 + 15 * 1024 = 2147467264 + 15360, just below 2^31.
  EXPECT_EQ(kv.Offset(0, 15), int64_t{2147482624});
  // Page 131072 starts exactly at 2^31.
  EXPECT_EQ(kv.Offset(0, 16), int64_t{1} << 31);
  EXPECT_EQ(kv.Offset(0, 17), (int64_t{1} << 31) + 1024);
  // Page INT32_MAX: (2^31 - 1) * 2^14 + 3 * 2^10.
  EXPECT_EQ(kv.Offset(0, 35), int64_t{35184372072448} + 3072);
  EXPECT_EQ(kv.PageOffset(std::numeric_limits<int32_t>::max()), int64_t{35184372072448});
  // Slots above 2^31 (slots themselves are 64-bit in the accessor).
  const int64_t slot = int64_t{std::numeric_limits<int32_t>::max()} * 16 + 3;
  EXPECT_EQ(kv.SlotOffset(slot), int64_t{35184372072448} + 3072);
  // A large page_table_stride with a large batch index.
  std::vector<int32_t> wide(3 * 70000, 0);
  wide[2 * 70000 + 69999] = near_overflow + 1;
  kv.page_table = wide.data();
  kv.page_table_stride = 70000;
  EXPECT_EQ(kv.Offset(2, 69999 * 16 + 1), (int64_t{1} << 31) + 1024);
}

// All-layer arrangement: 3 layers, 2 heads x 4 dims, max_context 10. A token spans
// 3 layers x (K, V) x 8 = 48 elements; layer l's K starts at l * 16, its V 8 further.
TEST(VirtualKvTest, HandComputedOffsetsAllLayers) {
  const std::vector<int32_t> rows = {2, 0, 5};
  VirtualKv kv;
  kv.token_stride = 48;
  kv.row_stride = 480;
  kv.max_context = 10;
  kv.row_ids = rows.data();
  EXPECT_EQ(kv.Offset(0, 0), 960);
  EXPECT_EQ(kv.Offset(0, 3), 960 + 144);
  EXPECT_EQ(kv.Offset(1, 9), 432);
  EXPECT_EQ(kv.Offset(2, 1), 2448);
  EXPECT_EQ(kv.SlotOffset(23), 960 + 144);  // row 2, pos 3
  EXPECT_EQ(kv.SlotOffset(51), 2448);       // row 5, pos 1
  for (int32_t b = 0; b < 3; ++b) {
    for (int64_t pos = 0; pos < 10; ++pos) {
      EXPECT_EQ(kv.Offset(b, pos), kv.SlotOffset(rows[b] * 10 + pos));
    }
  }
}

// Per-layer arrangement: token_stride = heads * dims, rows possibly padded.
TEST(VirtualKvTest, HandComputedOffsetsPerLayerPaddedRows) {
  const std::vector<int32_t> rows = {1, 3};
  VirtualKv kv;
  kv.token_stride = 8;
  kv.row_stride = 8 * 10 + 48;  // rows rounded up to a granule
  kv.max_context = 10;
  kv.row_ids = rows.data();
  EXPECT_EQ(kv.Offset(0, 0), 128);
  EXPECT_EQ(kv.Offset(1, 7), 384 + 56);
  EXPECT_EQ(kv.SlotOffset(37), 384 + 56);
}

// All-layer rows in chunks of 4 tokens, 3 layers, 8 elements per token and layer: a chunk
// is 3 x 2 blocks of 4 x 8 = 32 elements (192), so 160 elements separate a block's last
// token from the next chunk. Token 6 of row 2 is token 2 of chunk 1: 2 * 480 (rows of
// 2.5 chunks) + 192 + 2 * 8 = 1168 from the view's base.
TEST(VirtualKvTest, HandComputedOffsetsInChunks) {
  const std::vector<int32_t> rows = {2, 0};
  VirtualKv kv;
  kv.token_stride = 8;
  kv.chunk_shift = 2;
  kv.chunk_gap = 192 - 4 * 8;
  kv.row_stride = 480;  // max_context 10: chunks 0, 1 and half of 2
  kv.max_context = 10;
  kv.row_ids = rows.data();
  EXPECT_EQ(kv.InRow(0), 0);
  EXPECT_EQ(kv.InRow(3), 24);
  EXPECT_EQ(kv.InRow(4), 192);
  EXPECT_EQ(kv.InRow(9), 2 * 192 + 8);
  EXPECT_EQ(kv.Offset(0, 6), 1168);
  EXPECT_EQ(kv.SlotOffset(2 * 10 + 6), 1168);
  EXPECT_EQ(kv.Offset(1, 9), 2 * 192 + 8);
}

// Llama-3-8B all-layer rows at max_context 32768: token_stride 32 x 2 x 8 x 128 = 65536,
// row_stride 2^31; row 255 sits at 255 * 2^31 ~ 5.5e11 elements.
TEST(VirtualKvTest, SixtyFourBitOffsets) {
  const std::vector<int32_t> rows = {255, 1};
  VirtualKv kv;
  kv.token_stride = 65536;
  kv.max_context = 32768;
  kv.row_stride = kv.max_context * kv.token_stride;
  kv.row_ids = rows.data();
  EXPECT_EQ(kv.Offset(0, 0), int64_t{547608330240});
  EXPECT_EQ(kv.Offset(0, 32767), int64_t{547608330240} + int64_t{2147418112});
  EXPECT_EQ(kv.Offset(1, 0), int64_t{1} << 31);
  EXPECT_EQ(kv.SlotOffset(int64_t{255} * 32768 + 32767), int64_t{549755748352});
  // Row ids near INT32_MAX with a small row stride.
  const std::vector<int32_t> big = {std::numeric_limits<int32_t>::max()};
  VirtualKv small;
  small.token_stride = 4;
  small.max_context = 8;
  small.row_stride = 32;
  small.row_ids = big.data();
  EXPECT_EQ(small.Offset(0, 7), int64_t{68719476704} + 28);
  EXPECT_EQ(small.SlotOffset(int64_t{std::numeric_limits<int32_t>::max()} * 8 + 7),
            int64_t{68719476704} + 28);
}

}  // namespace
}  // namespace kvmem
