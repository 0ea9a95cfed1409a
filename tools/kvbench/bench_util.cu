// Implementation of tools/kvbench/bench_util.h: the random-fill kernel and the helpers
// that need no templates.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "tools/kvbench/bench_util.h"

namespace kvbench {
namespace {

// Random bf16 in [-1, 1) from a hash of the index: never zeros, fast to fill gigabytes.
__global__ void FillRandomBf16(uint16_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 0x9e3779b9u ^ static_cast<uint32_t>(i >> 32) ^ seed;
    x ^= x >> 16;
    x *= 0x85ebca6bu;
    x ^= x >> 13;
    x *= 0xc2b2ae35u;
    x ^= x >> 16;
    const float f = static_cast<float>(x >> 8) * (2.f / 16777216.f) - 1.f;
    const uint32_t u = __float_as_uint(f);
    p[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

__global__ void Spin(int64_t ns) {
  uint64_t t0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (;;) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (static_cast<int64_t>(t - t0) >= ns) break;
  }
}

}  // namespace

void LaunchSpacer(int us) { Spin<<<1, 32>>>(int64_t{us} * 1000); }

bool FillRandom(void* p, int64_t bytes, uint32_t seed, const char* who) {
  FillRandomBf16<<<1024, 256>>>(static_cast<uint16_t*>(p), bytes / 2, seed);
  KVBENCH_CUDA(who, cudaGetLastError());
  return true;
}

bool CurrentDeviceProperties(cudaDeviceProp* prop, const char* who) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaGetDeviceProperties(prop, device) != cudaSuccess) {
    std::fprintf(stderr, "%s: no CUDA device\n", who);
    return false;
  }
  return true;
}

}  // namespace kvbench
