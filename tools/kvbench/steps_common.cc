#include "tools/kvbench/steps_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "tools/kvbench/status_macros.h"

namespace kvbench {

Sample Summarize(std::vector<double> ns, double units) {
  Sample s;
  s.reps = static_cast<int>(ns.size());
  if (ns.empty() || units <= 0) return s;
  std::sort(ns.begin(), ns.end());
  s.min = ns.front() / units;
  s.median = ns[ns.size() / 2] / units;
  return s;
}

kvmem::KvCacheConfig StepsConfig(const StepsShape& shape, const StepsLayout& layout,
                                 int max_requests, int64_t max_context, int64_t budget_bytes) {
  kvmem::KvCacheConfig c;
  c.num_layers = shape.layers;
  c.num_kv_heads = shape.kv_heads;
  c.head_dim = shape.head_dim;
  c.dtype = kvmem::DType::kBFloat16;
  c.layout = layout.layout;
  c.arrangement = layout.arrangement;
  c.page_tokens = layout.page_tokens;
  c.chunk_tokens = layout.chunk_tokens;
  c.max_requests = max_requests;
  c.max_context = max_context;
  c.memory_budget_bytes = budget_bytes;
  c.device = kvmem::DeviceKind::kHost;
  c.host_granularity = shape.granularity;
  return c;
}

absl::StatusOr<int64_t> BudgetFor(const kvmem::KvCacheConfig& config,
                                  absl::Span<const int64_t> lengths) {
  KVBENCH_ASSIGN_OR_RETURN(const kvmem::MemoryPlan plan, kvmem::PlanMinimalMemory(config));
  const int64_t unit = std::max<int64_t>(1, plan.unit_tokens);
  int64_t tokens = 0;
  for (int64_t n : lengths) tokens += (n + unit - 1) / unit * unit;
  // Granules a paged pool rounds each of its 2 x layers pools up to, and the page that
  // copy on write stages in the virtual layout.
  const int64_t spare = (2 * int64_t{config.num_layers} + 2) * plan.granularity;
  const int64_t g = plan.granularity;
  const int64_t budget = (tokens * plan.token_bytes + spare + g - 1) / g * g;
  return std::max(budget, plan.min_budget_bytes);
}

absl::StatusOr<std::unique_ptr<kvmem::KvCache>> MakeStepsCache(
    const StepsShape& shape, const StepsLayout& layout, int max_requests, int64_t max_context,
    absl::Span<const int64_t> lengths, double scale) {
  kvmem::KvCacheConfig config = StepsConfig(shape, layout, max_requests, max_context, 0);
  KVBENCH_ASSIGN_OR_RETURN(const int64_t needed, BudgetFor(config, lengths));
  const int64_t g = shape.granularity;
  config.memory_budget_bytes =
      (static_cast<int64_t>(std::ceil(static_cast<double>(needed) * scale)) + g - 1) / g * g;
  return kvmem::KvCache::Create(config);
}

std::vector<int64_t> ContextMix(int batch, int64_t min, int64_t max, int64_t growth,
                                int64_t max_tokens) {
  std::vector<int64_t> lens(batch);
  double sum = 0;
  const double ratio = static_cast<double>(max) / static_cast<double>(min);
  for (int i = 0; i < batch; ++i) {
    // The golden-ratio sequence: every prefix of it covers [0, 1) evenly.
    const double u = std::fmod((i + 1) * 0.6180339887498949, 1.0);
    lens[i] = std::clamp<int64_t>(std::llround(min * std::pow(ratio, u)), min, max);
    sum += static_cast<double>(lens[i]);
  }
  const double room = static_cast<double>(max_tokens) - static_cast<double>(batch) * growth;
  if (sum > room) {
    const double f = std::max(room, 0.0) / sum;
    for (int64_t& n : lens) n = std::max<int64_t>(1, std::llround(static_cast<double>(n) * f));
  }
  return lens;
}

absl::Status Prefill(kvmem::KvCache* cache, kvmem::RequestId id, int64_t n,
                     std::vector<int64_t>* scratch) {
  if (static_cast<int64_t>(scratch->size()) < n) scratch->resize(n);
  return cache->ExtendBatch({&id, 1}, {&n, 1}, absl::MakeSpan(*scratch));
}

namespace {
volatile int64_t consumed = 0;
}  // namespace

void Consume(int64_t v) { consumed = consumed + v; }

}  // namespace kvbench
