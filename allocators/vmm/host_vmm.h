// Internal hooks into the host memory backend (MakeHostVmm in kvmem/vmm.h) that the
// Vmm interface has no place for: tests use them to prove that released physical
// memory really goes back to the OS.
#ifndef KVMEM_ALLOCATORS_VMM_HOST_VMM_H_
#define KVMEM_ALLOCATORS_VMM_HOST_VMM_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

// Bytes of physical memory the host backend's memfd holds now (the file's allocated
// blocks, not its size). InvalidArgument when `vmm` is not a host backend.
absl::StatusOr<int64_t> HostVmmResidentBytes(const Vmm& vmm);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VMM_HOST_VMM_H_
