// Every KvCacheConfig field at its extremes (0, -1, INT_MAX, INT64_MAX, 2^30, budgets of
// 2^26 and 2^31 - 1 granules, a 1 TiB host page, enum values outside their enum), on
// every layout: Create answers with a Status, never an abort, and quickly, without
// allocating host memory in proportion to the field; a rejection names the numbers.
// Meant to run under the project's sanitizer build too (tools/test.sh --sanitize), where
// UBSan aborts on any signed overflow in the configuration arithmetic.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {
namespace {

using absl::StatusCode;

constexpr int64_t kMiB = int64_t{1} << 20;
// What Create may add to the process's resident memory for any of these configurations
// (they are small, or rejected): far below what a runaway field would allocate.
constexpr int64_t kMaxResidentGrowth = 256 * kMiB;
// Seconds a Create may take, sanitizers included.
constexpr double kMaxSeconds = 10;

int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * 4096;
}

struct Case {
  std::string name;
  std::function<void(KvCacheConfig*)> apply;
  // Codes Create may answer (kOk: the extreme is a valid configuration); empty:
  // InvalidArgument only.
  std::vector<StatusCode> codes = {};
  // Each must appear in the message of a rejection.
  std::vector<std::string> mentions = {};
};

std::vector<Case> Cases() {
  const int kIntMax = INT_MAX;
  const int64_t kInt64Max = INT64_MAX;
  const std::vector<StatusCode> ok = {StatusCode::kOk};
  std::vector<Case> out;
  auto add = [&](Case c) { out.push_back(std::move(c)); };
  // Shape.
  for (int v : {0, -1}) {
    add({absl::StrCat("num_layers_", v),
         [v](KvCacheConfig* c) { c->num_layers = v; },
         {},
         {"num_layers", absl::StrCat(v)}});
    add({absl::StrCat("num_kv_heads_", v),
         [v](KvCacheConfig* c) { c->num_kv_heads = v; },
         {},
         {"num_kv_heads", absl::StrCat(v)}});
    add({absl::StrCat("head_dim_", v),
         [v](KvCacheConfig* c) { c->head_dim = v; },
         {},
         {"head_dim", absl::StrCat(v)}});
    add({absl::StrCat("page_tokens_", v),
         [v](KvCacheConfig* c) { c->page_tokens = v; },
         {},
         {"page_tokens", absl::StrCat(v)}});
    add({absl::StrCat("max_requests_", v),
         [v](KvCacheConfig* c) { c->max_requests = v; },
         {},
         {"max_requests", absl::StrCat(v)}});
    add({absl::StrCat("max_context_", v),
         [v](KvCacheConfig* c) { c->max_context = v; },
         {},
         {"max_context", absl::StrCat(v)}});
    add({absl::StrCat("memory_budget_bytes_", v),
         [v](KvCacheConfig* c) { c->memory_budget_bytes = v; },
         {},
         {"memory_budget_bytes", absl::StrCat(v)}});
    add({absl::StrCat("host_granularity_", v),
         [v](KvCacheConfig* c) { c->host_granularity = v; },
         {},
         {"host_granularity", absl::StrCat(v)}});
  }
  // One huge factor: the budget (1 MiB) holds no request of such a shape.
  add({"num_layers_max", [=](KvCacheConfig* c) { c->num_layers = kIntMax; }});
  add({"num_kv_heads_max", [=](KvCacheConfig* c) { c->num_kv_heads = kIntMax; }});
  add({"head_dim_max", [=](KvCacheConfig* c) { c->head_dim = kIntMax; }});
  // kv_heads * head_dim * 4 bytes overflows 64 bits: the TokenLayerBytes() of the issue.
  add({"heads_and_head_dim_max",
       [=](KvCacheConfig* c) {
         c->num_kv_heads = kIntMax;
         c->head_dim = kIntMax;
       },
       {},
       {"2147483647", "2^63"}});
  add({"everything_max",
       [=](KvCacheConfig* c) {
         c->num_layers = kIntMax;
         c->num_kv_heads = kIntMax;
         c->head_dim = kIntMax;
         c->page_tokens = kIntMax;
         c->max_requests = kIntMax;
         c->max_context = int64_t{1} << 30;
         c->memory_budget_bytes = kInt64Max;
       },
       {},
       {"2^63"}});
  add({"page_tokens_max",
       [=](KvCacheConfig* c) { c->page_tokens = kIntMax; },
       {StatusCode::kOk, StatusCode::kInvalidArgument}});
  for (int v : {-1, 3, kIntMax}) {
    add({absl::StrCat("chunk_tokens_", v),
         [v](KvCacheConfig* c) { c->chunk_tokens = v; },
         {},
         {"chunk_tokens", absl::StrCat(v)}});
  }
  add({"chunk_tokens_2^30",
       [](KvCacheConfig* c) { c->chunk_tokens = 1 << 30; },
       {StatusCode::kOk, StatusCode::kInvalidArgument}});
  // Enum values outside their enum.
  add({"layout_2",
       [](KvCacheConfig* c) { c->layout = static_cast<Layout>(2); },
       {},
       {"layout", "2"}});
  add({"layout_255",
       [](KvCacheConfig* c) { c->layout = static_cast<Layout>(255); },
       {},
       {"layout", "255"}});
  add({"arrangement_2",
       [](KvCacheConfig* c) { c->arrangement = static_cast<Arrangement>(2); },
       {},
       {"arrangement", "2"}});
  add({"dtype_3", [](KvCacheConfig* c) { c->dtype = static_cast<DType>(3); }, {}, {"dtype", "3"}});
  add({"dtype_255",
       [](KvCacheConfig* c) { c->dtype = static_cast<DType>(255); },
       {},
       {"dtype", "255"}});
  add({"page_placement_2",
       [](KvCacheConfig* c) { c->page_placement = static_cast<PagePlacement>(2); },
       {},
       {"page_placement", "2"}});
  add({"device_2",
       [](KvCacheConfig* c) { c->device = static_cast<DeviceKind>(2); },
       {},
       {"device", "2"}});
  add({"cuda_device_ordinal_-1",
       [](KvCacheConfig* c) {
         c->device = DeviceKind::kCuda;
         c->device_ordinal = -1;
       },
       {},
       {"device_ordinal", "-1"}});
  // Any answer but an abort: Unavailable without CUDA or a GPU, NotFound-like errors with.
  add({"cuda_device_ordinal_max",
       [=](KvCacheConfig* c) {
         c->device = DeviceKind::kCuda;
         c->device_ordinal = kIntMax;
       },
       {StatusCode::kUnavailable, StatusCode::kInvalidArgument, StatusCode::kNotFound,
        StatusCode::kOutOfRange, StatusCode::kInternal}});
  add({"host_device_ordinal_-1", [](KvCacheConfig* c) { c->device_ordinal = -1; }, ok});
  // Capacity.
  add({"max_requests_max",
       [=](KvCacheConfig* c) { c->max_requests = kIntMax; },
       {},
       {"max_requests", "2147483647"}});
  add({"max_requests_max_unlimited_budget",
       [=](KvCacheConfig* c) {
         c->max_requests = kIntMax;
         c->memory_budget_bytes = kInt64Max;
       },
       {},
       {"2147483647"}});
  add({"max_context_2^30_unlimited_budget",
       [=](KvCacheConfig* c) {
         c->max_context = int64_t{1} << 30;
         c->memory_budget_bytes = kInt64Max;
       },
       {},
       {"1073741824"}});
  add({"max_context_2^30+1",
       [](KvCacheConfig* c) { c->max_context = (int64_t{1} << 30) + 1; },
       {},
       {"max_context", "1073741825"}});
  add({"max_context_max",
       [=](KvCacheConfig* c) { c->max_context = kInt64Max; },
       {},
       {"max_context", "9223372036854775807"}});
  // Budgets far beyond what the rows can use: valid, and only that much is taken.
  add({"memory_budget_bytes_max", [=](KvCacheConfig* c) { c->memory_budget_bytes = kInt64Max; },
       ok});
  add({"budget_2^26_granules",
       [](KvCacheConfig* c) { c->memory_budget_bytes = (int64_t{1} << 26) * c->host_granularity; },
       ok});
  add({"budget_2^31-1_granules",
       [](KvCacheConfig* c) {
         c->memory_budget_bytes = ((int64_t{1} << 31) - 1) * c->host_granularity;
       },
       ok});
  // The host page.
  for (int64_t v : {int64_t{3000}, int64_t{2048}, int64_t{1} << 40, kInt64Max}) {
    add({absl::StrCat("host_granularity_", v),
         [v](KvCacheConfig* c) { c->host_granularity = v; },
         {},
         {"host_granularity", absl::StrCat(v)}});
  }
  // A 1 GiB page is allowed; a 1 MiB budget does not hold one.
  add({"host_granularity_2^30",
       [](KvCacheConfig* c) { c->host_granularity = int64_t{1} << 30; },
       {},
       {"1073741824"}});
  // The background mapper's reach.
  for (int64_t v : {int64_t{-1}, int64_t{257}, kInt64Max}) {
    add({absl::StrCat("map_ahead_tokens_", v),
         [v](KvCacheConfig* c) { c->map_ahead_tokens = v; },
         {},
         {"map_ahead_tokens", absl::StrCat(v)}});
  }
  add({"map_ahead_tokens_max_context", [](KvCacheConfig* c) { c->map_ahead_tokens = 256; }, ok});
  return out;
}

// "-<digit>" only where the configuration itself holds a negative number: a wrapped
// product would show up as one.
bool HasNegativeNumber(const std::string& text) {
  return std::regex_search(text, std::regex("-[0-9]"));
}

class ConfigExtremesTest : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(ConfigExtremesTest, CreateAnswersWithAStatus) {
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.name);
    KvCacheConfig config = SmallConfig(GetParam());
    c.apply(&config);
    const int64_t resident = ResidentBytes();
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, kMaxSeconds);
    EXPECT_LT(ResidentBytes() - resident, kMaxResidentGrowth);
    const StatusCode code = cache.status().code();
    const std::vector<StatusCode> codes =
        c.codes.empty() ? std::vector<StatusCode>{StatusCode::kInvalidArgument} : c.codes;
    EXPECT_TRUE(std::find(codes.begin(), codes.end(), code) != codes.end())
        << cache.status() << " for " << DescribeConfig(config);
    if (!cache.ok()) {
      const std::string message(cache.status().message());
      for (const std::string& m : c.mentions) {
        EXPECT_TRUE(absl::StrContains(message, m)) << "want '" << m << "' in: " << message;
      }
      // Unavailable (no CUDA here) is about no number.
      if (code != StatusCode::kUnavailable) {
        EXPECT_TRUE(std::regex_search(message, std::regex("[0-9]"))) << message;
      }
      // A field set to a negative value is named in the message; nothing else may be.
      if (!absl::StrContains(c.name, "_-")) {
        EXPECT_FALSE(HasNegativeNumber(message)) << message;
      }
      EXPECT_FALSE(absl::StrContains(message, "is 0 bytes")) << message;
      continue;
    }
    // Accepted: the cache works at full length, and holds only what its rows can use.
    KvCache& kv = **cache;
    const Stats s = kv.GetStats();
    const int64_t per_request = (config.max_context * config.TokenBytes()) / s.page_bytes + 1;
    EXPECT_LE(s.pages_total, 4 * int64_t{config.max_requests} * per_request + 4096)
        << "pages the rows can never use";
    KVMEM_ASSERT_OK(kv.AddRequest(1));
    KVMEM_EXPECT_OK(kv.Extend(1, config.max_context));
    KVMEM_EXPECT_OK(kv.CheckInvariants());
    KVMEM_EXPECT_OK(kv.Free(1));
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ConfigExtremesTest, ::testing::ValuesIn(AllLayouts()),
                         LayoutCaseName);

// The byte counts of a shape are defined for any config: saturated, never wrapped.
TEST(ConfigExtremesTest, TokenBytesSaturate) {
  KvCacheConfig c;
  c.num_kv_heads = INT_MAX;
  c.head_dim = INT_MAX;
  c.dtype = DType::kFloat32;
  EXPECT_EQ(c.TokenLayerBytes(), INT64_MAX);
  EXPECT_EQ(c.TokenBytes(), INT64_MAX);
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.num_layers = INT_MAX;
  EXPECT_EQ(c.TokenLayerBytes(), 8 * 128 * 4);
  EXPECT_EQ(c.TokenBytes(), int64_t{2} * INT_MAX * 8 * 128 * 4);
  c.num_layers = -1;
  EXPECT_EQ(c.TokenBytes(), 0);
  c.head_dim = INT_MIN;
  EXPECT_EQ(c.TokenLayerBytes(), 0);
}

// The paged budget message of a shape whose page and request sizes are near 2^63: the
// numbers it gives are real (saturated at worst), never wrapped to 0 or below.
TEST(ConfigExtremesTest, PagedBudgetMessageOfAHugeShape) {
  KvCacheConfig c;
  c.layout = Layout::kPaged;
  c.num_layers = 1;
  c.num_kv_heads = 1 << 16;
  c.head_dim = 1 << 15;
  c.dtype = DType::kBFloat16;  // 2^33 bytes a token
  c.max_context = (int64_t{1} << 30) - 1;
  c.page_tokens = (1 << 29) + 1;  // two pages a request: 2^30 + 2 tokens of 2^33 bytes
  c.max_requests = 1;
  c.memory_budget_bytes = kMiB;
  c.host_granularity = 4096;
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(c);
  ASSERT_EQ(cache.status().code(), StatusCode::kInvalidArgument) << cache.status();
  const std::string message(cache.status().message());
  EXPECT_FALSE(HasNegativeNumber(message)) << message;
  EXPECT_FALSE(absl::StrContains(message, "is 0 bytes")) << message;
}

}  // namespace
}  // namespace kvmem::test
