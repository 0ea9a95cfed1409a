#include "tools/kvbench/settings.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "kvmem/config.h"
#include "tools/kvbench/flags.h"
#include "tools/kvbench/status_macros.h"

namespace kvbench {
namespace {

// InvalidArgument "--name=value: want" unless `ok`.
absl::Status Want(bool ok, const char* name, int64_t value, const char* want) {
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--", name, "=", value, ": want ", want));
}

bool PowerOfTwo(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Every name in the comma-separated `list` is one of `known`; none is an error too.
absl::Status CheckList(const char* name, const std::string& list,
                       const std::vector<std::string>& known) {
  bool any = false;
  for (absl::string_view item : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    bool found = false;
    for (const std::string& k : known) found = found || item == k;
    if (!found) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, "=", list, ": unknown '", item,
                                                     "' (want a comma-separated list of ",
                                                     absl::StrJoin(known, ", "), ")"));
    }
    any = true;
  }
  if (!any) return absl::InvalidArgumentError(absl::StrCat("--", name, "= names nothing"));
  return absl::OkStatus();
}

std::vector<DecodeShape> AllDecodeShapes(const DecodeSettings& s) {
  const bool all = !s.d1 && !s.d2 && !s.balance;
  const DecodeKind kinds[] = {DecodeKind::kPaged, DecodeKind::kVirtualAllLayers,
                              DecodeKind::kVirtualPerLayer};
  std::vector<DecodeShape> shapes;
  if (all || s.d1) {
    for (DecodeKind k : kinds) {
      for (auto [b, ctx] : std::vector<std::pair<int, int>>{
               {1, 4096}, {16, 4096}, {64, 4096}, {128, 4096}, {8, 32768}, {1, 131072}}) {
        shapes.push_back({"D1", b, ctx, k, s.page});
      }
    }
  }
  if (all || s.d2) {
    for (int page : {1, 16, 64, 256}) shapes.push_back({"D2", 64, 4096, DecodeKind::kPaged, page});
    shapes.push_back({"D2", 64, 4096, DecodeKind::kVirtualAllLayers, 0});
    shapes.push_back({"D2", 64, 4096, DecodeKind::kVirtualPerLayer, 0});
  }
  if (s.balance) {
    // Where whole requests would leave CTAs running alone at the end: a long request among
    // short ones, and a batch of 1.2 waves (160 CTAs over 132 SMs on an H100).
    for (DecodeKind k : kinds) {
      shapes.push_back({"BAL", 64, 2048, k, s.page, 65536});
      shapes.push_back({"BAL", 128, 512, k, s.page, 32768});
      shapes.push_back({"BAL", 20, 4096, k, s.page});
    }
  }
  return shapes;
}

}  // namespace

// ---- decode ---------------------------------------------------------------------

std::string DecodeKindName(DecodeKind kind, int page_tokens) {
  switch (kind) {
    case DecodeKind::kPaged:
      return absl::StrCat("paged-", page_tokens);
    case DecodeKind::kVirtualAllLayers:
      return "virtual-all";
    case DecodeKind::kVirtualPerLayer:
      return "virtual-layer";
  }
  return "?";
}

void DeclareFlags(DecodeSettings* s, FlagSet* f) {
  f->Bool("d1", &s->d1, "the D1 shapes (batch / context sweep); with no set named, D1 and D2");
  f->Bool("d2", &s->d2, "the D2 shapes (page-size sensitivity)");
  f->Bool("balance", &s->balance,
          "batches the split plan must balance: one long request among short ones (in-order "
          "pages), 1.2 waves of equal ones");
  f->Bool("quick", &s->quick,
          "20 reps and 3 warm-ups (unless --reps says otherwise), a 2 GiB "
          "ceiling buffer instead of 8 GiB");
  f->Int("reps", &s->reps, "timed launches per shape; 0: 100, or 20 with --quick");
  f->String("filter", &s->filter,
            "only shapes whose layout name (paged-16, virtual-all, "
            "virtual-layer) contains this");
  f->Int("batch", &s->batch, "> 0: only shapes of this batch size (e.g. for ncu)");
  f->Int("page", &s->page, "page_tokens of the paged D1 and balance shapes");
  f->Choice("pool", &s->pool,
            {{"grown", PoolKind::kGrown},
             {"grown-elastic", PoolKind::kGrownElastic},
             {"shuffled", PoolKind::kShuffled},
             {"in-order", PoolKind::kInOrder}},
            "the paged page tables: kvmem's cache after request churn (pool mapped whole, or "
            "elastic), every page shuffled, or in order");
  f->Choice("placement", &s->placement,
            {{"contiguous", kvmem::PagePlacement::kContiguous},
             {"lowest-first", kvmem::PagePlacement::kLowestFirst}},
            "the grown cache's PagePlacement");
  f->Int("spacer_us", &s->spacer_us,
         "> 0: a kernel spinning this many microseconds before each timed launch");
  f->Int("stages", &s->stages,
         "the kernel's pipeline stages (DecodeOptions::pipeline_stages; 0: the device's choice)");
  f->Bool("spread", &s->spread, "print the 10th and 90th percentile beside the median");
  f->Bool("graph", &s->graph,
          "time replays of one captured launch (fixed_grid workspace), as an engine replays a "
          "decode step");
  f->Bool("trace", &s->trace,
          "per-CTA start and end of 50 more launches per shape, fastest and slowest summarised "
          "(a build with -DKVMEM_DECODE_TRACE=ON)");
  f->String("trace_csv", &s->trace_csv,
            "also write the traced records as CSV here (implies --trace; one shape)");
  f->Int("repeat", &s->repeat,
         "rounds over the selected shapes in one process (a shape's figure can depend on what "
         "ran before it: quote the last round)");
  f->Choice("virtual", &s->virtual_cache, {{"cache", true}, {"tensor", false}},
            "the virtual layouts' K/V in kvmem's CUDA KvCache (2 MiB handles mapped into a "
            "reservation), or in a cudaMalloc'd tensor of that shape");
  f->Int("layers", &s->layers,
         "the cache's layers, each launch reading the next (the model's: virtual-all's token "
         "stride is 128 KiB); with --virtual=tensor only virtual-all's, fewer where they do not "
         "fit, 0 for the 2-32 that the L2 rotation needs");
  f->Int("chunk", &s->chunk,
         "the cache's all-layer chunk in tokens (KvCacheConfig::chunk_tokens; 0: auto, 512 "
         "here, a layer's K and V per 2 MiB page; 1: no chunks)");
}

absl::Status Validate(DecodeSettings* s) {
  KVBENCH_RETURN_IF_ERROR(Want(s->reps >= 0, "reps", s->reps, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->batch >= 0, "batch", s->batch, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->page >= 1, "page", s->page, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->spacer_us >= 0, "spacer_us", s->spacer_us, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->stages >= 0, "stages", s->stages, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->repeat >= 1, "repeat", s->repeat, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->layers >= 0, "layers", s->layers, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(
      Want(s->chunk == 0 || PowerOfTwo(s->chunk), "chunk", s->chunk, "0 (auto) or a power of two"));
  s->warmup = s->quick ? 3 : 10;
  if (s->reps == 0) s->reps = s->quick ? 20 : 100;
  s->ceiling_bytes = int64_t{s->quick ? 2 : 8} << 30;
  if (!s->trace_csv.empty()) s->trace = true;
  s->shapes.clear();
  for (const DecodeShape& sh : AllDecodeShapes(*s)) {
    if (DecodeKindName(sh.kind, sh.page_tokens).find(s->filter) == std::string::npos) continue;
    if (s->batch > 0 && sh.batch != s->batch) continue;
    s->shapes.push_back(sh);
  }
  if (s->shapes.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("no shape matches --filter=", s->filter,
                                                   " --batch=", s->batch, " in the sets chosen"));
  }
  if (!s->trace_csv.empty() && s->shapes.size() > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--trace_csv writes one shape's records, ", s->shapes.size(),
                     " shapes selected (narrow them with --filter, --batch, --d1 or --d2)"));
  }
  return absl::OkStatus();
}

// ---- prefill --------------------------------------------------------------------

const std::vector<std::string>& PrefillLayouts() {
  static const std::vector<std::string> layouts = {"paged", "virtual-all", "virtual-layer"};
  return layouts;
}

const std::vector<std::string>& PrefillShapeTags() {
  static const std::vector<std::string> tags = {"p4k", "p16k", "b4", "extend"};
  return tags;
}

bool Listed(const std::string& list, const std::string& name) {
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    if (item == name) return true;
  }
  return false;
}

void DeclareFlags(PrefillSettings* s, FlagSet* f) {
  f->Int("reps", &s->reps, "timed launches per figure (the median is printed)");
  f->Int("warmup", &s->warmup, "untimed launches before them");
  f->Int("page", &s->page, "page_tokens of the paged layout");
  f->String("layouts", &s->layouts, "comma-separated: paged, virtual-all, virtual-layer");
  f->String("shapes", &s->shapes,
            "comma-separated: p4k (B=1 L=4096), p16k (B=1 L=16384), b4 (B=4 L=8192), extend "
            "(512 new tokens on a 4096 prefix)");
  f->Choice("kernel", &s->kernel,
            {{"auto", PrefillKernel::kAuto},
             {"mma", PrefillKernel::kMma},
             {"both", PrefillKernel::kBoth}},
            "the kernel kAuto picks (wgmma on an H100), the portable mma.sync one, or both");
  f->Bool("seq_pages", &s->seq_pages,
          "the paged pool's pages in order (a diagnostic: by default shuffled, a fragmented "
          "pool)");
  f->Int("settle_ms", &s->settle_ms,
         "the GPU idles this long before each figure (under prefill an H100 reaches its power "
         "cap and lowers its clock within tenths of a second)");
  f->Int("chunk", &s->chunk,
         "virtual-all's chunk in tokens (512: the cache's choice for this shape; 1: no chunks)");
}

absl::Status Validate(PrefillSettings* s) {
  KVBENCH_RETURN_IF_ERROR(Want(s->reps >= 1, "reps", s->reps, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->warmup >= 0, "warmup", s->warmup, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->page >= 1, "page", s->page, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->settle_ms >= 0, "settle_ms", s->settle_ms, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(PowerOfTwo(s->chunk), "chunk", s->chunk, "a power of two"));
  KVBENCH_RETURN_IF_ERROR(CheckList("layouts", s->layouts, PrefillLayouts()));
  KVBENCH_RETURN_IF_ERROR(CheckList("shapes", s->shapes, PrefillShapeTags()));
  return absl::OkStatus();
}

// ---- vmm ------------------------------------------------------------------------

void DeclareFlags(VmmSettings* s, FlagSet* f) {
  f->Choice("backend", &s->backend, {{"cuda", VmmBackend::kCuda}, {"host", VmmBackend::kHost}},
            "the driver's VMM calls (raw and through kvmem's CudaVmm) with cudaMalloc as the "
            "anchor, or kvmem's host backend (no GPU needed)");
  f->Int("handles", &s->handles, "physical handles of one granule per round");
  f->Int("rounds", &s->rounds, "rounds over them, after one warm-up round");
  f->Int("batch", &s->batch, "handles per call in the batched set access / unmap rows");
  f->Int("device", &s->device, "CUDA device ordinal");
}

absl::Status Validate(VmmSettings* s) {
  KVBENCH_RETURN_IF_ERROR(Want(s->handles >= 1, "handles", s->handles, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->rounds >= 1, "rounds", s->rounds, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(
      Want(s->batch >= 1 && s->batch <= s->handles, "batch", s->batch, "1 <= batch <= handles"));
  KVBENCH_RETURN_IF_ERROR(Want(s->device >= 0, "device", s->device, ">= 0"));
#ifndef KVMEM_WITH_CUDA
  if (s->backend == VmmBackend::kCuda) {
    return absl::InvalidArgumentError(
        "--backend=cuda: this kvbench is built without CUDA; use "
        "--backend=host");
  }
#endif
  return absl::OkStatus();
}

// ---- mapper ---------------------------------------------------------------------

void DeclareFlags(MapperSettings* s, FlagSet* f) {
  f->Int("requests", &s->requests, "requests decoding together");
  f->Int("steps", &s->steps, "timed decode steps");
  f->Int("warmup", &s->warmup, "decode steps before them");
  f->Int("prompt_max", &s->prompt_max, "prompts are uniform in 1..prompt_max tokens");
  f->Int64("map_ahead", &s->map_ahead,
           "tokens the background mapper keeps mapped ahead of each row (mode on)");
  f->Int("chunk", &s->chunk,
         "KvCacheConfig::chunk_tokens (0: the library's chunk, 512 tokens for this shape; 1: "
         "no chunks, 16 tokens per 2 MiB page)");
  f->Int("layers", &s->layers, "model layers");
  f->Int("kv_heads", &s->kv_heads, "KV heads per layer");
  f->Int("head_dim", &s->head_dim, "head dimension (bf16)");
  f->Int("device", &s->device, "CUDA device ordinal");
  f->String("modes", &s->modes,
            "comma-separated: off (growth maps synchronously), on (the "
            "background mapper)");
}

absl::Status Validate(MapperSettings* s) {
  KVBENCH_RETURN_IF_ERROR(Want(s->requests >= 1, "requests", s->requests, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->steps >= 1, "steps", s->steps, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->warmup >= 0, "warmup", s->warmup, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->prompt_max >= 1, "prompt_max", s->prompt_max, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->map_ahead >= 1 && s->map_ahead <= (int64_t{1} << 24), "map_ahead",
                               s->map_ahead, "1 to 2^24"));
  KVBENCH_RETURN_IF_ERROR(
      Want(s->chunk == 0 || PowerOfTwo(s->chunk), "chunk", s->chunk, "0 (auto) or a power of two"));
  KVBENCH_RETURN_IF_ERROR(Want(s->layers >= 1, "layers", s->layers, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->kv_heads >= 1, "kv_heads", s->kv_heads, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->head_dim >= 1, "head_dim", s->head_dim, ">= 1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->device >= 0, "device", s->device, ">= 0"));
  // The step's kernels write and read whole 16-byte vectors of each layer's K and V.
  if (int64_t{s->kv_heads} * s->head_dim * 2 % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv_heads=", s->kv_heads, " --head_dim=", s->head_dim, ": a token's K of ",
        "one layer is ", int64_t{s->kv_heads} * s->head_dim * 2, " bytes; want a multiple of 16"));
  }
  // Steps past the prompts must fit the cache's max_context (2^30 tokens).
  const int64_t longest = int64_t{s->prompt_max} + s->warmup + s->steps + s->map_ahead;
  if (longest > (int64_t{1} << 29)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prompt_max + --warmup + --steps + --map_ahead = ", longest, " tokens: want <= 2^29"));
  }
  KVBENCH_RETURN_IF_ERROR(CheckList("modes", s->modes, {"off", "on"}));
  s->mode_off = Listed(s->modes, "off");
  s->mode_on = Listed(s->modes, "on");
  return absl::OkStatus();
}

// ---- steps ----------------------------------------------------------------------

namespace {

// The comma-separated integers of `list` (or of `fallback` when `list` is empty), each in
// [lo, hi], into *out.
template <typename Int>
absl::Status ParseInts(const char* name, const std::string& list, const char* fallback, int64_t lo,
                       int64_t hi, std::vector<Int>* out) {
  const std::string& text = list.empty() ? std::string(fallback) : list;
  out->clear();
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(item, &v) || v < lo || v > hi) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", name, "=", text, ": '", item, "' is not an integer in [", lo, ", ", hi, "]"));
    }
    out->push_back(static_cast<Int>(v));
  }
  if (out->empty()) return absl::InvalidArgumentError(absl::StrCat("--", name, "= names nothing"));
  return absl::OkStatus();
}

}  // namespace

const std::vector<StepsLayout>& StepsLayouts() {
  using kvmem::Arrangement;
  using kvmem::Layout;
  static const std::vector<StepsLayout> layouts = {
      {"paged-1", Layout::kPaged, Arrangement::kAllLayers, 1, 0},
      {"paged-16", Layout::kPaged, Arrangement::kAllLayers, 16, 0},
      {"paged-64", Layout::kPaged, Arrangement::kAllLayers, 64, 0},
      {"virtual-chunk", Layout::kVirtual, Arrangement::kAllLayers, 16, 0},
      {"virtual", Layout::kVirtual, Arrangement::kAllLayers, 16, 1},
      {"virtual-layer", Layout::kVirtual, Arrangement::kPerLayer, 16, 0},
  };
  return layouts;
}

const std::vector<std::string>& StepsScenarios() {
  static const std::vector<std::string> scenarios = {"decode", "prefill",  "churn",
                                                     "fork",   "rewind",   "pressure",
                                                     "threads"};
  return scenarios;
}

void DeclareFlags(StepsSettings* s, FlagSet* f) {
  f->String("layouts", &s->layouts,
            "comma-separated: paged-1, paged-16, paged-64 (page_tokens), virtual-chunk (all "
            "layers of a token together, in the library's chunks), virtual (the same, "
            "chunk_tokens = 1), virtual-layer (a tensor per layer and K/V)");
  f->String("scenarios", &s->scenarios,
            "comma-separated: decode (one token for every request of a batch: the per-request "
            "calls + BuildBatchMetadata vs ExtendBatch + the running batch), prefill (one "
            "request extended by many tokens), churn (AddRequest + Free), fork (of a long "
            "prefix), rewind (speculative decoding: extend by 1-8, truncate back), pressure "
            "(decode at a budget 1.02x what the batch holds, requests ending and starting), "
            "threads (1, 2 and 4 threads each decoding its own 256 requests of one cache)");
  f->String("batches", &s->batches,
            "decode: requests per step (empty: 64,256,1024,4096; 64,256 with --quick)");
  f->String("context", &s->context,
            "decode and pressure: the requests' tokens, MIN-MAX (spread geometrically over the "
            "range) or N (empty: 2048-32768; 2048-8192 with --quick); scaled down together "
            "where the batch would pass --max_tokens");
  f->String("prefill", &s->prefill,
            "prefill: tokens per extend (empty: 512,2048,8192,32768; 512,4096 with --quick)");
  f->String("rows", &s->rows,
            "churn: the cache's max_requests, all but 8 rows in use (empty: 64,4096; 64,1024 "
            "with --quick)");
  f->String("fork", &s->fork,
            "fork: tokens of the prefix forked (empty: 2048,8192,32768; 2048 with --quick)");
  f->String("rewind", &s->rewind,
            "rewind: requests per step, all forked from one 2000-token prefix (empty: 64,256; "
            "64 with --quick)");
  f->Int("pressure_batch", &s->pressure_batch,
         "pressure: requests per step (0: 1024, 64 with --quick)");
  f->Int("reps", &s->reps, "timed reps (steps, calls) per figure; 0: 200, or 20 with --quick");
  f->Int("warmup", &s->warmup, "untimed reps before them; -1: 20, or 3 with --quick");
  f->Int("max_ms", &s->max_ms,
         "a figure stops after this many milliseconds once it has 3 reps (the per-request "
         "path of a large batch is slow); 0: 2000, or 200 with --quick");
  f->Int64("max_tokens", &s->max_tokens,
           "tokens one cache holds at most; a batch whose contexts would pass it has them "
           "scaled down (each granule is a mapping of its own on the host backend, and a "
           "process has vm.max_map_count of them); 0: 16M, or 1M with --quick");
  f->Bool("quick", &s->quick,
          "smaller sizes, 20 reps and 3 warm-ups (unless said otherwise): a smoke run");
  f->Int("layers", &s->layers,
         "model layers. The shape is Llama-3-8B's but for the layers: 8 KV heads x 128 "
         "bf16, so one layer is 4 KiB per token (K and V). Bookkeeping costs follow tokens "
         "and pages, not bytes; one layer keeps a large batch's bytes within host memory, "
         "but a virtual row's page then holds 32x the tokens it holds with 32 layers");
  f->Int64("granularity", &s->granularity,
           "bytes of the host backend's page (KvCacheConfig::host_granularity), a power of "
           "two; 2 MiB is a GPU's. A smaller page makes the virtual layouts map pages more "
           "often per token (and a cache holds fewer tokens: see --max_tokens)");
  f->String("json", &s->json,
            "also write the results here, as a results file of tools/scripts/gen_benchmarks.py "
            "(one run per scenario)");
}

absl::Status Validate(StepsSettings* s) {
  const bool q = s->quick;
  KVBENCH_RETURN_IF_ERROR(Want(s->reps >= 0, "reps", s->reps, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->warmup >= -1, "warmup", s->warmup, ">= -1"));
  KVBENCH_RETURN_IF_ERROR(Want(s->max_ms >= 0, "max_ms", s->max_ms, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->max_tokens >= 0, "max_tokens", s->max_tokens, ">= 0"));
  KVBENCH_RETURN_IF_ERROR(Want(s->pressure_batch >= 0 && s->pressure_batch <= 65536,
                               "pressure_batch", s->pressure_batch, "0 (the default) to 65536"));
  KVBENCH_RETURN_IF_ERROR(
      Want(s->layers >= 1 && s->layers <= 128, "layers", s->layers, "1 to 128"));
  KVBENCH_RETURN_IF_ERROR(Want(
      PowerOfTwo(s->granularity) && s->granularity >= 4096 && s->granularity <= (int64_t{1} << 30),
      "granularity", s->granularity, "a power of two, 4 KiB to 1 GiB"));
  if (s->reps == 0) s->reps = q ? 20 : 200;
  if (s->warmup < 0) s->warmup = q ? 3 : 20;
  if (s->max_ms == 0) s->max_ms = q ? 200 : 2000;
  if (s->max_tokens == 0) s->max_tokens = int64_t{q ? 1 : 16} << 20;
  if (s->pressure_batch == 0) s->pressure_batch = q ? 64 : 1024;

  std::vector<std::string> names;
  for (const StepsLayout& l : StepsLayouts()) names.push_back(l.name);
  KVBENCH_RETURN_IF_ERROR(CheckList("layouts", s->layouts, names));
  s->layout_list.clear();
  for (const StepsLayout& l : StepsLayouts()) {
    if (Listed(s->layouts, l.name)) s->layout_list.push_back(l);
  }
  KVBENCH_RETURN_IF_ERROR(CheckList("scenarios", s->scenarios, StepsScenarios()));

  // Contexts stay below 2^29 tokens: max_context, with room to grow, must fit 2^30.
  constexpr int64_t kMaxContext = int64_t{1} << 29;
  KVBENCH_RETURN_IF_ERROR(ParseInts("batches", s->batches, q ? "64,256" : "64,256,1024,4096", 1,
                                    65536, &s->batch_list));
  KVBENCH_RETURN_IF_ERROR(ParseInts("prefill", s->prefill, q ? "512,4096" : "512,2048,8192,32768",
                                    1, kMaxContext, &s->prefill_list));
  KVBENCH_RETURN_IF_ERROR(
      ParseInts("rows", s->rows, q ? "64,1024" : "64,4096", 9, 65536, &s->row_list));
  KVBENCH_RETURN_IF_ERROR(
      ParseInts("fork", s->fork, q ? "2048" : "2048,8192,32768", 1, kMaxContext, &s->fork_list));
  KVBENCH_RETURN_IF_ERROR(
      ParseInts("rewind", s->rewind, q ? "64" : "64,256", 1, 65536, &s->rewind_list));

  const std::string context = s->context.empty() ? (q ? "2048-8192" : "2048-32768") : s->context;
  const std::vector<std::string> ends = absl::StrSplit(context, '-');
  if (ends.size() > 2 || !absl::SimpleAtoi(ends.front(), &s->context_min) ||
      !absl::SimpleAtoi(ends.back(), &s->context_max) || s->context_min < 1 ||
      s->context_max < s->context_min || s->context_max > kMaxContext) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--context=", context, ": want N or MIN-MAX tokens, 1 <= MIN <= MAX <= ", kMaxContext));
  }
  return absl::OkStatus();
}

}  // namespace kvbench
