// The check a layout's Create makes against the device's physical memory before it
// creates any handle (internal): what Create itself creates up front must fit in the
// memory the device has free (Vmm::AvailableMemory, cuMemGetInfo on CUDA), rather than
// handles being created until the driver runs out. Memory created as requests grow (an
// elastic paged pool) is not needed at Create: a pool that could grow past the free
// memory only logs a warning, once per process.
#ifndef KVMEM_ALLOCATORS_VMM_DEVICE_MEMORY_H_
#define KVMEM_ALLOCATORS_VMM_DEVICE_MEMORY_H_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

// What a layout's pool takes from the device's physical memory.
struct DeviceMemoryNeed {
  std::string_view layout = {};  // "paged layout", "virtual layout": the message's start
  int64_t pool_bytes = 0;        // physical memory of the whole pool: every handle it can hold
  bool created_up_front = true;  // Create creates all of it (else as requests grow)
  int64_t budget_bytes = 0;      // config.memory_budget_bytes
  int64_t min_budget_bytes = 0;  // the smallest budget that holds one request at max_context
  // The config change that creates the memory as requests grow instead, for the message
  // ("elastic_pool = true"); empty where the layout has none.
  std::string_view grow_lazily_fix = {};
};

// Checks `need` against vmm.AvailableMemory(). OK where the backend cannot tell
// (Unimplemented). For a pool created up front: InvalidArgument when it is larger than
// the device's whole memory (it can never be created there), ResourceExhausted when it is
// larger than the memory free now (it could be, with less else on the device); both
// messages give the numbers and the fixes (a smaller budget, `grow_lazily_fix`, freeing
// memory on the device). A pool created as requests grow is no error: when it could grow
// past the free memory, one warning per process says so. Another error of
// AvailableMemory (a failing driver) is returned with the layout named.
absl::Status CheckDeviceMemory(const Vmm& vmm, const DeviceMemoryNeed& need);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VMM_DEVICE_MEMORY_H_
