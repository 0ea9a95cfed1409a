// Loads the CUDA driver at run time (see cuda_driver.h): dlopen of libcuda.so.1, one
// dlsym per entry point, cuInit. Nothing here links against libcuda.
#include "allocators/vmm/cuda_driver.h"

#include <dlfcn.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "src/core/logging.h"

namespace kvmem::internal {
namespace {

// Two levels so that the argument is macro-expanded first: KVMEM_SYMBOL(cuMemcpyDtoDAsync)
// is "cuMemcpyDtoDAsync_v2", the symbol whose ABI <cuda.h> declares under that name.
#define KVMEM_STRINGIFY_INNER_(x) #x
#define KVMEM_SYMBOL(x) KVMEM_STRINGIFY_INNER_(x)

absl::StatusOr<const CudaDriver*> LoadDriver() {
  // The library stays loaded for the life of the process: objects holding driver
  // resources may be destroyed during exit, after any point where we could close it.
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    return absl::UnavailableError(absl::StrFormat(
        "CUDA driver not found: dlopen(\"libcuda.so.1\") failed (%s); no NVIDIA driver is "
        "installed on this machine, so only device = host is available",
        err != nullptr ? err : "unknown error"));
  }
  static CudaDriver driver;
#define KVMEM_RESOLVE(name)                                                               \
  {                                                                                       \
    void* sym = dlsym(lib, KVMEM_SYMBOL(name));                                           \
    if (sym == nullptr) {                                                                 \
      return absl::UnavailableError(absl::StrFormat(                                      \
          "CUDA driver too old: libcuda.so.1 has no %s (kvmem needs the VMM API of CUDA " \
          ">= 11.2)",                                                                     \
          KVMEM_SYMBOL(name)));                                                           \
    }                                                                                     \
    driver.name = reinterpret_cast<decltype(driver.name)>(sym);                           \
  }
  KVMEM_CUDA_DRIVER_ENTRY_POINTS(KVMEM_RESOLVE)
#undef KVMEM_RESOLVE

  const CUresult init = driver.cuInit(0);
  if (init != CUDA_SUCCESS) {
    return absl::UnavailableError(
        absl::StrFormat("CUDA driver present but cuInit failed: %s (no usable GPU, or the "
                        "driver library and kernel module do not match)",
                        CudaErrorText(&driver, init)));
  }
  int version = 0;
  driver.cuDriverGetVersion(&version);
  Logger()->debug("CUDA driver loaded: version {}.{}", version / 1000, (version % 1000) / 10);
  return &driver;
}

}  // namespace

absl::StatusOr<const CudaDriver*> GetCudaDriver() {
  // A function-local static is initialised once, even with concurrent first callers.
  static const absl::StatusOr<const CudaDriver*> driver = LoadDriver();
  return driver;
}

std::string CudaErrorText(const CudaDriver* driver, CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (driver != nullptr && driver->cuGetErrorName != nullptr) {
    if (driver->cuGetErrorName(result, &name) != CUDA_SUCCESS) name = nullptr;
    if (driver->cuGetErrorString(result, &text) != CUDA_SUCCESS) text = nullptr;
  }
  if (name == nullptr) return absl::StrFormat("CUresult %d", static_cast<int>(result));
  if (text == nullptr) return name;
  return absl::StrFormat("%s (%s)", name, text);
}

absl::Status CudaStatus(const CudaDriver* driver, CUresult result, std::string_view what) {
  if (result == CUDA_SUCCESS) return absl::OkStatus();
  const std::string msg = absl::StrFormat("%s: %s", what, CudaErrorText(driver, result));
  switch (result) {
    case CUDA_ERROR_OUT_OF_MEMORY:
      return absl::ResourceExhaustedError(msg);
    case CUDA_ERROR_INVALID_VALUE:
      return absl::InvalidArgumentError(msg);
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_INVALID_DEVICE:
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_DEINITIALIZED:
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
    case CUDA_ERROR_NOT_SUPPORTED:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace kvmem::internal
