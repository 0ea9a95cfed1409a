// The batch calls (ExtendBatch, TruncateBatch, FreeBatch) and the running batch on every
// layout: a batch does what the same single-request calls in a row do, is all or
// nothing when memory runs out part-way, and the running batch's arrays keep their
// addresses while they follow every change of their members.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "kvmem/running_batch.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {
namespace {

using absl::StatusCode;

class KvCacheBatchTest : public ::testing::TestWithParam<LayoutCase> {
 protected:
  std::unique_ptr<KvCache> MakeCache(int64_t budget = 0) const {
    KvCacheConfig config = SmallConfig(GetParam());
    if (budget > 0) config.memory_budget_bytes = budget;
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    EXPECT_TRUE(cache.ok()) << cache.status();
    return cache.ok() ? *std::move(cache) : nullptr;
  }
  int64_t Tpp(const KvCache& cache) const { return TokensPerPage(cache.config()); }
};

// Two caches given the same requests: one extended batch by batch, the other request by
// request in the same order. Every slot, length and stat must agree.
TEST_P(KvCacheBatchTest, ExtendBatchEqualsExtendsInOrder) {
  std::unique_ptr<KvCache> batched = MakeCache();
  std::unique_ptr<KvCache> single = MakeCache();
  ASSERT_TRUE(batched != nullptr && single != nullptr);
  const int64_t tpp = Tpp(*batched);
  std::vector<RequestId> ids = {1, 2, 3, 4};
  for (KvCache* c : {batched.get(), single.get()}) {
    for (RequestId id : ids) KVMEM_ASSERT_OK(c->AddRequest(id));
  }
  const std::vector<std::vector<int64_t>> steps = {
      {1, 1, 1, 1}, {tpp + 1, 0, 2 * tpp, 3}, {1, 1, 1, 1}, {0, tpp - 1, 1, tpp}, {5, 5, 0, 5}};
  for (const std::vector<int64_t>& counts : steps) {
    int64_t total = 0;
    for (int64_t n : counts) total += n;
    std::vector<int64_t> out(total);
    KVMEM_ASSERT_OK(batched->ExtendBatch(ids, counts, absl::MakeSpan(out)));
    std::vector<int64_t> want;
    for (size_t i = 0; i < ids.size(); ++i) {
      KVMEM_ASSERT_OK(single->ExtendInto(ids[i], counts[i], &want));
    }
    EXPECT_EQ(out, want);
    KVMEM_ASSERT_OK(batched->CheckInvariants());
  }
  for (RequestId id : ids) EXPECT_EQ(batched->Length(id).value(), single->Length(id).value());
  EXPECT_EQ(SnapshotDiff(TakeSnapshot(*single, ids, false), TakeSnapshot(*batched, ids, false)),
            "");
}

// Memory for the first rows of a batch but not the last: the batch fails and no row grew.
TEST_P(KvCacheBatchTest, ExtendBatchThatRunsOutChangesNothing) {
  std::unique_ptr<KvCache> probe = MakeCache();
  ASSERT_TRUE(probe != nullptr);
  std::unique_ptr<KvCache> cache = MakeCache(MinimalBudget(probe->config()));
  ASSERT_TRUE(cache != nullptr);
  const int64_t max_context = cache->config().max_context;
  const std::vector<RequestId> ids = {1, 2};
  for (RequestId id : ids) KVMEM_ASSERT_OK(cache->AddRequest(id));
  KVMEM_ASSERT_OK(cache->Extend(1, 1));
  const Snapshot before = TakeSnapshot(*cache, ids);
  // Request 2 alone at max_context fits the budget; with request 1's pages it cannot.
  const int64_t counts[] = {max_context / 2, max_context};
  std::vector<int64_t> out(max_context / 2 + max_context);
  KVMEM_EXPECT_CODE(cache->ExtendBatch(ids, counts, absl::MakeSpan(out)),
                    StatusCode::kResourceExhausted);
  EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache, ids)), "");
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

// Two forks ending part-way through one shared page both write in one batch: one copies,
// the last writes in place, and each reads back its own tokens.
TEST_P(KvCacheBatchTest, SiblingsWritingOneSharedPageInOneBatch) {
  std::unique_ptr<KvCache> cache = MakeCache();
  ASSERT_TRUE(cache != nullptr);
  const int64_t tpp = Tpp(*cache);
  if (tpp < 2) GTEST_SKIP() << "a one-token page is never partly filled";
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, tpp + 1));
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  const int64_t copies = cache->GetStats().cow_copies;
  const RequestId ids[] = {1, 2};
  const int64_t counts[] = {1, 1};
  KVMEM_ASSERT_OK(model.ExtendBatch(ids, counts));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  if (cache->config().layout == Layout::kPaged) {
    EXPECT_EQ(cache->GetStats().cow_copies, copies + 1);
  }
}

// Speculative decoding over forks of one prefix: every fork rewinds into the shared,
// partly filled last page by a different amount, then writes again; the pages' fill
// bookkeeping (several rows ending part-way through one page) stays exact throughout.
TEST_P(KvCacheBatchTest, ForksRewindIntoOneSharedPage) {
  std::unique_ptr<KvCache> cache = MakeCache();
  ASSERT_TRUE(cache != nullptr);
  const int64_t tpp = Tpp(*cache);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 2 * tpp + std::max<int64_t>(tpp - 1, 1)));
  std::vector<RequestId> forks;
  for (RequestId id = 2; id < 2 + 5; ++id) {
    KVMEM_ASSERT_OK(model.Fork(1, id));
    forks.push_back(id);
  }
  for (int round = 0; round < 4; ++round) {
    SCOPED_TRACE(testing::Message() << "round " << round);
    std::vector<int64_t> counts, lengths;
    for (size_t i = 0; i < forks.size(); ++i) counts.push_back(1 + (i + round) % 3);
    KVMEM_ASSERT_OK(model.ExtendBatch(forks, counts));
    KVMEM_ASSERT_OK(cache->CheckInvariants());
    for (size_t i = 0; i < forks.size(); ++i) {
      lengths.push_back(std::max<int64_t>(0, model.LengthOf(forks[i]) - 2 - int64_t(i)));
    }
    KVMEM_ASSERT_OK(model.TruncateBatch(forks, lengths));
    KVMEM_ASSERT_OK(cache->CheckInvariants());
    KVMEM_ASSERT_OK(model.VerifyAll());
  }
  KVMEM_ASSERT_OK(model.FreeBatch(forks));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  KVMEM_ASSERT_OK(model.VerifyAll());
}

TEST_P(KvCacheBatchTest, TruncateAndFreeBatch) {
  std::unique_ptr<KvCache> cache = MakeCache();
  ASSERT_TRUE(cache != nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = Tpp(*cache);
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 3 * tpp + 1));
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  KVMEM_ASSERT_OK(model.Fork(1, 3));
  const RequestId ids[] = {3, 1, 2};
  const int64_t lengths[] = {tpp, 3 * tpp + 1, 1};  // 1 keeps its length
  KVMEM_ASSERT_OK(model.TruncateBatch(ids, lengths));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  const RequestId gone[] = {2, 1};
  KVMEM_ASSERT_OK(model.FreeBatch(gone));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  EXPECT_EQ(cache->GetStats().num_requests, 1);
}

// The arrays keep their addresses; members' entries follow Extend (including a copy on
// write), Truncate, Free and reordering; what the entries say is the request's state.
TEST_P(KvCacheBatchTest, RunningBatchFollowsItsMembers) {
  std::unique_ptr<KvCache> cache = MakeCache();
  ASSERT_TRUE(cache != nullptr);
  const bool paged = cache->config().layout == Layout::kPaged;
  const int64_t tpp = Tpp(*cache);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, tpp + 1));
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  KVMEM_ASSERT_OK(model.Add(3));
  KVMEM_ASSERT_OK(cache->SetRunningBatch({2, 1, 3}));
  const RunningBatchView first = cache->RunningBatch();
  ASSERT_EQ(first.size, 3);
  EXPECT_EQ(first.max_batch, cache->config().max_requests);
  EXPECT_EQ(first.page_table != nullptr, paged);
  auto expect_entry = [&](const RunningBatchView& v, int b, RequestId id) {
    SCOPED_TRACE(testing::Message() << "entry " << b << " request " << id);
    EXPECT_EQ(v.seq_lens[b], cache->Length(id).value());
    EXPECT_EQ(v.row_ids[b], cache->Row(id).value());
    if (!paged) return;
    const std::vector<int32_t> table = cache->BlockTable(id).value();
    for (size_t k = 0; k < table.size(); ++k) {
      EXPECT_EQ(v.page_table[b * v.page_table_stride + k], table[k]) << "page " << k;
    }
    const int64_t len = cache->Length(id).value();
    EXPECT_EQ(v.last_page_len[b], len == 0 ? 0 : (len - 1) % cache->config().page_tokens + 1);
  };
  const RequestId ids[] = {1, 2, 3};
  const int64_t counts[] = {1, 2, 2 * tpp + 1};  // 1 or 2 copies its shared last page
  KVMEM_ASSERT_OK(model.ExtendBatch(ids, counts));
  RunningBatchView v = cache->RunningBatch();
  EXPECT_EQ(v.seq_lens, first.seq_lens);
  EXPECT_EQ(v.page_table, first.page_table);
  expect_entry(v, 0, 2);
  expect_entry(v, 1, 1);
  expect_entry(v, 2, 3);
  EXPECT_EQ(v.max_seq_len, std::max(tpp + 3, 2 * tpp + 1));

  KVMEM_ASSERT_OK(model.Truncate(3, 1));
  KVMEM_ASSERT_OK(model.Free(2));
  v = cache->RunningBatch();
  EXPECT_EQ(v.seq_lens[0], 0);
  EXPECT_EQ(v.row_ids[0], -1);
  expect_entry(v, 2, 3);
  EXPECT_EQ(v.max_seq_len, tpp + 2);
  KVMEM_EXPECT_OK(cache->CheckInvariants());

  KVMEM_ASSERT_OK(cache->SetRunningBatch({3, 1}));
  v = cache->RunningBatch();
  EXPECT_EQ(v.size, 2);
  EXPECT_EQ(v.seq_lens, first.seq_lens);
  expect_entry(v, 0, 3);
  expect_entry(v, 1, 1);
  EXPECT_EQ(v.seq_lens[2], 0);
  KVMEM_EXPECT_OK(cache->CheckInvariants());

  absl::StatusOr<RunningBatchCsr> csr = cache->PackRunningBatch();
  if (!paged) {
    KVMEM_EXPECT_CODE(csr, StatusCode::kFailedPrecondition);
    return;
  }
  KVMEM_ASSERT_OK(csr);
  for (int b = 0; b < 2; ++b) {
    const std::vector<int32_t> table = cache->BlockTable(b == 0 ? 3 : 1).value();
    EXPECT_EQ(std::vector<int32_t>(csr->indices + csr->indptr[b],
                                   csr->indices + csr->indptr[b + 1]),
              table);
  }
}

TEST_P(KvCacheBatchTest, BadRunningBatchChangesNothing) {
  std::unique_ptr<KvCache> cache = MakeCache();
  ASSERT_TRUE(cache != nullptr);
  KVMEM_ASSERT_OK(cache->AddRequest(1));
  KVMEM_ASSERT_OK(cache->AddRequest(2));
  KVMEM_ASSERT_OK(cache->SetRunningBatch({1}));
  KVMEM_EXPECT_CODE(cache->SetRunningBatch({2, 7}), StatusCode::kNotFound);
  KVMEM_EXPECT_CODE(cache->SetRunningBatch({2, 2}), StatusCode::kInvalidArgument);
  std::vector<RequestId> too_many(cache->config().max_requests + 1, 1);
  KVMEM_EXPECT_CODE(cache->SetRunningBatch(too_many), StatusCode::kInvalidArgument);
  const RunningBatchView v = cache->RunningBatch();
  EXPECT_EQ(v.size, 1);
  EXPECT_EQ(v.row_ids[0], cache->Row(1).value());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

// The batch calls find the running batch's members by their entry when an id stands at
// its entry's position, and hash the others: an id given twice is caught whichever way
// each copy was found, an ended member's id is unknown, and ids out of the batch's order
// reach the same requests.
TEST_P(KvCacheBatchTest, BatchCallsFindMembersByEntryOrById) {
  std::unique_ptr<KvCache> cache = MakeCache();
  ASSERT_TRUE(cache != nullptr);
  for (RequestId id : {1, 2, 3, 4}) KVMEM_ASSERT_OK(cache->AddRequest(id));
  KVMEM_ASSERT_OK(cache->SetRunningBatch({1, 2, 3}));
  std::vector<int64_t> out(8);
  // 1 at its entry, then again (hashed): nothing changes.
  KVMEM_EXPECT_CODE(cache->ExtendBatch({1, 2, 1}, {1, 1, 1}, absl::MakeSpan(out)),
                    StatusCode::kInvalidArgument);
  KVMEM_EXPECT_CODE(cache->ExtendBatch({2, 2}, {1, 1}, absl::MakeSpan(out)),
                    StatusCode::kInvalidArgument);
  for (RequestId id : {1, 2, 3, 4}) EXPECT_EQ(cache->Length(id).value(), 0);
  // In the batch's order, out of it, and a request outside the batch.
  KVMEM_ASSERT_OK(cache->ExtendBatch({1, 2, 3}, {1, 2, 3}, absl::MakeSpan(out)));
  KVMEM_ASSERT_OK(cache->ExtendBatch({3, 4, 1, 2}, {1, 1, 1, 1}, absl::MakeSpan(out)));
  EXPECT_EQ(cache->Length(1).value(), 2);
  EXPECT_EQ(cache->Length(2).value(), 3);
  EXPECT_EQ(cache->Length(3).value(), 4);
  EXPECT_EQ(cache->Length(4).value(), 1);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  // An ended member leaves its entry: its id is unknown there too.
  KVMEM_ASSERT_OK(cache->Free(2));
  KVMEM_EXPECT_CODE(cache->ExtendBatch({1, 2, 3}, {1, 1, 1}, absl::MakeSpan(out)),
                    StatusCode::kNotFound);
  EXPECT_EQ(cache->Length(1).value(), 2);
  // A new request with the ended one's id is not the entry's request.
  KVMEM_ASSERT_OK(cache->AddRequest(2));
  KVMEM_ASSERT_OK(cache->ExtendBatch({1, 2, 3}, {1, 1, 1}, absl::MakeSpan(out)));
  EXPECT_EQ(cache->Length(2).value(), 1);
  const RunningBatchView v = cache->RunningBatch();
  EXPECT_EQ(v.seq_lens[0], 3);
  EXPECT_EQ(v.seq_lens[1], 0);  // the entry stays empty until SetRunningBatch
  EXPECT_EQ(v.seq_lens[2], 5);
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

INSTANTIATE_TEST_SUITE_P(Layouts, KvCacheBatchTest, ::testing::ValuesIn(AllLayouts()),
                         LayoutCaseName);

}  // namespace
}  // namespace kvmem::test
