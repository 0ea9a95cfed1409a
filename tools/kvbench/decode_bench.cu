// kvbench decode: decode attention (kvmem/attention.h) on the shapes of
// shared/benchmarks.md, D1 (batch / context sweep) and D2 (page-size sensitivity), against
// the device's read-bandwidth ceiling measured in the same run by a streaming-read kernel.
//
// Each figure is the median of many launches timed with CUDA events after a warm-up,
// rotating over enough copies of the inputs (>= 200 MB) that L2 (50 MB) never holds them.
// Bytes = 2 (K, V) x B x ctx x kv_heads x head_dim x 2. tools/gpu/anchor_decode.py runs
// torch SDPA on the same shapes for the anchors; docs/decode.md has the figures.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kvmem/attention.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/reference_attention.h"
#include "tools/kvbench/bench_util.h"
#include "tools/kvbench/registry.h"

namespace kvmem {
namespace {

constexpr char kWho[] = "decode bench";
#define BENCH_CUDA(expr) KVBENCH_CUDA(kWho, expr)

using kvbench::DeviceBuffer;

constexpr int64_t kRotateBytes = int64_t{200} << 20;  // 4x L2: inputs never stay cached

struct Settings {
  int reps = 100;
  int warmup = 10;
  bool d1 = true;
  bool d2 = true;
  int64_t ceiling_bytes = int64_t{8} << 30;
  bool seq_pages = false;  // paged: pages in order instead of shuffled (diagnostic)
  int spacer_us = 0;       // > 0: a spinning kernel of this length before each timed launch
  bool spread = false;     // print the 10th and 90th percentile beside the median
  std::string filter;      // run only shapes whose layout name contains this
  int batch = 0;           // > 0: run only shapes of this batch size (e.g. for ncu)
  int d1_page = 16;        // page_tokens of the paged D1 shapes
};

// Streaming read: every 16-byte vector once, kUnroll loads in flight per thread; the XOR
// of everything is stored only if it matches a value it never has, so nothing is elided.
template <int kUnroll>
__global__ void StreamRead(const int4* __restrict__ p, int64_t n, int* sink) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  int4 acc = make_int4(0, 0, 0, 0);
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc.x ^= v[u].x;
      acc.y ^= v[u].y;
      acc.z ^= v[u].z;
      acc.w ^= v[u].w;
    }
  }
  for (; i < n; i += stride) {
    const int4 v = __ldcs(p + i);
    acc.x ^= v.x;
    acc.y ^= v.y;
    acc.z ^= v.z;
    acc.w ^= v.w;
  }
  if ((acc.x & acc.y & acc.z & acc.w) == 0x7f3a5c1e) *sink = acc.x;
}

// Median of `reps` event-timed runs of fn(rep) after `warmup` untimed ones (microseconds).
template <typename Fn>
double MedianMicros(int warmup, int reps, Fn&& fn) {
  return kvbench::MedianMs(warmup, reps, std::forward<Fn>(fn)) * 1e3;
}

// The best of a few streaming-read configurations over `bytes` of device memory (GB/s).
bool MeasureCeiling(const Settings& s, int sms, double* gbps) {
  DeviceBuffer buf, sink;
  if (!buf.Allocate(s.ceiling_bytes) || !sink.Allocate(64)) {
    std::fprintf(stderr, "decode bench: cannot allocate %lld bytes for the ceiling\n",
                 static_cast<long long>(s.ceiling_bytes));
    return false;
  }
  if (!kvbench::FillRandom(buf.get(), s.ceiling_bytes, 1, kWho)) return false;
  const int64_t n = s.ceiling_bytes / 16;
  *gbps = 0.0;
  for (int per_sm : {2, 4, 8}) {
    const double us = MedianMicros(3, 15, [&](int) {
      StreamRead<4><<<sms * per_sm, 512>>>(buf.get<int4>(), n, sink.get<int>());
    });
    BENCH_CUDA(cudaDeviceSynchronize());
    const double g = s.ceiling_bytes / us * 1e-3;
    std::printf("  stream-read %d x 512 threads/SM-slot: %.0f us, %.0f GB/s\n", per_sm, us, g);
    *gbps = std::max(*gbps, g);
  }
  return true;
}

enum class Kind { kPaged, kVirtualAllLayers, kVirtualPerLayer };

struct Shape {
  const char* tag;
  int batch;
  int ctx;
  Kind kind;
  int page_tokens;
};

const char* KindName(Kind k, int page) {
  static char buf[32];
  switch (k) {
    case Kind::kPaged:
      std::snprintf(buf, sizeof(buf), "paged-%d", page);
      return buf;
    case Kind::kVirtualAllLayers:
      return "virtual-all";
    case Kind::kVirtualPerLayer:
      return "virtual-layer";
  }
  return "?";
}

// Default model shape: 32 query heads, 8 KV heads, head_dim 128, bf16.
constexpr int kQHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;

// Times one shape; prints a row and returns false on a CUDA or kvmem error.
bool RunShape(const Settings& s, const Shape& sh, double ceiling) {
  const int64_t block = int64_t{kKvHeads} * kHeadDim;                    // elements per token
  const int64_t set_bytes = 2 * int64_t{sh.batch} * sh.ctx * block * 2;  // K and V
  const int sets = static_cast<int>(
      std::min<int64_t>(32, std::max<int64_t>(2, (kRotateBytes + set_bytes - 1) / set_bytes)));

  AttentionShape shape;
  shape.num_q_heads = kQHeads;
  shape.num_kv_heads = kKvHeads;
  shape.head_dim = kHeadDim;
  shape.kv_dtype = DType::kBFloat16;
  DecodeOptions o;
  o.shape = shape;
  o.layout = sh.kind == Kind::kPaged ? Layout::kPaged : Layout::kVirtual;
  o.max_batch = sh.batch;
  o.max_context = sh.ctx;
  o.page_tokens = sh.page_tokens;
  auto ws = DecodeWorkspace::Create(o);
  if (!ws.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", ws.status().ToString().c_str());
    return false;
  }

  // K/V of all sets in one allocation. Paged: a pool per set, pages shuffled (the same
  // table for every set). Virtual all-layer: set = layer, token stride over all sets.
  // Virtual per-layer: a [batch][ctx][H][D] tensor pair per set.
  DeviceBuffer kv;
  if (!kv.Allocate(sets * set_bytes)) {
    std::fprintf(stderr, "decode bench: cannot allocate %lld bytes\n",
                 static_cast<long long>(sets * set_bytes));
    return false;
  }
  if (!kvbench::FillRandom(kv.get(), sets * set_bytes, 7, kWho)) return false;
  uint16_t* base = kv.get<uint16_t>();
  const int64_t set_elems = set_bytes / 2;
  std::vector<int32_t> lens(sh.batch, sh.ctx);
  std::vector<PagedKv> paged(sets);
  std::vector<VirtualKv> virt(sets);
  std::vector<int32_t> table;
  int64_t table_stride = 0;
  std::vector<int32_t> rows;
  if (sh.kind == Kind::kPaged) {
    const int64_t pages_per_req = (sh.ctx + sh.page_tokens - 1) / sh.page_tokens;
    const int64_t pages = pages_per_req * sh.batch;
    std::vector<int32_t> ids(pages);
    std::iota(ids.begin(), ids.end(), 0);
    if (!s.seq_pages) std::shuffle(ids.begin(), ids.end(), std::mt19937(1));
    // The pool is sized for whole pages; a set's bytes cover ctx tokens, so pages that
    // run past a set's end only occur when page_tokens does not divide ctx (not here).
    for (int i = 0; i < sets; ++i) {
      PagedKv& p = paged[i];
      p.k = base + i * set_elems;
      p.v = base + i * set_elems + set_elems / 2;
      p.page_tokens = sh.page_tokens;
      p.token_stride = block;
      p.page_stride = sh.page_tokens * block;
      p = (*ws)->Bind(p);
    }
    table = std::move(ids);
    table_stride = pages_per_req;
  } else {
    rows.resize(sh.batch);
    std::iota(rows.begin(), rows.end(), 0);
    for (int i = 0; i < sets; ++i) {
      VirtualKv& v = virt[i];
      if (sh.kind == Kind::kVirtualAllLayers) {
        v.token_stride = 2 * block * sets;  // [row][token][set][k|v][H][D]
        v.k = base + 2 * block * i;
        v.v = base + 2 * block * i + block;
      } else {
        v.token_stride = block;
        v.k = base + i * set_elems;
        v.v = base + i * set_elems + set_elems / 2;
      }
      v.max_context = sh.ctx;
      v.row_stride = v.token_stride * sh.ctx;
      v = (*ws)->Bind(v);
    }
  }
  const absl::Status planned = sh.kind == Kind::kPaged
                                   ? (*ws)->PlanPaged(lens, table, table_stride, nullptr)
                                   : (*ws)->PlanVirtual(lens, rows, nullptr);
  if (!planned.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", planned.ToString().c_str());
    return false;
  }
  const int64_t q_elems = int64_t{sh.batch} * kQHeads * kHeadDim;
  DeviceBuffer q, out;
  if (!q.Allocate(sets * q_elems * 2) || !out.Allocate(sets * q_elems * 2)) return false;
  if (!kvbench::FillRandom(q.get(), sets * q_elems * 2, 3, kWho)) return false;
  BENCH_CUDA(cudaDeviceSynchronize());

  absl::Status launched;
  const std::vector<double> sorted = kvbench::SortedMs(
      s.warmup, s.reps,
      [&](int r) {
        const int i = r % sets;
        const uint16_t* qi = q.get<uint16_t>() + i * q_elems;
        uint16_t* oi = out.get<uint16_t>() + i * q_elems;
        const absl::Status st = sh.kind == Kind::kPaged
                                    ? DecodeAttention(**ws, paged[i], qi, oi, nullptr)
                                    : DecodeAttention(**ws, virt[i], qi, oi, nullptr);
        if (!st.ok()) launched.Update(st);
      },
      [&](int) {
        if (s.spacer_us > 0) kvbench::LaunchSpacer(s.spacer_us);
      });
  const double us = sorted[s.reps / 2] * 1e3;
  BENCH_CUDA(cudaDeviceSynchronize());
  if (!launched.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", launched.ToString().c_str());
    return false;
  }
  const double gbps = set_bytes / us * 1e-3;
  std::printf("%-3s %-14s%s B=%-4d ctx=%-6d splits=%-4d  %9.1f us  %7.0f GB/s  %5.1f %%\n", sh.tag,
              KindName(sh.kind, sh.page_tokens),
              sh.kind == Kind::kPaged && s.seq_pages ? " (in order)" : "", sh.batch, sh.ctx,
              (*ws)->num_work(), us, gbps, 100.0 * gbps / ceiling);
  if (s.spread) {
    std::printf("      p10 %.1f us, p90 %.1f us, min %.1f us, max %.1f us%s\n",
                sorted[s.reps / 10] * 1e3, sorted[s.reps * 9 / 10] * 1e3, sorted.front() * 1e3,
                sorted.back() * 1e3, s.spacer_us > 0 ? " (spacer between launches)" : "");
  }
  std::fflush(stdout);
  return true;
}

int DecodeBench(const std::vector<std::string>& args) {
  Settings s;
  for (const std::string& a : args) {
    if (a == "--quick") {
      s.reps = 20;
      s.warmup = 3;
      s.ceiling_bytes = int64_t{2} << 30;
    } else if (a == "--d1") {
      s.d2 = false;
    } else if (a == "--d2") {
      s.d1 = false;
    } else if (a == "--seq-pages") {
      s.seq_pages = true;
    } else if (const char* v = kvbench::FlagValue(a, "--filter=")) {
      s.filter = v;
    } else if (const char* v = kvbench::FlagValue(a, "--reps=")) {
      s.reps = std::max(1, std::atoi(v));
    } else if (const char* v = kvbench::FlagValue(a, "--batch=")) {
      s.batch = std::atoi(v);
    } else if (const char* v = kvbench::FlagValue(a, "--spacer-us=")) {
      s.spacer_us = std::max(0, std::atoi(v));
    } else if (const char* v = kvbench::FlagValue(a, "--page=")) {
      s.d1_page = std::max(1, std::atoi(v));
    } else if (a == "--spread") {
      s.spread = true;
    } else {
      std::fprintf(stderr,
                   "usage: kvbench decode [--quick] [--d1 | --d2] [--reps=N] [--filter=LAYOUT] "
                   "[--batch=B] [--page=N] [--seq-pages] [--spread] [--spacer-us=N]\n");
      return 2;
    }
  }
  cudaDeviceProp prop;
  if (!kvbench::CurrentDeviceProperties(&prop, kWho)) return 1;
  std::printf("device: %s, %d SMs, L2 %d MB; shape: %d q heads / %d kv heads, head_dim %d, bf16\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, kQHeads, kKvHeads,
              kHeadDim);
  double ceiling = 0.0;
  if (!MeasureCeiling(s, prop.multiProcessorCount, &ceiling)) return 1;
  std::printf("read-bandwidth ceiling: %.0f GB/s\n", ceiling);
  std::printf("set median of %d reps; %% = of the ceiling\n", s.reps);

  std::vector<Shape> shapes;
  if (s.d1) {
    for (Kind k : {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualPerLayer}) {
      for (auto [b, ctx] : std::vector<std::pair<int, int>>{
               {1, 4096}, {16, 4096}, {64, 4096}, {128, 4096}, {8, 32768}, {1, 131072}}) {
        shapes.push_back({"D1", b, ctx, k, s.d1_page});
      }
    }
  }
  if (s.d2) {
    for (int page : {1, 16, 64, 256}) shapes.push_back({"D2", 64, 4096, Kind::kPaged, page});
    shapes.push_back({"D2", 64, 4096, Kind::kVirtualAllLayers, 0});
    shapes.push_back({"D2", 64, 4096, Kind::kVirtualPerLayer, 0});
  }
  for (const Shape& sh : shapes) {
    if (std::string(KindName(sh.kind, sh.page_tokens)).find(s.filter) == std::string::npos) {
      continue;
    }
    if (s.batch > 0 && sh.batch != s.batch) continue;
    if (!RunShape(s, sh, ceiling)) return 1;
  }
  return 0;
}

KVBENCH_REGISTER(decode, "decode",
                 "decode attention, shapes D1 and D2, vs the measured read bandwidth", DecodeBench);

}  // namespace
}  // namespace kvmem
