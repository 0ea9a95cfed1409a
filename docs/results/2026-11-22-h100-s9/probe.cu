// Diagnostic: where do the last microseconds of a decode launch go?
// (a) launch overhead of empty kernels by config; (b) the decode kernel's memory traffic
// without its math, token-major (kvmem virtual-layer) vs head-major (cuDNN's contiguous KV);
// (c) read-ceiling variants. Event-timed per launch, median, like kvbench.
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <functional>

#define CK(x) do { cudaError_t ck_e = (x); if (ck_e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(ck_e), __LINE__); exit(1);} } while (0)

__global__ void Empty(int* sink) { if (threadIdx.x == 999) sink[0] = 1; }

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void Commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void WaitGroup() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// One CTA per (b, h, piece): tiles of 128 tokens x 256 B of K and of V, 3 stages.
// head_major: element (b,h,t) at ((b*H + h)*ctx + t)*256 B; else ((b*ctx + t)*H + h)*256 B.
template <bool kHeadMajor>
__global__ void __launch_bounds__(256) CopyOnly(const uint8_t* k, const uint8_t* v, int ctx, int H, int pieces, int64_t tstride, int* sink) {
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr int kTile = 128, kStages = 3, kStage = kTile * 256;
  const int piece = blockIdx.x % pieces;
  const int bh = blockIdx.x / pieces;
  const int h = bh % H, b = bh / H;
  const int per = ctx / pieces;
  const int t0 = piece * per;
  const int n_tiles = per / kTile;
  const int tid = threadIdx.x;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  auto addr = [&](int t) -> int64_t {
    return kHeadMajor ? ((int64_t(b) * H + h) * ctx + t) * 256 : (int64_t(b) * ctx + t) * tstride + h * 256;
  };
  auto load = [&](int tile) {
    const int s = tile % kStages;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = tid + i * 256;  // 2048 chunks of 16 B per tile
      const int row = c >> 4, ch = c & 15;
      const int64_t off = addr(t0 + tile * kTile + row) + ch * 16;
      CpAsync16(base + s * kStage + c * 16, k + off);
      CpAsync16(base + (kStages + s) * kStage + c * 16, v + off);
    }
  };
  for (int s = 0; s < kStages - 1; ++s) { if (s < n_tiles) load(s); Commit(); }
  int acc = 0;
  for (int j = 0; j < n_tiles; ++j) {
    WaitGroup<kStages - 2>();
    __syncthreads();
    if (j + kStages - 1 < n_tiles) load(j + kStages - 1);
    Commit();
    const int s = j % kStages;
    acc ^= reinterpret_cast<const int*>(smem + s * kStage)[tid] ^ reinterpret_cast<const int*>(smem + (kStages + s) * kStage)[tid];
  }
  WaitGroup<0>();
  if (acc == 0x12345678) sink[0] = acc;
}

template <int kUnroll>
__global__ void StreamRead(const int4* __restrict__ p, int64_t n, int* sink) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  int acc = 0;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678) sink[0] = acc;
}

static double MedianUs(int warmup, int reps, const std::function<void(int)>& fn) {
  for (int r = 0; r < warmup; ++r) fn(r);
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) CK(cudaEventCreate(&e));
  for (int r = 0; r < reps; ++r) { cudaEventRecord(ev[2 * r]); fn(warmup + r); cudaEventRecord(ev[2 * r + 1]); }
  CK(cudaEventSynchronize(ev.back()));
  std::vector<double> ms(reps);
  for (int r = 0; r < reps; ++r) { float t; cudaEventElapsedTime(&t, ev[2 * r], ev[2 * r + 1]); ms[r] = t; }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2] * 1e3;
}

static double LoopUs(int n, const std::function<void(int)>& fn) {  // back-to-back, events around the loop
  for (int r = 0; r < 5; ++r) fn(r);
  cudaEvent_t a, e2; cudaEventCreate(&a); cudaEventCreate(&e2);
  cudaEventRecord(a); for (int r = 0; r < n; ++r) fn(r); cudaEventRecord(e2);
  CK(cudaEventSynchronize(e2)); float t; cudaEventElapsedTime(&t, a, e2);
  return t * 1e3 / n;
}

int main(int argc, char** argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 2;
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  printf("probe: %s, %d SMs\n", prop.name, sms);
  int* sink; CK(cudaMalloc(&sink, 64));
  const int kSmem = 6 * 128 * 256;  // 192 KiB
  CK(cudaFuncSetAttribute(CopyOnly<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  CK(cudaFuncSetAttribute(CopyOnly<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  CK(cudaFuncSetAttribute(Empty, cudaFuncAttributeMaxDynamicSharedMemorySize, 201 * 1024));
  const int64_t kMax = int64_t{1} << 30;  // K or V of B=64 x 4096 x 8 x 256 B = 512 MiB each
  uint8_t *kbuf, *vbuf;
  CK(cudaMalloc(&kbuf, 4 * kMax)); CK(cudaMalloc(&vbuf, 2 * kMax));
  CK(cudaMemset(kbuf, 1, 4 * kMax)); CK(cudaMemset(vbuf, 2, 2 * kMax));
  const int64_t ceil_bytes = int64_t{2} << 30;
  for (int round = 0; round < rounds; ++round) {
    printf("=== round %d\n", round);
    for (int per_sm : {2, 4, 8}) {
      double us = MedianUs(3, 15, [&](int) { StreamRead<4><<<sms * per_sm, 512>>>(reinterpret_cast<const int4*>(kbuf), ceil_bytes / 16, sink); });
      printf("ceiling stream-read<4> %d x 512/SM: %.1f us %.0f GB/s\n", per_sm, us, ceil_bytes / us * 1e-3);
    }
    {
      double us = MedianUs(3, 15, [&](int) { StreamRead<8><<<sms * 2, 512>>>(reinterpret_cast<const int4*>(kbuf), ceil_bytes / 16, sink); });
      printf("ceiling stream-read<8> 2 x 512/SM: %.1f us %.0f GB/s\n", us, ceil_bytes / us * 1e-3);
    }
    for (int grid : {128, 512}) for (int smem : {0, 201 * 1024}) for (int thr : {128, 256}) {
      double us = MedianUs(10, 101, [&](int) { Empty<<<grid, thr, smem>>>(sink); });
      double lp = LoopUs(200, [&](int) { Empty<<<grid, thr, smem>>>(sink); });
      printf("empty grid %4d x %3d thr smem %6d: per-launch events %.2f us, loop %.2f us\n", grid, thr, smem, us, lp);
    }
    struct S { int b, ctx, pieces; };
    for (S s : {S{16, 4096, 1}, S{64, 4096, 1}, S{128, 4096, 1}, S{8, 32768, 2}, S{1, 131072, 16}}) {
      const int64_t bytes = int64_t{s.b} * s.ctx * 8 * 256;  // per K
      const int sets = bytes * 2 * 2 <= 4 * kMax ? 2 : 1;
      // patterns: 0 head-major (cuDNN), 1 token-major 2 KiB rows, K and V apart (virtual-layer,
      // paged in order), 2 token-major 8 KiB rows holding 2 layers' K|V (kvbench's virtual-all)
      for (int pat = 0; pat < 3; ++pat) {
        const int grid = s.b * 8 * s.pieces;
        const int sets2 = pat == 2 ? 1 : sets;
        auto fn = [&](int r) {
          const int64_t o = (r % sets2) * bytes;
          if (pat == 0) CopyOnly<true><<<grid, 256, kSmem>>>(kbuf + o, vbuf + o, s.ctx, 8, s.pieces, 0, sink);
          else if (pat == 1) CopyOnly<false><<<grid, 256, kSmem>>>(kbuf + o, vbuf + o, s.ctx, 8, s.pieces, 2048, sink);
          else CopyOnly<false><<<grid, 256, kSmem>>>(kbuf + (r % 2) * 4096, kbuf + (r % 2) * 4096 + 2048, s.ctx, 8, s.pieces, 8192, sink);
        };
        double us = MedianUs(10, 100, fn);
        double lp = LoopUs(100, fn);
        static const char* names[] = {"head-major", "token-2KiB", "token-8KiB-kv"};
        printf("copy-only %-13s B=%-3d ctx=%-6d CTAs=%-4d: %.1f us (%.0f GB/s); loop %.1f us\n", names[pat],
               s.b, s.ctx, grid, us, 2 * bytes / us * 1e-3, lp);
      }
    }
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
