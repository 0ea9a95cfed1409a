// Macros shared by host and device code (one accessor header serves g++ and nvcc) and by
// C and C++ (c_api.h).
#ifndef KVMEM_PLATFORM_H_
#define KVMEM_PLATFORM_H_

#if defined(__CUDACC__)
#define KVMEM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVMEM_HOST_DEVICE inline
#endif

// Symbols of libkvmem.so. Everything is built with hidden visibility; the public API (the
// C ABI of c_api.h and the C++ API of these headers) is marked KVMEM_EXPORT. Plain C too.
#if defined(__GNUC__) || defined(__clang__)
#define KVMEM_EXPORT __attribute__((visibility("default")))
#else
#define KVMEM_EXPORT
#endif

#endif  // KVMEM_PLATFORM_H_
