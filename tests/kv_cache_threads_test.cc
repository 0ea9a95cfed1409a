// KvCache from several threads at once, on every layout: 4 workers each drive their own
// requests (add / extend / fork / truncate / free / trim) on one cache and check their
// own K/V data after every step, while an observer calls GetStats and CheckInvariants.
// At the end the cache is consistent and every worker's data is intact. Short, so that
// it also runs under the sanitizers.
#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {
namespace {

using absl::StatusCode;

constexpr int kWorkers = 4;
constexpr int kStepsPerWorker = 300;  // before KVMEM_TEST_SCALE
constexpr int kLivePerWorker = 3;

class KvCacheThreadsTest : public ::testing::TestWithParam<LayoutCase> {};

// One worker's run. Returns the first problem, or "" (gtest assertions are not used off
// the main thread).
std::string Work(KvCache* cache, CacheModel* model, int worker, int steps) {
  std::mt19937_64 rng(1000 + worker);
  const int64_t tpp = TokensPerPage(cache->config());
  const int64_t max_context = cache->config().max_context;
  RequestId next = static_cast<RequestId>(worker) * 1000000 + 1;
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int i = 0; i < steps; ++i) {
    const int r = static_cast<int>(uniform(0, 99));
    absl::Status s;
    std::string what;
    const std::vector<RequestId> ids = model->ids();
    if (ids.empty() || (r < 15 && ids.size() < kLivePerWorker)) {
      what = absl::StrCat("AddRequest(", next, ")");
      s = model->Add(next).status();
      if (s.ok()) ++next;
    } else {
      const RequestId id = ids[uniform(0, static_cast<int64_t>(ids.size()) - 1)];
      const int64_t len = model->LengthOf(id);
      if (r < 60) {
        const int64_t n = std::min(max_context - len, uniform(0, 2 * tpp + 2));
        what = absl::StrCat("Extend(", id, ", ", n, ")");
        s = model->Extend(id, n).status();
      } else if (r < 72) {
        const int64_t to = uniform(0, len);
        what = absl::StrCat("Truncate(", id, ", ", to, ")");
        s = model->Truncate(id, to);
      } else if (r < 84 && ids.size() < kLivePerWorker) {
        what = absl::StrCat("Fork(", id, ", ", next, ")");
        s = model->Fork(id, next).status();
        if (s.ok()) ++next;
      } else if (r < 97) {
        what = absl::StrCat("Free(", id, ")");
        s = model->Free(id);
      } else {
        what = "Trim()";
        s = cache->Trim().status();
      }
    }
    // The budget holds every row at max_context: nothing may fail.
    if (!s.ok())
      return absl::StrCat("worker ", worker, " step ", i, ": ", what, ": ", s.ToString());
    if (absl::Status v = model->VerifyAll(); !v.ok()) {
      return absl::StrCat("worker ", worker, " step ", i, " after ", what, ": ", v.ToString());
    }
  }
  return "";
}

void RunWorkersAndObserver(const KvCacheConfig& config) {
  absl::StatusOr<std::unique_ptr<KvCache>> created = KvCache::Create(config);
  KVMEM_ASSERT_OK(created);
  KvCache* cache = created->get();

  std::vector<std::unique_ptr<CacheModel>> models;
  for (int w = 0; w < kWorkers; ++w) {
    // Tags of different workers never meet: a token written by one worker that shows up
    // in another's request is caught.
    models.push_back(std::make_unique<CacheModel>(cache, 1 + w * 10000000u));
  }
  std::vector<std::string> errors(kWorkers);
  std::atomic<int> running{kWorkers};
  std::string observer_error;
  int64_t observations = 0;
  std::thread observer([&] {
    while (running.load() > 0 || observations == 0) {
      const Stats s = cache->GetStats();
      if (absl::Status c = cache->CheckInvariants(); !c.ok()) {
        observer_error = c.ToString();
        return;
      }
      if (s.num_requests > config.max_requests || s.held_bytes < s.live_bytes ||
          s.stored_tokens > s.logical_tokens ||
          s.live_bytes != s.stored_tokens * config.TokenBytes()) {
        observer_error = absl::StrCat("inconsistent stats: ", s.ToString());
        return;
      }
      ++observations;
    }
  });
  std::vector<std::thread> workers;
  const int steps = Scaled(kStepsPerWorker);
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      errors[w] = Work(cache, models[w].get(), w, steps);
      running.fetch_sub(1);
    });
  }
  for (std::thread& t : workers) t.join();
  observer.join();

  for (int w = 0; w < kWorkers; ++w) EXPECT_EQ(errors[w], "") << "worker " << w;
  EXPECT_EQ(observer_error, "");
  EXPECT_GT(observations, 0);
  KVMEM_EXPECT_OK(cache->CheckInvariants());
  int64_t live = 0;
  int64_t tokens = 0;
  for (const auto& m : models) {
    KVMEM_EXPECT_OK(m->VerifyAll());
    live += static_cast<int64_t>(m->size());
    for (RequestId id : m->ids()) tokens += m->LengthOf(id);
  }
  const Stats s = cache->GetStats();
  EXPECT_EQ(s.num_requests, live);
  EXPECT_EQ(s.logical_tokens, tokens);
  for (const auto& m : models) {
    for (RequestId id : m->ids()) KVMEM_EXPECT_OK(m->Free(id));
  }
  EXPECT_EQ(cache->GetStats().held_bytes, 0);
  EXPECT_EQ(cache->GetStats().num_requests, 0);
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

KvCacheConfig ThreadsConfig(const LayoutCase& c) {
  KvCacheConfig config = SmallConfig(c);
  config.max_requests = kWorkers * kLivePerWorker;
  config.max_context = 128;
  config.memory_budget_bytes = MinimalBudget(config) * config.max_requests;
  return config;
}

TEST_P(KvCacheThreadsTest, WorkersAndObserver) {
  const KvCacheConfig config = ThreadsConfig(GetParam());
  ASSERT_GT(config.memory_budget_bytes, 0);
  RunWorkersAndObserver(config);
}

// The virtual layout's background mapper maps ahead of the rows on its own thread
// (the paged layout ignores the setting).
TEST_P(KvCacheThreadsTest, WorkersAndObserverWithMapAhead) {
  KvCacheConfig config = ThreadsConfig(GetParam());
  ASSERT_GT(config.memory_budget_bytes, 0);
  config.map_ahead_tokens = 2 * TokensPerPage(config);
  RunWorkersAndObserver(config);
}

INSTANTIATE_TEST_SUITE_P(Layouts, KvCacheThreadsTest, ::testing::ValuesIn(AllLayouts()),
                         LayoutCaseName);

}  // namespace
}  // namespace kvmem::test
