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
// --trace (a diagnostic) then times every CTA of 50 more launches per shape with the
// kernel's trace (include/kvmem/decode_trace.h) and summarises the fastest and the slowest:
// whether a slow launch has late-starting CTAs, slow ones, or uniformly slower ones.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <map>
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
#include "kvmem/debug/decode_trace.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/reference_attention.h"
#include "tools/kvbench/bench_util.h"
#include "tools/kvbench/grown_pool.h"
#include "tools/kvbench/registry.h"
#include "tools/kvbench/virtual_cache.h"

namespace kvmem {
namespace {

constexpr char kWho[] = "decode bench";
#define BENCH_CUDA(expr) KVBENCH_CUDA(kWho, expr)

using kvbench::DeviceBuffer;

constexpr int64_t kRotateBytes = int64_t{200} << 20;  // 4x L2: inputs never stay cached

// Paged page tables. kGrown / kGrownElastic: from kvmem's paged cache after request
// churn (grown_pool.h), its pool mapped whole as engines preallocate theirs, or elastic.
// kShuffled: every page of the batch in a random order (the worst case for address
// translation). kInOrder: request by request (the best case).
enum class PoolKind { kGrown, kGrownElastic, kShuffled, kInOrder };

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

// *out = the value named `v` among `choices`; false (and a message naming `flag`) when
// none is.
template <typename E>
bool ParseChoice(const char* flag, const std::string& v,
                 std::initializer_list<std::pair<const char*, E>> choices, E* out) {
  for (const auto& [name, value] : choices) {
    if (v == name) {
      *out = value;
      return true;
    }
  }
  std::fprintf(stderr, "decode bench: unknown %s=%s\n", flag, v.c_str());
  return false;
}

struct Settings {
  int reps = 100;
  int warmup = 10;
  bool d1 = true;
  bool d2 = true;
  bool balance = false;  // the balance shapes (see --balance) instead
  int64_t ceiling_bytes = int64_t{8} << 30;
  PoolKind pool = PoolKind::kGrown;                      // paged: which page tables
  PagePlacement placement = PagePlacement::kContiguous;  // kGrown: the cache's placement
  int spacer_us = 0;      // > 0: a spinning kernel of this length before each timed launch
  int stages = 0;         // DecodeOptions::pipeline_stages (0: the device's choice)
  bool spread = false;    // print the 10th and 90th percentile beside the median
  bool graph = false;     // time replays of a captured CUDA graph (fixed_grid workspace)
  std::string filter;     // run only shapes whose layout name contains this
  int batch = 0;          // > 0: run only shapes of this batch size (e.g. for ncu)
  int d1_page = 16;       // page_tokens of the paged D1 shapes
  bool trace = false;     // after the timing, per-CTA times of more launches (diagnostic)
  std::string trace_csv;  // non-empty: the traced fastest and slowest launches' records
  int repeat = 2;         // rounds over the selected shapes, in one process (see the top)
  // Virtual layouts: K/V in kvmem's own CUDA virtual KvCache (2 MiB handles mapped into
  // a reservation; virtual_cache.h), or (false) in a cudaMalloc'd tensor of that shape.
  bool virtual_cache = true;
  // The cache's layers, each launch reading the next one as a decode step does. The
  // default is the model's (32, as in docs/benchmarks.md): virtual-all's token stride is
  // then 128 KiB and a 2 MiB page holds 16 tokens. With --virtual=tensor it sets
  // virtual-all's layers only (the per-layer tensors rotate over as many copies as the L2
  // rotation needs), and 0 gives virtual-all that count too (2 from B=16 up, an 8 KiB
  // stride); 0 with the cache: 32.
  int layers = 32;
  // The cache's all-layer chunk (KvCacheConfig::chunk_tokens; 0, the default, picks one
  // that gives a layer's K and V whole 2 MiB pages: 512 tokens here; 1: no chunks).
  int chunk = 0;
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
  int long_ctx = 0;  // > 0: request 0 has this many tokens, the others ctx (ragged)
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

// ---- --trace: per-CTA times of a launch (include/kvmem/decode_trace.h) ----

constexpr int kTraceLaunches = 50;  // kept, after s.warmup traced ones that are dropped

// One traced launch: its event time and the records of the CTAs that wrote one.
struct TracedLaunch {
  double us = 0.0;
  std::vector<DecodeTraceRecord> records;
};

// Microseconds from t0 to t (global-timer nanoseconds).
double MicrosSince(uint64_t t0, uint64_t t) { return static_cast<double>(t - t0) * 1e-3; }

// The p-th percentile of `sorted` (nearest rank below); REQUIRES: not empty.
double Pct(const std::vector<double>& sorted, int p) {
  return sorted[(sorted.size() - 1) * p / 100];
}

// fn(record) of every record, sorted.
template <typename Fn>
std::vector<double> SortedBy(const std::vector<DecodeTraceRecord>& recs, Fn&& fn) {
  std::vector<double> v;
  v.reserve(recs.size());
  for (const DecodeTraceRecord& r : recs) v.push_back(fn(r));
  std::sort(v.begin(), v.end());
  return v;
}

uint64_t FirstStart(const std::vector<DecodeTraceRecord>& recs) {
  uint64_t t = UINT64_MAX;
  for (const DecodeTraceRecord& r : recs) t = std::min(t, r.start_ns);
  return t;
}

uint64_t FirstEnd(const std::vector<DecodeTraceRecord>& recs) {
  uint64_t t = UINT64_MAX;
  for (const DecodeTraceRecord& r : recs) t = std::min(t, r.end_ns);
  return t;
}

// CTAs per SM, by %smid.
std::map<uint32_t, int> CtasPerSm(const std::vector<DecodeTraceRecord>& recs) {
  std::map<uint32_t, int> per_sm;
  for (const DecodeTraceRecord& r : recs) ++per_sm[r.smid];
  return per_sm;
}

// CTAs recorded, SMs used and the histogram of CTAs per SM (SMs without one: `sms` less
// the SMs seen, as %smid need not be dense).
void PrintOccupancy(const std::vector<DecodeTraceRecord>& recs, int ctas, int sms) {
  int hist[4] = {0, 0, 0, 0};  // SMs with 0, 1, 2, 3+ CTAs
  const std::map<uint32_t, int> per_sm = CtasPerSm(recs);
  for (const auto& [sm, n] : per_sm) ++hist[std::min(n, 3)];
  hist[0] = std::max(0, sms - static_cast<int>(per_sm.size()));
  std::printf("        %zu of %d CTAs recorded on %zu SMs; SMs with 0/1/2/3+ CTAs: %d/%d/%d/%d\n",
              recs.size(), ctas, per_sm.size(), hist[0], hist[1], hist[2], hist[3]);
}

// Start, end (both from the first start) and duration percentiles, and the timer's step
// (the gcd of the stamps from the first start: 1000 would mean a 1 us timer).
void PrintTimes(const std::vector<DecodeTraceRecord>& recs) {
  const uint64_t t0 = FirstStart(recs);
  const std::vector<double> start =
      SortedBy(recs, [&](const DecodeTraceRecord& r) { return MicrosSince(t0, r.start_ns); });
  const std::vector<double> end =
      SortedBy(recs, [&](const DecodeTraceRecord& r) { return MicrosSince(t0, r.end_ns); });
  const std::vector<double> dur =
      SortedBy(recs, [](const DecodeTraceRecord& r) { return MicrosSince(r.start_ns, r.end_ns); });
  uint64_t step = 0;
  for (const DecodeTraceRecord& r : recs) {
    step = std::gcd(std::gcd(step, r.start_ns - t0), r.end_ns - t0);
  }
  std::printf("        start (us from the first): p0 %.1f p50 %.1f p90 %.1f max %.1f\n", start[0],
              Pct(start, 50), Pct(start, 90), start.back());
  std::printf("        end (us from the first start): p0 %.1f p50 %.1f p90 %.1f max %.1f\n", end[0],
              Pct(end, 50), Pct(end, 90), end.back());
  std::printf(
      "        duration (us): min %.1f p10 %.1f p50 %.1f p90 %.1f max %.1f; timer step %llu ns\n",
      dur[0], Pct(dur, 10), Pct(dur, 50), Pct(dur, 90), dur.back(),
      static_cast<unsigned long long>(step));
  // SM cycles per nanosecond over each CTA's run: a launch slowed by a lower SM clock (a
  // power or thermal cap) shows here, one slowed by memory does not.
  const std::vector<double> mhz = SortedBy(recs, [](const DecodeTraceRecord& r) {
    return r.end_ns > r.start_ns
               ? 1e3 * static_cast<double>(r.end_clock - r.start_clock) / (r.end_ns - r.start_ns)
               : 0.0;
  });
  std::printf("        SM clock (MHz): min %.0f p50 %.0f max %.0f\n", mhz[0], Pct(mhz, 50),
              mhz.back());
}

// Other CTAs on r's SM, and how many of them ran at the same time as r.
std::pair<int, int> SmNeighbours(const std::vector<DecodeTraceRecord>& recs,
                                 const DecodeTraceRecord& r) {
  int on_sm = 0;
  int overlapping = 0;
  for (const DecodeTraceRecord& o : recs) {
    if (o.smid != r.smid || o.block == r.block) continue;
    ++on_sm;
    if (o.start_ns < r.end_ns && r.start_ns < o.end_ns) ++overlapping;
  }
  return {on_sm, overlapping};
}

// The kLatest CTAs to end, latest first.
void PrintLatestEnds(const std::vector<DecodeTraceRecord>& recs) {
  constexpr int kLatest = 8;
  const uint64_t t0 = FirstStart(recs);
  std::vector<DecodeTraceRecord> late = recs;
  const auto n = std::min<size_t>(kLatest, late.size());
  std::partial_sort(late.begin(), late.begin() + n, late.end(),
                    [](const auto& a, const auto& b) { return a.end_ns > b.end_ns; });
  std::printf(
      "        latest ends: block  sm  start(us)  end(us)  dur(us)  others on SM (overlapping)\n");
  for (size_t i = 0; i < n; ++i) {
    const DecodeTraceRecord& r = late[i];
    const auto [on_sm, overlapping] = SmNeighbours(recs, r);
    std::printf("                     %5u %3u %10.1f %8.1f %8.1f  %d (%d)\n", r.block, r.smid,
                MicrosSince(t0, r.start_ns), MicrosSince(t0, r.end_ns),
                MicrosSince(r.start_ns, r.end_ns), on_sm, overlapping);
  }
}

// CTAs that started after the first CTA ended: a second wave, and their SMs.
void PrintSecondWave(const std::vector<DecodeTraceRecord>& recs) {
  const uint64_t first_end = FirstEnd(recs);
  std::vector<uint32_t> sms;
  for (const DecodeTraceRecord& r : recs) {
    if (r.start_ns > first_end) sms.push_back(r.smid);
  }
  std::sort(sms.begin(), sms.end());
  std::printf("        second wave (start after the first end, %.1f us): %zu CTAs%s",
              MicrosSince(FirstStart(recs), first_end), sms.size(), sms.empty() ? "" : ", SMs");
  for (uint32_t sm : sms) std::printf(" %u", sm);
  std::printf("\n");
}

void PrintTracedLaunch(const char* name, const TracedLaunch& t, int ctas, int sms) {
  std::printf("      %s launch: %.1f us\n", name, t.us);
  PrintOccupancy(t.records, ctas, sms);
  if (t.records.empty()) return;
  PrintTimes(t.records);
  PrintLatestEnds(t.records);
  PrintSecondWave(t.records);
}

// Appends the records as CSV rows "launch,block,smid,start_ns,end_ns,start_clock,end_clock".
void WriteCsvRows(std::FILE* f, const char* launch, const std::vector<DecodeTraceRecord>& recs) {
  for (const DecodeTraceRecord& r : recs) {
    std::fprintf(f, "%s,%u,%u,%llu,%llu,%llu,%llu\n", launch, r.block, r.smid,
                 static_cast<unsigned long long>(r.start_ns),
                 static_cast<unsigned long long>(r.end_ns),
                 static_cast<unsigned long long>(r.start_clock),
                 static_cast<unsigned long long>(r.end_clock));
  }
}

bool WriteTraceCsv(const std::string& path, const TracedLaunch& fast, const TracedLaunch& slow) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "decode bench: cannot write %s\n", path.c_str());
    return false;
  }
  std::fprintf(f, "launch,block,smid,start_ns,end_ns,start_clock,end_clock\n");
  WriteCsvRows(f, "fast", fast.records);
  WriteCsvRows(f, "slow", slow.records);
  return std::fclose(f) == 0;
}

// Traces the decode kernel into `buffer` for the guard's lifetime.
class ScopedDecodeTrace {
 public:
  ScopedDecodeTrace(DecodeTraceRecord* buffer, int capacity)
      : status_(SetDecodeTrace(buffer, capacity)) {}
  ~ScopedDecodeTrace() {
    if (status_.ok()) SetDecodeTrace(nullptr, 0).IgnoreError();
  }
  ScopedDecodeTrace(const ScopedDecodeTrace&) = delete;
  ScopedDecodeTrace& operator=(const ScopedDecodeTrace&) = delete;
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// Records of the CTAs of slot `i` of `kept` that wrote one: start set (the slots are zeroed
// before each launch) and an end no earlier.
bool CopyRecords(const DeviceBuffer& kept, int i, int ctas, std::vector<DecodeTraceRecord>* out) {
  std::vector<DecodeTraceRecord> slot(ctas);
  BENCH_CUDA(cudaMemcpy(slot.data(), kept.get<DecodeTraceRecord>() + int64_t{i} * ctas,
                        ctas * sizeof(DecodeTraceRecord), cudaMemcpyDeviceToHost));
  out->clear();
  for (const DecodeTraceRecord& r : slot) {
    if (r.start_ns != 0 && r.end_ns >= r.start_ns) out->push_back(r);
  }
  return true;
}

// s.warmup + kTraceLaunches launches of launch(first + i), each after before(first + i),
// all traced; the event times of the last kTraceLaunches in *us, and the fastest and the
// slowest of them with their records. The trace target stays put (setting it is a
// synchronous copy, which would wait for the previous launch): after each launch its
// records are copied to a slot of their own and the buffer is zeroed, asynchronously, so
// the launches follow one another as in the timing loop, but for those two small copies.
template <typename Launch, typename Before>
bool TraceLaunches(const Settings& s, int ctas, int first, Launch&& launch, Before&& before,
                   std::vector<double>* us, TracedLaunch* fast, TracedLaunch* slow) {
  const int n = s.warmup + kTraceLaunches;
  const size_t bytes = ctas * sizeof(DecodeTraceRecord);
  DeviceBuffer live, kept;
  if (!live.Allocate(bytes) || !kept.Allocate(n * bytes)) return false;
  BENCH_CUDA(cudaMemset(live.get(), 0, bytes));
  std::vector<cudaEvent_t> ev(2 * n);
  for (auto& e : ev) BENCH_CUDA(cudaEventCreate(&e));
  {
    const ScopedDecodeTrace trace(live.get<DecodeTraceRecord>(), ctas);
    if (!trace.status().ok()) {
      std::fprintf(stderr, "decode bench: %s\n", trace.status().ToString().c_str());
      return false;
    }
    for (int i = 0; i < n; ++i) {
      before(first + i);
      cudaEventRecord(ev[2 * i]);
      launch(first + i);
      cudaEventRecord(ev[2 * i + 1]);
      cudaMemcpyAsync(kept.get<uint8_t>() + i * bytes, live.get(), bytes, cudaMemcpyDeviceToDevice);
      cudaMemsetAsync(live.get(), 0, bytes);
    }
    BENCH_CUDA(cudaDeviceSynchronize());
  }
  us->resize(kTraceLaunches);
  for (int i = 0; i < kTraceLaunches; ++i) {
    float ms = 0.f;
    BENCH_CUDA(cudaEventElapsedTime(&ms, ev[2 * (s.warmup + i)], ev[2 * (s.warmup + i) + 1]));
    (*us)[i] = ms * 1e3;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  const int fastest = static_cast<int>(std::min_element(us->begin(), us->end()) - us->begin());
  const int slowest = static_cast<int>(std::max_element(us->begin(), us->end()) - us->begin());
  fast->us = (*us)[fastest];
  slow->us = (*us)[slowest];
  return CopyRecords(kept, s.warmup + fastest, ctas, &fast->records) &&
         CopyRecords(kept, s.warmup + slowest, ctas, &slow->records);
}

// The --trace part of a shape: traced launches (see TraceLaunches), their spread, and the
// summaries (and CSV) of the fastest and the slowest.
template <typename Launch, typename Before>
bool TraceShape(const Settings& s, int ctas, int sms, int first, Launch&& launch, Before&& before) {
  std::vector<double> us;
  TracedLaunch fast, slow;
  if (!TraceLaunches(s, ctas, first, launch, before, &us, &fast, &slow)) return false;
  std::sort(us.begin(), us.end());
  std::printf(
      "      traced: %d launches after %d, min %.1f p10 %.1f p50 %.1f p90 %.1f max %.1f us\n",
      kTraceLaunches, s.warmup, us[0], Pct(us, 10), Pct(us, 50), Pct(us, 90), us.back());
  PrintTracedLaunch("fastest", fast, ctas, sms);
  PrintTracedLaunch("slowest", slow, ctas, sms);
  return s.trace_csv.empty() || WriteTraceCsv(s.trace_csv, fast, slow);
}

// The paged page table of a shape: `stride` entries per request, and the pool's size (a
// grown pool has more pages than the batch reads, the others exactly the batch's).
struct PagedTable {
  std::vector<int32_t> table;
  int64_t stride = 0;
  int64_t pool_pages = 0;
  std::vector<int64_t> row_pages;  // pages in use per request
};

bool MakePagedTable(const Settings& s, const Shape& sh, const std::vector<int32_t>& lens,
                    int max_ctx, PagedTable* out) {
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
void MakeViews(const Shape& sh, int sets, int64_t set_alloc, uint16_t* base, int max_ctx,
               const DecodeWorkspace& ws, std::vector<PagedKv>* paged,
               std::vector<VirtualKv>* virt) {
  constexpr int64_t kBlock = int64_t{kKvHeads} * kHeadDim;  // elements per token
  const int64_t set_elems = set_alloc / 2;
  for (int i = 0; i < sets; ++i) {
    if (sh.kind == Kind::kPaged) {
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
    if (sh.kind == Kind::kVirtualAllLayers) {
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

// Times one shape (then traces it with s.trace); prints a row and returns false on a CUDA
// or kvmem error.
bool RunShape(const Settings& s, const Shape& sh, double ceiling, int sms) {
  const int64_t block = int64_t{kKvHeads} * kHeadDim;  // elements per token
  std::vector<int32_t> lens(sh.batch, sh.ctx);
  if (sh.long_ctx > 0) lens[0] = sh.long_ctx;
  const int max_ctx = std::max(sh.ctx, sh.long_ctx);
  const int64_t tokens = std::accumulate(lens.begin(), lens.end(), int64_t{0});
  const int64_t set_bytes = 2 * tokens * block * 2;  // K and V read
  PagedTable paged_table;
  if (sh.kind == Kind::kPaged && !MakePagedTable(s, sh, lens, max_ctx, &paged_table)) {
    return false;
  }
  // Bytes each set (a layer's K and V) occupies.
  const int64_t set_alloc = sh.kind == Kind::kPaged
                                ? 2 * paged_table.pool_pages * sh.page_tokens * block * 2
                                : 2 * int64_t{sh.batch} * max_ctx * block * 2;
  int sets = static_cast<int>(
      std::min<int64_t>(32, std::max<int64_t>(2, (kRotateBytes + set_alloc - 1) / set_alloc)));
  if (sh.kind == Kind::kVirtualAllLayers && !s.virtual_cache && s.layers > 0) {
    // The model's layers where they fit (keeping 2 GiB for the workspace and the ceiling's
    // sink); fewer, said so in the row, where they do not.
    size_t free_bytes = 0, total_bytes = 0;
    BENCH_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
    const int64_t usable = static_cast<int64_t>(free_bytes) - (int64_t{2} << 30);
    sets = static_cast<int>(std::max<int64_t>(2, std::min<int64_t>(s.layers, usable / set_alloc)));
  }

  DecodeOptions o;
  o.shape.num_q_heads = kQHeads;
  o.shape.num_kv_heads = kKvHeads;
  o.shape.head_dim = kHeadDim;
  o.shape.kv_dtype = DType::kBFloat16;
  o.layout = sh.kind == Kind::kPaged ? Layout::kPaged : Layout::kVirtual;
  o.max_batch = sh.batch;
  o.max_context = max_ctx;
  o.page_tokens = sh.page_tokens;
  o.fixed_grid = s.graph;
  o.pipeline_stages = s.stages;
  auto ws = DecodeWorkspace::Create(o);
  if (!ws.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", ws.status().ToString().c_str());
    return false;
  }
  DeviceBuffer kv;
  std::vector<PagedKv> paged;
  std::vector<VirtualKv> virt;
  std::vector<int32_t> rows(sh.batch);
  std::iota(rows.begin(), rows.end(), 0);
  kvbench::VirtualCacheBatch cached;
  if (s.virtual_cache && sh.kind != Kind::kPaged) {
    // The model's layers (a cache holds them all), rotated as a decode step does.
    sets = s.layers > 0 ? s.layers : 32;
    absl::StatusOr<kvbench::VirtualCacheBatch> made = kvbench::MakeVirtualCacheBatch(
        sh.kind == Kind::kVirtualAllLayers ? Arrangement::kAllLayers : Arrangement::kPerLayer, sets,
        s.chunk, kKvHeads, kHeadDim, lens, max_ctx);
    if (absl::IsResourceExhausted(made.status())) {
      // Too large for this device: say so and go on with the other shapes.
      std::printf("%-3s %-14s (KvCache, %d layers) B=%-4d ctx=%-6d skipped: %s\n", sh.tag,
                  KindName(sh.kind, sh.page_tokens), sets, sh.batch, sh.ctx,
                  made.status().ToString().c_str());
      return true;
    }
    if (!made.ok()) {
      std::fprintf(stderr, "decode bench: %s\n", made.status().ToString().c_str());
      return false;
    }
    cached = *std::move(made);
    for (const VirtualKv& v : cached.views) virt.push_back((*ws)->Bind(v));
    rows = cached.meta.row_ids;
  } else {
    if (!kv.Allocate(sets * set_alloc)) {
      std::fprintf(stderr, "decode bench: cannot allocate %lld bytes\n",
                   static_cast<long long>(sets * set_alloc));
      return false;
    }
    if (!kvbench::FillRandom(kv.get(), sets * set_alloc, 7, kWho)) return false;
    MakeViews(sh, sets, set_alloc, kv.get<uint16_t>(), max_ctx, **ws, &paged, &virt);
  }
  const absl::Status planned =
      sh.kind == Kind::kPaged
          ? (*ws)->PlanPaged(lens, paged_table.table, paged_table.stride, nullptr)
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
  auto launch_on = [&](int i, cudaStream_t stream) {
    const uint16_t* qi = q.get<uint16_t>() + i * q_elems;
    uint16_t* oi = out.get<uint16_t>() + i * q_elems;
    const absl::Status st = sh.kind == Kind::kPaged
                                ? DecodeAttention(**ws, paged[i], qi, oi, stream)
                                : DecodeAttention(**ws, virt[i], qi, oi, stream);
    launched.Update(st);
    return st.ok();
  };
  DecodeGraphs graphs;
  if (s.graph && !graphs.Capture(sets, launch_on)) {
    std::fprintf(stderr, "decode bench: graph capture failed: %s / %s\n",
                 cudaGetErrorString(cudaGetLastError()), launched.ToString().c_str());
    return false;
  }
  auto launch = [&](int r) {
    if (s.graph) {
      const cudaError_t err = graphs.Launch(r % sets);
      if (err != cudaSuccess) launched.Update(absl::InternalError(cudaGetErrorString(err)));
    } else {
      launch_on(r % sets, nullptr);
    }
  };
  auto spacer = [&](int) {
    if (s.spacer_us > 0) kvbench::LaunchSpacer(s.spacer_us);
  };
  const std::vector<double> sorted = kvbench::SortedMs(s.warmup, s.reps, launch, spacer);
  const double us = sorted[s.reps / 2] * 1e3;
  BENCH_CUDA(cudaDeviceSynchronize());
  if (!launched.ok()) {
    std::fprintf(stderr, "decode bench: %s\n", launched.ToString().c_str());
    return false;
  }
  const double gbps = set_bytes / us * 1e-3;
  std::string how;
  if (sh.kind == Kind::kVirtualAllLayers && s.virtual_cache) {
    how = absl::StrCat(" (KvCache, ", sets, " layers, chunk ", 1 << virt[0].chunk_shift, ")");
  } else if (sh.kind != Kind::kPaged && s.virtual_cache) {
    how = absl::StrCat(" (KvCache, ", sets, " layers)");
  } else if (sh.kind == Kind::kVirtualAllLayers) {
    how = absl::StrCat(" (", sets, " layers)");
  } else if (sh.kind == Kind::kPaged) {
    how = sh.long_ctx > 0 ? " (in order)" : absl::StrCat(" (", PoolName(s.pool, s.placement), ")");
  }
  std::printf(
      "%-3s %-14s%s B=%-4d ctx=%-6d%s splits=%-4d stages=%d  %9.1f us  %7.0f GB/s  %5.1f %%\n",
      sh.tag, KindName(sh.kind, sh.page_tokens), how.c_str(), sh.batch, sh.ctx,
      sh.long_ctx > 0 ? absl::StrCat(" (one of ", sh.long_ctx, ")").c_str() : "", (*ws)->num_work(),
      (*ws)->pipeline_stages(), us, gbps, 100.0 * gbps / ceiling);
  if (s.graph) {
    std::printf("      graph replay: fixed grid of %d CTAs, %d of them with work\n",
                (*ws)->max_work() * kKvHeads, (*ws)->num_work() * kKvHeads);
  }
  if (sh.kind == Kind::kPaged) {
    std::printf("      pool of %lld pages; %.1f %% of a request's consecutive pages adjacent\n",
                static_cast<long long>(paged_table.pool_pages),
                100.0 * kvbench::AdjacentShare(paged_table.table, paged_table.stride,
                                               paged_table.row_pages));
  }
  if (s.spread) {
    std::printf("      p10 %.1f us, p90 %.1f us, min %.1f us, max %.1f us%s\n",
                sorted[s.reps / 10] * 1e3, sorted[s.reps * 9 / 10] * 1e3, sorted.front() * 1e3,
                sorted.back() * 1e3, s.spacer_us > 0 ? " (spacer between launches)" : "");
  }
  if (s.trace) {
    // The grid of a launch: every work item of the plan (or the capacity) times the heads.
    const int ctas = (s.graph ? (*ws)->max_work() : (*ws)->num_work()) * kKvHeads;
    if (!TraceShape(s, ctas, sms, s.warmup + s.reps, launch, spacer)) return false;
    if (!launched.ok()) {
      std::fprintf(stderr, "decode bench: %s\n", launched.ToString().c_str());
      return false;
    }
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
    } else if (a == "--balance") {
      s.d1 = s.d2 = false;
      s.balance = true;
    } else if (const char* v = kvbench::FlagValue(a, "--pool=")) {
      if (!ParseChoice("--pool", v,
                       {{"grown", PoolKind::kGrown},
                        {"grown-elastic", PoolKind::kGrownElastic},
                        {"shuffled", PoolKind::kShuffled},
                        {"in-order", PoolKind::kInOrder}},
                       &s.pool)) {
        return 2;
      }
    } else if (const char* v = kvbench::FlagValue(a, "--placement=")) {
      if (!ParseChoice("--placement", v,
                       {{"contiguous", PagePlacement::kContiguous},
                        {"lowest-first", PagePlacement::kLowestFirst}},
                       &s.placement)) {
        return 2;
      }
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
    } else if (const char* v = kvbench::FlagValue(a, "--repeat=")) {
      s.repeat = std::max(1, std::atoi(v));
    } else if (const char* v = kvbench::FlagValue(a, "--stages=")) {
      s.stages = std::atoi(v);
    } else if (const char* v = kvbench::FlagValue(a, "--virtual=")) {
      if (!ParseChoice("--virtual", v, {{"cache", true}, {"tensor", false}}, &s.virtual_cache)) {
        return 2;
      }
    } else if (const char* v = kvbench::FlagValue(a, "--layers=")) {
      s.layers = std::max(0, std::atoi(v));
    } else if (const char* v = kvbench::FlagValue(a, "--chunk=")) {
      s.chunk = std::max(0, std::atoi(v));
    } else if (a == "--spread") {
      s.spread = true;
    } else if (a == "--graph") {
      s.graph = true;
    } else if (a == "--trace") {
      s.trace = true;
    } else if (const char* v = kvbench::FlagValue(a, "--trace-csv=")) {
      s.trace = true;
      s.trace_csv = v;
    } else {
      std::fprintf(
          stderr,
          "usage: kvbench decode [--quick] [--d1 | --d2 | --balance] [--reps=N] [--filter=LAYOUT] "
          "[--batch=B] [--page=N] [--pool=KIND] [--placement=P] [--spread] "
          "[--spacer-us=N] [--graph] [--trace] [--trace-csv=PATH] [--repeat=N] [--stages=N] "
          "[--virtual=V] [--layers=N] [--chunk=N]\n"
          "  --virtual=cache (default) | tensor: the virtual layouts' K/V in kvmem's CUDA "
          "KvCache (2 MiB handles mapped into a reservation), or in a cudaMalloc'd tensor of "
          "that shape\n"
          "  --layers=N: the cache's layers, each launch reading the next (default 32, the "
          "model's: virtual-all's token stride is 128 KiB); with --virtual=tensor only "
          "virtual-all's, fewer where they do not fit, 0 for the 2-32 that the L2 rotation "
          "needs\n"
          "  --chunk=N: the cache's all-layer chunk in tokens (KvCacheConfig::chunk_tokens; "
          "default 0, auto: 512 here, a layer's K and V per 2 MiB page; 1: no chunks)\n"
          "  --stages=N: the kernel's pipeline stages (DecodeOptions::pipeline_stages; "
          "default 0, the device's choice)\n"
          "  --graph: time replays of one captured launch (fixed_grid workspace), as an "
          "engine replays a decode step\n"
          "  --balance: batches the split plan must balance: one long request among "
          "short ones (in-order pages), 1.2 waves of equal ones\n"
          "  --pool=grown (default) | grown-elastic | shuffled | in-order: the paged "
          "page tables: kvmem's cache after request churn (pool mapped whole, or "
          "elastic), every page shuffled, or in order\n"
          "  --placement=contiguous (default) | lowest-first: the grown cache's "
          "PagePlacement\n"
          "  --repeat=N: N rounds over the selected shapes in one process (a shape's "
          "figure can depend on what ran before it)\n"
          "  --trace: per-CTA start/end of %d more launches per shape, fastest and "
          "slowest summarised\n"
          "  --trace-csv=PATH: also their records as CSV (implies --trace; one shape)\n",
          kTraceLaunches);
      return 2;
    }
  }
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
  if (s.balance) {
    // Where whole requests would leave CTAs running alone at the end: a long request among
    // short ones, and a batch of 1.2 waves (160 CTAs over 132 SMs on an H100).
    for (Kind k : {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualPerLayer}) {
      shapes.push_back({"BAL", 64, 2048, k, s.d1_page, 65536});
      shapes.push_back({"BAL", 128, 512, k, s.d1_page, 32768});
      shapes.push_back({"BAL", 20, 4096, k, s.d1_page});
    }
  }
  std::vector<Shape> selected;
  for (const Shape& sh : shapes) {
    if (std::string(KindName(sh.kind, sh.page_tokens)).find(s.filter) == std::string::npos) {
      continue;
    }
    if (s.batch > 0 && sh.batch != s.batch) continue;
    selected.push_back(sh);
  }
  if (!s.trace_csv.empty() && selected.size() > 1) {
    std::fprintf(stderr,
                 "decode bench: --trace-csv writes one shape's records, %zu shapes selected "
                 "(narrow them with --filter, --batch, --d1 or --d2)\n",
                 selected.size());
    return 2;
  }

  cudaDeviceProp prop;
  if (!kvbench::CurrentDeviceProperties(&prop, kWho)) return 1;
  std::printf("device: %s, %d SMs, L2 %d MB; shape: %d q heads / %d kv heads, head_dim %d, bf16\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, kQHeads, kKvHeads,
              kHeadDim);
  double ceiling = 0.0;
  if (!MeasureCeiling(s, prop.multiProcessorCount, &ceiling)) return 1;
  std::printf("read-bandwidth ceiling: %.0f GB/s\n", ceiling);
  std::printf("set median of %d reps; %% = of the ceiling; paged page tables: %s\n", s.reps,
              PoolName(s.pool, s.placement).c_str());
  for (int round = 1; round <= s.repeat; ++round) {
    if (s.repeat > 1) std::printf("round %d of %d\n", round, s.repeat);
    for (const Shape& sh : selected) {
      if (!RunShape(s, sh, ceiling, prop.multiProcessorCount)) return 1;
    }
  }
  return 0;
}

KVBENCH_REGISTER(decode, "decode",
                 "decode attention, shapes D1 and D2, vs the measured read bandwidth", DecodeBench);

}  // namespace
}  // namespace kvmem
