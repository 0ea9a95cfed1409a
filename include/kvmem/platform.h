// Macros shared by host and device code: one accessor header serves g++ and nvcc.
#ifndef KVMEM_PLATFORM_H_
#define KVMEM_PLATFORM_H_

#if defined(__CUDACC__)
#define KVMEM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVMEM_HOST_DEVICE inline
#endif

#endif  // KVMEM_PLATFORM_H_
