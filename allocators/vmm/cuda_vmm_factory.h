// Entry point of the CUDA driver backend, defined in allocators/cuda_vmm.cc (built only
// with CUDA). MakeCudaVmm() in vmm_factory.cc forwards here.
#ifndef KVMEM_ALLOCATORS_VMM_CUDA_VMM_FACTORY_H_
#define KVMEM_ALLOCATORS_VMM_CUDA_VMM_FACTORY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {
absl::StatusOr<std::unique_ptr<Vmm>> MakeCudaVmmImpl(int ordinal);
}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VMM_CUDA_VMM_FACTORY_H_
