// Shared pieces of the kvbench GPU benchmarks (decode_bench.cu, prefill_bench.cu): a
// device buffer, a fast random bf16 fill, the median of event-timed launches, the
// current device's properties and a CUDA check that reports and fails.
#ifndef KVMEM_TOOLS_KVBENCH_BENCH_UTIL_H_
#define KVMEM_TOOLS_KVBENCH_BENCH_UTIL_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

// Evaluates a CUDA runtime call; on an error prints "<who>: <call>: <error>" to stderr
// and returns false from the enclosing function.
#define KVBENCH_CUDA(who, expr)                                                   \
  do {                                                                            \
    const cudaError_t err_ = (expr);                                              \
    if (err_ != cudaSuccess) {                                                    \
      std::fprintf(stderr, "%s: %s: %s\n", who, #expr, cudaGetErrorString(err_)); \
      return false;                                                               \
    }                                                                             \
  } while (0)

namespace kvbench {

// Owns one cudaMalloc'd buffer.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  bool Allocate(size_t bytes) {
    cudaFree(ptr_);
    ptr_ = nullptr;
    return cudaMalloc(&ptr_, bytes) == cudaSuccess;
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

// Fills `bytes` of device memory with random bf16 in [-1, 1) (never zeros) from a hash
// of the index and `seed`; on a launch error reports it as `who` and returns false.
bool FillRandom(void* p, int64_t bytes, uint32_t seed, const char* who);

// Event-timed runs of fn(rep) after `warmup` untimed ones, fn(0) to fn(warmup - 1), in
// milliseconds, sorted. before(rep), when given, runs ahead of each timed rep outside its
// events (a diagnostic: a spacer kernel between timed launches).
template <typename Fn, typename Before>
std::vector<double> SortedMs(int warmup, int reps, Fn&& fn, Before&& before) {
  for (int r = 0; r < warmup; ++r) fn(r);
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) cudaEventCreate(&e);
  for (int r = 0; r < reps; ++r) {
    before(warmup + r);
    cudaEventRecord(ev[2 * r]);
    fn(warmup + r);
    cudaEventRecord(ev[2 * r + 1]);
  }
  cudaEventSynchronize(ev.back());
  std::vector<double> ms(reps);
  for (int r = 0; r < reps; ++r) {
    float t = 0.f;
    cudaEventElapsedTime(&t, ev[2 * r], ev[2 * r + 1]);
    ms[r] = t;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  return ms;
}

// Median of `reps` event-timed runs of fn(rep) after `warmup` untimed ones (milliseconds).
template <typename Fn>
double MedianMs(int warmup, int reps, Fn&& fn) {
  return SortedMs(warmup, reps, std::forward<Fn>(fn), [](int) {})[reps / 2];
}

// Keeps the device busy for about `us` microseconds (one CTA spinning on the global
// timer): a gap between timed launches that no launch of the timed kernel fills.
void LaunchSpacer(int us);

// The current device's properties; false (reported as `who`) where there is no device.
bool CurrentDeviceProperties(cudaDeviceProp* prop, const char* who);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_BENCH_UTIL_H_
