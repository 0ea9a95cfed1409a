// Tests of the request-to-token index (src/token_index.h).
#include "src/core/token_index.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem::internal {
namespace {

TEST(TokenIndexTest, RejectsBadShapes) {
  EXPECT_EQ(TokenIndex::Make(0, 10).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TokenIndex::Make(4, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TokenIndex::Make(4, -3).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TokenIndexTest, UnwrittenEntriesReadMinusOne) {
  absl::StatusOr<TokenIndex> index = TokenIndex::Make(4, 100);
  ASSERT_TRUE(index.ok()) << index.status();
  for (int32_t r = 0; r < 4; ++r) {
    for (int64_t p = 0; p < 100; ++p) ASSERT_EQ(index->Get(r, p), -1);
  }
  index->Set(2, 10, 77);
  EXPECT_EQ(index->Get(2, 10), 77);
  EXPECT_EQ(index->high_water(2), 11);
  // The gap below the first write was filled with -1, not left as 0.
  for (int64_t p = 0; p < 10; ++p) EXPECT_EQ(index->Get(2, p), -1);
  for (int64_t p = 0; p < 10; ++p) EXPECT_EQ(index->data()[2 * 100 + p], -1);
  EXPECT_EQ(index->Get(2, 11), -1);
  EXPECT_EQ(index->Get(1, 10), -1);
  EXPECT_EQ(index->Get(3, 10), -1);
}

TEST(TokenIndexTest, FillAndCopyPrefix) {
  absl::StatusOr<TokenIndex> index = TokenIndex::Make(3, 50);
  ASSERT_TRUE(index.ok());
  for (int64_t p = 0; p < 20; ++p) index->Set(0, p, static_cast<int32_t>(1000 + p));
  index->CopyPrefix(0, 1, 15);
  for (int64_t p = 0; p < 15; ++p) EXPECT_EQ(index->Get(1, p), 1000 + p);
  EXPECT_EQ(index->Get(1, 15), -1);
  // Copying more than the source ever wrote gives -1 beyond its mark.
  index->CopyPrefix(0, 2, 30);
  for (int64_t p = 0; p < 20; ++p) EXPECT_EQ(index->Get(2, p), 1000 + p);
  for (int64_t p = 20; p < 30; ++p) EXPECT_EQ(index->Get(2, p), -1);
  index->Fill(0, 5, 20, -1);
  for (int64_t p = 0; p < 5; ++p) EXPECT_EQ(index->Get(0, p), 1000 + p);
  for (int64_t p = 5; p < 50; ++p) EXPECT_EQ(index->Get(0, p), -1);
  index->Fill(1, 40, 45, 9);
  for (int64_t p = 15; p < 40; ++p) EXPECT_EQ(index->Get(1, p), -1);
  for (int64_t p = 40; p < 45; ++p) EXPECT_EQ(index->Get(1, p), 9);
  EXPECT_EQ(index->Get(1, 45), -1);
  // Rows do not bleed into each other.
  EXPECT_EQ(index->Get(0, 49), -1);
  EXPECT_EQ(index->Get(2, 49), -1);
}

TEST(TokenIndexTest, MoveTransfersOwnership) {
  absl::StatusOr<TokenIndex> made = TokenIndex::Make(2, 8);
  ASSERT_TRUE(made.ok());
  made->Set(1, 3, 5);
  TokenIndex a = std::move(*made);
  EXPECT_EQ(a.Get(1, 3), 5);
  TokenIndex b;
  b = std::move(a);
  EXPECT_EQ(b.Get(1, 3), 5);
  EXPECT_EQ(b.rows(), 2);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
}

TEST(TokenIndexTest, UntouchedRowsCostNoMemory) {
  // 256 x 131072 x 4 B = 128 MiB of address space; only written pages become resident.
  constexpr int32_t kRows = 256;
  constexpr int64_t kContext = 131072;
  absl::StatusOr<TokenIndex> index = TokenIndex::Make(kRows, kContext);
  ASSERT_TRUE(index.ok()) << index.status();
  for (int64_t p = 0; p < 3000; ++p) index->Set(5, p, static_cast<int32_t>(p));
  index->Set(200, 0, 1);
  const int64_t os_page = sysconf(_SC_PAGESIZE);
  const int64_t bytes = int64_t{kRows} * kContext * 4;
  std::vector<unsigned char> resident((bytes + os_page - 1) / os_page);
  ASSERT_EQ(mincore(const_cast<int32_t*>(index->data()), bytes, resident.data()), 0);
  int64_t pages = 0;
  for (unsigned char c : resident) pages += c & 1;
  // Row 5: 3000 entries (12 KB, at most 4 pages); row 200: one page.
  EXPECT_GE(pages, 2);
  EXPECT_LE(pages, 6) << pages * os_page << " bytes resident";
  EXPECT_EQ(index->Get(5, 2999), 2999);
  EXPECT_EQ(index->Get(255, kContext - 1), -1);
}

}  // namespace
}  // namespace kvmem::internal
