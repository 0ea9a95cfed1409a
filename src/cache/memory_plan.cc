// PlanMemory: KvCache::Create's sizing without its memory. The numbers come from the
// layouts' own geometry (allocators/layout/kv_layout.h), so they cannot drift from what a
// created cache holds.
#include "kvmem/memory_plan.h"

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "allocators/layout/kv_layout.h"
#include "kvmem/config.h"
#include "kvmem/vmm.h"
#include "src/core/status_macros.h"

namespace kvmem {
namespace {

// The granularity of the backend Create would use. The host backend's is the config's;
// the driver's is only known by asking it, so CUDA opens the backend (and closes it).
absl::StatusOr<int64_t> BackendGranularity(const KvCacheConfig& config) {
  if (config.vmm != nullptr) return config.vmm->granularity();
  if (config.device == DeviceKind::kHost) return config.host_granularity;
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Vmm> vmm, MakeCudaVmm(config.device_ordinal));
  return vmm->granularity();
}

absl::StatusOr<MemoryPlan> Plan(const KvCacheConfig& config, bool minimal_budget) {
  // Create's order: the shape first, then the backend, then the layout.
  KVMEM_RETURN_IF_ERROR(ValidateShape(config));
  KVMEM_ASSIGN_OR_RETURN(const int64_t granularity, BackendGranularity(config));
  return config.layout == Layout::kPaged
             ? internal::PlanPagedLayout(config, granularity, minimal_budget)
             : internal::PlanVirtualLayout(config, granularity, minimal_budget);
}

}  // namespace

absl::StatusOr<MemoryPlan> PlanMemory(const KvCacheConfig& config) { return Plan(config, false); }

absl::StatusOr<MemoryPlan> PlanMinimalMemory(const KvCacheConfig& config) {
  // Any valid budget: the layouts replace it with the smallest that fits.
  KvCacheConfig any_budget = config;
  any_budget.memory_budget_bytes = 1;
  return Plan(any_budget, true);
}

}  // namespace kvmem
