// kvbench mapper (benchmark V2): is mapping hidden behind decode? A virtual-layout KvCache
// on the GPU (all-layer arrangement, Llama-3-8B shape by default; --chunk=N sets
// KvCacheConfig::chunk_tokens: 0, the library's 512-token chunks, each growth into a new
// chunk mapping its 32 pages; 1, 16 tokens per 2 MiB page) holds `requests` requests with
// random prompt lengths; every decode step grows each
// request by one token (KvCache::ExtendInto on the host), writes the new tokens' K/V with a
// kernel and reads every live token's K/V with another (a decode step's memory traffic,
// a few milliseconds), then waits for the GPU, as an engine's step does. Run with the
// background mapper off (map_ahead_tokens = 0: a step whose requests cross into a new page
// maps it synchronously, on the critical path) and on (pages mapped ahead while the GPU
// works). Reported per mode: steps that stalled on the driver (Stats::map_stalls grew
// during the step), host time of the step's Extend calls, and step time.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "kvmem/stats.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/sizing.h"
#include "tools/kvbench/subcommands.h"

namespace kvbench {
namespace {

using Clock = std::chrono::steady_clock;

#define MAPPER_CHECK_CUDA(expr)                                                               \
  do {                                                                                        \
    const cudaError_t e_ = (expr);                                                            \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "kvbench mapper: %s failed: %s\n", #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)
#define MAPPER_CHECK_OK(expr)                                                                \
  do {                                                                                       \
    const ::absl::Status s_ = (expr);                                                        \
    if (!s_.ok()) {                                                                          \
      std::fprintf(stderr, "kvbench mapper: %s failed: %s\n", #expr, s_.ToString().c_str()); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

// Where the K and V of every layer of a token lie, from layer 0's view: 2 * layers
// blocks (layer l's K is block 2l, V 2l + 1) of `block_bytes` apart (a chunk's tokens of
// one layer; without chunks one token), `token_layer_bytes` per token in each.
struct TokenBlocks {
  int blocks;
  int64_t block_bytes;
  int64_t token_layer_bytes;
};

// Writes each new token's K/V over all layers.
__global__ void AppendTokensKernel(kvmem::VirtualKv kv, const int64_t* slots, TokenBlocks t,
                                   uint32_t step) {
  char* const token = static_cast<char*>(kv.k) + kv.SlotOffset(slots[blockIdx.x]) * 2;  // bf16
  const uint32_t x = step * 0x9E3779B1u + blockIdx.x;
  const int64_t per_block = t.token_layer_bytes / 16;
  for (int64_t i = threadIdx.x; i < t.blocks * per_block; i += blockDim.x) {
    uint4* dst = reinterpret_cast<uint4*>(token + i / per_block * t.block_bytes) + i % per_block;
    *dst = make_uint4(x, x ^ static_cast<uint32_t>(i), x + 1, ~x);
  }
}

// Reads every live token of every request (all layers, K and V), 16 bytes at a time: the
// row's whole chunks in one run, then each block's part of the partial chunk.
// gridDim.y = batch entries; gridDim.x blocks share one entry's bytes.
__global__ void ReadLiveKvKernel(kvmem::VirtualKv kv, const int32_t* seq_lens, TokenBlocks t,
                                 uint32_t* sink) {
  const int b = blockIdx.y;
  const char* row = static_cast<const char*>(kv.k) + kv.Offset(b, 0) * 2;
  const int64_t chunk = int64_t{1} << kv.chunk_shift;
  const int64_t full = seq_lens[b] / chunk * chunk;  // tokens of whole chunks
  const int64_t n_full = kv.InRow(full) * 2 / 16;
  const int64_t per_block = (seq_lens[b] - full) * t.token_layer_bytes / 16;
  const int64_t n = n_full + t.blocks * per_block;
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i - n_full;
    const char* at = i < n_full
                         ? row + i * 16
                         : row + n_full * 16 + j / per_block * t.block_bytes + j % per_block * 16;
    const uint4 v = *reinterpret_cast<const uint4*>(at);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B1u) sink[0] = acc;  // keeps the loads; practically never true
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}
double Mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / v.size();
}

struct ModeResult {
  std::string mode;
  int64_t stalled_steps = 0;
  int64_t map_stalls = 0;
  int64_t warmup_stalls = 0;
  std::vector<int> stalled_at;  // timed steps (0-based) that stalled
  std::vector<double> extend_us, step_us, gpu_us;
  double create_ms = 0;
  int64_t live_tokens_end = 0;
};

// The cache of both modes but for its budget and mapper: the model shape, all-layer rows,
// room for every request's longest length and the tokens mapped ahead of it.
kvmem::KvCacheConfig MapperConfig(const MapperSettings& o) {
  kvmem::KvCacheConfig config;
  config.num_layers = o.layers;
  config.num_kv_heads = o.kv_heads;
  config.head_dim = o.head_dim;
  config.dtype = kvmem::DType::kBFloat16;
  config.layout = kvmem::Layout::kVirtual;
  config.arrangement = kvmem::Arrangement::kAllLayers;
  config.chunk_tokens = o.chunk;
  config.max_requests = o.requests;
  const int64_t longest = o.prompt_max + o.warmup + o.steps;
  config.max_context = (longest + o.map_ahead + 255) / 256 * 256;
  config.device = kvmem::DeviceKind::kCuda;
  config.device_ordinal = o.device;
  return config;
}

ModeResult RunMode(const MapperSettings& o, const kvmem::MemoryPlan& plan, int64_t map_ahead) {
  ModeResult res;
  res.mode = map_ahead > 0 ? "on (map_ahead " + std::to_string(map_ahead) + ")" : "off";
  kvmem::KvCacheConfig config = MapperConfig(o);
  // Every request at its longest, mapped ahead (whole chunks), plus one page of slack.
  const int64_t longest = o.prompt_max + o.warmup + o.steps;
  absl::StatusOr<int64_t> pages = RequestPages(config, plan, longest + o.map_ahead);
  MAPPER_CHECK_OK(pages.status());
  const int64_t per_request = *pages + 1;
  config.memory_budget_bytes = o.requests * per_request * plan.granularity;
  const int64_t chunk = plan.chunk_tokens;
  const TokenBlocks blocks = {chunk == 1 ? 1 : 2 * o.layers, chunk * config.TokenLayerBytes(),
                              chunk == 1 ? config.TokenBytes() : config.TokenLayerBytes()};
  config.map_ahead_tokens = map_ahead;

  const auto c0 = Clock::now();
  absl::StatusOr<std::unique_ptr<kvmem::KvCache>> made = kvmem::KvCache::Create(config);
  res.create_ms = std::chrono::duration<double, std::milli>(Clock::now() - c0).count();
  MAPPER_CHECK_OK(made.status());
  kvmem::KvCache& cache = **made;
  const kvmem::Stats created = cache.GetStats();
  std::printf(
      "  mode %-18s: cache created in %.1f ms (physical handles up front: %.1f GiB, "
      "pool_create_nanos %.1f ms), max_context %lld\n",
      res.mode.c_str(), res.create_ms, created.physical_bytes / double(1 << 30),
      created.pool_create_nanos / 1e6, static_cast<long long>(config.max_context));

  std::mt19937 rng(42);
  std::uniform_int_distribution<int> prompt(1, o.prompt_max);
  std::vector<kvmem::RequestId> ids(o.requests);
  std::vector<int64_t> locs;
  for (int r = 0; r < o.requests; ++r) {
    ids[r] = r + 1;
    MAPPER_CHECK_OK(cache.AddRequest(ids[r]).status());
    MAPPER_CHECK_OK(cache.ExtendInto(ids[r], prompt(rng), &locs));
  }

  cudaStream_t stream;
  MAPPER_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t ev0, ev1;
  MAPPER_CHECK_CUDA(cudaEventCreate(&ev0));
  MAPPER_CHECK_CUDA(cudaEventCreate(&ev1));
  int32_t *h_rows, *h_lens, *d_rows, *d_lens;
  int64_t *h_slots, *d_slots;
  uint32_t* d_sink;
  MAPPER_CHECK_CUDA(cudaMallocHost(&h_rows, o.requests * sizeof(int32_t)));
  MAPPER_CHECK_CUDA(cudaMallocHost(&h_lens, o.requests * sizeof(int32_t)));
  MAPPER_CHECK_CUDA(cudaMallocHost(&h_slots, o.requests * sizeof(int64_t)));
  MAPPER_CHECK_CUDA(cudaMalloc(&d_rows, o.requests * sizeof(int32_t)));
  MAPPER_CHECK_CUDA(cudaMalloc(&d_lens, o.requests * sizeof(int32_t)));
  MAPPER_CHECK_CUDA(cudaMalloc(&d_slots, o.requests * sizeof(int64_t)));
  MAPPER_CHECK_CUDA(cudaMalloc(&d_sink, sizeof(uint32_t)));

  int64_t prev_stalls = cache.GetStats().map_stalls;
  kvmem::BatchMetadata meta;
  for (int step = 0; step < o.warmup + o.steps; ++step) {
    const bool timed = step >= o.warmup;
    const auto t0 = Clock::now();
    locs.clear();
    for (int r = 0; r < o.requests; ++r) MAPPER_CHECK_OK(cache.ExtendInto(ids[r], 1, &locs));
    const auto t1 = Clock::now();
    MAPPER_CHECK_OK(cache.BuildBatchMetadata(ids, &meta));
    absl::StatusOr<kvmem::VirtualKv> view = cache.VirtualView(0, meta);
    MAPPER_CHECK_OK(view.status());
    std::memcpy(h_rows, meta.row_ids.data(), o.requests * sizeof(int32_t));
    std::memcpy(h_lens, meta.seq_lens.data(), o.requests * sizeof(int32_t));
    std::memcpy(h_slots, locs.data(), o.requests * sizeof(int64_t));
    MAPPER_CHECK_CUDA(cudaMemcpyAsync(d_rows, h_rows, o.requests * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, stream));
    MAPPER_CHECK_CUDA(cudaMemcpyAsync(d_lens, h_lens, o.requests * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, stream));
    MAPPER_CHECK_CUDA(cudaMemcpyAsync(d_slots, h_slots, o.requests * sizeof(int64_t),
                                      cudaMemcpyHostToDevice, stream));
    kvmem::VirtualKv kv = *view;
    kv.row_ids = d_rows;
    MAPPER_CHECK_CUDA(cudaEventRecord(ev0, stream));
    AppendTokensKernel<<<o.requests, 256, 0, stream>>>(kv, d_slots, blocks, step);
    ReadLiveKvKernel<<<dim3(16, o.requests), 256, 0, stream>>>(kv, d_lens, blocks, d_sink);
    MAPPER_CHECK_CUDA(cudaGetLastError());
    MAPPER_CHECK_CUDA(cudaEventRecord(ev1, stream));
    MAPPER_CHECK_CUDA(cudaStreamSynchronize(stream));
    const auto t2 = Clock::now();
    const int64_t stalls = cache.GetStats().map_stalls;
    if (timed) {
      float gpu_ms = 0;
      MAPPER_CHECK_CUDA(cudaEventElapsedTime(&gpu_ms, ev0, ev1));
      res.extend_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      res.step_us.push_back(std::chrono::duration<double, std::micro>(t2 - t0).count());
      res.gpu_us.push_back(gpu_ms * 1e3);
      res.map_stalls += stalls - prev_stalls;
      res.stalled_steps += stalls > prev_stalls;
      if (stalls > prev_stalls) res.stalled_at.push_back(step - o.warmup);
    } else {
      res.warmup_stalls += stalls - prev_stalls;
    }
    prev_stalls = stalls;
  }
  res.live_tokens_end = cache.GetStats().logical_tokens;
  MAPPER_CHECK_OK(cache.CheckInvariants());
  cudaFreeHost(h_rows);
  cudaFreeHost(h_lens);
  cudaFreeHost(h_slots);
  cudaFree(d_rows);
  cudaFree(d_lens);
  cudaFree(d_slots);
  cudaFree(d_sink);
  cudaEventDestroy(ev0);
  cudaEventDestroy(ev1);
  cudaStreamDestroy(stream);
  return res;
}

}  // namespace

int RunMapper(const MapperSettings& o) {
  // The driver's granularity and the chunk, as the cache will have them.
  absl::StatusOr<kvmem::MemoryPlan> plan = kvmem::PlanMinimalMemory(MapperConfig(o));
  if (!plan.ok()) {
    std::fprintf(stderr, "kvbench mapper: %s\n", plan.status().ToString().c_str());
    return 1;
  }
  const int64_t granularity = plan->granularity;
  MAPPER_CHECK_CUDA(cudaSetDevice(o.device));
  cudaDeviceProp prop{};
  MAPPER_CHECK_CUDA(cudaGetDeviceProperties(&prop, o.device));
  kvmem::KvCacheConfig shape;
  shape.num_layers = o.layers;
  shape.num_kv_heads = o.kv_heads;
  shape.head_dim = o.head_dim;
  std::printf(
      "kvbench mapper (V2): %s, granularity %lld, %d requests (prompts 1..%d), "
      "%d decode steps (+%d warm-up), %d layers x %d KV heads x %d bf16 = %lld KiB per "
      "token, %s\n",
      prop.name, static_cast<long long>(granularity), o.requests, o.prompt_max, o.steps, o.warmup,
      o.layers, o.kv_heads, o.head_dim, static_cast<long long>(shape.TokenBytes() >> 10),
      o.chunk == 1 ? (std::to_string(granularity / shape.TokenBytes()) + " tokens per page").c_str()
                   : ("rows in chunks (chunk_tokens " + std::to_string(o.chunk) + ")").c_str());
  std::vector<ModeResult> results;
  if (o.mode_off) results.push_back(RunMode(o, *plan, 0));
  if (o.mode_on) results.push_back(RunMode(o, *plan, o.map_ahead));
  std::printf("\n%-18s %8s %10s %9s %9s %9s %9s %9s %9s %8s\n", "mapper", "stalled", "map_stalls",
              "ext_p50", "ext_p99", "ext_max", "ext_mean", "step_p50", "step_mean", "gpu_ms");
  for (const ModeResult& r : results) {
    std::printf("%-18s %4lld/%-3zu %10lld %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %8.3f\n",
                r.mode.c_str(), static_cast<long long>(r.stalled_steps), r.step_us.size(),
                static_cast<long long>(r.map_stalls), Percentile(r.extend_us, 0.5),
                Percentile(r.extend_us, 0.99),
                *std::max_element(r.extend_us.begin(), r.extend_us.end()), Mean(r.extend_us),
                Percentile(r.step_us, 0.5), Mean(r.step_us), Mean(r.gpu_us) / 1e3);
  }
  std::printf(
      "(ext_*: host us per step in the %d ExtendInto calls, on the critical path; "
      "step: us from the first Extend to the GPU done; gpu: append + read kernels; "
      "warm-up stalls not counted:",
      o.requests);
  for (const ModeResult& r : results) {
    std::printf(" %s %lld", r.mode.c_str(), static_cast<long long>(r.warmup_stalls));
  }
  std::printf(")\n");
  for (const ModeResult& r : results) {
    if (r.stalled_at.empty() || r.stalled_at.size() == r.step_us.size()) continue;
    std::printf("stalled steps with mapper %s:", r.mode.c_str());
    for (size_t i = 0; i < r.stalled_at.size() && i < 16; ++i) std::printf(" %d", r.stalled_at[i]);
    std::printf("%s\n", r.stalled_at.size() > 16 ? " ..." : "");
  }
  if (results.size() == 2) {
    std::printf(
        "time added per step by synchronous mapping: %.1f us mean (%.1f us mean "
        "Extend with the mapper off vs %.1f us on); steps stalled: %lld off, %lld on\n",
        Mean(results[0].step_us) - Mean(results[1].step_us), Mean(results[0].extend_us),
        Mean(results[1].extend_us), static_cast<long long>(results[0].stalled_steps),
        static_cast<long long>(results[1].stalled_steps));
  }
  return 0;
}

}  // namespace kvbench
