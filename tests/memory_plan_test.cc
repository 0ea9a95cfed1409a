// Tests of PlanMemory (include/kvmem/memory_plan.h): for every layout, what the plan says
// is what a created cache reports and does (pages, bytes, chunks, reservation, how many
// requests at max_context fit), min_budget_bytes is exactly the smallest budget Create
// accepts, and a config Create rejects gets Create's own InvalidArgument.
#include "kvmem/memory_plan.h"

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "kvmem/vmm.h"
#include "tests/cache_test_util.h"

namespace kvmem {
namespace {

// A host backend that adds up the address space reserved through it, so the test can
// compare reservation_bytes with what Create reserves.
class CountingVmm final : public Vmm {
 public:
  explicit CountingVmm(std::unique_ptr<Vmm> inner) : inner_(std::move(inner)) {}

  int64_t reserved_bytes() const {
    absl::MutexLock lock(&mu_);
    return reserved_;
  }

  std::string_view name() const override { return inner_->name(); }
  int64_t granularity() const override { return inner_->granularity(); }
  bool is_device() const override { return inner_->is_device(); }
  absl::StatusOr<uintptr_t> Reserve(int64_t bytes) override {
    absl::StatusOr<uintptr_t> addr = inner_->Reserve(bytes);
    if (addr.ok()) {
      absl::MutexLock lock(&mu_);
      reserved_ += bytes;
    }
    return addr;
  }
  absl::Status FreeReservation(uintptr_t addr, int64_t bytes) override {
    return inner_->FreeReservation(addr, bytes);
  }
  absl::StatusOr<PhysHandle> Create() override { return inner_->Create(); }
  absl::Status Release(PhysHandle handle) override { return inner_->Release(handle); }
  absl::Status Map(uintptr_t addr, PhysHandle handle) override { return inner_->Map(addr, handle); }
  absl::Status SetAccess(uintptr_t addr, int64_t bytes) override {
    return inner_->SetAccess(addr, bytes);
  }
  absl::Status Unmap(uintptr_t addr, int64_t bytes) override { return inner_->Unmap(addr, bytes); }
  absl::Status Copy(uintptr_t dst, uintptr_t src, int64_t bytes) override {
    return inner_->Copy(dst, src, bytes);
  }
  bool FenceComplete(const Fence& fence) override { return inner_->FenceComplete(fence); }
  VmmCounters counters() const override { return inner_->counters(); }

 private:
  const std::unique_ptr<Vmm> inner_;
  mutable absl::Mutex mu_;
  int64_t reserved_ ABSL_GUARDED_BY(mu_) = 0;
};

struct PlanCase {
  std::string name;
  KvCacheConfig config;
};

void PrintTo(const PlanCase& c, std::ostream* os) { *os << c.name; }

// Two shapes: a tiny one on 4 KiB pages (256 bytes per token; max_context 200 ends inside
// a page and a chunk) and Llama-3-8B's on 2 MiB pages (128 KiB per token; 1024 tokens per page per
// layer). Each in every layout: paged pages of 1, 3 (pages that straddle granules), 16 and 64
// tokens, virtual all-layer rows in chunks (picked, and 16 tokens), without chunks, and per layer.
std::vector<PlanCase> Cases() {
  KvCacheConfig tiny;
  tiny.num_layers = 2;
  tiny.num_kv_heads = 2;
  tiny.head_dim = 8;
  tiny.dtype = DType::kFloat32;
  tiny.max_requests = 8;
  tiny.max_context = 200;
  tiny.host_granularity = 4096;
  KvCacheConfig llama;
  llama.max_requests = 4;
  llama.max_context = 2048;
  llama.host_granularity = int64_t{2} << 20;

  struct LayoutSpec {
    const char* name;
    Layout layout;
    Arrangement arrangement;
    int page_tokens;
    int chunk_tokens;
  };
  const LayoutSpec layouts[] = {
      {"Paged1", Layout::kPaged, Arrangement::kAllLayers, 1, 0},
      {"Paged3", Layout::kPaged, Arrangement::kAllLayers, 3, 0},
      {"Paged16", Layout::kPaged, Arrangement::kAllLayers, 16, 0},
      {"Paged64", Layout::kPaged, Arrangement::kAllLayers, 64, 0},
      {"VirtualChunked", Layout::kVirtual, Arrangement::kAllLayers, 16, 0},
      {"VirtualChunk16", Layout::kVirtual, Arrangement::kAllLayers, 16, 16},
      {"VirtualUnchunked", Layout::kVirtual, Arrangement::kAllLayers, 16, 1},
      {"VirtualPerLayer", Layout::kVirtual, Arrangement::kPerLayer, 16, 0},
  };
  std::vector<PlanCase> cases;
  for (const auto& [shape_name, shape] :
       {std::pair<const char*, KvCacheConfig>{"Tiny", tiny}, {"Llama", llama}}) {
    for (const LayoutSpec& l : layouts) {
      KvCacheConfig c = shape;
      c.layout = l.layout;
      c.arrangement = l.arrangement;
      c.page_tokens = l.page_tokens;
      c.chunk_tokens = l.chunk_tokens;
      cases.push_back({std::string(shape_name) + l.name, c});
    }
  }
  return cases;
}

class MemoryPlanTest : public ::testing::TestWithParam<PlanCase> {
 protected:
  // The case's config with a budget of 3.5 requests at max_context: room for 3 (paged:
  // more where whole granules hold more pages), so running out is tested too.
  KvCacheConfig Config() const {
    KvCacheConfig c = GetParam().config;
    absl::StatusOr<MemoryPlan> minimal = PlanMinimalMemory(c);
    EXPECT_TRUE(minimal.ok()) << minimal.status();
    if (minimal.ok()) c.memory_budget_bytes = minimal->min_budget_bytes * 7 / 2;
    return c;
  }
};

TEST_P(MemoryPlanTest, AgreesWithTheCreatedCache) {
  KvCacheConfig c = Config();
  auto counting = std::make_shared<CountingVmm>(*MakeHostVmm(c.host_granularity));
  c.vmm = counting;
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan plan, PlanMemory(c));
  EXPECT_EQ(plan.layout, c.layout);
  EXPECT_EQ(plan.granularity, c.host_granularity);
  EXPECT_EQ(plan.budget_bytes, c.memory_budget_bytes);
  EXPECT_EQ(plan.token_bytes, c.TokenBytes());
  EXPECT_EQ(plan.token_layer_bytes, c.TokenLayerBytes());
  EXPECT_GE(plan.max_full_requests, 3);
  EXPECT_LE(plan.max_full_requests, c.max_requests);
  EXPECT_EQ(counting->reserved_bytes(), 0) << "planning reserves nothing";

  KVMEM_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KvCache> cache, KvCache::Create(c));
  const Stats stats = cache->GetStats();
  EXPECT_EQ(plan.page_bytes, stats.page_bytes);
  EXPECT_EQ(plan.pages_total, stats.pages_total);
  EXPECT_EQ(plan.budget_bytes, stats.budget_bytes);
  EXPECT_EQ(plan.reservation_bytes, counting->reserved_bytes());
  if (c.layout == Layout::kVirtual) {
    EXPECT_EQ(plan.physical_bytes, stats.physical_bytes);  // every handle created up front
  } else {
    EXPECT_EQ(stats.physical_bytes, 0);  // an elastic pool maps as pages are needed
    KvCacheConfig whole = c;
    whole.vmm = nullptr;
    whole.elastic_pool = false;
    KVMEM_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KvCache> mapped, KvCache::Create(whole));
    EXPECT_EQ(plan.physical_bytes, mapped->GetStats().physical_bytes);
  }
  BatchMetadata none;
  if (c.layout == Layout::kVirtual) {
    KVMEM_ASSERT_OK_AND_ASSIGN(const VirtualKv view, cache->VirtualView(0, none));
    EXPECT_EQ(plan.chunk_tokens, int64_t{1} << view.chunk_shift);
    if (c.chunk_tokens > 0) {
      EXPECT_EQ(plan.chunk_tokens, c.chunk_tokens);
    }
  } else {
    EXPECT_EQ(plan.chunk_tokens, 1);
  }

  // max_full_requests requests at max_context fit, each holding pages_per_request pages;
  // one more (where a row is left) cannot reach max_context.
  for (int64_t i = 0; i < plan.max_full_requests; ++i) {
    KVMEM_ASSERT_OK(cache->AddRequest(i));
    KVMEM_ASSERT_OK(cache->Extend(i, c.max_context));
    EXPECT_EQ(cache->GetStats().pages_used, (i + 1) * plan.pages_per_request);
  }
  if (plan.max_full_requests < c.max_requests) {
    KVMEM_ASSERT_OK(cache->AddRequest(plan.max_full_requests));
    KVMEM_EXPECT_CODE(cache->Extend(plan.max_full_requests, c.max_context),
                      absl::StatusCode::kResourceExhausted);
  }
  KVMEM_EXPECT_OK(cache->CheckInvariants());
}

TEST_P(MemoryPlanTest, UnitTokensIsWhatARequestGrowsBy) {
  const KvCacheConfig c = Config();
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan plan, PlanMemory(c));
  ASSERT_LT(plan.unit_tokens, c.max_context);
  KVMEM_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KvCache> cache, KvCache::Create(c));
  KVMEM_ASSERT_OK(cache->AddRequest(1));
  KVMEM_ASSERT_OK(cache->Extend(1, 1));
  const int64_t first = cache->GetStats().pages_used;
  EXPECT_GE(first, 1);
  // The shapes' tokens divide the pages, so a unit holds whole pages.
  KVMEM_ASSERT_OK(cache->Extend(1, plan.unit_tokens - 1));
  EXPECT_EQ(cache->GetStats().pages_used, first) << plan.unit_tokens << " tokens";
  KVMEM_ASSERT_OK(cache->Extend(1, 1));
  EXPECT_GT(cache->GetStats().pages_used, first) << plan.unit_tokens + 1 << " tokens";
}

TEST_P(MemoryPlanTest, MinBudgetIsTheSmallestCreateAccepts) {
  KvCacheConfig c = Config();
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan plan, PlanMemory(c));
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan minimal, PlanMinimalMemory(c));
  const int64_t min = plan.min_budget_bytes;
  EXPECT_EQ(minimal.min_budget_bytes, min);
  EXPECT_EQ(minimal.budget_bytes, min);
  EXPECT_EQ(minimal.pages_per_request, plan.pages_per_request);
  if (c.layout == Layout::kPaged) {
    // Every pool is mapped in whole granules: a multiple of 2 x layers granules, which
    // may hold more pages than one request needs.
    EXPECT_EQ(min % (2 * c.num_layers * plan.granularity), 0);
    EXPECT_GE(minimal.pages_total, plan.pages_per_request);
    EXPECT_GE(minimal.max_full_requests, 1);
  } else {
    EXPECT_EQ(min, plan.pages_per_request * plan.granularity);
    EXPECT_EQ(minimal.pages_total, plan.pages_per_request);
    EXPECT_EQ(minimal.max_full_requests, 1);
  }

  c.memory_budget_bytes = min;
  KVMEM_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KvCache> cache, KvCache::Create(c));
  EXPECT_EQ(cache->GetStats().pages_total, minimal.pages_total);
  KVMEM_ASSERT_OK(cache->AddRequest(1));
  KVMEM_EXPECT_OK(cache->Extend(1, c.max_context));
  cache.reset();

  c.memory_budget_bytes = min - 1;
  const absl::Status created = KvCache::Create(c).status();
  EXPECT_EQ(created.code(), absl::StatusCode::kInvalidArgument) << created;
  EXPECT_EQ(PlanMemory(c).status(), created);
  // Whatever the budget, the minimal plan is the same.
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan again, PlanMinimalMemory(c));
  EXPECT_EQ(again.min_budget_bytes, min);
}

TEST_P(MemoryPlanTest, ABudgetBeyondWhatTheRowsUseHoldsWhatTheyUse) {
  KvCacheConfig c = GetParam().config;
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan minimal, PlanMinimalMemory(c));
  c.memory_budget_bytes = minimal.min_budget_bytes * (c.max_requests + 4);
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan plan, PlanMemory(c));
  EXPECT_EQ(plan.max_full_requests, c.max_requests);
  KVMEM_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KvCache> cache, KvCache::Create(c));
  EXPECT_EQ(plan.pages_total, cache->GetStats().pages_total);
  EXPECT_EQ(plan.physical_bytes, c.layout == Layout::kVirtual ? cache->GetStats().physical_bytes
                                                              : plan.reservation_bytes);
}

INSTANTIATE_TEST_SUITE_P(Layouts, MemoryPlanTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<PlanCase>& info) {
                           return info.param.name;
                         });

// Configs Create rejects before it takes memory: PlanMemory returns Create's status.
TEST(MemoryPlanErrors, SameInvalidArgumentAsCreate) {
  KvCacheConfig base;
  base.max_requests = 4;
  base.max_context = 1024;
  base.memory_budget_bytes = int64_t{1} << 30;
  struct Bad {
    const char* what;
    void (*apply)(KvCacheConfig*);
  };
  const Bad bad[] = {
      {"no layers", [](KvCacheConfig* c) { c->num_layers = 0; }},
      {"head_dim 0", [](KvCacheConfig* c) { c->head_dim = 0; }},
      {"page_tokens 0", [](KvCacheConfig* c) { c->page_tokens = 0; }},
      {"chunk_tokens 3", [](KvCacheConfig* c) { c->chunk_tokens = 3; }},
      {"max_context 0", [](KvCacheConfig* c) { c->max_context = 0; }},
      {"max_context 2^30 + 1", [](KvCacheConfig* c) { c->max_context = (int64_t{1} << 30) + 1; }},
      {"no budget", [](KvCacheConfig* c) { c->memory_budget_bytes = 0; }},
      {"budget of one page", [](KvCacheConfig* c) { c->memory_budget_bytes = 2 << 20; }},
      {"host granularity 1000", [](KvCacheConfig* c) { c->host_granularity = 1000; }},
      {"map_ahead_tokens -1", [](KvCacheConfig* c) { c->map_ahead_tokens = -1; }},
  };
  for (Layout layout : {Layout::kPaged, Layout::kVirtual}) {
    for (const Bad& b : bad) {
      SCOPED_TRACE(testing::Message() << b.what << (layout == Layout::kPaged ? ", paged" : ""));
      KvCacheConfig c = base;
      c.layout = layout;
      b.apply(&c);
      const absl::Status created = KvCache::Create(c).status();
      EXPECT_EQ(created.code(), absl::StatusCode::kInvalidArgument) << created;
      EXPECT_EQ(PlanMemory(c).status(), created);
    }
  }
}

// A virtual cache creates only the pages its rows can map at once (every row at
// max_context, and the copy-on-write staging page): a larger budget buys no more. Past
// 2^31 - 1 such pages the layout's page ids do not fit: InvalidArgument.
TEST(MemoryPlanErrors, VirtualBudgetOfTooManyPages) {
  KvCacheConfig c;
  c.layout = Layout::kVirtual;
  c.max_requests = 1;
  c.max_context = 1024;
  c.host_granularity = 4096;
  c.memory_budget_bytes = (int64_t{1} << 31) * 4096;  // 2^31 pages
  absl::StatusOr<MemoryPlan> plan = PlanMemory(c);
  KVMEM_ASSERT_OK(plan);
  EXPECT_EQ(plan->pages_total, plan->pages_per_request + 1);
  absl::StatusOr<std::unique_ptr<KvCache>> small = KvCache::Create(c);
  KVMEM_ASSERT_OK(small);
  EXPECT_EQ((*small)->GetStats().pages_total, plan->pages_total);
  // 65536 rows of 65536 pages (2048 tokens of 128 KiB, 4 KiB pages) can map 2^32 pages.
  c.max_requests = 65536;
  c.max_context = 2048;
  const absl::Status created = KvCache::Create(c).status();
  EXPECT_EQ(created.code(), absl::StatusCode::kInvalidArgument) << created;
  EXPECT_EQ(PlanMemory(c).status(), created);
}

// Pools whose host bookkeeping (a record per page and per physical handle) would pass
// what a cache may take on any host: Create checks that before it allocates, and so does
// the plan.
TEST(MemoryPlanErrors, HostBookkeepingAsCreate) {
  KvCacheConfig paged;  // 64 pools of 4 KiB granules: 2^27 handles at this budget
  paged.page_tokens = 16;
  paged.max_requests = 128;
  paged.max_context = 32768;
  paged.host_granularity = 4096;
  paged.memory_budget_bytes = int64_t{1} << 40;
  KvCacheConfig virt;  // 2^27 physical pages of 4 KiB
  virt.layout = Layout::kVirtual;
  virt.chunk_tokens = 1;
  virt.max_requests = 1024;
  virt.max_context = 4096;
  virt.host_granularity = 4096;
  virt.memory_budget_bytes = int64_t{1} << 39;
  for (const KvCacheConfig& c : {paged, virt}) {
    const absl::Status created = KvCache::Create(c).status();
    EXPECT_EQ(created.code(), absl::StatusCode::kInvalidArgument) << created;
    EXPECT_TRUE(absl::StrContains(created.message(), "bookkeeping")) << created;
    EXPECT_EQ(PlanMemory(c).status(), created);
  }
}

TEST(MemoryPlanErrors, MinimalPlanRejectsBadShapes) {
  KvCacheConfig c;
  c.num_kv_heads = 0;
  KVMEM_EXPECT_CODE(PlanMinimalMemory(c), absl::StatusCode::kInvalidArgument);
  c = KvCacheConfig();
  c.memory_budget_bytes = 0;  // ignored
  KVMEM_EXPECT_OK(PlanMinimalMemory(c));
}

// On CUDA the plan uses the driver's granularity; without a driver it returns the
// backend's status (Unavailable), as Create does.
TEST(MemoryPlanCuda, DriverGranularityOrTheBackendsStatus) {
  KvCacheConfig c;
  c.device = DeviceKind::kCuda;
  c.max_requests = 4;
  c.max_context = 1024;
  absl::StatusOr<std::unique_ptr<Vmm>> vmm = MakeCudaVmm(c.device_ordinal);
  absl::StatusOr<MemoryPlan> plan = PlanMemory(c);
  if (!vmm.ok()) {
    EXPECT_EQ(plan.status(), vmm.status());
    return;
  }
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->granularity, (*vmm)->granularity());
}

TEST(MemoryPlanHost, HostGranularityWithoutABackend) {
  KvCacheConfig c;
  c.host_granularity = 4096;
  c.max_context = 256;                        // 32 MiB a request
  c.memory_budget_bytes = int64_t{64} << 20;  // 16384 mappings of 4 KiB: within any limit
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan plan, PlanMemory(c));
  EXPECT_EQ(plan.granularity, 4096);
  c.host_granularity = int64_t{2} << 20;
  c.memory_budget_bytes = int64_t{256} << 20;  // 64 pools of whole 2 MiB granules
  KVMEM_ASSERT_OK_AND_ASSIGN(const MemoryPlan big, PlanMemory(c));
  EXPECT_EQ(big.granularity, int64_t{2} << 20);
}

}  // namespace
}  // namespace kvmem
