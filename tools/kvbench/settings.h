// The settings of every kvbench subcommand: one struct each, its flags (DeclareFlags) and
// the one function that checks them (Validate). Plain host code, so the command lines are
// tested without a GPU (tests/kvbench_flags_test.cc); the benchmarks that read them are in
// the subcommands' own files.
#ifndef KVMEM_TOOLS_KVBENCH_SETTINGS_H_
#define KVMEM_TOOLS_KVBENCH_SETTINGS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kvmem/config.h"
#include "tools/kvbench/flags.h"

namespace kvbench {

// ---- kvbench decode ---------------------------------------------------------------

// Paged page tables. kGrown / kGrownElastic: from kvmem's paged cache after request
// churn (grown_pool.h), its pool mapped whole as engines preallocate theirs, or elastic.
// kShuffled: every page of the batch in a random order (the worst case for address
// translation). kInOrder: request by request (the best case).
enum class PoolKind { kGrown, kGrownElastic, kShuffled, kInOrder };

// Where a decode shape's K/V lie.
enum class DecodeKind { kPaged, kVirtualAllLayers, kVirtualPerLayer };

struct DecodeShape {
  const char* tag;  // "D1", "D2", "BAL"
  int batch;
  int ctx;
  DecodeKind kind;
  int page_tokens;
  int long_ctx = 0;  // > 0: request 0 has this many tokens, the others ctx (ragged)
};

// "paged-16", "virtual-all", "virtual-layer": what --filter matches.
std::string DecodeKindName(DecodeKind kind, int page_tokens);

struct DecodeSettings {
  // Shape sets; none given: D1 and D2.
  bool d1 = false;
  bool d2 = false;
  bool balance = false;  // batches the split plan must balance (decode_bench.cu)
  bool quick = false;    // fewer reps, a smaller ceiling buffer
  int reps = 0;          // timed launches per shape; 0: 100, or 20 with --quick
  std::string filter;    // only shapes whose layout name contains this
  int batch = 0;         // > 0: only shapes of this batch size (e.g. for ncu)
  int page = 16;         // page_tokens of the paged D1 and balance shapes
  PoolKind pool = PoolKind::kGrown;
  kvmem::PagePlacement placement = kvmem::PagePlacement::kContiguous;  // of kGrown pools
  int spacer_us = 0;      // > 0: a spinning kernel of this length before each timed launch
  int stages = 0;         // DecodeOptions::pipeline_stages (0: the device's choice)
  bool spread = false;    // the 10th and 90th percentile beside the median
  bool graph = false;     // time replays of a captured CUDA graph (fixed_grid workspace)
  bool trace = false;     // per-CTA times of more launches after the timing (diagnostic)
  std::string trace_csv;  // non-empty: the traced launches' records as CSV (implies trace)
  int repeat = 2;         // rounds over the selected shapes in one process
  // The virtual layouts' K/V in kvmem's own CUDA KvCache (2 MiB handles mapped into a
  // reservation), or (false) in a cudaMalloc'd tensor of that shape.
  bool virtual_cache = true;
  // The cache's layers, each launch reading the next one as a decode step does (32, the
  // model's). With virtual_cache false: virtual-all's layers only, fewer where they do not
  // fit; 0 gives it the 2-32 copies that the L2 rotation needs.
  int layers = 32;
  // The cache's all-layer chunk (KvCacheConfig::chunk_tokens; 0 picks 512 tokens here, a
  // layer's K and V per 2 MiB page; 1: no chunks).
  int chunk = 0;

  // Filled by Validate.
  int warmup = 0;                   // untimed launches before the timed ones
  int64_t ceiling_bytes = 0;        // buffer of the read-bandwidth ceiling
  std::vector<DecodeShape> shapes;  // the selected shapes, in order
};

void DeclareFlags(DecodeSettings* s, FlagSet* flags);
// Checks every value (InvalidArgument naming the flag) and fills what follows from the
// flags together: reps, warmup and the ceiling's buffer (--quick), trace (--trace_csv),
// the shapes (sets, --filter, --batch; none selected is an error, and --trace_csv takes one).
absl::Status Validate(DecodeSettings* s);

// ---- kvbench prefill --------------------------------------------------------------

enum class PrefillKernel { kAuto, kMma, kBoth };  // which ExtendKernel(s) to time

struct PrefillSettings {
  int reps = 20;
  int warmup = 3;
  int page = 16;  // page_tokens of the paged layout
  std::string layouts = "paged,virtual-all,virtual-layer";
  std::string shapes = "p4k,p16k,b4,extend";
  PrefillKernel kernel = PrefillKernel::kAuto;
  bool seq_pages = false;  // paged: pages in order instead of shuffled (diagnostic)
  int settle_ms = 500;     // idle before each figure's timing (prefill_bench.cu says why)
  // virtual-all's chunk in tokens, a power of two (KvCacheConfig::chunk_tokens; 512 is
  // what the cache picks for this shape on 2 MiB pages; 1: no chunks).
  int chunk = 512;
};

void DeclareFlags(PrefillSettings* s, FlagSet* flags);
// Checks every value; --layouts and --shapes name known ones.
absl::Status Validate(PrefillSettings* s);

// The prefill layouts and shapes, in the order they run.
const std::vector<std::string>& PrefillLayouts();
const std::vector<std::string>& PrefillShapeTags();
// True when the comma-separated `list` names `name`.
bool Listed(const std::string& list, const std::string& name);

// ---- kvbench vmm ------------------------------------------------------------------

enum class VmmBackend { kCuda, kHost };

struct VmmSettings {
  // The driver where the build has CUDA, else the host backend.
#ifdef KVMEM_WITH_CUDA
  VmmBackend backend = VmmBackend::kCuda;
#else
  VmmBackend backend = VmmBackend::kHost;
#endif
  int handles = 256;
  int rounds = 4;
  int batch = 64;  // handles per SetAccess / Unmap in the batched rows
  int device = 0;
};

void DeclareFlags(VmmSettings* s, FlagSet* flags);
// 1 <= batch <= handles, rounds >= 1, device >= 0; --backend=cuda needs a CUDA build.
absl::Status Validate(VmmSettings* s);

// ---- kvbench mapper ---------------------------------------------------------------

struct MapperSettings {
  int requests = 256;
  int steps = 256;
  int warmup = 32;
  int prompt_max = 512;    // prompts are uniform in [1, prompt_max] tokens
  int64_t map_ahead = 32;  // map_ahead_tokens of the "on" mode
  int chunk = 0;           // KvCacheConfig::chunk_tokens
  int layers = 32;
  int kv_heads = 8;
  int head_dim = 128;
  int device = 0;
  std::string modes = "off,on";  // background mapper off, on, or both (in this order)

  // Filled by Validate.
  bool mode_off = false;
  bool mode_on = false;
};

void DeclareFlags(MapperSettings* s, FlagSet* flags);
// Checks every value and that a token's K (or V) of one layer is whole 16-byte vectors
// (what the step's kernels move).
absl::Status Validate(MapperSettings* s);

// ---- kvbench steps ----------------------------------------------------------------

// One cache layout of the steps benchmark, as --layouts names it.
struct StepsLayout {
  std::string name;  // paged-1, paged-16, paged-64, virtual-chunk, virtual, virtual-layer
  kvmem::Layout layout = kvmem::Layout::kPaged;
  kvmem::Arrangement arrangement = kvmem::Arrangement::kAllLayers;  // virtual only
  int page_tokens = 16;                                             // paged only
  int chunk_tokens = 0;  // virtual all-layer rows (0: the library's pick; 1: no chunks)
};

// Every steps layout, in the order the tables list them (kvstress's names).
const std::vector<StepsLayout>& StepsLayouts();
// The scenarios, in the order they run: decode, prefill, churn, fork, rewind, pressure,
// threads.
const std::vector<std::string>& StepsScenarios();

struct StepsSettings {
  // The lists are comma-separated; an empty one takes its default, smaller with --quick.
  std::string layouts = "paged-1,paged-16,paged-64,virtual-chunk,virtual,virtual-layer";
  std::string scenarios = "decode,prefill,churn,fork,rewind,pressure,threads";
  std::string batches;     // decode: requests per step
  std::string context;     // decode and pressure: "MIN-MAX" (a mix) or "N" tokens
  std::string prefill;     // prefill: tokens per extend
  std::string rows;        // churn: max_requests of the cache
  std::string fork;        // fork: prefix tokens
  std::string rewind;      // rewind: requests per step
  int pressure_batch = 0;  // pressure: requests per step (0: 1024, 64 with --quick)
  int reps = 0;            // timed reps per figure (0: 200, 20 with --quick)
  int warmup = -1;         // untimed reps first (-1: 20, 3 with --quick)
  int max_ms = 0;          // a figure stops after this long (0: 2000, 200 with --quick)
  int64_t max_tokens = 0;  // tokens one cache holds at most (0: 16M, 1M with --quick)
  bool quick = false;
  int layers = 1;                          // the cache's model shape (see DeclareFlags)
  int64_t granularity = int64_t{2} << 20;  // KvCacheConfig::host_granularity
  std::string json;                        // non-empty: write the results here

  // Filled by Validate.
  std::vector<StepsLayout> layout_list;
  std::vector<int> batch_list;
  std::vector<int64_t> prefill_list;
  std::vector<int> row_list;
  std::vector<int64_t> fork_list;
  std::vector<int> rewind_list;
  int64_t context_min = 0;
  int64_t context_max = 0;
};

void DeclareFlags(StepsSettings* s, FlagSet* flags);
// Checks every value (InvalidArgument naming the flag), fills the defaults that --quick
// changes and parses the lists.
absl::Status Validate(StepsSettings* s);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_SETTINGS_H_
