// Implementation of allocators/vmm/device_memory.h.
#include "allocators/vmm/device_memory.h"

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kvmem/vmm.h"
#include "src/core/logging.h"

namespace kvmem::internal {
namespace {

// Whether the warning about a pool that may grow past the device's free memory was
// logged: once per process, however many caches are created.
std::atomic<bool> warned_growth{false};

}  // namespace

absl::Status CheckDeviceMemory(const Vmm& vmm, const DeviceMemoryNeed& need) {
  if (need.pool_bytes <= 0) return absl::OkStatus();
  absl::StatusOr<DeviceMemory> memory = vmm.AvailableMemory();
  if (absl::IsUnimplemented(memory.status())) return absl::OkStatus();
  if (!memory.ok()) {
    return absl::Status(memory.status().code(),
                        absl::StrFormat("%s: asking the device for its free memory: %s",
                                        need.layout, memory.status().message()));
  }
  const int64_t granularity = vmm.granularity();
  const int64_t pool_handles = granularity > 0 ? need.pool_bytes / granularity : 0;
  if (!need.created_up_front) {
    if (need.pool_bytes > memory->free_bytes && !warned_growth.exchange(true)) {
      Logger()->warn(
          "{}: the pool may grow to {} bytes ({} physical handles of {} bytes) as requests "
          "grow, more than the {} bytes free on {} ({} bytes in all); growth past the free "
          "memory fails with ResourceExhausted (said once per process)",
          need.layout, need.pool_bytes, pool_handles, granularity, memory->free_bytes,
          memory->device, memory->total_bytes);
    }
    return absl::OkStatus();
  }
  if (need.pool_bytes <= memory->free_bytes) return absl::OkStatus();

  const bool never_fits = need.pool_bytes > memory->total_bytes;
  std::vector<std::string> fixes;
  // A budget of at most the free memory makes a pool of at most that much (both layouts
  // round the budget down to whole handles), if it still holds one request.
  const int64_t fits = granularity > 0 ? memory->free_bytes / granularity * granularity : 0;
  if (fits >= need.min_budget_bytes && fits > 0) {
    fixes.push_back(absl::StrFormat("a smaller budget: memory_budget_bytes <= %d", fits));
  } else {
    fixes.push_back(absl::StrFormat(
        "a smaller model shape or max_context: one request at max_context needs %d bytes, "
        "more than is free",
        need.min_budget_bytes));
  }
  if (!need.grow_lazily_fix.empty()) {
    fixes.push_back(
        absl::StrFormat("%s, which creates memory only as requests grow", need.grow_lazily_fix));
  }
  if (!never_fits) {
    fixes.push_back("free memory on the device (other caches, allocations or processes)");
  }
  const std::string text = absl::StrFormat(
      "%s: Create would create %d bytes of physical memory up front (%d handles of %d bytes, "
      "the pool for a budget of %d bytes), but %s has %d bytes free of %d; Create stopped "
      "before creating any. Any one of these fixes it: %s",
      need.layout, need.pool_bytes, pool_handles, granularity, need.budget_bytes, memory->device,
      memory->free_bytes, memory->total_bytes, absl::StrJoin(fixes, "; "));
  return never_fits ? absl::InvalidArgumentError(text) : absl::ResourceExhaustedError(text);
}

}  // namespace kvmem::internal
