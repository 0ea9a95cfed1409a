// The prefix cache's contract (kvmem/kv_cache.h, docs/prefix_cache.md), call by call:
// matching, starting on a cached prefix, publishing, Free keeping pages cached, eviction
// (memory needed, LRU, priority, the byte cap, reset), statistics, events and block
// hashes; every bad input fails with its code and changes nothing; CheckInvariants after
// every step. Also the index on its own with a key hash that always collides.
#include "kvmem/prefix_cache.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "src/cache/prefix_index.h"
#include "src/core/page_pool.h"
#include "tests/cache_test_util.h"
#include "tests/prefix_test_util.h"

namespace kvmem::test {
namespace {

using absl::StatusCode;

std::unique_ptr<KvCache> MakeCache(const KvCacheConfig& config) {
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? *std::move(cache) : nullptr;
}

std::string Hex(const BlockHash& h) {
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(h.data()), h.size()));
}

// ---- configuration ---------------------------------------------------------------------

TEST(PrefixCacheConfig, EveryCallIsFailedPreconditionWhenOff) {
  KvCacheConfig config = PrefixConfig();
  config.enable_prefix_cache = false;
  auto cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> t = Prompt(8, 1);
  KVMEM_EXPECT_CODE(cache->MatchPrefix(t), StatusCode::kFailedPrecondition);
  KVMEM_EXPECT_CODE(cache->AddRequestWithPrefix(1, t), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(cache->Contains(1));
  KVMEM_ASSERT_OK(cache->AddRequest(1));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 1, t));
  KVMEM_EXPECT_CODE(cache->PublishTokens(1, t), StatusCode::kFailedPrecondition);
  KVMEM_EXPECT_CODE(cache->ResetPrefixCache(), StatusCode::kFailedPrecondition);
  std::vector<PrefixEvent> events;
  KVMEM_EXPECT_CODE(cache->TakePrefixEvents(&events), StatusCode::kFailedPrecondition);
  KVMEM_ASSERT_OK(cache->Free(1));
  EXPECT_EQ(cache->GetStats().prefix_cached_bytes, 0);
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST(PrefixCacheConfig, VirtualLayoutIsUnimplemented) {
  for (const LayoutCase& c : AllLayouts()) {
    if (c.layout != Layout::kVirtual) continue;
    KvCacheConfig config = SmallConfig(c);
    config.enable_prefix_cache = true;
    KVMEM_EXPECT_CODE(KvCache::Create(config), StatusCode::kUnimplemented);
  }
}

TEST(PrefixCacheConfig, NegativeCapIsInvalid) {
  KvCacheConfig config = PrefixConfig();
  config.prefix_cache_max_bytes = -1;
  KVMEM_EXPECT_CODE(KvCache::Create(config), StatusCode::kInvalidArgument);
  KVMEM_EXPECT_CODE(ValidateShape(config), StatusCode::kInvalidArgument);
}

// ---- block hashes ----------------------------------------------------------------------

TEST(PrefixBlockHash, MatchesSha256OfTheDocumentedEncoding) {
  // Computed independently (Python hashlib) over the encoding prefix_cache.h describes.
  const int32_t first[] = {1, 2, 3};
  const BlockHash h = PrefixBlockHash(nullptr, "", first);
  EXPECT_EQ(Hex(h), "0358286521161ea7a8991319fc5173c2ce2b8cb713a6d80798b610bc895893bd");
  const int32_t second[] = {-1, 4, 5};
  EXPECT_EQ(Hex(PrefixBlockHash(&h, "ab", second)),
            "f889404553349f23e3fbfa6d158508ddd28555aedb95dd4d7a75659c6e2c9243");
  const int32_t all[] = {1, 2, 3, -1, 4, 5, 9};
  const std::vector<BlockHash> chain = PrefixBlockHashes(all, 3, "");
  ASSERT_EQ(chain.size(), 2u);
  EXPECT_EQ(chain[0], h);
  EXPECT_EQ(chain[1], PrefixBlockHash(&h, "", second));
  EXPECT_NE(PrefixBlockHashes(all, 3, "x")[0], h);
  EXPECT_TRUE(PrefixBlockHashes(all, 0).empty());
}

// ---- matching, starting on a prefix, publishing ---------------------------------------

TEST(PrefixCache, PublishedPagesAreMatchedAndShared) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> a = Prompt(10, 1);  // 2 full pages + 2 tokens
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t hit, Serve(*cache, 1, a));
  EXPECT_EQ(hit, 0);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  EXPECT_EQ(*cache->MatchPrefix(a), 8);
  EXPECT_EQ(*cache->MatchPrefix(absl::MakeConstSpan(a).subspan(0, 7)), 4);
  EXPECT_EQ(*cache->MatchPrefix(a, "tenant"), 0);  // salts isolate
  std::vector<int32_t> b = a;
  b[5] += 1;  // differs in the second page
  EXPECT_EQ(*cache->MatchPrefix(b), 4);
  EXPECT_EQ(*cache->MatchPrefix({}), 0);

  Stats s = cache->GetStats();
  EXPECT_EQ(s.prefix_stored_blocks, 2);
  EXPECT_EQ(s.prefix_cached_bytes, 2 * s.page_bytes);
  EXPECT_EQ(s.prefix_evictable_bytes, 0);  // request 1 holds them
  // A second request on the same prompt while the first runs: shares its pages.
  KVMEM_ASSERT_OK_AND_ASSIGN(hit, Serve(*cache, 2, b));
  EXPECT_EQ(hit, 4);
  KVMEM_ASSERT_OK(CheckTokens(*cache, 1, a));
  KVMEM_ASSERT_OK(CheckTokens(*cache, 2, b));
  KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> bt1, cache->BlockTable(1));
  KVMEM_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> bt2, cache->BlockTable(2));
  EXPECT_EQ(bt1[0], bt2[0]);
  EXPECT_NE(bt1[1], bt2[1]);
  KVMEM_ASSERT_OK(cache->CheckInvariants());

  // Free keeps the published pages cached; a later request starts on them.
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(cache->Free(2));
  s = cache->GetStats();
  EXPECT_EQ(s.num_requests, 0);
  EXPECT_EQ(s.pages_used, 0);  // no request holds a page
  EXPECT_EQ(s.held_bytes, 0);
  EXPECT_EQ(s.stored_tokens, 0);
  EXPECT_EQ(s.prefix_stored_blocks, 3);  // a's two pages, b's second
  EXPECT_EQ(s.prefix_cached_bytes, 3 * s.page_bytes);
  EXPECT_EQ(s.prefix_evictable_bytes, 3 * s.page_bytes);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  const std::vector<int32_t> c = Concat(a, Prompt(5, 9));
  KVMEM_ASSERT_OK_AND_ASSIGN(hit, cache->AddRequestWithPrefix(3, c));
  EXPECT_EQ(hit, 8);
  EXPECT_EQ(*cache->Length(3), 8);
  KVMEM_ASSERT_OK(CheckTokens(*cache, 3, absl::MakeConstSpan(c).subspan(0, 8)));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 3, c));
  KVMEM_ASSERT_OK(CheckTokens(*cache, 3, c));
  s = cache->GetStats();
  EXPECT_EQ(s.prefix_lookups, 3);
  EXPECT_EQ(s.prefix_lookup_tokens, 10 + 10 + 15);
  EXPECT_EQ(s.prefix_hit_tokens, 0 + 4 + 8);
  EXPECT_DOUBLE_EQ(s.prefix_hit_rate(), 12.0 / 35.0);
  EXPECT_EQ(s.prefix_evictable_bytes, 1 * s.page_bytes);  // b's page
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCache, MatchPrefixChangesNothing) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> a = Prompt(12, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, a));
  KVMEM_ASSERT_OK(cache->Free(1));
  const std::vector<std::vector<int32_t>> prompts = {a};
  const PrefixSnapshot before = TakePrefixSnapshot(*cache, {1}, prompts);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(*cache->MatchPrefix(a), 12);
  EXPECT_EQ(PrefixSnapshotDiff(before, TakePrefixSnapshot(*cache, {1}, prompts)), "");
}

TEST(PrefixCache, PublishAsPagesFillAndRepublishIsIdempotent) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> a = Prompt(13, 2);
  KVMEM_ASSERT_OK(cache->AddRequest(1));
  for (size_t n = 1; n <= a.size(); ++n) {
    const auto prefix = absl::MakeConstSpan(a).subspan(0, n);
    KVMEM_ASSERT_OK(ExtendTo(*cache, 1, prefix));
    KVMEM_ASSERT_OK(cache->PublishTokens(1, prefix));
    EXPECT_EQ(*cache->MatchPrefix(a), static_cast<int64_t>(n / 4 * 4)) << n;
    KVMEM_ASSERT_OK(cache->CheckInvariants());
  }
  // Publishing the same again, or fewer tokens, changes nothing.
  const std::vector<std::vector<int32_t>> prompts = {a};
  const PrefixSnapshot before = TakePrefixSnapshot(*cache, {1}, prompts);
  KVMEM_ASSERT_OK(cache->PublishTokens(1, a));
  KVMEM_ASSERT_OK(cache->PublishTokens(1, absl::MakeConstSpan(a).subspan(0, 5)));
  KVMEM_ASSERT_OK(cache->PublishTokens(1, {}));
  EXPECT_EQ(PrefixSnapshotDiff(before, TakePrefixSnapshot(*cache, {1}, prompts)), "");
  EXPECT_EQ(cache->GetStats().prefix_stored_blocks, 3);
}

TEST(PrefixCache, DuplicateComputationIsNotCachedTwice) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> a = Prompt(12, 3);
  // Both start before either published: both compute the whole prompt.
  KVMEM_ASSERT_OK(cache->AddRequestWithPrefix(1, a));
  KVMEM_ASSERT_OK(cache->AddRequestWithPrefix(2, a));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 1, a));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 2, a));
  KVMEM_ASSERT_OK(cache->PublishTokens(1, absl::MakeConstSpan(a).subspan(0, 8)));
  KVMEM_ASSERT_OK(cache->PublishTokens(2, a));  // two duplicates, then a new block
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  EXPECT_EQ(cache->GetStats().prefix_stored_blocks, 3);
  EXPECT_EQ(*cache->MatchPrefix(a), 12);
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  // The matched pages: 1's first two (now cached only) and 2's third.
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t hit, cache->AddRequestWithPrefix(3, a));
  EXPECT_EQ(hit, 12);
  KVMEM_ASSERT_OK(CheckTokens(*cache, 3, a));
  KVMEM_ASSERT_OK(cache->Free(2));
  KVMEM_ASSERT_OK(cache->Free(3));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t evicted, cache->ResetPrefixCache());
  EXPECT_EQ(evicted, 3);
  const Stats s = cache->GetStats();
  EXPECT_EQ(s.prefix_cached_bytes, 0);
  EXPECT_EQ(s.pages_used, 0);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

// ---- bad input: a code, and nothing changed ------------------------------------------

class PrefixCacheBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = MakeCache(PrefixConfig(4));
    ASSERT_NE(cache_, nullptr);
    a_ = Prompt(10, 4);
    KVMEM_ASSERT_OK(Serve(*cache_, 1, a_, {.salt = "t1", .priority = 0}));
    KVMEM_ASSERT_OK(cache_->AddRequest(2));
    KVMEM_ASSERT_OK(ExtendTo(*cache_, 2, a_));
    prompts_ = {a_};
  }
  // `call` fails with `code` and changes nothing observable.
  template <typename F>
  void ExpectRejected(F call, StatusCode code) {
    const std::vector<std::string> salts = {"", "t1"};
    const PrefixSnapshot before = TakePrefixSnapshot(*cache_, ids_, prompts_, salts);
    std::vector<PrefixEvent> events;
    KVMEM_ASSERT_OK(cache_->TakePrefixEvents(&events));
    KVMEM_EXPECT_CODE(call(), code);
    EXPECT_EQ(PrefixSnapshotDiff(before, TakePrefixSnapshot(*cache_, ids_, prompts_, salts)), "");
    events.clear();
    KVMEM_ASSERT_OK(cache_->TakePrefixEvents(&events));
    EXPECT_TRUE(events.empty());
    KVMEM_EXPECT_OK(cache_->CheckInvariants());
  }
  std::unique_ptr<KvCache> cache_;
  std::vector<int32_t> a_;
  std::vector<std::vector<int32_t>> prompts_;
  std::vector<RequestId> ids_ = {1, 2, 3};
};

TEST_F(PrefixCacheBadInput, PublishMoreTokensThanTheRequestHas) {
  const std::vector<int32_t> more = Concat(a_, {7});
  ExpectRejected([&] { return cache_->PublishTokens(1, more, "t1"); },
                 StatusCode::kInvalidArgument);
  ExpectRejected([&] { return cache_->PublishTokens(2, more); }, StatusCode::kInvalidArgument);
}

TEST_F(PrefixCacheBadInput, PublishContradictingAnEarlierPublish) {
  std::vector<int32_t> other = a_;
  other[9] += 1;  // in the partly filled page: published, not cached
  ExpectRejected([&] { return cache_->PublishTokens(1, other, "t1"); },
                 StatusCode::kInvalidArgument);
  other = a_;
  other[0] += 1;
  ExpectRejected([&] { return cache_->PublishTokens(1, other, "t1"); },
                 StatusCode::kInvalidArgument);
  ExpectRejected(
      [&] { return cache_->PublishTokens(1, absl::MakeConstSpan(other).subspan(0, 2), "t1"); },
      StatusCode::kInvalidArgument);
}

TEST_F(PrefixCacheBadInput, PublishWithAnotherSalt) {
  ExpectRejected([&] { return cache_->PublishTokens(1, a_); }, StatusCode::kInvalidArgument);
  ExpectRejected([&] { return cache_->PublishTokens(1, a_, "t2"); }, StatusCode::kInvalidArgument);
  // Request 2 binds its salt with its first publish; then another salt is refused.
  KVMEM_ASSERT_OK(cache_->PublishTokens(2, absl::MakeConstSpan(a_).subspan(0, 1)));
  ExpectRejected([&] { return cache_->PublishTokens(2, a_, "t1"); }, StatusCode::kInvalidArgument);
}

TEST_F(PrefixCacheBadInput, PublishForAnUnknownRequest) {
  ExpectRejected([&] { return cache_->PublishTokens(3, a_); }, StatusCode::kNotFound);
}

TEST_F(PrefixCacheBadInput, PublishAPageThatCachesOtherTokens) {
  // Request 3, a fork of 2 (which has published nothing), claims other tokens for the
  // pages they share; then 2 cannot cache its own tokens in those pages.
  KVMEM_ASSERT_OK(cache_->Fork(2, 3));
  std::vector<int32_t> other = a_;
  other[1] += 1;
  KVMEM_ASSERT_OK(cache_->PublishTokens(3, other));
  KVMEM_ASSERT_OK(cache_->CheckInvariants());
  ExpectRejected([&] { return cache_->PublishTokens(2, a_); }, StatusCode::kInvalidArgument);
}

TEST_F(PrefixCacheBadInput, AddRequestWithPrefixErrors) {
  ExpectRejected([&] { return cache_->AddRequestWithPrefix(1, a_); }, StatusCode::kAlreadyExists);
  const std::vector<int32_t> huge = Prompt(257, 5);
  ExpectRejected([&] { return cache_->AddRequestWithPrefix(3, huge); }, StatusCode::kOutOfRange);
  for (RequestId id = 10; id < 16; ++id) KVMEM_ASSERT_OK(cache_->AddRequest(id));
  ExpectRejected([&] { return cache_->AddRequestWithPrefix(3, a_, {.salt = "t1", .priority = 0}); },
                 StatusCode::kResourceExhausted);
}

TEST_F(PrefixCacheBadInput, NullEventsOutput) {
  ExpectRejected([&] { return cache_->TakePrefixEvents(nullptr); }, StatusCode::kInvalidArgument);
}

// ---- eviction --------------------------------------------------------------------------

// 64 pages of 4 tokens in all (the smallest budget of SmallConfig at page 4).
KvCacheConfig TightConfig() {
  KvCacheConfig config = PrefixConfig(4);
  config.memory_budget_bytes = MinimalBudget(config);
  return config;
}

TEST(PrefixCacheEviction, AllocationEvictsLeastRecentlyUsedFirst) {
  auto cache = MakeCache(TightConfig());
  ASSERT_NE(cache, nullptr);
  ASSERT_EQ(cache->GetStats().pages_total, 64);
  // Four prompts of 8 pages each, served and ended: 32 pages cached.
  std::vector<std::vector<int32_t>> p;
  for (uint32_t i = 0; i < 4; ++i) {
    p.push_back(Prompt(32, 100 + i));
    KVMEM_ASSERT_OK(Serve(*cache, i, p[i]));
    KVMEM_ASSERT_OK(cache->Free(i));
  }
  // Use prompt 0 again: it becomes the most recently used.
  KVMEM_ASSERT_OK(cache->AddRequestWithPrefix(10, p[0]));
  KVMEM_ASSERT_OK(cache->Free(10));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  // 40 pages needed: 32 free + 8 evicted, from prompt 1 (the least recently used).
  KVMEM_ASSERT_OK(cache->AddRequest(20));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 20, Prompt(160, 7)));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  EXPECT_EQ(cache->GetStats().prefix_evictions, 8);
  EXPECT_EQ(*cache->MatchPrefix(p[0]), 32);
  EXPECT_EQ(*cache->MatchPrefix(p[1]), 0);
  EXPECT_EQ(*cache->MatchPrefix(p[2]), 32);
  EXPECT_EQ(*cache->MatchPrefix(p[3]), 32);
  KVMEM_ASSERT_OK(CheckTokens(*cache, 20, Prompt(160, 7)));
}

TEST(PrefixCacheEviction, EvictsLeavesFirstSoPrefixesStayMatchable) {
  auto cache = MakeCache(TightConfig());
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(32, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(cache->AddRequest(2));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 2, Prompt(4 * 59, 2)));  // 59 pages: evict 3 of the 8
  EXPECT_EQ(cache->GetStats().prefix_evictions, 3);
  EXPECT_EQ(*cache->MatchPrefix(p), 20);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCacheEviction, HigherPriorityIsKeptLonger) {
  auto cache = MakeCache(TightConfig());
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> keep = Prompt(32, 1), drop = Prompt(32, 2);
  KVMEM_ASSERT_OK(Serve(*cache, 1, keep, {.salt = "", .priority = 5}));
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(Serve(*cache, 2, drop));  // more recent, lower priority
  KVMEM_ASSERT_OK(cache->Free(2));
  KVMEM_ASSERT_OK(cache->AddRequest(3));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 3, Prompt(4 * 52, 3)));  // evicts 4
  EXPECT_EQ(*cache->MatchPrefix(keep), 32);
  EXPECT_EQ(*cache->MatchPrefix(drop), 16);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCacheEviction, PagesARequestHoldsAreNeverEvicted) {
  auto cache = MakeCache(TightConfig());
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(32, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  KVMEM_ASSERT_OK(cache->AddRequestWithPrefix(2, p));  // holds them too
  KVMEM_ASSERT_OK(cache->Free(1));
  // 56 pages are free; 57 would need request 2's: ResourceExhausted, nothing evicted.
  KVMEM_ASSERT_OK(cache->AddRequest(3));
  const std::vector<std::vector<int32_t>> prompts = {p};
  const PrefixSnapshot before = TakePrefixSnapshot(*cache, {1, 2, 3}, prompts);
  KVMEM_EXPECT_CODE(cache->Extend(3, 4 * 57), StatusCode::kResourceExhausted);
  EXPECT_EQ(PrefixSnapshotDiff(before, TakePrefixSnapshot(*cache, {1, 2, 3}, prompts)), "");
  KVMEM_ASSERT_OK(ExtendTo(*cache, 3, Prompt(4 * 56, 3)));
  KVMEM_ASSERT_OK(CheckTokens(*cache, 2, p));
  EXPECT_EQ(cache->GetStats().prefix_evictions, 0);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCacheEviction, ResourceExhaustedEvictsNothingWhenEvictionCannotHelp) {
  auto cache = MakeCache(TightConfig());
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(32, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(cache->AddRequest(2));
  KVMEM_ASSERT_OK(ExtendTo(*cache, 2, Prompt(4 * 50, 2)));
  // 6 free + 8 evictable < 15.
  const std::vector<std::vector<int32_t>> prompts = {p};
  const PrefixSnapshot before = TakePrefixSnapshot(*cache, {1, 2, 3}, prompts);
  KVMEM_ASSERT_OK(cache->AddRequest(3));
  KVMEM_EXPECT_CODE(cache->Extend(3, 4 * 15), StatusCode::kResourceExhausted);
  KVMEM_ASSERT_OK(cache->Free(3));
  EXPECT_EQ(PrefixSnapshotDiff(before, TakePrefixSnapshot(*cache, {1, 2, 3}, prompts)),
            "peak_requests: 1 -> 2; ");
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCacheEviction, ByteCapBoundsWhatNoRequestHolds) {
  KvCacheConfig config = PrefixConfig(4);
  config.prefix_cache_max_bytes = 3 * 4 * config.TokenBytes();  // 3 pages
  auto cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(32, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  EXPECT_EQ(cache->GetStats().prefix_cached_bytes, 8 * cache->GetStats().page_bytes);
  KVMEM_ASSERT_OK(cache->Free(1));
  const Stats s = cache->GetStats();
  EXPECT_EQ(s.prefix_evictable_bytes, 3 * s.page_bytes);
  EXPECT_EQ(s.prefix_evictions, 5);
  EXPECT_EQ(*cache->MatchPrefix(p), 12);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  // A cap of 0 keeps nothing past the request's end, but sharing while it runs works.
  config.prefix_cache_max_bytes = 0;
  cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t hit, Serve(*cache, 2, p));
  EXPECT_EQ(hit, 32);
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(cache->Free(2));
  EXPECT_EQ(cache->GetStats().prefix_cached_bytes, 0);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCacheEviction, ResetKeepsOnlyWhatRequestsHold) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(16, 1), q = Prompt(16, 2);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  KVMEM_ASSERT_OK(Serve(*cache, 2, q));
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t evicted, cache->ResetPrefixCache());
  EXPECT_EQ(evicted, 4);
  EXPECT_EQ(*cache->MatchPrefix(p), 0);
  EXPECT_EQ(*cache->MatchPrefix(q), 16);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  KVMEM_ASSERT_OK(cache->Free(2));
  KVMEM_ASSERT_OK_AND_ASSIGN(evicted, cache->ResetPrefixCache());
  EXPECT_EQ(evicted, 4);
  const Stats s = cache->GetStats();
  EXPECT_EQ(s.pages_used, 0);
  EXPECT_EQ(s.prefix_cached_bytes, 0);
  EXPECT_EQ(s.pages_free, s.pages_total);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCacheEviction, EvictedPageWaitsForTheFenceOfItsLastReader) {
  auto cache = MakeCache(TightConfig());
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(32, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  std::atomic<bool> done{false};
  KVMEM_ASSERT_OK(cache->Free(1, HostFence(&done)));
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t evicted, cache->ResetPrefixCache());
  EXPECT_EQ(evicted, 8);
  Stats s = cache->GetStats();
  EXPECT_EQ(s.pages_quarantined, 8);  // the kernel of request 1 may still read them
  KVMEM_ASSERT_OK(cache->AddRequest(2));
  KVMEM_EXPECT_CODE(cache->Extend(2, 4 * 57), StatusCode::kResourceExhausted);
  done = true;
  KVMEM_ASSERT_OK(cache->Extend(2, 4 * 57));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

// ---- rewinds and forks of requests on cached pages -----------------------------------

TEST(PrefixCache, WritingIntoACachedPageAfterARewindCopiesIt) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(12, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p));
  // Rewind into the second page, then write other tokens: the cached page is copied.
  KVMEM_ASSERT_OK(cache->Truncate(1, 6));
  std::vector<int32_t> q(p.begin(), p.begin() + 6);
  q = Concat(q, {900, 901, 902, 903});
  KVMEM_ASSERT_OK(ExtendTo(*cache, 1, q));
  EXPECT_EQ(cache->GetStats().cow_copies, 1);
  KVMEM_ASSERT_OK(CheckTokens(*cache, 1, q));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  // The cache still serves the original tokens, from untouched pages.
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t hit, cache->AddRequestWithPrefix(2, p));
  EXPECT_EQ(hit, 12);
  KVMEM_ASSERT_OK(CheckTokens(*cache, 2, p));
  // Request 1 publishes its new tokens: a sibling of the original second page.
  KVMEM_ASSERT_OK(cache->PublishTokens(1, q));
  EXPECT_EQ(*cache->MatchPrefix(q), 8);
  KVMEM_ASSERT_OK(cache->CheckInvariants());
}

TEST(PrefixCache, AForkPublishesWhatItsParentPublished) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(10, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p, {.salt = "s", .priority = 0}));
  KVMEM_ASSERT_OK(cache->Fork(1, 2));
  std::vector<int32_t> other = p;
  other[0] += 1;
  KVMEM_EXPECT_CODE(cache->PublishTokens(2, other, "s"), StatusCode::kInvalidArgument);
  KVMEM_EXPECT_CODE(cache->PublishTokens(2, p), StatusCode::kInvalidArgument);  // salt
  const std::vector<int32_t> longer = Concat(p, {5, 6});
  KVMEM_ASSERT_OK(ExtendTo(*cache, 2, longer));
  KVMEM_ASSERT_OK(cache->PublishTokens(2, longer, "s"));
  EXPECT_EQ(*cache->MatchPrefix(longer, "s"), 12);
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(cache->Free(2));
  KVMEM_ASSERT_OK(cache->CheckInvariants());
  KVMEM_ASSERT_OK_AND_ASSIGN(int64_t evicted, cache->ResetPrefixCache());
  EXPECT_EQ(evicted, 3);
}

// ---- events ----------------------------------------------------------------------------

TEST(PrefixCacheEvents, StoredAndRemovedInOrderWithTheBlockHashes) {
  auto cache = MakeCache(PrefixConfig(4));
  ASSERT_NE(cache, nullptr);
  const std::vector<int32_t> p = Prompt(9, 1);
  KVMEM_ASSERT_OK(Serve(*cache, 1, p, {.salt = "x", .priority = 0}));
  KVMEM_ASSERT_OK(cache->Free(1));
  KVMEM_ASSERT_OK(cache->ResetPrefixCache());
  std::vector<PrefixEvent> ev;
  KVMEM_ASSERT_OK(cache->TakePrefixEvents(&ev));
  ASSERT_EQ(ev.size(), 4u);
  const std::vector<BlockHash> h = PrefixBlockHashes(p, 4, "x");
  for (size_t i = 0; i < ev.size(); ++i) {
    EXPECT_EQ(ev[i].sequence, i + 1);
    EXPECT_EQ(ev[i].num_tokens, 4);
  }
  EXPECT_EQ(ev[0].kind, PrefixEvent::Kind::kStored);
  EXPECT_EQ(ev[0].block_hash, h[0]);
  EXPECT_FALSE(ev[0].has_parent);
  EXPECT_EQ(ev[1].kind, PrefixEvent::Kind::kStored);
  EXPECT_EQ(ev[1].block_hash, h[1]);
  EXPECT_TRUE(ev[1].has_parent);
  EXPECT_EQ(ev[1].parent_hash, h[0]);
  // Leaves go first.
  EXPECT_EQ(ev[2].kind, PrefixEvent::Kind::kRemoved);
  EXPECT_EQ(ev[2].block_hash, h[1]);
  EXPECT_EQ(ev[3].kind, PrefixEvent::Kind::kRemoved);
  EXPECT_EQ(ev[3].block_hash, h[0]);
  ev.clear();
  KVMEM_ASSERT_OK(cache->TakePrefixEvents(&ev));
  EXPECT_TRUE(ev.empty());
  KVMEM_ASSERT_OK(Serve(*cache, 2, p, {.salt = "x", .priority = 0}));
  KVMEM_ASSERT_OK(cache->TakePrefixEvents(&ev));
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].sequence, 5u);
}

// ---- the page pool's pins --------------------------------------------------------------

TEST(PagePoolPins, ThePinIsAReferenceThatNoRequestOwns) {
  internal::PagePool pool(8);
  const auto check = [&] { KVMEM_EXPECT_OK(pool.CheckConsistency()); };
  const int32_t p = pool.Allocate();
  pool.Pin(p);
  EXPECT_EQ(pool.refcount(p), 2);
  EXPECT_EQ(pool.owners(p), 1);
  EXPECT_EQ(pool.pinned_count(), 1);
  EXPECT_EQ(pool.cached_only_count(), 0);
  EXPECT_EQ(pool.shared_count(), 0);  // one request and the cache: not shared by requests
  check();
  pool.AddRef(p);
  EXPECT_EQ(pool.shared_count(), 1);
  EXPECT_FALSE(pool.Unref(p));
  EXPECT_EQ(pool.shared_count(), 0);
  EXPECT_FALSE(pool.Unref(p));  // the last request leaves: the cache keeps it
  EXPECT_EQ(pool.cached_only_count(), 1);
  EXPECT_EQ(pool.used_count(), 1);
  check();
  pool.AddRef(p);  // a request starts on the cached page
  EXPECT_EQ(pool.cached_only_count(), 0);
  std::atomic<bool> done{false};
  EXPECT_FALSE(pool.Unref(p, HostFence(&done)));  // its kernel may still read the page
  check();
  EXPECT_TRUE(pool.Unpin(p));  // evicted: waits for that fence
  EXPECT_EQ(pool.quarantined_count(), 1);
  EXPECT_FALSE(pool.is_free(p));
  EXPECT_EQ(pool.pinned_count(), 0);
  EXPECT_EQ(pool.cached_only_count(), 0);
  check();
  const auto complete = [](const Fence& f) {
    return static_cast<std::atomic<bool>*>(f.event)->load();
  };
  EXPECT_EQ(pool.Reclaim(complete, true), 0);
  done = true;
  EXPECT_EQ(pool.Reclaim(complete, true), 1);
  EXPECT_TRUE(pool.is_free(p));
  check();
  // Unpinned while a request still holds it: nothing is freed.
  const int32_t q = pool.Allocate();
  pool.Pin(q);
  EXPECT_FALSE(pool.Unpin(q));
  EXPECT_EQ(pool.refcount(q), 1);
  EXPECT_FALSE(pool.pinned(q));
  check();
}

// ---- the index alone: keys that collide -----------------------------------------------

uint64_t Colliding(uint64_t, absl::Span<const int32_t>) { return 42; }

TEST(PrefixIndex, CollidingKeysAreToldApartByTheirTokens) {
  internal::PrefixIndex index(2, &Colliding);
  using Holder = internal::PrefixIndex::Holder;
  Holder a, b, c;
  std::vector<int32_t> pin;
  internal::PrefixIndex::PublishPlan plan;
  const std::vector<int32_t> ta = {1, 2, 3, 4}, tb = {1, 2, 5, 6}, tc = {7, 8};
  const std::vector<int32_t> pages_a = {10, 11}, pages_b = {12, 13}, pages_c = {14};
  KVMEM_ASSERT_OK(index.PlanPublish(a, "", ta, 4, pages_a, &plan));
  index.CommitPublish(&a, "", ta, pages_a, plan, &pin);
  KVMEM_ASSERT_OK(index.PlanPublish(b, "", tb, 4, pages_b, &plan));
  index.CommitPublish(&b, "", tb, pages_b, plan, &pin);
  KVMEM_ASSERT_OK(index.PlanPublish(c, "", tc, 2, pages_c, &plan));
  index.CommitPublish(&c, "", tc, pages_c, plan, &pin);
  EXPECT_EQ(pin, (std::vector<int32_t>{10, 11, 13, 14}));  // b's first block is a's
  std::vector<internal::PrefixIndex::NodeId> m;
  index.Match(ta, "", &m);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(index.page(m[0]), 10);
  EXPECT_EQ(index.page(m[1]), 11);
  index.Match(tb, "", &m);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(index.page(m[1]), 13);
  index.Match(tc, "", &m);
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(index.page(m[0]), 14);
  index.Match(std::vector<int32_t>{7, 9}, "", &m);
  EXPECT_TRUE(m.empty());
  index.Match(ta, "salt", &m);
  EXPECT_TRUE(m.empty());
  const Holder* holders[] = {&a, &b, &c};
  auto pinned = [](int32_t p) { return p >= 10 && p <= 14 && p != 12; };
  KVMEM_EXPECT_OK(index.CheckConsistency(holders, pinned, 4));
  // Evicting one node of a collision chain keeps the others findable.
  index.Detach(&a);
  index.Detach(&b);
  index.Detach(&c);
  const int32_t first = index.EvictOne([](int32_t) { return true; });
  EXPECT_EQ(first, 11);  // a's leaf, the least recently used
  index.Match(tb, "", &m);
  EXPECT_EQ(m.size(), 2u);
  index.Match(tc, "", &m);
  EXPECT_EQ(m.size(), 1u);
  auto pinned2 = [](int32_t p) { return p == 10 || p == 13 || p == 14; };
  KVMEM_EXPECT_OK(index.CheckConsistency({}, pinned2, 3));
  std::vector<int32_t> rest;
  for (int32_t p; (p = index.EvictOne([](int32_t) { return true; })) >= 0;) rest.push_back(p);
  std::sort(rest.begin(), rest.end());
  EXPECT_EQ(rest, (std::vector<int32_t>{10, 13, 14}));
  KVMEM_EXPECT_OK(index.CheckConsistency(
      {}, [](int32_t) { return false; }, 0));
}

}  // namespace
}  // namespace kvmem::test
