// Tests of kvbench's budgets (tools/kvbench/sizing.h): RequestPages is the number of pages
// a created cache holds for one request of that many tokens, in every layout, including
// lengths short enough that planning them alone would pick a smaller chunk.
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "tools/kvbench/sizing.h"

namespace kvbench {
namespace {

struct Case {
  const char* name;
  kvmem::Layout layout;
  kvmem::Arrangement arrangement;
  int chunk_tokens;
};

TEST(KvbenchSizing, RequestPagesIsWhatTheCacheHolds) {
  const Case cases[] = {
      {"paged", kvmem::Layout::kPaged, kvmem::Arrangement::kAllLayers, 0},
      {"virtual chunked", kvmem::Layout::kVirtual, kvmem::Arrangement::kAllLayers, 0},
      {"virtual unchunked", kvmem::Layout::kVirtual, kvmem::Arrangement::kAllLayers, 1},
      {"virtual per layer", kvmem::Layout::kVirtual, kvmem::Arrangement::kPerLayer, 0},
  };
  for (const Case& c : cases) {
    kvmem::KvCacheConfig config;
    config.num_layers = 4;
    config.num_kv_heads = 2;
    config.head_dim = 64;  // 256 bytes per token and layer's K: 2 KiB per token
    config.layout = c.layout;
    config.arrangement = c.arrangement;
    config.chunk_tokens = c.chunk_tokens;
    config.max_requests = 2;
    config.max_context = 3000;
    config.host_granularity = 64 << 10;
    absl::StatusOr<kvmem::MemoryPlan> plan = kvmem::PlanMinimalMemory(config);
    ASSERT_TRUE(plan.ok()) << plan.status();
    if (c.layout == kvmem::Layout::kVirtual && c.chunk_tokens == 0 &&
        c.arrangement == kvmem::Arrangement::kAllLayers) {
      ASSERT_EQ(plan->chunk_tokens, 128) << "a layer's K and V of a chunk fill a 64 KiB page";
    }
    config.memory_budget_bytes = plan->min_budget_bytes;
    for (int64_t tokens : {int64_t{1}, int64_t{17}, int64_t{100}, int64_t{129}, int64_t{3000}}) {
      SCOPED_TRACE(testing::Message() << c.name << ", " << tokens << " tokens");
      absl::StatusOr<int64_t> pages = RequestPages(config, *plan, tokens);
      ASSERT_TRUE(pages.ok()) << pages.status();
      absl::StatusOr<std::unique_ptr<kvmem::KvCache>> cache = kvmem::KvCache::Create(config);
      ASSERT_TRUE(cache.ok()) << cache.status();
      ASSERT_TRUE((*cache)->AddRequest(1).ok());
      ASSERT_TRUE((*cache)->Extend(1, tokens).ok());
      EXPECT_EQ(*pages, (*cache)->GetStats().pages_used);
    }
    absl::StatusOr<int64_t> none = RequestPages(config, *plan, 0);
    ASSERT_TRUE(none.ok());
    EXPECT_EQ(*none, 0);
  }
}

}  // namespace
}  // namespace kvbench
