#include "tools/kvbench/sizing.h"

#include <cstdint>

#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "kvmem/memory_plan.h"
#include "tools/kvbench/status_macros.h"

namespace kvbench {

absl::StatusOr<int64_t> RequestPages(const kvmem::KvCacheConfig& config,
                                     const kvmem::MemoryPlan& plan, int64_t tokens) {
  if (tokens == 0) return 0;
  kvmem::KvCacheConfig one = config;
  one.max_context = tokens;
  one.chunk_tokens = static_cast<int>(plan.chunk_tokens);
  one.device = kvmem::DeviceKind::kHost;
  one.host_granularity = plan.granularity;
  one.vmm = nullptr;
  KVBENCH_ASSIGN_OR_RETURN(const kvmem::MemoryPlan request, kvmem::PlanMinimalMemory(one));
  return request.pages_per_request;
}

}  // namespace kvbench
