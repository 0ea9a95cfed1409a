// The CUDA driver entry points kvmem uses, resolved at run time from libcuda.so.1 with
// dlopen + dlsym. kvmem never links against libcuda, so the library (and every binary
// built with CUDA) loads and runs on machines without a driver; there the CUDA backend
// reports Unavailable instead of failing to load. <cuda.h> is used for types only.
//
// Thread safety: the table is loaded once (thread-safe) and immutable afterwards; the
// driver's own calls are thread-safe.
#ifndef KVMEM_ALLOCATORS_VMM_CUDA_DRIVER_H_
#define KVMEM_ALLOCATORS_VMM_CUDA_DRIVER_H_

#include <cuda.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvmem::internal {

// One pointer per driver entry point, typed from the declarations of <cuda.h>. The
// declarations are macros for versioned symbols (cuMemcpyDtoDAsync is
// cuMemcpyDtoDAsync_v2): decltype and the resolved symbol name both follow the macro,
// so the type always matches the ABI of the symbol loaded.
struct CudaDriver {
#define KVMEM_CUDA_DRIVER_ENTRY_POINTS(X) \
  X(cuInit)                               \
  X(cuDriverGetVersion)                   \
  X(cuGetErrorName)                       \
  X(cuGetErrorString)                     \
  X(cuDeviceGetCount)                     \
  X(cuDeviceGet)                          \
  X(cuDeviceGetName)                      \
  X(cuDeviceGetAttribute)                 \
  X(cuDevicePrimaryCtxRetain)             \
  X(cuDevicePrimaryCtxRelease)            \
  X(cuCtxGetCurrent)                      \
  X(cuCtxPushCurrent)                     \
  X(cuCtxPopCurrent)                      \
  X(cuMemGetInfo)                         \
  X(cuMemGetAllocationGranularity)        \
  X(cuMemAddressReserve)                  \
  X(cuMemAddressFree)                     \
  X(cuMemCreate)                          \
  X(cuMemRelease)                         \
  X(cuMemMap)                             \
  X(cuMemUnmap)                           \
  X(cuMemSetAccess)                       \
  X(cuMemcpyDtoDAsync)                    \
  X(cuStreamCreate)                       \
  X(cuStreamDestroy)                      \
  X(cuStreamSynchronize)                  \
  X(cuEventQuery)
#define KVMEM_CUDA_DRIVER_FIELD(name) decltype(&::name) name = nullptr;
  KVMEM_CUDA_DRIVER_ENTRY_POINTS(KVMEM_CUDA_DRIVER_FIELD)
#undef KVMEM_CUDA_DRIVER_FIELD
};

// The driver table, loaded on first use (dlopen("libcuda.so.1") and every entry point
// resolved, then cuInit(0)). Unavailable, saying what was missing, when there is no
// driver library, an entry point is absent (driver too old for the VMM API) or cuInit
// fails (no device, driver / kernel module mismatch). The result is cached: a process
// that found no driver keeps reporting the same status.
absl::StatusOr<const CudaDriver*> GetCudaDriver();

// "CUDA_ERROR_OUT_OF_MEMORY (out of memory)": the driver's name and text for `result`,
// or the number where the driver cannot name it.
std::string CudaErrorText(const CudaDriver* driver, CUresult result);

// Maps a failed driver call to a Status: CUDA_ERROR_OUT_OF_MEMORY is ResourceExhausted,
// CUDA_ERROR_INVALID_VALUE InvalidArgument, no device / no driver Unavailable, anything
// else Internal. The message is "`what`: <name> (<text>)". OK for CUDA_SUCCESS.
absl::Status CudaStatus(const CudaDriver* driver, CUresult result, std::string_view what);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VMM_CUDA_DRIVER_H_
