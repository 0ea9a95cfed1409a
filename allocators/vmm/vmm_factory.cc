// Backend selection that does not depend on whether CUDA was built.
#include <memory>

#include "absl/status/status.h"
#include "kvmem/vmm.h"
#ifdef KVMEM_WITH_CUDA
#include "allocators/vmm/cuda_vmm_factory.h"
#endif

namespace kvmem {

std::string_view VmmOpName(VmmOp op) {
  switch (op) {
    case VmmOp::kReserve:
      return "reserve";
    case VmmOp::kFreeReservation:
      return "free_reservation";
    case VmmOp::kCreate:
      return "create";
    case VmmOp::kRelease:
      return "release";
    case VmmOp::kMap:
      return "map";
    case VmmOp::kSetAccess:
      return "set_access";
    case VmmOp::kUnmap:
      return "unmap";
    case VmmOp::kCopy:
      return "copy";
    case VmmOp::kCount:
      break;
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<Vmm>> MakeCudaVmm(int ordinal) {
#ifdef KVMEM_WITH_CUDA
  return internal::MakeCudaVmmImpl(ordinal);
#else
  return absl::UnavailableError(
      "kvmem was built without CUDA (no nvcc found at configure time); only device = host "
      "is available");
#endif
}

}  // namespace kvmem
