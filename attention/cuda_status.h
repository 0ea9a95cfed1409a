// CUDA runtime errors as absl::Status, and device attribute queries, for the attention
// launchers and workspaces (internal). Host code only: builds with the host compiler.
#ifndef KVMEM_ATTENTION_CUDA_STATUS_H_
#define KVMEM_ATTENTION_CUDA_STATUS_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kvmem::internal {

// Wraps a CUDA runtime error as Internal with the call that failed.
inline absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

// Attribute `attr` of the current device.
inline absl::StatusOr<int> CurrentDeviceAttribute(cudaDeviceAttr attr) {
  int device = 0;
  int value = 0;
  if (const absl::Status st = CudaStatus(cudaGetDevice(&device), "cudaGetDevice"); !st.ok()) {
    return st;
  }
  if (const absl::Status st =
          CudaStatus(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
      !st.ok()) {
    return st;
  }
  return value;
}

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_CUDA_STATUS_H_
