// kvbench prefill: extend / prefill attention (kvmem/extend_attention.h) on the P1 shapes
// of docs/benchmarks.md (B=1 L in {4096, 16384}; B=4 L=8192; 512 new tokens on a 4096
// cached prefix), default model shape 32 q / 8 KV heads, head_dim 128, bf16, over the
// paged layout (page 16, pages shuffled) and the virtual layout (all-layer arrangement,
// 32 layers in chunks of --chunk tokens, and per-layer).
//
// FLOPs: prefill (no prefix) uses the convention of benchmarks.md,
// 2 x B x q_heads x L x L x head_dim (twice the attended pairs, which are ~L^2 / 2); an
// extend counts its attended pairs exactly: 4 x q_heads x head_dim x
// (new x prefix + new x (new + 1) / 2). Each figure is the median of event-timed launches
// after a warm-up. tools/gpu/anchor_prefill.py runs torch SDPA on the same shapes for the
// anchors; docs/kernels.md has the figures.
//
// Flags: `kvbench prefill --help` (settings.h). --kernel=both times the portable mma.sync
// kernel too (ExtendKernel::kMmaSync), beside the one kAuto picks (wgmma on an H100).
// --seq_pages puts the paged pool's pages in order (a diagnostic: the default shuffles
// them, a fragmented pool).
// --settle_ms=N (default 500): the GPU idles N ms before each figure's timed launches. At
// these rates an H100 runs into its power cap within tenths of a second and lowers its
// clock (nvidia-smi: "SW power cap", 1.4-2.0 GHz), so without a pause a figure depends on
// what ran before it (the extend shape measured right after b4 came out 18 % lower than
// alone). tools/gpu/anchor_prefill.py pauses the same way before each of its figures.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvmem/extend_attention.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/reference_attention.h"
#include "tools/kvbench/bench_util.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/subcommands.h"

namespace kvmem {
namespace {

constexpr char kWho[] = "prefill bench";
#define PREFILL_CUDA(expr) KVBENCH_CUDA(kWho, expr)

using kvbench::DeviceBuffer;

constexpr int kQHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kLayers = 32;  // of the all-layer arrangement: a token's stride spans them all

struct Shape {
  const char* tag;
  int batch;
  int prefix;
  int fresh;
};

double Flops(const Shape& sh) {
  const double hd = double{kQHeads} * kHeadDim;
  if (sh.prefix == 0) return 2.0 * sh.batch * hd * double(sh.fresh) * sh.fresh;
  const double pairs = double(sh.fresh) * sh.prefix + double(sh.fresh) * (sh.fresh + 1) / 2;
  return 4.0 * sh.batch * hd * pairs;
}

// Times one (shape, layout); prints a row. *tflops gets the figure.
bool RunOne(const kvbench::PrefillSettings& s, const Shape& sh, const std::string& layout,
            ExtendKernel kernel, double* tflops) {
  const int64_t block = int64_t{kKvHeads} * kHeadDim;  // elements per token, one of K / V
  const int64_t ctx = int64_t{sh.prefix} + sh.fresh;
  const int64_t total_new = int64_t{sh.batch} * sh.fresh;
  AttentionShape shape;
  shape.num_q_heads = kQHeads;
  shape.num_kv_heads = kKvHeads;
  shape.head_dim = kHeadDim;
  shape.kv_dtype = DType::kBFloat16;

  ExtendOptions o;
  o.shape = shape;
  o.max_batch = sh.batch;
  o.max_new_tokens = total_new;
  o.max_context = ctx;
  o.page_tokens = s.page;
  o.layout = layout == "paged" ? Layout::kPaged : Layout::kVirtual;
  o.kernel = kernel;
  auto ws = ExtendWorkspace::Create(o);
  if (!ws.ok()) {
    std::fprintf(stderr, "prefill bench: %s\n", ws.status().ToString().c_str());
    return false;
  }
  const std::vector<int32_t> prefix(sh.batch, sh.prefix);
  const std::vector<int32_t> fresh(sh.batch, sh.fresh);

  DeviceBuffer kv_buf, q_buf, out_buf;
  PagedKv paged;
  VirtualKv virt;
  std::vector<int32_t> table, rows;
  int64_t kv_bytes = 0;
  if (layout == "paged") {
    const int64_t pages_per_req = (ctx + s.page - 1) / s.page;
    const int64_t pages = pages_per_req * sh.batch;
    kv_bytes = 2 * pages * s.page * block * 2;
    if (!kv_buf.Allocate(kv_bytes)) return false;
    paged.k = kv_buf.get();
    paged.v = kv_buf.get<uint16_t>() + pages * s.page * block;
    paged.page_tokens = s.page;
    paged.token_stride = block;
    paged.page_stride = s.page * block;
    table.resize(pages);
    std::iota(table.begin(), table.end(), 0);
    std::mt19937 rng(1);
    if (!s.seq_pages) std::shuffle(table.begin(), table.end(), rng);  // a fragmented pool
    auto st = (*ws)->PlanPaged(prefix, fresh, table, pages_per_req, nullptr);
    if (!st.ok()) {
      std::fprintf(stderr, "prefill bench: %s\n", st.ToString().c_str());
      return false;
    }
    paged = (*ws)->Bind(paged);
  } else {
    const bool all = layout == "virtual-all";
    // All layers: [row][chunk][layer][k|v][chunk token][H][D] (layer 0 is timed); per
    // layer: [row][token][H][D].
    const int64_t chunk = all ? s.chunk : 1;
    const int64_t chunk_elems = (all ? 2 * int64_t{kLayers} : 1) * chunk * block;
    const int64_t row_stride = (ctx + chunk - 1) / chunk * chunk_elems;
    kv_bytes = (all ? 1 : 2) * sh.batch * row_stride * 2;
    if (!kv_buf.Allocate(kv_bytes)) return false;
    virt.k = kv_buf.get();
    virt.v = all ? kv_buf.get<uint16_t>() + chunk * block
                 : kv_buf.get<uint16_t>() + sh.batch * row_stride;
    // As KvCache::VirtualView gives it: a chunk of one token is a plain token stride.
    virt.token_stride = chunk == 1 ? chunk_elems : block;
    virt.chunk_shift = std::countr_zero(static_cast<uint64_t>(chunk));
    virt.chunk_gap = chunk == 1 ? 0 : chunk_elems - chunk * block;
    virt.row_stride = row_stride;
    virt.max_context = ctx;
    rows.resize(sh.batch);
    std::iota(rows.begin(), rows.end(), 0);
    std::reverse(rows.begin(), rows.end());
    auto st = (*ws)->PlanVirtual(prefix, fresh, rows, nullptr);
    if (!st.ok()) {
      std::fprintf(stderr, "prefill bench: %s\n", st.ToString().c_str());
      return false;
    }
    virt = (*ws)->Bind(virt);
  }
  const int64_t q_bytes = total_new * kQHeads * kHeadDim * 2;
  if (!q_buf.Allocate(q_bytes) || !out_buf.Allocate(q_bytes)) return false;
  if (!kvbench::FillRandom(kv_buf.get(), kv_bytes, 7, kWho) ||
      !kvbench::FillRandom(q_buf.get(), q_bytes, 9, kWho)) {
    return false;
  }
  PREFILL_CUDA(cudaDeviceSynchronize());
  std::this_thread::sleep_for(std::chrono::milliseconds(s.settle_ms));

  absl::Status launched = absl::OkStatus();
  auto run = [&] {
    absl::Status st = layout == "paged"
                          ? ExtendAttention(**ws, paged, q_buf.get(), out_buf.get(), nullptr)
                          : ExtendAttention(**ws, virt, q_buf.get(), out_buf.get(), nullptr);
    if (!st.ok()) launched = st;
  };
  const double ms = kvbench::MedianMs(s.warmup, s.reps, [&](int) { run(); });
  PREFILL_CUDA(cudaDeviceSynchronize());
  if (!launched.ok()) {
    std::fprintf(stderr, "prefill bench: %s\n", launched.ToString().c_str());
    return false;
  }
  *tflops = Flops(sh) / (ms * 1e-3) * 1e-12;
  const std::string name = layout == "paged"         ? "paged-" + std::to_string(s.page)
                           : layout == "virtual-all" ? "virtual-all/" + std::to_string(s.chunk)
                                                     : layout;
  std::printf("%-8s B=%d prefix=%-5d new=%-5d %-15s %-9s %9.3f ms %7.1f TFLOP/s\n", sh.tag,
              sh.batch, sh.prefix, sh.fresh, name.c_str(),
              (*ws)->uses_wgmma() ? "wgmma" : "mma.sync", ms, *tflops);
  std::fflush(stdout);
  return true;
}

}  // namespace
}  // namespace kvmem

namespace kvbench {

int RunPrefill(const PrefillSettings& s) {
  using kvmem::ExtendKernel;
  cudaDeviceProp prop;
  if (!CurrentDeviceProperties(&prop, kvmem::kWho)) return 1;
  std::printf("prefill: %s, %d SMs; q_heads %d, kv_heads %d, head_dim %d, bf16; median of %d\n",
              prop.name, prop.multiProcessorCount, kvmem::kQHeads, kvmem::kKvHeads, kvmem::kHeadDim,
              s.reps);
  const kvmem::Shape shapes[] = {
      {"p4k", 1, 0, 4096}, {"p16k", 1, 0, 16384}, {"b4", 4, 0, 8192}, {"extend", 1, 4096, 512}};
  std::vector<ExtendKernel> kernels;
  if (s.kernel != PrefillKernel::kMma) kernels.push_back(ExtendKernel::kAuto);
  if (s.kernel != PrefillKernel::kAuto) kernels.push_back(ExtendKernel::kMmaSync);
  int rc = 0;
  for (const ExtendKernel kernel : kernels) {
    for (const kvmem::Shape& sh : shapes) {
      if (!Listed(s.shapes, sh.tag)) continue;
      double paged = 0.0, virt = 0.0;
      for (const std::string& l : PrefillLayouts()) {
        if (!Listed(s.layouts, l)) continue;
        double t = 0.0;
        if (!kvmem::RunOne(s, sh, l, kernel, &t)) {
          rc = 1;
          continue;
        }
        if (l == "paged") paged = t;
        if (l == "virtual-all") virt = t;
      }
      if (paged > 0 && virt > 0) {
        std::printf("%-8s paged / virtual-all = %.3f\n", sh.tag, paged / virt);
      }
    }
  }
  return rc;
}

}  // namespace kvbench
