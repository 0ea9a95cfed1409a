// kvbench decode --trace (decode_trace.h): traced launches and their summaries.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kvmem/debug/decode_trace.h"
#include "tools/kvbench/bench_util.h"
#include "tools/kvbench/decode_trace.h"
#include "tools/kvbench/settings.h"

namespace kvbench {
namespace {

using kvmem::DecodeTraceRecord;
using kvmem::SetDecodeTrace;

constexpr char kWho[] = "decode bench";
#define BENCH_CUDA(expr) KVBENCH_CUDA(kWho, expr)

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
bool TraceLaunches(const DecodeSettings& s, int ctas, int first,
                   const std::function<void(int)>& launch, const std::function<void(int)>& before,
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

}  // namespace

bool TraceShape(const DecodeSettings& s, int ctas, int sms, int first,
                const std::function<void(int)>& launch, const std::function<void(int)>& before) {
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

}  // namespace kvbench
