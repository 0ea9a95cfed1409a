// kvbench decode: decode attention (kvmem/attention.h) on the shapes of
// docs/benchmarks.md, D1 (batch / context sweep) and D2 (page-size sensitivity), against
// the device's read-bandwidth ceiling measured in the same run by a streaming-read kernel.
//
// Each figure is the median of many launches timed with CUDA events after a warm-up,
// rotating over enough copies of the inputs (>= 200 MB) that L2 (50 MB) never holds them.
// Bytes = 2 (K, V) x B x ctx x kv_heads x head_dim x 2. tools/gpu/anchor_decode.py runs
// torch SDPA on the same shapes for the anchors; docs/benchmarks.md has the figures.
//
// The virtual shapes read K/V from kvmem's own CUDA virtual KvCache of the model's 32
// layers (virtual_cache.h; --virtual=tensor: a cudaMalloc'd tensor of that shape, whose
// 2 MiB pages the driver places differently). The layer count matters for the all-layer
// arrangement without chunks (--chunk=1): a 2 MiB page holds 16 tokens of 32 layers, so
// one layer's read uses 64 KiB of each page it translates, and decode runs 3-4 % slower
// than with 2 layers (docs/kernels.md). The cache's default chunk (512 tokens) gives each
// layer whole pages.
//
// The paged shapes read page tables taken from kvmem's own paged cache after serving
// churn (--pool=grown, grown_pool.h): where a request's pages lie decides how many 2 MiB
// translation entries its reads need, which moves a decode step by 1-2 %. --pool=shuffled
// (the worst case), --pool=in-order (the best) and --placement=lowest-first compare.
//
// Two rounds over the shapes by default (--repeat=N), the figures to quote being the last
// round's: on the H100 the shape measured first after the bandwidth ceiling (and sometimes
// the second) ran 15-17 % slower in every launch, whatever its layout (paged B=16: 111.6 us
// in round 1, 95.6-96.0 in rounds 2 and 3 of one process; virtual-layer alone in a process:
// 109.1), while the SM clock stayed at 1830 MHz (--trace). tools/gpu/anchor_decode.py
// runs its shapes twice the same way; its second shape once read 164.8 us in a single round.
//
// --trace (a diagnostic, decode_trace.h) then times every CTA of more launches per shape.
// The flags are in settings.h (`kvbench decode --help`).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvmem/attention.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/reference_attention.h"
#include "tools/kvbench/bench_util.h"
#include "tools/kvbench/decode_trace.h"
#include "tools/kvbench/grown_pool.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/subcommands.h"
#include "tools/kvbench/virtual_cache.h"

namespace kvmem {
namespace {

constexpr char kWho[] = "decode bench";
#define BENCH_CUDA(expr) KVBENCH_CUDA(kWho, expr)

using kvbench::DeviceBuffer;

constexpr int64_t kRotateBytes = int64_t{200} << 20;  // 4x L2: inputs never stay cached

using kvbench::DecodeKind;
using kvbench::DecodeSettings;
using kvbench::DecodeShape;
using kvbench::PoolKind;

std::string PoolName(PoolKind pool, PagePlacement placement) {
  const char* how = placement == PagePlacement::kContiguous ? "contiguous" : "lowest-first";
  switch (pool) {
    case PoolKind::kGrown:
      return absl::StrCat("grown, ", how);
    case PoolKind::kGrownElastic:
      return absl::StrCat("grown elastic, ", how);
    case PoolKind::kShuffled:
      return "shuffled";
    case PoolKind::kInOrder:
      return "in order";
  }
  return "?";
}

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
bool MeasureCeiling(const DecodeSettings& s, int sms, double* gbps) {
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

// Default model shape: 32 query heads, 8 KV heads, head_dim 128, bf16.
constexpr int kQHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;

// The paged page table of a shape: `stride` entries per request, and the pool's size (a
// grown pool has more pages than the batch reads, the others exactly the batch's).
struct PagedTable {
  std::vector<int32_t> table;
  int64_t stride = 0;
  int64_t pool_pages = 0;
  std::vector<int64_t> row_pages;  // pages in use per request
};

bool MakePagedTable(const DecodeSettings& s, const DecodeShape& sh,
                    const std::vector<int32_t>& lens, int max_ctx, PagedTable* out) {
  out->stride = (max_ctx + sh.page_tokens - 1) / sh.page_tokens;
  out->pool_pages = out->stride * sh.batch;
  for (int32_t len : lens) out->row_pages.push_back((len + sh.page_tokens - 1) / sh.page_tokens);
  if (sh.long_ctx > 0) {
    // Ragged: each request's pages in order (the grown pools model a uniform batch).
    out->table.assign(out->pool_pages, 0);
    int32_t next = 0;
    for (int b = 0; b < sh.batch; ++b) {
      for (int64_t i = 0; i < out->row_pages[b]; ++i) out->table[b * out->stride + i] = next++;
    }
    out->pool_pages = next;
  } else if (s.pool == PoolKind::kGrown || s.pool == PoolKind::kGrownElastic) {
    absl::StatusOr<kvbench::GrownPool> grown =
        kvbench::GrowPool(sh.batch, sh.ctx, sh.page_tokens, s.placement,
                          /*elastic=*/s.pool == PoolKind::kGrownElastic, /*seed=*/1);
    if (!grown.ok()) {
      std::fprintf(stderr, "decode bench: %s\n", grown.status().ToString().c_str());
      return false;
    }
    out->table = std::move(grown->table);
    out->pool_pages = grown->num_pages;
  } else {
    out->table.resize(out->pool_pages);
    std::iota(out->table.begin(), out->table.end(), 0);
    if (s.pool == PoolKind::kShuffled) {
      std::shuffle(out->table.begin(), out->table.end(), std::mt19937(1));
    }
  }
  return true;
}

// The views of `sets` copies of a layer's K and V, all in one allocation at `base` of
// set_alloc bytes each, bound to the workspace. Paged: a pool per set (the same table
// for every set). Virtual all-layer: set = layer, token stride over all sets. Virtual
// per-layer: a [batch][max_ctx][H][D] tensor pair per set.
void MakeViews(const DecodeShape& sh, int sets, int64_t set_alloc, uint16_t* base, int max_ctx,
               const DecodeWorkspace& ws, std::vector<PagedKv>* paged,
               std::vector<VirtualKv>* virt) {
  constexpr int64_t kBlock = int64_t{kKvHeads} * kHeadDim;  // elements per token
  const int64_t set_elems = set_alloc / 2;
  for (int i = 0; i < sets; ++i) {
    if (sh.kind == DecodeKind::kPaged) {
      PagedKv p;
      p.k = base + i * set_elems;
      p.v = base + i * set_elems + set_elems / 2;
      p.page_tokens = sh.page_tokens;
      p.token_stride = kBlock;
      p.page_stride = sh.page_tokens * kBlock;
      paged->push_back(ws.Bind(p));
      continue;
    }
    VirtualKv v;
    if (sh.kind == DecodeKind::kVirtualAllLayers) {
      v.token_stride = 2 * kBlock * sets;  // [row][token][set][k|v][H][D]
      v.k = base + 2 * kBlock * i;
      v.v = base + 2 * kBlock * i + kBlock;
    } else {
      v.token_stride = kBlock;
      v.k = base + i * set_elems;
      v.v = base + i * set_elems + set_elems / 2;
    }
    v.max_context = max_ctx;
    v.row_stride = v.token_stride * max_ctx;
    virt->push_back(ws.Bind(v));
  }
}

// One captured decode launch per K/V set, replayed by Launch (--graph).
class DecodeGraphs {
 public:
  DecodeGraphs() = default;
  ~DecodeGraphs() {
    for (cudaGraphExec_t e : execs_) cudaGraphExecDestroy(e);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  DecodeGraphs(const DecodeGraphs&) = delete;
  DecodeGraphs& operator=(const DecodeGraphs&) = delete;

  // Captures launch_on(i, stream) for i < sets, on a stream of its own (the legacy stream
  // cannot capture); false on a CUDA error or when a capture's launch failed.
  template <typename LaunchOn>
  bool Capture(int sets, LaunchOn&& launch_on) {
    if (cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) != cudaSuccess) return false;
    for (int i = 0; i < sets; ++i) {
      cudaGraph_t graph = nullptr;
      if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        return false;
      }
      const bool launched = launch_on(i, stream_);
      const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
      if (!launched || ended != cudaSuccess) {
        if (graph != nullptr) cudaGraphDestroy(graph);  // captured, but not usable
        return false;
      }
      cudaGraphExec_t exec = nullptr;
      const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      if (made != cudaSuccess) return false;
      execs_.push_back(exec);
    }
    return true;
  }
  // Replays set i's graph on the legacy stream, where the timing events are recorded.
  cudaError_t Launch(int i) const { return cudaGraphLaunch(execs_[i], nullptr); }

 private:
  cudaStream_t stream_ = nullptr;
  std::vector<cudaGraphExec_t> execs_;
};

// Everything one shape's launches read: the decode workspace and its plan, the K/V of
// `sets` copies of a layer (or the cache's layers) and their views, and the queries.
struct ShapeInputs {
  std::vector<int32_t> lens;
  int max_ctx = 0;
  int64_t set_bytes = 0;  // K and V bytes one launch reads
  PagedTable paged_table;
  int sets = 0;
  std::unique_ptr<DecodeWorkspace> ws;
  DeviceBuffer kv;                    // the copies, where not in a cache
  kvbench::VirtualCacheBatch cached;  // the virtual layouts' K/V in kvmem's cache
  std::vector<PagedKv> paged;
  std::vector<VirtualKv> virt;
  std::vector<int32_t> rows;  // virtual: the batch's rows
  int64_t q_elems = 0;        // per set
  DeviceBuffer q, out;
};

// How many copies of a layer's K/V (`set_alloc` bytes each) the launches rotate over so
// that L2 never holds them: 2 to 32, enough for kRotateBytes; for virtual-all in a tensor,
// the model's layers where they fit.
bool RotationSets(const DecodeSettings& s, const DecodeShape& sh, int64_t set_alloc, int* sets) {
  *sets = static_cast<int>(
      std::min<int64_t>(32, std::max<int64_t>(2, (kRotateBytes + set_alloc - 1) / set_alloc)));
  if (sh.kind == DecodeKind::kVirtualAllLayers && !s.virtual_cache && s.layers > 0) {
    // The model's layers where they fit (keeping 2 GiB for the workspace and the ceiling's
    // sink); fewer, said so in the row, where they do not.
    size_t free_bytes = 0, total_bytes = 0;
    BENCH_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
    const int64_t usable = static_cast<int64_t>(free_bytes) - (int64_t{2} << 30);
    *sets = static_cast<int>(std::max<int64_t>(2, std::min<int64_t>(s.layers, usable / set_alloc)));
  }
  return true;
}

bool MakeWorkspace(const DecodeSettings& s, const DecodeShape& sh, int max_ctx,
                   std::unique_ptr<DecodeWorkspace>* ws) {
  DecodeOptions o;
  o.shape.num_q_heads = kQHeads;
  o.shape.num_kv_heads = kKvHeads;
  o.shape.head_dim = kHeadDim;
  o.shape.kv_dtype = DType::kBFloat16;
  o.layout = sh.kind == DecodeKind::kPaged ? Layout::kPaged : Layout::kVirtual;
  o.max_batch = sh.batch;
  o.max_context = max_ctx;
  o.page_tokens = sh.page_tokens;
  o.fixed_grid = s.graph;
  o.pipeline_stages = s.stages;
  auto made = DecodeWorkspace::Create(o);
  if (!made.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", made.status().ToString().c_str());
    return false;
  }
  *ws = *std::move(made);
  return true;
}

enum class Loaded { kReady, kSkipped, kFailed };

// The virtual layouts' K/V in kvmem's own CUDA cache of the model's layers, rotated as a
// decode step does. kSkipped (printed) where the device cannot hold it.
Loaded LoadFromCache(const DecodeSettings& s, const DecodeShape& sh, ShapeInputs* in) {
  in->sets = s.layers > 0 ? s.layers : 32;
  absl::StatusOr<kvbench::VirtualCacheBatch> made = kvbench::MakeVirtualCacheBatch(
      sh.kind == DecodeKind::kVirtualAllLayers ? Arrangement::kAllLayers : Arrangement::kPerLayer,
      in->sets, s.chunk, kKvHeads, kHeadDim, in->lens, in->max_ctx);
  if (absl::IsResourceExhausted(made.status())) {
    // Too large for this device: say so and go on with the other shapes.
    std::printf("%-3s %-14s (KvCache, %d layers) B=%-4d ctx=%-6d skipped: %s\n", sh.tag,
                kvbench::DecodeKindName(sh.kind, sh.page_tokens).c_str(), in->sets, sh.batch,
                sh.ctx, made.status().ToString().c_str());
    return Loaded::kSkipped;
  }
  if (!made.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", made.status().ToString().c_str());
    return Loaded::kFailed;
  }
  in->cached = *std::move(made);
  for (const VirtualKv& v : in->cached.views) in->virt.push_back(in->ws->Bind(v));
  in->rows = in->cached.meta.row_ids;
  return Loaded::kReady;
}

// `sets` copies of the shape's K/V in one cudaMalloc'd buffer, random bf16.
Loaded LoadIntoBuffer(const DecodeShape& sh, int64_t set_alloc, ShapeInputs* in) {
  if (!in->kv.Allocate(in->sets * set_alloc)) {
    std::fprintf(stderr, "decode bench: cannot allocate %lld bytes\n",
                 static_cast<long long>(in->sets * set_alloc));
    return Loaded::kFailed;
  }
  if (!kvbench::FillRandom(in->kv.get(), in->sets * set_alloc, 7, kWho)) return Loaded::kFailed;
  MakeViews(sh, in->sets, set_alloc, in->kv.get<uint16_t>(), in->max_ctx, *in->ws, &in->paged,
            &in->virt);
  return Loaded::kReady;
}

// Builds the shape's inputs: page table (paged), workspace, K/V, the decode plan, queries.
Loaded PrepareShape(const DecodeSettings& s, const DecodeShape& sh, ShapeInputs* in) {
  const int64_t block = int64_t{kKvHeads} * kHeadDim;  // elements per token
  in->lens.assign(sh.batch, sh.ctx);
  if (sh.long_ctx > 0) in->lens[0] = sh.long_ctx;
  in->max_ctx = std::max(sh.ctx, sh.long_ctx);
  const int64_t tokens = std::accumulate(in->lens.begin(), in->lens.end(), int64_t{0});
  in->set_bytes = 2 * tokens * block * 2;  // K and V read
  if (sh.kind == DecodeKind::kPaged &&
      !MakePagedTable(s, sh, in->lens, in->max_ctx, &in->paged_table)) {
    return Loaded::kFailed;
  }
  // Bytes each set (a layer's K and V) occupies.
  const int64_t set_alloc = sh.kind == DecodeKind::kPaged
                                ? 2 * in->paged_table.pool_pages * sh.page_tokens * block * 2
                                : 2 * int64_t{sh.batch} * in->max_ctx * block * 2;
  if (!RotationSets(s, sh, set_alloc, &in->sets)) return Loaded::kFailed;
  if (!MakeWorkspace(s, sh, in->max_ctx, &in->ws)) return Loaded::kFailed;
  in->rows.resize(sh.batch);
  std::iota(in->rows.begin(), in->rows.end(), 0);
  const Loaded loaded = s.virtual_cache && sh.kind != DecodeKind::kPaged
                            ? LoadFromCache(s, sh, in)
                            : LoadIntoBuffer(sh, set_alloc, in);
  if (loaded != Loaded::kReady) return loaded;
  const absl::Status planned =
      sh.kind == DecodeKind::kPaged
          ? in->ws->PlanPaged(in->lens, in->paged_table.table, in->paged_table.stride, nullptr)
          : in->ws->PlanVirtual(in->lens, in->rows, nullptr);
  if (!planned.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", planned.ToString().c_str());
    return Loaded::kFailed;
  }
  in->q_elems = int64_t{sh.batch} * kQHeads * kHeadDim;
  const int64_t q_bytes = in->sets * in->q_elems * 2;
  if (!in->q.Allocate(q_bytes) || !in->out.Allocate(q_bytes)) return Loaded::kFailed;
  if (!kvbench::FillRandom(in->q.get(), q_bytes, 3, kWho)) return Loaded::kFailed;
  if (const cudaError_t err = cudaDeviceSynchronize(); err != cudaSuccess) {
    std::fprintf(stderr, "decode bench: filling the inputs: %s\n", cudaGetErrorString(err));
    return Loaded::kFailed;
  }
  return Loaded::kReady;
}

// How the shape's K/V are held, for its row: " (KvCache, 32 layers, chunk 512)", ...
std::string HowHeld(const DecodeSettings& s, const DecodeShape& sh, const ShapeInputs& in) {
  if (sh.kind == DecodeKind::kVirtualAllLayers && s.virtual_cache) {
    return absl::StrCat(" (KvCache, ", in.sets, " layers, chunk ", 1 << in.virt[0].chunk_shift,
                        ")");
  }
  if (sh.kind != DecodeKind::kPaged && s.virtual_cache) {
    return absl::StrCat(" (KvCache, ", in.sets, " layers)");
  }
  if (sh.kind == DecodeKind::kVirtualAllLayers) return absl::StrCat(" (", in.sets, " layers)");
  if (sh.kind == DecodeKind::kPaged) {
    return sh.long_ctx > 0 ? " (in order)" : absl::StrCat(" (", PoolName(s.pool, s.placement), ")");
  }
  return "";
}

// The shape's row, and the lines --graph, the paged pool and --spread add below it.
void PrintShape(const DecodeSettings& s, const DecodeShape& sh, const ShapeInputs& in,
                const std::vector<double>& sorted_ms, double ceiling) {
  const double us = sorted_ms[s.reps / 2] * 1e3;
  const double gbps = in.set_bytes / us * 1e-3;
  std::printf(
      "%-3s %-14s%s B=%-4d ctx=%-6d%s splits=%-4d stages=%d  %9.1f us  %7.0f GB/s  %5.1f %%\n",
      sh.tag, kvbench::DecodeKindName(sh.kind, sh.page_tokens).c_str(), HowHeld(s, sh, in).c_str(),
      sh.batch, sh.ctx, sh.long_ctx > 0 ? absl::StrCat(" (one of ", sh.long_ctx, ")").c_str() : "",
      in.ws->num_work(), in.ws->pipeline_stages(), us, gbps, 100.0 * gbps / ceiling);
  if (s.graph) {
    std::printf("      graph replay: fixed grid of %d CTAs, %d of them with work\n",
                in.ws->max_work() * kKvHeads, in.ws->num_work() * kKvHeads);
  }
  if (sh.kind == DecodeKind::kPaged) {
    std::printf("      pool of %lld pages; %.1f %% of a request's consecutive pages adjacent\n",
                static_cast<long long>(in.paged_table.pool_pages),
                100.0 * kvbench::AdjacentShare(in.paged_table.table, in.paged_table.stride,
                                               in.paged_table.row_pages));
  }
  if (s.spread) {
    std::printf("      p10 %.1f us, p90 %.1f us, min %.1f us, max %.1f us%s\n",
                sorted_ms[s.reps / 10] * 1e3, sorted_ms[s.reps * 9 / 10] * 1e3,
                sorted_ms.front() * 1e3, sorted_ms.back() * 1e3,
                s.spacer_us > 0 ? " (spacer between launches)" : "");
  }
}

// Times one shape (then traces it with s.trace); prints its row. False on a CUDA or kvmem
// error.
bool RunShape(const DecodeSettings& s, const DecodeShape& sh, double ceiling, int sms) {
  ShapeInputs in;
  const Loaded loaded = PrepareShape(s, sh, &in);
  if (loaded != Loaded::kReady) return loaded == Loaded::kSkipped;

  absl::Status launched;
  auto launch_on = [&](int i, cudaStream_t stream) {
    const uint16_t* qi = in.q.get<uint16_t>() + i * in.q_elems;
    uint16_t* oi = in.out.get<uint16_t>() + i * in.q_elems;
    const absl::Status st = sh.kind == DecodeKind::kPaged
                                ? DecodeAttention(*in.ws, in.paged[i], qi, oi, stream)
                                : DecodeAttention(*in.ws, in.virt[i], qi, oi, stream);
    launched.Update(st);
    return st.ok();
  };
  DecodeGraphs graphs;
  if (s.graph && !graphs.Capture(in.sets, launch_on)) {
    std::fprintf(stderr, "decode bench: graph capture failed: %s / %s\n",
                 cudaGetErrorString(cudaGetLastError()), launched.ToString().c_str());
    return false;
  }
  auto launch = [&](int r) {
    if (s.graph) {
      const cudaError_t err = graphs.Launch(r % in.sets);
      if (err != cudaSuccess) launched.Update(absl::InternalError(cudaGetErrorString(err)));
    } else {
      launch_on(r % in.sets, nullptr);
    }
  };
  auto spacer = [&](int) {
    if (s.spacer_us > 0) kvbench::LaunchSpacer(s.spacer_us);
  };
  const std::vector<double> sorted = kvbench::SortedMs(s.warmup, s.reps, launch, spacer);
  BENCH_CUDA(cudaDeviceSynchronize());
  if (!launched.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", launched.ToString().c_str());
    return false;
  }
  PrintShape(s, sh, in, sorted, ceiling);
  if (s.trace) {
    // The grid of a launch: every work item of the plan (or the capacity) times the heads.
    const int ctas = (s.graph ? in.ws->max_work() : in.ws->num_work()) * kKvHeads;
    if (!kvbench::TraceShape(s, ctas, sms, s.warmup + s.reps, launch, spacer)) return false;
    if (!launched.ok()) {
      std::fprintf(stderr, "decode bench: %s\n", launched.ToString().c_str());
      return false;
    }
  }
  std::fflush(stdout);
  return true;
}

}  // namespace
}  // namespace kvmem

namespace kvbench {

int RunDecode(const DecodeSettings& s) {
  cudaDeviceProp prop;
  if (!CurrentDeviceProperties(&prop, kvmem::kWho)) return 1;
  std::printf("device: %s, %d SMs, L2 %d MB; shape: %d q heads / %d kv heads, head_dim %d, bf16\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, kvmem::kQHeads,
              kvmem::kKvHeads, kvmem::kHeadDim);
  double ceiling = 0.0;
  if (!kvmem::MeasureCeiling(s, prop.multiProcessorCount, &ceiling)) return 1;
  std::printf("read-bandwidth ceiling: %.0f GB/s\n", ceiling);
  std::printf("set median of %d reps; %% = of the ceiling; paged page tables: %s\n", s.reps,
              kvmem::PoolName(s.pool, s.placement).c_str());
  for (int round = 1; round <= s.repeat; ++round) {
    if (s.repeat > 1) std::printf("round %d of %d\n", round, s.repeat);
    for (const DecodeShape& sh : s.shapes) {
      if (!kvmem::RunShape(s, sh, ceiling, prop.multiProcessorCount)) return 1;
    }
  }
  return 0;
}

}  // namespace kvbench
