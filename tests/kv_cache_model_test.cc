// Randomized model test of KvCache on every layout: seeded sequences of AddRequest,
// Extend, Truncate, Fork, Free (with and without fences) and Trim, checked against a
// plain model (id -> one tag per token) after every operation: CheckInvariants, the
// lengths, the stats that follow from the model, and the K/V bytes of every live token
// (written with ReferenceAppendKv, read back through the views). That last check is what
// catches copy-on-write and aliasing bugs. Failed calls must leave cache and model equal.
//
// KVMEM_TEST_SEED overrides the seed; KVMEM_TEST_SCALE scales the number of operations.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {
namespace {

using absl::StatusCode;

constexpr int kOpsPerRun = 2000;  // per budget and layout, before KVMEM_TEST_SCALE
constexpr int kMaxPendingFences = 2;

uint64_t BaseSeed() {
  const char* s = std::getenv("KVMEM_TEST_SEED");
  return s != nullptr ? std::strtoull(s, nullptr, 10) : 20240601;
}

KvCacheConfig ModelConfig(const LayoutCase& c) {
  KvCacheConfig config = SmallConfig(c);
  config.max_requests = 6;
  config.max_context = 160;
  return config;
}

class Runner {
 public:
  // `fences` holds the host fences given to Free; it must outlive the cache.
  Runner(KvCache* cache, uint64_t seed, bool may_run_out, std::deque<std::atomic<bool>>* fences)
      : cache_(cache),
        fences_(fences),
        config_(cache->config()),
        model_(cache),
        rng_(seed),
        may_run_out_(may_run_out),
        tpp_(TokensPerPage(config_)) {}

  // Runs `ops` random operations; stops at the first failure (a gtest failure is set).
  void Run(int ops) {
    for (int i = 0; i < ops && !::testing::Test::HasFatalFailure(); ++i) {
      Step();
      if (::testing::Test::HasFailure()) {
        ADD_FAILURE() << "after op " << i << "; last ops:\n" << absl::StrJoin(history_, "\n");
        return;
      }
    }
    // Drain the fences and free everything: the cache must come back empty.
    for (std::atomic<bool>* f : pending_) f->store(true);
    for (RequestId id : model_.ids()) {
      KVMEM_ASSERT_OK(model_.Free(id));
      Check("final free");
    }
    const Stats s = cache_->GetStats();
    EXPECT_EQ(s.num_requests, 0);
    EXPECT_EQ(s.held_bytes, 0);
    EXPECT_EQ(s.logical_tokens, 0);
    KVMEM_EXPECT_OK(cache_->CheckInvariants());
    RecordSummary();
  }

  int64_t exhausted() const { return exhausted_; }
  int64_t forks() const { return forks_; }

 private:
  template <typename T>
  T Uniform(T lo, T hi) {  // inclusive
    return std::uniform_int_distribution<T>(lo, hi)(rng_);
  }
  bool Chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }

  RequestId PickLive() {
    const std::vector<RequestId> ids = model_.ids();
    return ids[Uniform<size_t>(0, ids.size() - 1)];
  }

  void Log(std::string line) {
    history_.push_back(std::move(line));
    if (history_.size() > 25) history_.pop_front();
  }

  // What must hold after every operation.
  void Check(const std::string& what) {
    SCOPED_TRACE(what);
    KVMEM_ASSERT_OK(cache_->CheckInvariants());
    KVMEM_ASSERT_OK(model_.VerifyAll());
    const Stats s = cache_->GetStats();
    int64_t tokens = 0;
    for (RequestId id : model_.ids()) tokens += model_.LengthOf(id);
    EXPECT_EQ(s.num_requests, static_cast<int64_t>(model_.size()));
    EXPECT_EQ(s.logical_tokens, tokens);
    EXPECT_LE(s.stored_tokens, s.logical_tokens);
    EXPECT_EQ(s.live_bytes, s.stored_tokens * config_.TokenBytes());
    EXPECT_GE(s.held_bytes, s.live_bytes);
    EXPECT_LE(s.physical_bytes, config_.memory_budget_bytes);
    EXPECT_GE(s.peak_requests, s.num_requests);
    EXPECT_GE(s.peak_held_bytes, s.held_bytes);
    CheckRunningBatch();
  }

  // An operation failed with `status`: it must be `code`, and nothing changed.
  void ExpectFailedUnchanged(const absl::Status& status, StatusCode code, const Snapshot& before,
                             const std::vector<RequestId>& ids) {
    EXPECT_EQ(status.code(), code) << status;
    EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache_, ids, /*with_data=*/false),
                           /*fences_may_complete=*/true),
              "");
  }

  // OK, or (when the budget may run out) ResourceExhausted with nothing changed.
  bool OkOrExhausted(const absl::Status& status, const Snapshot& before,
                     const std::vector<RequestId>& ids) {
    if (status.ok()) return true;
    if (status.code() == StatusCode::kResourceExhausted && may_run_out_) {
      ++exhausted_;
      EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache_, ids, /*with_data=*/false),
                             /*fences_may_complete=*/true),
                "");
      return false;
    }
    ADD_FAILURE() << "unexpected " << status;
    return false;
  }

  void Step() {
    const RequestId fresh = next_id_;
    const std::vector<RequestId> ids = SnapshotIds(model_, {fresh});
    const Snapshot before = TakeSnapshot(*cache_, ids, /*with_data=*/false);
    // Rows: all live means no row; a row freed under a pending fence may stay taken
    // until the fence completes (virtual), so a new row may or may not be found.
    const bool full = model_.size() == static_cast<size_t>(config_.max_requests);
    const bool maybe_full =
        model_.size() + PendingRows() >= static_cast<size_t>(config_.max_requests);
    const int r = Uniform(0, 109);
    std::string what;
    if (model_.size() == 0 || r < 14) {  // AddRequest
      what = absl::StrCat("AddRequest(", fresh, ")");
      Log(what);
      absl::StatusOr<int32_t> row = model_.Add(fresh);
      if (full || (maybe_full && row.status().code() == StatusCode::kResourceExhausted)) {
        ExpectFailedUnchanged(row.status(), StatusCode::kResourceExhausted, before, ids);
      } else {
        KVMEM_EXPECT_OK(row);
        ++next_id_;
      }
    } else if (r < 50) {  // Extend
      const RequestId id = PickLive();
      const int64_t len = model_.LengthOf(id);
      // Up to 3 pages; sometimes more where pages are small, so requests get long.
      const int64_t n =
          Uniform<int64_t>(0, Chance(may_run_out_ ? 0.5 : 0.25) ? std::max<int64_t>(3 * tpp_, 40)
                                                                : std::min<int64_t>(3 * tpp_, 40));
      what = absl::StrCat("Extend(", id, ", ", n, ") at length ", len);
      Log(what);
      absl::StatusOr<std::vector<int64_t>> slots = model_.Extend(id, n);
      if (len + n > config_.max_context) {
        ExpectFailedUnchanged(slots.status(), StatusCode::kOutOfRange, before, ids);
      } else if (slots.status().code() != StatusCode::kResourceExhausted) {
        KVMEM_EXPECT_OK(slots);
      } else {
        OkOrExhausted(slots.status(), before, ids);
      }
    } else if (r < 62) {  // Truncate
      const RequestId id = PickLive();
      const int64_t len = model_.LengthOf(id);
      const bool bad = Chance(0.05);
      const int64_t to = bad ? (Chance(0.5) ? len + 1 : -1) : Uniform<int64_t>(0, len);
      what = absl::StrCat("Truncate(", id, ", ", to, ") from ", len);
      Log(what);
      const absl::Status s = model_.Truncate(id, to);
      if (bad) {
        ExpectFailedUnchanged(s, StatusCode::kOutOfRange, before, ids);
      } else {
        KVMEM_EXPECT_OK(s);
      }
    } else if (r < 76) {  // Fork
      const RequestId parent = PickLive();
      what = absl::StrCat("Fork(", parent, ", ", fresh, ") at length ", model_.LengthOf(parent));
      Log(what);
      absl::StatusOr<int32_t> row = model_.Fork(parent, fresh);
      if (full || (maybe_full && row.status().code() == StatusCode::kResourceExhausted)) {
        ExpectFailedUnchanged(row.status(), StatusCode::kResourceExhausted, before, ids);
      } else if (OkOrExhausted(row.status(), before, ids)) {
        ++next_id_;
        ++forks_;
      }
    } else if (r < 90) {  // Free
      const RequestId id = PickLive();
      Fence fence;
      if (pending_.size() < kMaxPendingFences && Chance(0.3)) {
        pending_.push_back(&fences_->emplace_back(false));
        pending_rows_.push_back(1);
        fence = HostFence(pending_.back());
      }
      what = absl::StrCat("Free(", id, fence.event != nullptr ? ", fence)" : ")");
      Log(what);
      KVMEM_EXPECT_OK(model_.Free(id, fence));
    } else if (r < 94) {  // Trim
      what = "Trim()";
      Log(what);
      KVMEM_EXPECT_OK(cache_->Trim());
    } else if (r < 97) {  // complete the oldest fence
      what = "complete a fence";
      Log(what);
      if (!pending_.empty()) {
        pending_.front()->store(true);
        pending_.pop_front();
        pending_rows_.pop_front();
      }
    } else if (r >= 100) {
      what = BatchStep(r - 100, before, ids);
    } else {  // calls that must fail
      const RequestId id = PickLive();
      what = absl::StrCat("bad calls on ", id);
      Log(what);
      KVMEM_EXPECT_CODE(cache_->Extend(id, -1), StatusCode::kInvalidArgument);
      KVMEM_EXPECT_CODE(cache_->Extend(fresh + 1000, 1), StatusCode::kNotFound);
      KVMEM_EXPECT_CODE(cache_->Fork(id, id), StatusCode::kAlreadyExists);
      KVMEM_EXPECT_CODE(cache_->AddRequest(id), StatusCode::kAlreadyExists);
      KVMEM_EXPECT_CODE(cache_->Free(fresh + 1000), StatusCode::kNotFound);
      EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache_, ids, /*with_data=*/false),
                             /*fences_may_complete=*/true),
                "");
    }
    Check(what);
  }

  size_t PendingRows() const {
    size_t n = 0;
    for (int r : pending_rows_) n += r;
    return n;
  }

  // A random subset of the live requests, in random order.
  std::vector<RequestId> PickSome() {
    std::vector<RequestId> ids = model_.ids();
    std::shuffle(ids.begin(), ids.end(), rng_);
    ids.resize(Uniform<size_t>(1, ids.size()));
    return ids;
  }

  // The batch calls and the running batch (r in [0, 10)); returns what it did.
  std::string BatchStep(int r, const Snapshot& before, const std::vector<RequestId>& ids) {
    const std::vector<RequestId> some = PickSome();
    std::string what;
    if (r < 4) {  // ExtendBatch
      std::vector<int64_t> counts;
      bool over = false;
      for (RequestId id : some) {
        counts.push_back(Uniform<int64_t>(0, Chance(0.2) ? 3 * tpp_ : 2));
        over |= model_.LengthOf(id) + counts.back() > config_.max_context;
      }
      what = absl::StrCat("ExtendBatch({", absl::StrJoin(some, ","), "}, {",
                          absl::StrJoin(counts, ","), "})");
      Log(what);
      absl::StatusOr<std::vector<int64_t>> out = model_.ExtendBatch(some, counts);
      if (over) {
        ExpectFailedUnchanged(out.status(), StatusCode::kOutOfRange, before, ids);
      } else if (out.status().code() != StatusCode::kResourceExhausted) {
        KVMEM_EXPECT_OK(out);
      } else {
        OkOrExhausted(out.status(), before, ids);
      }
    } else if (r < 6) {  // TruncateBatch, rewinding a few tokens
      std::vector<int64_t> lengths;
      for (RequestId id : some) {
        lengths.push_back(std::max<int64_t>(0, model_.LengthOf(id) - Uniform<int64_t>(0, 8)));
      }
      what = absl::StrCat("TruncateBatch({", absl::StrJoin(some, ","), "}, {",
                          absl::StrJoin(lengths, ","), "})");
      Log(what);
      KVMEM_EXPECT_OK(model_.TruncateBatch(some, lengths));
    } else if (r < 7) {  // FreeBatch
      Fence fence;
      if (pending_.size() < kMaxPendingFences && Chance(0.3)) {
        pending_.push_back(&fences_->emplace_back(false));
        pending_rows_.push_back(static_cast<int>(some.size()));
        fence = HostFence(pending_.back());
      }
      what = absl::StrCat("FreeBatch({", absl::StrJoin(some, ","), "}",
                          fence.event != nullptr ? ", fence)" : ")");
      Log(what);
      KVMEM_EXPECT_OK(model_.FreeBatch(some, fence));
    } else if (r < 9) {  // a new running batch
      what = absl::StrCat("SetRunningBatch({", absl::StrJoin(some, ","), "})");
      Log(what);
      KVMEM_EXPECT_OK(cache_->SetRunningBatch(some));
      running_ = some;
    } else {  // batch calls that must fail, changing nothing
      what = absl::StrCat("bad batch calls on {", absl::StrJoin(some, ","), "}");
      Log(what);
      const RequestId id = some[0];
      const RequestId twice[] = {id, id};
      const int64_t ones[] = {1, 1};
      int64_t loc[4];
      KVMEM_EXPECT_CODE(cache_->ExtendBatch(twice, ones, loc), StatusCode::kInvalidArgument);
      KVMEM_EXPECT_CODE(cache_->ExtendBatch({&id, 1}, ones, loc), StatusCode::kInvalidArgument);
      if (model_.LengthOf(id) < config_.max_context) {  // else OutOfRange comes first
        KVMEM_EXPECT_CODE(cache_->ExtendBatch({&id, 1}, {ones, 1}, {loc, 0}),
                          StatusCode::kInvalidArgument);
      }
      const int64_t minus[] = {-1};
      KVMEM_EXPECT_CODE(cache_->ExtendBatch({&id, 1}, minus, loc), StatusCode::kInvalidArgument);
      const RequestId unknown[] = {id, next_id_ + 1000};
      KVMEM_EXPECT_CODE(cache_->ExtendBatch(unknown, ones, loc), StatusCode::kNotFound);
      const int64_t lengths[] = {0, 0};
      KVMEM_EXPECT_CODE(cache_->TruncateBatch(twice, lengths), StatusCode::kInvalidArgument);
      const int64_t longer[] = {model_.LengthOf(id) + 1};
      KVMEM_EXPECT_CODE(cache_->TruncateBatch({&id, 1}, longer), StatusCode::kOutOfRange);
      KVMEM_EXPECT_CODE(cache_->FreeBatch(twice), StatusCode::kInvalidArgument);
      KVMEM_EXPECT_CODE(cache_->FreeBatch(unknown), StatusCode::kNotFound);
      KVMEM_EXPECT_CODE(cache_->SetRunningBatch(twice), StatusCode::kInvalidArgument);
      EXPECT_EQ(SnapshotDiff(before, TakeSnapshot(*cache_, ids, /*with_data=*/false),
                             /*fences_may_complete=*/true),
                "");
    }
    return what;
  }

  // The running batch's entries say what the model says of its members.
  void CheckRunningBatch() {
    const RunningBatchView v = cache_->RunningBatch();
    ASSERT_EQ(v.size, static_cast<int32_t>(running_.size()));
    int32_t longest = 0;
    for (size_t b = 0; b < running_.size(); ++b) {
      const int64_t len = model_.Has(running_[b]) ? model_.LengthOf(running_[b]) : 0;
      EXPECT_EQ(v.seq_lens[b], len) << "entry " << b << ", request " << running_[b];
      longest = std::max<int32_t>(longest, static_cast<int32_t>(len));
    }
    EXPECT_EQ(v.max_seq_len, longest);
    if (config_.layout != Layout::kPaged || running_.empty()) return;
    absl::StatusOr<RunningBatchCsr> csr = cache_->PackRunningBatch();
    KVMEM_ASSERT_OK(csr);
    for (size_t b = 0; b < running_.size(); ++b) {
      std::vector<int32_t> table;
      if (model_.Has(running_[b])) table = cache_->BlockTable(running_[b]).value();
      const std::vector<int32_t> packed(csr->indices + csr->indptr[b],
                                        csr->indices + csr->indptr[b + 1]);
      EXPECT_EQ(packed, table) << "CSR entry " << b;
    }
  }

  void RecordSummary() {
    ::testing::Test::RecordProperty("resource_exhausted", static_cast<int>(exhausted_));
    ::testing::Test::RecordProperty("forks", static_cast<int>(forks_));
  }

  KvCache* cache_;
  std::deque<std::atomic<bool>>* fences_;
  const KvCacheConfig config_;
  CacheModel model_;
  std::mt19937_64 rng_;
  const bool may_run_out_;
  const int64_t tpp_;
  RequestId next_id_ = 1;
  std::deque<std::atomic<bool>*> pending_;
  std::deque<int> pending_rows_;  // rows freed under each pending fence
  std::vector<RequestId> running_;  // the last SetRunningBatch
  std::deque<std::string> history_;
  int64_t exhausted_ = 0;
  int64_t forks_ = 0;
};

class KvCacheModelTest : public ::testing::TestWithParam<LayoutCase> {
 protected:
  uint64_t Seed(int salt) const {
    uint64_t layout_index = 0;
    const std::vector<LayoutCase> all = AllLayouts();
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i].name == GetParam().name) layout_index = i;
    }
    return BaseSeed() * 31 + layout_index * 7 + salt;
  }
};

// A budget that holds every row at max_context plus the pending fences' memory: Extend
// and Fork must never run out of memory.
TEST_P(KvCacheModelTest, RandomOpsRoomyBudget) {
  KvCacheConfig config = ModelConfig(GetParam());
  const int64_t one = MinimalBudget(config);
  ASSERT_GT(one, 0);
  config.memory_budget_bytes = one * (config.max_requests + kMaxPendingFences);
  std::deque<std::atomic<bool>> fences;  // outlives the cache, which may poll them
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  KVMEM_ASSERT_OK(cache);
  const uint64_t seed = Seed(1);
  SCOPED_TRACE(absl::StrCat("seed ", seed, " (KVMEM_TEST_SEED=", BaseSeed(), ")"));
  Runner runner(cache->get(), seed, /*may_run_out=*/false, &fences);
  runner.Run(Scaled(kOpsPerRun));
  EXPECT_GT(runner.forks(), 0);
}

// Room for one full request among six: out of memory is frequent, and every
// failure must leave the cache and the model equal.
TEST_P(KvCacheModelTest, RandomOpsTightBudget) {
  KvCacheConfig config = ModelConfig(GetParam());
  const int64_t one = MinimalBudget(config);
  ASSERT_GT(one, 0);
  config.memory_budget_bytes = one;
  std::deque<std::atomic<bool>> fences;  // outlives the cache, which may poll them
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  KVMEM_ASSERT_OK(cache);
  const uint64_t seed = Seed(2);
  SCOPED_TRACE(absl::StrCat("seed ", seed, " (KVMEM_TEST_SEED=", BaseSeed(), ")"));
  Runner runner(cache->get(), seed, /*may_run_out=*/true, &fences);
  runner.Run(Scaled(kOpsPerRun));
  EXPECT_GT(runner.exhausted(), 0) << "the tight budget never ran out: the test lost its point";
}

// bf16 storage, a 1-token page and a per-layer virtual layout differ in rounding and
// strides: one shorter run each in bf16.
TEST_P(KvCacheModelTest, RandomOpsBf16) {
  KvCacheConfig config = ModelConfig(GetParam());
  config.dtype = DType::kBFloat16;
  config.head_dim = 16;
  const int64_t one = MinimalBudget(config);
  ASSERT_GT(one, 0);
  config.memory_budget_bytes = 3 * one;
  std::deque<std::atomic<bool>> fences;  // outlives the cache, which may poll them
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  KVMEM_ASSERT_OK(cache);
  const uint64_t seed = Seed(3);
  SCOPED_TRACE(absl::StrCat("seed ", seed, " (KVMEM_TEST_SEED=", BaseSeed(), ")"));
  Runner runner(cache->get(), seed, /*may_run_out=*/true, &fences);
  runner.Run(Scaled(kOpsPerRun / 4));
}

INSTANTIATE_TEST_SUITE_P(Layouts, KvCacheModelTest, ::testing::ValuesIn(AllLayouts()),
                         LayoutCaseName);

}  // namespace
}  // namespace kvmem::test
