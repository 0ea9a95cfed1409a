// The KvCache contract on both layouts (paged at 1, 3 and 16 tokens a page; virtual,
// all-layer and per-layer) on the host backend: every error path returns its status and
// leaves the cache exactly as it was (snapshots before and after) with its invariants
// intact; and the positive semantics of Extend, Fork, Truncate, Free, fences, Trim,
// batch metadata and views.
#include "kvmem/kv_cache.h"

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {
namespace {

using absl::StatusCode;

class KvCacheTest : public ::testing::TestWithParam<LayoutCase> {
 protected:
  KvCacheConfig Config(DType dtype = DType::kFloat32) const {
    return SmallConfig(GetParam(), dtype);
  }
  bool paged() const { return GetParam().layout == Layout::kPaged; }

  static std::unique_ptr<KvCache> MustCreate(const KvCacheConfig& config) {
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    EXPECT_TRUE(cache.ok()) << cache.status() << " for " << DescribeConfig(config);
    return cache.ok() ? *std::move(cache) : nullptr;
  }
};

// Runs `call`, which must fail with `code`, and checks that the cache did not change.
#define EXPECT_FAILS_UNCHANGED(cache, ids, call, want_code)                             \
  do {                                                                                  \
    const Snapshot kvmem_before_ = TakeSnapshot(*(cache), (ids));                       \
    KVMEM_EXPECT_CODE(call, want_code);                                                 \
    EXPECT_EQ(SnapshotDiff(kvmem_before_, TakeSnapshot(*(cache), (ids))), "") << #call; \
    KVMEM_EXPECT_OK((cache)->CheckInvariants());                                        \
  } while (0)

// The bytes of the K and V of every layer of the tokens at `slots`, read through the
// cache's views (so they can be compared after their request is gone).
std::vector<std::string> TokenBytes(const KvCache& cache, const std::vector<int32_t>& slots) {
  const KvCacheConfig& config = cache.config();
  const int64_t elem = DTypeBytes(config.dtype);
  const int64_t token_bytes = TokenElems(config) * elem;
  const BatchMetadata empty;
  std::vector<std::string> out;
  auto read = [&](const auto& view) {
    for (int32_t slot : slots) {
      const int64_t at = view.SlotOffset(slot) * elem;
      out.emplace_back(static_cast<const char*>(view.k) + at, token_bytes);
      out.emplace_back(static_cast<const char*>(view.v) + at, token_bytes);
    }
  };
  for (int layer = 0; layer < config.num_layers; ++layer) {
    if (config.layout == Layout::kPaged) {
      absl::StatusOr<PagedKv> v = cache.PagedView(layer, empty);
      EXPECT_TRUE(v.ok()) << v.status();
      if (v.ok()) read(*v);
    } else {
      absl::StatusOr<VirtualKv> v = cache.VirtualView(layer, empty);
      EXPECT_TRUE(v.ok()) << v.status();
      if (v.ok()) read(*v);
    }
  }
  return out;
}

TEST_P(KvCacheTest, CreateReportsConfig) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->config().layout, config.layout);
  EXPECT_EQ(cache->config().max_context, config.max_context);
  ASSERT_NE(cache->config().vmm, nullptr);
  const Stats s = cache->GetStats();
  EXPECT_EQ(s.num_requests, 0);
  EXPECT_EQ(s.logical_tokens, 0);
  EXPECT_EQ(s.held_bytes, 0);
  EXPECT_EQ(s.budget_bytes, config.memory_budget_bytes);
  EXPECT_GT(s.page_bytes, 0);
  EXPECT_GT(s.pages_total, 0);
  EXPECT_LE(s.pages_total * s.page_bytes, config.memory_budget_bytes);
  EXPECT_EQ(s.pages_free, s.pages_total);
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, UnknownIdIsNotFound) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 5));
  const std::vector<RequestId> ids = {1, 99, 100};
  std::vector<int64_t> out = {7};
  std::vector<int32_t> r2t = {3};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(99, 1), StatusCode::kNotFound);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(99, 0), StatusCode::kNotFound);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->ExtendInto(99, 2, &out), StatusCode::kNotFound);
  EXPECT_EQ(out, std::vector<int64_t>{7});
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Truncate(99, 0), StatusCode::kNotFound);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Fork(99, 100), StatusCode::kNotFound);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Free(99), StatusCode::kNotFound);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Length(99), StatusCode::kNotFound);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Row(99), StatusCode::kNotFound);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->ReqToToken(99, &r2t), StatusCode::kNotFound);
  if (paged()) {
    EXPECT_FAILS_UNCHANGED(cache, ids, cache->BlockTable(99), StatusCode::kNotFound);
  }
  BatchMetadata meta;
  meta.max_seq_len = 42;
  const RequestId batch[] = {1, 99};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->BuildBatchMetadata(batch, &meta),
                         StatusCode::kNotFound);
  EXPECT_EQ(meta.max_seq_len, 42) << "a failed BuildBatchMetadata wrote its output";
  EXPECT_FALSE(cache->Contains(99));
  KVMEM_EXPECT_OK(model.VerifyAll());
}

// A null output pointer is the caller's bug, reported as such: never dereferenced.
TEST_P(KvCacheTest, NullOutputIsInvalidArgument) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 5));
  const std::vector<RequestId> ids = {1};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->ExtendInto(1, 2, nullptr),
                         StatusCode::kInvalidArgument);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->ExtendInto(1, 0, nullptr),
                         StatusCode::kInvalidArgument);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->ReqToToken(1, nullptr), StatusCode::kInvalidArgument);
  const RequestId batch[] = {1};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->BuildBatchMetadata(batch, nullptr),
                         StatusCode::kInvalidArgument);
  KVMEM_EXPECT_OK(model.VerifyAll());
}

TEST_P(KvCacheTest, DuplicateIdIsAlreadyExists) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 5));
  KVMEM_ASSERT_OK(model.Add(2));
  KVMEM_ASSERT_OK(model.Extend(2, 2));
  const std::vector<RequestId> ids = {1, 2};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->AddRequest(1), StatusCode::kAlreadyExists);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Fork(1, 2), StatusCode::kAlreadyExists);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Fork(1, 1), StatusCode::kAlreadyExists);
  KVMEM_EXPECT_OK(model.VerifyAll());
}

TEST_P(KvCacheTest, DoubleFreeIsNotFound) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 5));
  KVMEM_ASSERT_OK(model.Add(2));
  KVMEM_ASSERT_OK(model.Extend(2, 3));
  KVMEM_ASSERT_OK(model.Free(1));
  const std::vector<RequestId> ids = {1, 2};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Free(1), StatusCode::kNotFound);
  KVMEM_EXPECT_OK(model.VerifyAll());
  // The id can be used again.
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 4));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, ExtendPastMaxContextIsOutOfRange) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  const std::vector<RequestId> ids = {1};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(1, config.max_context + 1),
                         StatusCode::kOutOfRange);
  KVMEM_ASSERT_OK(model.Extend(1, config.max_context - 2));
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(1, 3), StatusCode::kOutOfRange);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(1, std::numeric_limits<int64_t>::max()),
                         StatusCode::kOutOfRange);
  KVMEM_ASSERT_OK(model.Extend(1, 2));
  EXPECT_EQ(*cache->Length(1), config.max_context);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(1, 1), StatusCode::kOutOfRange);
  KVMEM_EXPECT_OK(model.VerifyAll());
}

TEST_P(KvCacheTest, NegativeExtendIsInvalidArgument) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 4));
  const std::vector<RequestId> ids = {1};
  std::vector<int64_t> out = {5, 6};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(1, -1), StatusCode::kInvalidArgument);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->ExtendInto(1, -3, &out), StatusCode::kInvalidArgument);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(1, std::numeric_limits<int64_t>::min()),
                         StatusCode::kInvalidArgument);
  EXPECT_EQ(out, (std::vector<int64_t>{5, 6}));
  KVMEM_EXPECT_OK(model.VerifyAll());
}

TEST_P(KvCacheTest, ExtendByZeroChangesNothing) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 3));
  const std::vector<RequestId> ids = {1};
  const Snapshot before = TakeSnapshot(*cache, ids);
  KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int64_t> slots, cache->Extend(1, 0));
  EXPECT_TRUE(slots.empty());
  EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache, ids)), "");
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, TruncateOutOfRange) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 7));
  const std::vector<RequestId> ids = {1};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Truncate(1, 8), StatusCode::kOutOfRange);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Truncate(1, -1), StatusCode::kOutOfRange);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Truncate(1, std::numeric_limits<int64_t>::min()),
                         StatusCode::kOutOfRange);
  const Snapshot before = TakeSnapshot(*cache, ids);
  KVMEM_EXPECT_OK(model.Truncate(1, 7));  // to the same length: a no-op
  EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache, ids)), "");
  KVMEM_EXPECT_OK(model.VerifyAll());
}

TEST_P(KvCacheTest, TooManyRequestsIsResourceExhausted) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  std::set<int32_t> rows;
  for (int i = 0; i < config.max_requests; ++i) {
    KVMEM_ASSERT_OK_AND_ASSIGN(int32_t row, model.Add(10 + i));
    EXPECT_GE(row, 0);
    EXPECT_LT(row, config.max_requests);
    rows.insert(row);
    KVMEM_ASSERT_OK(model.Extend(10 + i, 1 + i));
  }
  EXPECT_EQ(static_cast<int>(rows.size()), config.max_requests) << "rows handed out twice";
  std::vector<RequestId> ids = model.ids();
  ids.push_back(1000);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->AddRequest(1000), StatusCode::kResourceExhausted);
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Fork(10, 1000), StatusCode::kResourceExhausted);
  KVMEM_ASSERT_OK(model.Free(12));
  KVMEM_ASSERT_OK(model.Add(1000));
  KVMEM_ASSERT_OK(model.Extend(1000, 3));
  KVMEM_EXPECT_OK(model.VerifyAll());
  EXPECT_EQ(cache->GetStats().peak_requests, config.max_requests);
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, BadShapesAreInvalidArgument) {
  struct Bad {
    const char* field;
    void (*apply)(KvCacheConfig*);
  };
  const Bad bad[] = {
      {"num_layers", [](KvCacheConfig* c) { c->num_layers = 0; }},
      {"num_kv_heads", [](KvCacheConfig* c) { c->num_kv_heads = 0; }},
      {"head_dim", [](KvCacheConfig* c) { c->head_dim = -1; }},
      {"page_tokens", [](KvCacheConfig* c) { c->page_tokens = 0; }},
      {"max_requests", [](KvCacheConfig* c) { c->max_requests = 0; }},
      {"max_context", [](KvCacheConfig* c) { c->max_context = 0; }},
      {"memory_budget_bytes", [](KvCacheConfig* c) { c->memory_budget_bytes = 0; }},
      {"host_granularity", [](KvCacheConfig* c) { c->host_granularity = 3000; }},
      {"host_granularity", [](KvCacheConfig* c) { c->host_granularity = 2048; }},
      {"map_ahead_tokens", [](KvCacheConfig* c) { c->map_ahead_tokens = -1; }},
  };
  for (const Bad& b : bad) {
    KvCacheConfig config = Config();
    b.apply(&config);
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    EXPECT_EQ(cache.status().code(), StatusCode::kInvalidArgument) << b.field;
    EXPECT_TRUE(absl::StrContains(cache.status().message(), b.field)) << cache.status();
  }
}

TEST_P(KvCacheTest, BudgetTooSmallForOneRequestIsInvalidArgument) {
  KvCacheConfig config = Config();
  const int64_t minimal = MinimalBudget(config);
  ASSERT_GT(minimal, 0);
  // The minimum holds one request at max_context: at least its tokens' bytes.
  EXPECT_GE(minimal, config.TokenBytes() * config.max_context);
  config.memory_budget_bytes = minimal - 1;
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  ASSERT_EQ(cache.status().code(), StatusCode::kInvalidArgument) << cache.status();
  const std::string message(cache.status().message());
  EXPECT_TRUE(absl::StrContains(message, absl::StrCat(minimal - 1)))
      << "the message should name the budget: " << message;
  EXPECT_TRUE(absl::StrContains(message, absl::StrCat(config.max_context)))
      << "the message should name max_context: " << message;
  config.memory_budget_bytes = 1;
  EXPECT_EQ(KvCache::Create(config).status().code(), StatusCode::kInvalidArgument);

  // At the minimum, one request reaches max_context.
  config.memory_budget_bytes = minimal;
  auto ok = MustCreate(config);
  ASSERT_NE(ok, nullptr);
  CacheModel model(ok.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(ok->CheckInvariants());
}

TEST_P(KvCacheTest, OutOfMemoryChangesNothingAndRecovers) {
  KvCacheConfig config = Config();
  config.memory_budget_bytes = MinimalBudget(config);
  ASSERT_GT(config.memory_budget_bytes, 0);
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t half = config.max_context / 2;
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, half + 1));
  KVMEM_ASSERT_OK(model.Add(2));
  std::vector<RequestId> ids = {1, 2, 3};
  // A growth that only partly fits is rolled back whole.
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(2, config.max_context),
                         StatusCode::kResourceExhausted);
  std::vector<int64_t> out = {11, 12};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->ExtendInto(2, config.max_context, &out),
                         StatusCode::kResourceExhausted);
  EXPECT_EQ(out, (std::vector<int64_t>{11, 12}));

  // Fill what is left with requests 10, 11, ... one token at a time, until memory runs
  // out; the failing Extend changes nothing.
  RequestId filler = 10;
  KVMEM_ASSERT_OK(model.Add(filler));
  for (;;) {
    ids = SnapshotIds(model, {3});
    const Snapshot before = TakeSnapshot(*cache, ids);
    absl::StatusOr<std::vector<int64_t>> s = model.Extend(filler, 1);
    if (s.ok()) continue;
    if (s.status().code() == StatusCode::kOutOfRange) {
      ASSERT_LT(filler, 10 + config.max_requests - 4) << "the budget holds far too much";
      KVMEM_ASSERT_OK(model.Add(++filler));
      continue;
    }
    ASSERT_EQ(s.status().code(), StatusCode::kResourceExhausted) << s.status();
    EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache, ids)), "");
    break;
  }
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(2, 1), StatusCode::kResourceExhausted);
  // A fork needs at most a copy of the last page; if that does not fit it must fail cleanly.
  {
    const Snapshot before = TakeSnapshot(*cache, ids);
    absl::StatusOr<int32_t> fork = model.Fork(1, 3);
    if (!fork.ok()) {
      EXPECT_EQ(fork.status().code(), StatusCode::kResourceExhausted) << fork.status();
      EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache, ids)), "");
    } else {
      KVMEM_EXPECT_OK(model.VerifyAll());
      KVMEM_EXPECT_OK(model.Free(3));
    }
  }
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  // Freeing makes room again.
  KVMEM_ASSERT_OK(model.Free(1));
  for (RequestId id = 10; id <= filler; ++id) KVMEM_ASSERT_OK(model.Free(id));
  KVMEM_ASSERT_OK(model.Extend(2, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_ASSERT_OK(model.Free(2));
  KVMEM_ASSERT_OK(model.Add(3));
  KVMEM_ASSERT_OK(model.Extend(3, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, ExtendGivesDistinctIndexedLocations) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  std::map<RequestId, std::vector<int64_t>> slots;
  for (RequestId id = 1; id <= 4; ++id) KVMEM_ASSERT_OK(model.Add(id));
  const int64_t tpp = TokensPerPage(config);
  for (int round = 0; round < 5; ++round) {
    for (RequestId id = 1; id <= 4; ++id) {
      const int64_t n = (round + id) % 3 == 0 ? 0 : 1 + (id * 7 + round) % (2 * tpp);
      KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int64_t> s, model.Extend(id, n));
      slots[id].insert(slots[id].end(), s.begin(), s.end());
    }
  }
  std::set<int64_t> all;
  int64_t total = 0;
  for (RequestId id = 1; id <= 4; ++id) {
    std::vector<int32_t> r2t;
    KVMEM_ASSERT_OK(cache->ReqToToken(id, &r2t));
    ASSERT_EQ(r2t.size(), slots[id].size());
    const int32_t row = *cache->Row(id);
    for (size_t pos = 0; pos < r2t.size(); ++pos) {
      EXPECT_EQ(r2t[pos], slots[id][pos]);
      if (!paged()) {
        EXPECT_EQ(slots[id][pos], int64_t{row} * config.max_context + pos);
      }
    }
    if (paged()) {
      // Tokens of a page are consecutive slots of one page.
      for (size_t pos = 0; pos < r2t.size(); ++pos) {
        EXPECT_EQ(r2t[pos] % config.page_tokens, static_cast<int32_t>(pos % config.page_tokens));
        if (pos % config.page_tokens != 0) {
          EXPECT_EQ(r2t[pos] / config.page_tokens, r2t[pos - 1] / config.page_tokens);
        }
      }
    }
    all.insert(slots[id].begin(), slots[id].end());
    total += static_cast<int64_t>(slots[id].size());
  }
  EXPECT_EQ(static_cast<int64_t>(all.size()), total) << "two live tokens share a location";
  const Stats s = cache->GetStats();
  EXPECT_EQ(s.logical_tokens, total);
  EXPECT_EQ(s.stored_tokens, total);
  EXPECT_EQ(s.live_bytes, total * config.TokenBytes());
  EXPECT_GE(s.held_bytes, s.live_bytes);
  EXPECT_EQ(s.num_requests, 4);
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, ExtendIntoAppends) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  KVMEM_ASSERT_OK(cache->AddRequest(1));
  KVMEM_ASSERT_OK(cache->AddRequest(2));
  std::vector<int64_t> out;
  KVMEM_ASSERT_OK(cache->ExtendInto(1, 3, &out));
  KVMEM_ASSERT_OK(cache->ExtendInto(2, 2, &out));
  KVMEM_ASSERT_OK(cache->ExtendInto(1, 1, &out));
  ASSERT_EQ(out.size(), 6u);
  std::vector<int32_t> r1, r2;
  KVMEM_ASSERT_OK(cache->ReqToToken(1, &r1));
  KVMEM_ASSERT_OK(cache->ReqToToken(2, &r2));
  EXPECT_EQ(r1, (std::vector<int32_t>{static_cast<int32_t>(out[0]), static_cast<int32_t>(out[1]),
                                      static_cast<int32_t>(out[2]), static_cast<int32_t>(out[5])}));
  EXPECT_EQ(r2, (std::vector<int32_t>{static_cast<int32_t>(out[3]), static_cast<int32_t>(out[4])}));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, ForkShares) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  const int64_t len = 2 * tpp + std::max<int64_t>(1, tpp / 2);
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, len));
  const Stats before = cache->GetStats();
  KVMEM_ASSERT_OK_AND_ASSIGN(int32_t row, model.Fork(1, 2));
  EXPECT_NE(row, *cache->Row(1));
  EXPECT_EQ(*cache->Row(2), row);
  EXPECT_EQ(*cache->Length(2), len);
  const Stats after = cache->GetStats();
  EXPECT_GT(after.pages_shared, 0);
  EXPECT_LE(after.held_bytes - before.held_bytes, TailPages(config) * after.page_bytes)
      << "a fork may copy at most the partly filled last page";
  EXPECT_GE(after.held_bytes, before.held_bytes);
  EXPECT_EQ(after.forks, before.forks + 1);
  EXPECT_EQ(after.logical_tokens, 2 * len);
  EXPECT_LT(after.stored_tokens, after.logical_tokens);
  EXPECT_EQ(after.live_bytes, after.stored_tokens * config.TokenBytes());
  EXPECT_EQ(after.num_requests, 2);
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  if (paged()) {
    // The shared full pages are the same pages.
    KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> t1, cache->BlockTable(1));
    KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> t2, cache->BlockTable(2));
    ASSERT_EQ(t1.size(), t2.size());
    for (int64_t p = 0; p < len / config.page_tokens; ++p) EXPECT_EQ(t1[p], t2[p]);
  }

  // Writes after the fork stay private: child, then parent, into the shared last page.
  KVMEM_ASSERT_OK(model.Extend(2, 1));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_ASSERT_OK(model.Extend(1, 2));
  KVMEM_EXPECT_OK(model.VerifyAll());
  if (paged() && len % config.page_tokens != 0) {
    EXPECT_GT(cache->GetStats().cow_copies, 0);
  }
  // Rewriting a shared position after Truncate must not reach the other request.
  KVMEM_ASSERT_OK(model.Truncate(2, 1));
  KVMEM_ASSERT_OK(model.Extend(2, tpp + 1));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_ASSERT_OK(model.Truncate(1, tpp - 1 > 0 ? tpp - 1 : 0));
  KVMEM_ASSERT_OK(model.Extend(1, 2 * tpp));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());

  // Fork of a fork, then the ancestors go away.
  KVMEM_ASSERT_OK(model.Fork(2, 3));
  KVMEM_ASSERT_OK(model.Free(2));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_ASSERT_OK(model.Extend(3, 3));
  KVMEM_ASSERT_OK(model.Free(1));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  EXPECT_EQ(cache->GetStats().pages_shared, 0);
}

// Memory runs out while a forked request writes into the page it shares with its
// freed parent: the growth takes pages back from idle rows (virtual: the parent's row,
// including its alias of the shared page) and must neither lose a page nor corrupt data.
TEST_P(KvCacheTest, CopyOnWriteWhileReclaimingTheSharedPage) {
  KvCacheConfig config = Config();
  config.memory_budget_bytes = MinimalBudget(config);
  ASSERT_GT(config.memory_budget_bytes, 0);
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  const int64_t r = std::max<int64_t>(1, tpp / 3);
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 2 * tpp + r));  // pages 0..2
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  KVMEM_ASSERT_OK(model.Truncate(2, r));  // the child keeps page 0, shared
  KVMEM_ASSERT_OK(model.Add(4));
  KVMEM_ASSERT_OK(model.Extend(4, tpp));
  // Fill the rest of the budget.
  KVMEM_ASSERT_OK(model.Add(3));
  while (model.LengthOf(3) < config.max_context) {
    absl::StatusOr<std::vector<int64_t>> s = model.Extend(3, 1);
    if (!s.ok()) {
      ASSERT_EQ(s.status().code(), StatusCode::kResourceExhausted) << s.status();
      break;
    }
  }
  KVMEM_ASSERT_OK(model.Free(1));  // idle first: its pages 2, 1, then its alias of 0
  KVMEM_ASSERT_OK(model.Free(4));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  // Page 0 (copy on write or not) and two fresh pages: the freed memory suffices.
  KVMEM_EXPECT_OK(model.Extend(2, 2 * tpp));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  KVMEM_EXPECT_OK(model.VerifyAll());
  // Everything freed: every page must be available again.
  KVMEM_ASSERT_OK(model.Free(2));
  KVMEM_ASSERT_OK(model.Free(3));
  KVMEM_ASSERT_OK(model.Add(5));
  KVMEM_EXPECT_OK(model.Extend(5, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, ForkAtPageBoundaryCopiesNothing) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t len = 2 * TokensPerPage(config);
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, len));
  const Stats before = cache->GetStats();
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  const Stats after = cache->GetStats();
  EXPECT_EQ(after.held_bytes, before.held_bytes);
  EXPECT_EQ(after.stored_tokens, len);
  EXPECT_GT(after.pages_shared, 0);
  KVMEM_ASSERT_OK(model.Extend(2, 1));
  KVMEM_ASSERT_OK(model.Extend(1, 1));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, ForkOfEmptyRequest) {
  auto cache = MustCreate(Config());
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  EXPECT_EQ(*cache->Length(2), 0);
  KVMEM_ASSERT_OK(model.Extend(2, 5));
  KVMEM_ASSERT_OK(model.Extend(1, 3));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, TruncateThenExtend) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 3 * tpp + 1));
  const Stats full = cache->GetStats();
  KVMEM_ASSERT_OK(model.Truncate(1, tpp + 1));
  const Stats cut = cache->GetStats();
  EXPECT_EQ(cut.logical_tokens, tpp + 1);
  EXPECT_EQ(cut.live_bytes, (tpp + 1) * config.TokenBytes());
  EXPECT_LE(cut.held_bytes, full.held_bytes);
  if (paged()) {
    EXPECT_EQ(cut.pages_used, full.pages_used - 2);
  }
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_ASSERT_OK(model.Extend(1, 2 * tpp + 3));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_ASSERT_OK(model.Truncate(1, 0));
  EXPECT_EQ(cache->GetStats().logical_tokens, 0);
  if (paged()) {
    EXPECT_EQ(cache->GetStats().held_bytes, 0);
  }
  KVMEM_ASSERT_OK(model.Extend(1, tpp + 2));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, FreeReturnsMemoryAndPeaksStay) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  int64_t max_held = 0, max_live = 0, max_requests = 0;
  auto sample = [&] {
    const Stats s = cache->GetStats();
    max_held = std::max(max_held, s.held_bytes);
    max_live = std::max(max_live, s.live_bytes);
    max_requests = std::max(max_requests, s.num_requests);
    EXPECT_EQ(s.peak_held_bytes, max_held);
    EXPECT_EQ(s.peak_live_bytes, max_live);
    EXPECT_EQ(s.peak_requests, max_requests);
    EXPECT_GE(s.held_bytes, s.live_bytes);
    EXPECT_EQ(s.live_bytes, s.stored_tokens * config.TokenBytes());
  };
  sample();
  KVMEM_ASSERT_OK(model.Add(1));
  sample();
  KVMEM_ASSERT_OK(model.Extend(1, 2 * tpp + 1));
  sample();
  KVMEM_ASSERT_OK(model.Add(2));
  KVMEM_ASSERT_OK(model.Extend(2, tpp));
  sample();
  const int64_t held_two = cache->GetStats().held_bytes;
  KVMEM_ASSERT_OK(model.Free(1));
  sample();
  const Stats one = cache->GetStats();
  EXPECT_LT(one.held_bytes, held_two);
  EXPECT_EQ(one.num_requests, 1);
  EXPECT_EQ(one.logical_tokens, tpp);
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_ASSERT_OK(model.Free(2));
  sample();
  const Stats none = cache->GetStats();
  EXPECT_EQ(none.held_bytes, 0);
  EXPECT_EQ(none.live_bytes, 0);
  EXPECT_EQ(none.stored_tokens, 0);
  EXPECT_EQ(none.pages_used, 0);
  // Free pages, or pages kept for reuse by idle rows (virtual deferred reclamation).
  EXPECT_GE(none.pages_free + none.idle_bytes / none.page_bytes, none.pages_total);
  EXPECT_LE(none.pages_free, none.pages_total);
  EXPECT_EQ(none.peak_requests, 2);
  EXPECT_EQ(none.peak_held_bytes, held_two);
  // A freed request's memory serves the next one.
  KVMEM_ASSERT_OK(model.Add(3));
  KVMEM_ASSERT_OK(model.Extend(3, 2 * tpp));
  sample();
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, BatchMetadata) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  const std::vector<RequestId> ids = {5, 3, 9};
  const int64_t lens[] = {2 * tpp + 1, 0, 3};
  for (size_t i = 0; i < ids.size(); ++i) {
    KVMEM_ASSERT_OK(model.Add(ids[i]));
    KVMEM_ASSERT_OK(model.Extend(ids[i], lens[i]));
  }
  BatchMetadata meta;
  KVMEM_ASSERT_OK(cache->BuildBatchMetadata(ids, &meta));
  ASSERT_EQ(meta.seq_lens.size(), ids.size());
  ASSERT_EQ(meta.row_ids.size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(meta.seq_lens[i], lens[i]);
    EXPECT_EQ(meta.row_ids[i], *cache->Row(ids[i]));
  }
  EXPECT_EQ(meta.max_seq_len, 2 * tpp + 1);
  if (paged()) {
    const int64_t pages = (2 * tpp + 1 + config.page_tokens - 1) / config.page_tokens;
    EXPECT_GE(meta.page_table_stride, pages);
    ASSERT_EQ(static_cast<int64_t>(meta.page_table.size()),
              meta.page_table_stride * static_cast<int64_t>(ids.size()));
    for (size_t i = 0; i < ids.size(); ++i) {
      KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> table, cache->BlockTable(ids[i]));
      EXPECT_EQ(static_cast<int64_t>(table.size()),
                (lens[i] + config.page_tokens - 1) / config.page_tokens);
      std::vector<int32_t> r2t;
      KVMEM_ASSERT_OK(cache->ReqToToken(ids[i], &r2t));
      for (int64_t p = 0; p < meta.page_table_stride; ++p) {
        const int32_t entry = meta.page_table[i * meta.page_table_stride + p];
        if (p < static_cast<int64_t>(table.size())) {
          EXPECT_EQ(entry, table[p]);
          EXPECT_EQ(entry, r2t[p * config.page_tokens] / config.page_tokens);
        } else {
          EXPECT_EQ(entry, 0) << "padding";
        }
      }
    }
  } else {
    KVMEM_EXPECT_CODE(cache->BlockTable(5), StatusCode::kFailedPrecondition);
  }
  BatchMetadata empty;
  KVMEM_ASSERT_OK(cache->BuildBatchMetadata({}, &empty));
  EXPECT_TRUE(empty.seq_lens.empty());
  EXPECT_TRUE(empty.row_ids.empty());
  EXPECT_EQ(empty.max_seq_len, 0);
  KVMEM_EXPECT_OK(model.VerifyAll());
}

TEST_P(KvCacheTest, Views) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  const BatchMetadata meta;
  const int64_t te = TokenElems(config);
  for (int layer : {-1, config.num_layers}) {
    KVMEM_EXPECT_CODE(cache->PagedView(layer, meta), StatusCode::kOutOfRange);
    KVMEM_EXPECT_CODE(cache->VirtualView(layer, meta), StatusCode::kOutOfRange);
  }
  if (paged()) {
    KVMEM_EXPECT_CODE(cache->VirtualView(0, meta), StatusCode::kFailedPrecondition);
    std::set<void*> bases;
    for (int layer = 0; layer < config.num_layers; ++layer) {
      KVMEM_ASSERT_OK_AND_ASSIGN(PagedKv view, cache->PagedView(layer, meta));
      EXPECT_NE(view.k, nullptr);
      EXPECT_NE(view.v, nullptr);
      EXPECT_EQ(view.page_tokens, config.page_tokens);
      EXPECT_EQ(view.token_stride, te);
      EXPECT_EQ(view.page_stride, config.page_tokens * te);
      bases.insert(view.k);
      bases.insert(view.v);
    }
    EXPECT_EQ(static_cast<int>(bases.size()), 2 * config.num_layers) << "pools overlap";
  } else {
    KVMEM_EXPECT_CODE(cache->PagedView(0, meta), StatusCode::kFailedPrecondition);
    const bool all = config.arrangement == Arrangement::kAllLayers;
    KVMEM_ASSERT_OK_AND_ASSIGN(VirtualKv first, cache->VirtualView(0, meta));
    // All layers: a block of `chunk` tokens per layer and K/V (a token without chunks).
    const int64_t chunk = ChunkTokens(config);
    for (int layer = 0; layer < config.num_layers; ++layer) {
      KVMEM_ASSERT_OK_AND_ASSIGN(VirtualKv view, cache->VirtualView(layer, meta));
      EXPECT_EQ(view.max_context, config.max_context);
      EXPECT_EQ(view.token_stride, all && chunk == 1 ? 2 * config.num_layers * te : te);
      EXPECT_EQ(int64_t{1} << view.chunk_shift, chunk);
      EXPECT_EQ(view.chunk_gap, chunk == 1 ? 0 : chunk * te * (2 * config.num_layers - 1));
      EXPECT_GE(view.row_stride, view.InRow(config.max_context));
      const int64_t elem = DTypeBytes(config.dtype);
      if (all) {
        EXPECT_EQ(static_cast<char*>(view.v) - static_cast<char*>(view.k), chunk * te * elem);
        EXPECT_EQ(static_cast<char*>(view.k) - static_cast<char*>(first.k),
                  int64_t{layer} * 2 * chunk * te * elem);
      }
    }
  }
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, Bf16RoundTrip) {
  KvCacheConfig config = Config(DType::kBFloat16);
  config.head_dim = 16;
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, tpp + 3));
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  KVMEM_ASSERT_OK(model.Extend(2, tpp));
  KVMEM_ASSERT_OK(model.Add(3));
  KVMEM_ASSERT_OK(model.Extend(3, 2 * tpp + 1));
  KVMEM_ASSERT_OK(model.Extend(1, 1));
  KVMEM_EXPECT_OK(model.VerifyAll());
  EXPECT_EQ(cache->GetStats().live_bytes, cache->GetStats().stored_tokens * config.TokenBytes());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

// Memory freed with an incomplete fence is not reused: a new request gets other memory
// and the freed tokens keep their bytes; once the fence completes, the memory serves again.
TEST_P(KvCacheTest, FencedFreeIsNotReusedEarly) {
  const KvCacheConfig config = Config();
  std::atomic<bool> done{false};  // outlives the cache
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int64_t> a_slots, model.Extend(1, 2 * tpp + 1));
  KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<float> a_data, ReadRequest(*cache, 1));
  const int32_t a_row = *cache->Row(1);
  // A's tokens, to be read again after A is gone.
  std::vector<int32_t> a_r2t;
  KVMEM_ASSERT_OK(cache->ReqToToken(1, &a_r2t));
  const std::vector<std::string> a_bytes = TokenBytes(*cache, a_r2t);

  KVMEM_ASSERT_OK(model.Free(1, HostFence(&done)));
  EXPECT_GT(cache->GetStats().pages_quarantined, 0);
  EXPECT_EQ(cache->GetStats().held_bytes, 0);
  KVMEM_EXPECT_OK(cache->CheckInvariants());

  // New requests while the fence is pending.
  for (RequestId id = 2; id <= 4; ++id) {
    KVMEM_ASSERT_OK_AND_ASSIGN(int32_t row, model.Add(id));
    if (!paged()) {
      EXPECT_NE(row, a_row) << "a quarantined row was handed out";
    }
    KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int64_t> s, model.Extend(id, 2 * tpp + 1));
    if (paged()) {
      for (int64_t slot : s) {
        for (int64_t a : a_slots) {
          EXPECT_NE(slot / config.page_tokens, a / config.page_tokens)
              << "page of a fenced free reused";
        }
      }
    }
  }
  KVMEM_EXPECT_OK(model.VerifyAll());
  ASSERT_EQ(TokenBytes(*cache, a_r2t), a_bytes)
      << "memory freed under a pending fence was overwritten";
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  // Trim must not give quarantined memory back either.
  KVMEM_ASSERT_OK(cache->Trim());
  ASSERT_EQ(TokenBytes(*cache, a_r2t), a_bytes);

  done.store(true);
  for (RequestId id = 2; id <= 4; ++id) KVMEM_ASSERT_OK(model.Free(id));
  KVMEM_ASSERT_OK(model.Add(5));
  KVMEM_ASSERT_OK(model.Extend(5, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

// A request forked from one that is then freed under a pending fence must not write
// into the pages they shared in place: the freed request's kernel may still be reading
// them (beam search or parallel sampling, then a speculative rewind of the survivor).
TEST_P(KvCacheTest, SiblingOfARequestFreedUnderAPendingFenceCopiesBeforeWriting) {
  const KvCacheConfig config = Config();
  const int64_t tpp = TokensPerPage(config);
  std::atomic<bool> done{false};  // outlives the cache
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, 2 * tpp));  // two full pages
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  std::vector<int32_t> parent_slots;
  KVMEM_ASSERT_OK(cache->ReqToToken(1, &parent_slots));
  const std::vector<std::string> parent_bytes = TokenBytes(*cache, parent_slots);
  KVMEM_ASSERT_OK(model.Free(1, HostFence(&done)));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  // Rewind the sibling into the first page and write the rest of that page anew.
  const int64_t keep = std::max<int64_t>(1, tpp / 2);
  KVMEM_ASSERT_OK(model.Truncate(2, keep));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  KVMEM_ASSERT_OK(model.Extend(2, tpp - keep + 1));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  KVMEM_EXPECT_OK(model.VerifyAll());
  EXPECT_EQ(TokenBytes(*cache, parent_slots), parent_bytes)
      << "a page still read under a pending fence was written in place";
  if (paged() && tpp > 1) {
    EXPECT_EQ(cache->GetStats().cow_copies, 1);
  }
  // Once the fence completes the page is the sibling's alone: no copy needed.
  done.store(true);
  KVMEM_ASSERT_OK(model.Truncate(2, keep));
  const int64_t copies = cache->GetStats().cow_copies;
  KVMEM_ASSERT_OK(model.Extend(2, 1));
  if (paged()) {
    EXPECT_EQ(cache->GetStats().cow_copies, copies);
  }
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

// With room for one request only, a fenced free leaves nothing to allocate until the
// fence completes, then all of it.
TEST_P(KvCacheTest, FencedFreeUnderTightBudget) {
  KvCacheConfig config = Config();
  config.memory_budget_bytes = MinimalBudget(config);
  ASSERT_GT(config.memory_budget_bytes, 0);
  std::atomic<bool> done{false};  // outlives the cache
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, config.max_context));
  KVMEM_ASSERT_OK(model.Free(1, HostFence(&done)));
  EXPECT_GT(cache->GetStats().pages_quarantined, 0);
  KVMEM_ASSERT_OK(model.Add(2));
  const std::vector<RequestId> ids = {1, 2};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(2, config.max_context),
                         StatusCode::kResourceExhausted);
  EXPECT_GT(cache->GetStats().pages_quarantined, 0);
  done.store(true);
  KVMEM_ASSERT_OK(model.Extend(2, config.max_context));
  EXPECT_EQ(cache->GetStats().pages_quarantined, 0);
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

// Stats describe memory as it is: pages whose fence has completed are free, whether or
// not a call has noticed yet. So an Extend that fails after taking them back from the
// quarantine (or without doing so) leaves every number as it was.
TEST_P(KvCacheTest, CompletedFencesCountAsFreeAndAFailedExtendMovesNothing) {
  KvCacheConfig config = Config();
  config.memory_budget_bytes = MinimalBudget(config);
  ASSERT_GT(config.memory_budget_bytes, 0);
  std::atomic<bool> done{false};  // outlives the cache
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t quarter = config.max_context / 4;
  KVMEM_ASSERT_OK(model.Add(3));
  KVMEM_ASSERT_OK(model.Extend(3, 2 * quarter));
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, quarter));
  const Stats held = cache->GetStats();
  KVMEM_ASSERT_OK(model.Free(1, HostFence(&done)));
  if (paged()) {
    EXPECT_GT(cache->GetStats().pages_quarantined, 0);
  }
  done.store(true);
  // Completed, and not yet seen by any call: no longer quarantined.
  const Stats now = cache->GetStats();
  EXPECT_EQ(now.pages_quarantined, 0);
  if (paged()) {
    EXPECT_EQ(now.pages_free, held.pages_free + (held.pages_used - now.pages_used));
  }
  KVMEM_ASSERT_OK(model.Add(2));
  // Request 3 holds half of the budget: a full-length request does not fit.
  const std::vector<RequestId> ids = {1, 2, 3};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(2, config.max_context),
                         StatusCode::kResourceExhausted);
  KVMEM_ASSERT_OK(model.Extend(2, quarter));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

// A shared page freed by one owner under a fence stays fenced even when another owner,
// freeing later without a fence, drops the last reference (the GPU may still be reading
// it for the first owner).
TEST_P(KvCacheTest, FenceOfASharedPageHoldsAfterTheLastOwnerFreesWithoutOne) {
  KvCacheConfig config = Config();
  config.memory_budget_bytes = MinimalBudget(config);
  ASSERT_GT(config.memory_budget_bytes, 0);
  std::atomic<bool> done{false};  // outlives the cache
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, config.max_context));
  KVMEM_ASSERT_OK(model.Fork(1, 2));
  KVMEM_ASSERT_OK(model.Free(1, HostFence(&done)));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  KVMEM_ASSERT_OK(model.Free(2, Fence{}));
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  // Every page of the budget was shared with request 1, whose fence is pending.
  KVMEM_ASSERT_OK(model.Add(3));
  const std::vector<RequestId> ids = {3};
  EXPECT_FAILS_UNCHANGED(cache, ids, cache->Extend(3, config.max_context),
                         StatusCode::kResourceExhausted);
  done.store(true);
  KVMEM_ASSERT_OK(model.Extend(3, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, NullFenceFreesAtOnce) {
  KvCacheConfig config = Config();
  config.memory_budget_bytes = MinimalBudget(config);
  ASSERT_GT(config.memory_budget_bytes, 0);
  std::atomic<bool> already{true};  // outlives the cache
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  KVMEM_ASSERT_OK(model.Add(1));
  KVMEM_ASSERT_OK(model.Extend(1, config.max_context));
  KVMEM_ASSERT_OK(model.Free(1, Fence{}));
  EXPECT_EQ(cache->GetStats().pages_quarantined, 0);
  KVMEM_ASSERT_OK(model.Add(2));
  KVMEM_ASSERT_OK(model.Extend(2, config.max_context));
  KVMEM_ASSERT_OK(model.Free(2, HostFence(&already)));
  KVMEM_ASSERT_OK(model.Add(3));
  KVMEM_ASSERT_OK(model.Extend(3, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, TrimGivesBackUnusedMemory) {
  const KvCacheConfig config = Config();
  auto cache = MustCreate(config);
  ASSERT_NE(cache, nullptr);
  CacheModel model(cache.get());
  const int64_t tpp = TokensPerPage(config);
  for (RequestId id = 1; id <= 4; ++id) {
    KVMEM_ASSERT_OK(model.Add(id));
    KVMEM_ASSERT_OK(model.Extend(id, 3 * tpp + 1));
  }
  // Trim with live requests keeps their data.
  KVMEM_ASSERT_OK(cache->Trim());
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  for (RequestId id = 1; id <= 4; ++id) KVMEM_ASSERT_OK(model.Free(id));
  const Stats before = cache->GetStats();
  EXPECT_GT(before.physical_bytes, 0);
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t given, cache->Trim());
  const Stats after = cache->GetStats();
  EXPECT_GT(given, 0);
  EXPECT_EQ(after.mapped_bytes, before.mapped_bytes - given);
  // Paged gives the handles back; virtual keeps its pool of handles (created up front).
  if (paged()) {
    EXPECT_EQ(after.physical_bytes, before.physical_bytes - given);
  }
  EXPECT_EQ(after.mapped_bytes, 0);
  EXPECT_EQ(after.idle_bytes, 0);
  EXPECT_EQ(after.held_bytes, 0);
  EXPECT_EQ(cache->config().vmm->counters().mapped_granules, 0);
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t again, cache->Trim());
  EXPECT_EQ(again, 0);
  // And it works afterwards.
  KVMEM_ASSERT_OK(model.Add(7));
  KVMEM_ASSERT_OK(model.Extend(7, config.max_context));
  KVMEM_EXPECT_OK(model.VerifyAll());
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(KvCacheTest, DestructionReleasesEverything) {
  KvCacheConfig config = Config();
  absl::StatusOr<std::unique_ptr<Vmm>> host = MakeHostVmm(config.host_granularity);
  KVMEM_ASSERT_OK(host);
  std::shared_ptr<Vmm> vmm = *std::move(host);
  config.vmm = vmm;
  std::atomic<bool> never{false};  // outlives the cache
  {
    auto cache = MustCreate(config);
    ASSERT_NE(cache, nullptr);
    CacheModel model(cache.get());
    const int64_t tpp = TokensPerPage(config);
    KVMEM_ASSERT_OK(model.Add(1));
    KVMEM_ASSERT_OK(model.Extend(1, 2 * tpp + 1));
    KVMEM_ASSERT_OK(model.Fork(1, 2));
    KVMEM_ASSERT_OK(model.Extend(2, 2));
    KVMEM_ASSERT_OK(model.Add(3));
    KVMEM_ASSERT_OK(model.Extend(3, tpp));
    KVMEM_ASSERT_OK(model.Free(3, HostFence(&never)));
    EXPECT_GT(vmm->counters().mapped_granules, 0);
    // The destructor must not wait for `never`.
    cache.reset();
  }
  const VmmCounters c = vmm->counters();
  EXPECT_EQ(c.live_reservations, 0);
  EXPECT_EQ(c.live_handles, 0);
  EXPECT_EQ(c.mapped_granules, 0);
}

// Virtual slots are row * max_context + pos: past 2^31 they do not fit the int32 token
// index. ReqToToken must say so rather than hand out a truncated slot; Extend's int64
// locations stay exact.
TEST(KvCacheIndexTest, VirtualSlotsPastInt32AreNotTruncated) {
  KvCacheConfig config;
  config.layout = Layout::kVirtual;
  config.num_layers = 1;
  config.num_kv_heads = 1;
  config.head_dim = 2;
  config.dtype = DType::kFloat16;  // 8 bytes per token
  config.max_context = int64_t{1} << 24;
  config.max_requests = 200;
  config.host_granularity = int64_t{2} << 20;
  config.memory_budget_bytes = (config.TokenBytes() << 24) + (int64_t{4} << 20);
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  KVMEM_ASSERT_OK(cache);
  RequestId far = 0;
  int32_t far_row = -1;
  for (RequestId id = 1; id <= static_cast<RequestId>(config.max_requests); ++id) {
    KVMEM_ASSERT_OK_AND_ASSIGN(int32_t row, (*cache)->AddRequest(id));
    if (row > far_row) {
      far_row = row;
      far = id;
    }
  }
  ASSERT_GT(int64_t{far_row} * config.max_context, std::numeric_limits<int32_t>::max());
  KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int64_t> slots, (*cache)->Extend(far, 2));
  EXPECT_EQ(slots[0], int64_t{far_row} * config.max_context);
  std::vector<int32_t> r2t;
  const absl::Status s = (*cache)->ReqToToken(far, &r2t);
  if (s.ok()) {
    ASSERT_EQ(r2t.size(), 2u);
    EXPECT_EQ(r2t[0], slots[0]) << "slot truncated to int32";
  } else {
    EXPECT_EQ(s.code(), StatusCode::kOutOfRange) << s;
    EXPECT_TRUE(r2t.empty()) << "a failed ReqToToken wrote its output";
  }
  // The views address the token exactly through the int64 slot.
  BatchMetadata meta;
  const RequestId batch[] = {far};
  KVMEM_ASSERT_OK((*cache)->BuildBatchMetadata(batch, &meta));
  KVMEM_ASSERT_OK_AND_ASSIGN(VirtualKv view, (*cache)->VirtualView(0, meta));
  EXPECT_EQ(view.Offset(0, 1), view.SlotOffset(slots[1]));
  KVMEM_EXPECT_OK((*cache)->CheckInvariants());
}

INSTANTIATE_TEST_SUITE_P(Layouts, KvCacheTest, ::testing::ValuesIn(AllLayouts()), LayoutCaseName);

}  // namespace
}  // namespace kvmem::test
