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

// What the layouts need of the backend Create would use: its granularity and whether
// it is a device. The host backend's granularity is the config's; the driver's is only
// known by asking it, so CUDA opens the backend (and closes it).
struct Backend {
  int64_t granularity = 0;
  bool device = false;
};

absl::StatusOr<Backend> BackendOf(const KvCacheConfig& config) {
  if (config.vmm != nullptr) return Backend{config.vmm->granularity(), config.vmm->is_device()};
  if (config.device == DeviceKind::kHost) return Backend{config.host_granularity, false};
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Vmm> vmm, MakeCudaVmm(config.device_ordinal));
  return Backend{vmm->granularity(), vmm->is_device()};
}

absl::StatusOr<MemoryPlan> Plan(const KvCacheConfig& config, bool minimal_budget) {
  // Create's order: the shape first, then the backend, then the layout.
  KVMEM_RETURN_IF_ERROR(ValidateShape(config));
  KVMEM_ASSIGN_OR_RETURN(const Backend backend, BackendOf(config));
  return config.layout == Layout::kPaged
             ? internal::PlanPagedLayout(config, backend.granularity, backend.device,
                                         minimal_budget)
             : internal::PlanVirtualLayout(config, backend.granularity, backend.device,
                                           minimal_budget);
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
