// kvbench steps: what kvmem's host bookkeeping costs an engine around each model step,
// on the host backend (no GPU): decode steps of batches of 64 to 4096 requests, prefill
// extends, request churn, forks of long prefixes, speculative rewinds, and decode under
// memory pressure, each through the per-request calls (the anchor) and the batch calls.
// The scenarios are in steps_workloads.h; this file runs the ones selected, prints each
// table as its figures come in and writes them as a results file (--json).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/steps_report.h"
#include "tools/kvbench/steps_workloads.h"
#include "tools/kvbench/subcommands.h"

#ifndef KVBENCH_BUILD_TYPE
#define KVBENCH_BUILD_TYPE "unknown"
#endif

namespace kvbench {
namespace {

// Runs the scenarios of one settings, collecting each one's table.
class StepsDriver {
 public:
  explicit StepsDriver(const StepsSettings& s)
      : s_(s),
        env_{StepsShape{s.layers, 8, 128, s.granularity}, StepsTiming{s.warmup, s.reps, s.max_ms}} {
  }

  void Decode();
  void Prefill();
  void Churn();
  void Fork();
  void Rewind();
  void Threads();
  void Pressure();

  const std::vector<ReportRun>& runs() const { return runs_; }
  int failures() const { return failures_; }
  std::string Shape() const;

 private:
  // The command line that measures one row again: every setting that shapes a figure.
  std::string Command(const std::string& scenario, const std::string& layout,
                      const std::string& rest) const {
    return absl::StrCat("kvbench steps --scenarios=", scenario, " --layouts=", layout, rest,
                        " --layers=", s_.layers, " --granularity=", s_.granularity,
                        " --reps=", s_.reps, " --warmup=", s_.warmup, " --max_ms=", s_.max_ms,
                        " --max_tokens=", s_.max_tokens);
  }
  std::string Context(int64_t lo, int64_t hi) const {
    return lo == hi ? absl::StrCat("ctx ", lo) : absl::StrCat("ctx ", lo, "-", hi);
  }
  std::string ContextFlag() const {
    return s_.context_min == s_.context_max
               ? absl::StrCat(" --context=", s_.context_min)
               : absl::StrCat(" --context=", s_.context_min, "-", s_.context_max);
  }
  ReportRun& Begin(ReportRun run) {
    PrintHeader(run, stdout);
    runs_.push_back(std::move(run));
    return runs_.back();
  }
  void Add(ReportRun& run, ReportRow row) {
    PrintRow(run, row, stdout);
    run.rows.push_back(std::move(row));
  }
  // A row saying what failed, in place of the figures.
  void Fail(ReportRun& run, std::string what, std::string command, const absl::Status& st) {
    ++failures_;
    Add(run,
        ReportRow{
            std::move(what), absl::StrCat("failed: ", st.ToString()), {}, {}, std::move(command)});
  }
  static std::string Reps(const Sample& a, const Sample& b) {
    return a.reps == b.reps ? absl::StrCat(a.reps) : absl::StrCat(a.reps, "/", b.reps);
  }

  const StepsSettings& s_;
  const StepsEnv env_;
  std::vector<ReportRun> runs_;
  int failures_ = 0;
};

std::string StepsDriver::Shape() const {
  const int64_t token_bytes = int64_t{2} * s_.layers * 8 * 128 * 2;
  // Tokens a virtual row's page holds, against Llama-3-8B's 16 (32 layers on 2 MiB).
  const double page_ratio = static_cast<double>(s_.granularity) / token_bytes / 16;
  return absl::StrFormat(
      "Host backend, %s build. Cache shape: %d layer(s) x 8 KV heads x 128 bf16, %d bytes "
      "per token (K and V), host pages of %d KiB: Llama-3-8B's heads with fewer layers, so "
      "that large batches fit host memory and the process's mapping limit. Bookkeeping "
      "follows tokens and pages, not bytes: the paged layouts' pages are the model's, but a "
      "virtual row's page holds %gx the tokens it holds for Llama-3-8B's 32 layers on "
      "2 MiB, so the virtual layouts map pages that much less often per token. Figures are "
      "medians over the timed reps (whole batches timed with steady_clock, after warm-up).",
      KVBENCH_BUILD_TYPE, s_.layers, token_bytes, s_.granularity >> 10, page_ratio);
}

void StepsDriver::Decode() {
  ReportRun& run = Begin(ReportRun{
      "steps-decode",
      "Decode step: one token for every request",
      absl::StrCat("kvmem: one ExtendBatch(ids, ones, out_cache_loc) and a read of "
                   "RunningBatch() (the running batch set once before). per_request: "
                   "ExtendInto(id, 1) for each request, then BuildBatchMetadata(ids), as "
                   "engines call the cache today; its two parts are the ExtendInto and "
                   "BuildBatchMetadata columns. Contexts are spread geometrically over the "
                   "range shown, which is scaled down where the batch would pass --max_tokens "
                   "tokens."),
      "ns/request",
      {{"per_request", "ExtendInto(id, 1) each + BuildBatchMetadata",
        "kvbench steps --scenarios=decode"}},
      {"kvmem min", "per_request min", "ExtendInto", "BuildBatchMetadata", "kvmem / smallest B",
       "per_request / smallest B", "reps"},
      {},
      {}});
  std::vector<int> batches = s_.batch_list;
  std::sort(batches.begin(), batches.end());
  for (const StepsLayout& layout : s_.layout_list) {
    std::optional<DecodeFigure> smallest;
    for (int b : batches) {
      const std::string cmd =
          Command("decode", layout.name, absl::StrCat(" --batches=", b, ContextFlag()));
      absl::StatusOr<DecodeFigure> f =
          MeasureDecode(env_, layout, b, s_.context_min, s_.context_max, s_.max_tokens);
      const std::string what = absl::StrCat(layout.name, ", B=", b);
      if (!f.ok()) {
        Fail(run, what, cmd, f.status());
        continue;
      }
      if (!smallest.has_value()) smallest = *f;
      Add(run, ReportRow{absl::StrCat(what, ", ", Context(f->context_min, f->context_max)),
                         f->batch.median,
                         {{"per_request", f->per_request.median}},
                         {{"kvmem min", f->batch.min},
                          {"per_request min", f->per_request.min},
                          {"ExtendInto", f->extend_into.median},
                          {"BuildBatchMetadata", f->build_metadata.median},
                          {"kvmem / smallest B", f->batch.median / smallest->batch.median},
                          {"per_request / smallest B",
                           f->per_request.median / smallest->per_request.median},
                          {"reps", Reps(f->batch, f->per_request)}},
                         cmd});
    }
  }
}

void StepsDriver::Prefill() {
  ReportRun& run = Begin(ReportRun{
      "steps-prefill",
      "Prefill: one request extended by many tokens",
      absl::StrCat("A new request is extended by the tokens shown, then ends. kvmem: "
                   "ExtendBatch into a buffer the caller keeps; per_request: Extend(id, n), "
                   "which returns a new vector. Both reuse the memory the previous request "
                   "left (a virtual row keeps its pages); 'after Trim' is ExtendBatch after "
                   "Trim() gave that memory back, so its pages are mapped anew."),
      "ns/token",
      {{"per_request", "Extend(id, n)", "kvbench steps --scenarios=prefill"}},
      {"kvmem min", "per_request min", "after Trim", "reps"},
      {},
      {}});
  for (const StepsLayout& layout : s_.layout_list) {
    for (int64_t n : s_.prefill_list) {
      const std::string cmd = Command("prefill", layout.name, absl::StrCat(" --prefill=", n));
      const std::string what = absl::StrCat(layout.name, ", ", n, " tokens");
      absl::StatusOr<PrefillFigure> f = MeasurePrefill(env_, layout, n);
      if (!f.ok()) {
        Fail(run, what, cmd, f.status());
        continue;
      }
      Add(run, ReportRow{what,
                         f->batch.median,
                         {{"per_request", f->per_request.median}},
                         {{"kvmem min", f->batch.min},
                          {"per_request min", f->per_request.min},
                          {"after Trim", f->trimmed.median},
                          {"reps", Reps(f->batch, f->per_request)}},
                         cmd});
    }
  }
}

void StepsDriver::Churn() {
  ReportRun& run =
      Begin(ReportRun{"steps-churn",
                      "Churn: requests starting and ending",
                      absl::StrCat(absl::StrFormat(
                          "A cache of the rows shown, all but %d holding a one-token request; "
                          "%d requests start (AddRequest) and end, with no tokens. kvmem: "
                          "AddRequest each + one FreeBatch; per_request: AddRequest each + Free "
                          "each. Per request, start and end together; the parts are in the "
                          "AddRequest, Free and FreeBatch columns.",
                          kChurnGroup, kChurnGroup)),
                      "ns/request",
                      {{"per_request", "AddRequest + Free", "kvbench steps --scenarios=churn"}},
                      {"AddRequest", "Free", "FreeBatch", "kvmem min", "reps"},
                      {},
                      {}});
  for (const StepsLayout& layout : s_.layout_list) {
    for (int rows : s_.row_list) {
      const std::string cmd = Command("churn", layout.name, absl::StrCat(" --rows=", rows));
      const std::string what = absl::StrCat(layout.name, ", ", rows, " rows");
      absl::StatusOr<ChurnFigure> f = MeasureChurn(env_, layout, rows);
      if (!f.ok()) {
        Fail(run, what, cmd, f.status());
        continue;
      }
      Add(run, ReportRow{what,
                         f->batch.median,
                         {{"per_request", f->per_request.median}},
                         {{"AddRequest", f->add.median},
                          {"Free", f->free.median},
                          {"FreeBatch", f->free_batch.median},
                          {"kvmem min", f->batch.min},
                          {"reps", Reps(f->batch, f->per_request)}},
                         cmd});
    }
  }
}

void StepsDriver::Fork() {
  ReportRun& run = Begin(ReportRun{
      "steps-fork",
      "Fork of a long prefix",
      absl::StrCat("Fork(parent, child) of a parent of the tokens shown, which the number of "
                   "children shown already share; then Free(child). Per call."),
      "ns/call",
      {},
      {"min", "ns per prefix token", "Free", "reps"},
      {},
      {}});
  for (const StepsLayout& layout : s_.layout_list) {
    for (int64_t n : s_.fork_list) {
      for (int siblings : {0, 255}) {
        const std::string cmd = Command("fork", layout.name, absl::StrCat(" --fork=", n));
        const std::string what =
            absl::StrCat(layout.name, ", ", n, " tokens, ", siblings, " sharing");
        absl::StatusOr<ForkFigure> f = MeasureFork(env_, layout, n, siblings);
        if (!f.ok()) {
          Fail(run, what, cmd, f.status());
          continue;
        }
        Add(run, ReportRow{what,
                           f->fork.median,
                           {},
                           {{"min", f->fork.min},
                            {"ns per prefix token", f->fork.median / static_cast<double>(n)},
                            {"Free", f->free.median},
                            {"reps", absl::StrCat(f->fork.reps)}},
                           cmd});
      }
    }
  }
}

void StepsDriver::Rewind() {
  ReportRun& run =
      Begin(ReportRun{"steps-rewind",
                      "Speculative rewinds of requests sharing a prefix",
                      absl::StrCat(absl::StrFormat(
                          "The requests shown are all forked from one %d-token request. Each "
                          "step extends every one by k draft tokens (k uniform in 1-8, one "
                          "ExtendBatch: the ExtendBatch column) and rewinds it by r rejected "
                          "ones (r uniform in 1-k). kvmem: one TruncateBatch; per_request: "
                          "Truncate for each request.",
                          kRewindPrefix)),
                      "ns/request",
                      {{"per_request", "Truncate each", "kvbench steps --scenarios=rewind"}},
                      {"kvmem min", "per_request min", "ExtendBatch", "kvmem / smallest B", "reps"},
                      {},
                      {}});
  std::vector<int> batches = s_.rewind_list;
  std::sort(batches.begin(), batches.end());
  for (const StepsLayout& layout : s_.layout_list) {
    std::optional<RewindFigure> smallest;
    for (int b : batches) {
      const std::string cmd = Command("rewind", layout.name, absl::StrCat(" --rewind=", b));
      const std::string what = absl::StrCat(layout.name, ", B=", b);
      absl::StatusOr<RewindFigure> f = MeasureRewind(env_, layout, b);
      if (!f.ok()) {
        Fail(run, what, cmd, f.status());
        continue;
      }
      if (!smallest.has_value()) smallest = *f;
      Add(run, ReportRow{what,
                         f->batch.median,
                         {{"per_request", f->per_request.median}},
                         {{"kvmem min", f->batch.min},
                          {"per_request min", f->per_request.min},
                          {"ExtendBatch", f->extend.median},
                          {"kvmem / smallest B", f->batch.median / smallest->batch.median},
                          {"reps", Reps(f->batch, f->per_request)}},
                         cmd});
    }
  }
}

void StepsDriver::Threads() {
  constexpr int kPerThread = 256;
  ReportRun& run = Begin(ReportRun{
      "steps-threads",
      "Threads decoding their own requests of one cache",
      absl::StrFormat(
          "T threads, each with its own %d requests of %d tokens in one cache, all "
          "growing every request by one token per step at once; a step's time is the wall "
          "time until every thread is done, per request of all threads. kvmem: one "
          "ExtendBatch per thread and step; per_request: ExtendInto for each request. "
          "'vs 1 thread' is the 1-thread figure over this one: 2 or 4 would be threads "
          "running side by side, 1 or less that they take turns (KvCache's one mutex).",
          kPerThread, kThreadsContext),
      "ns/request",
      {{"per_request", "ExtendInto each", "kvbench steps --scenarios=threads"}},
      {"kvmem min", "vs 1 thread", "per_request vs 1 thread", "reps"},
      {},
      {}});
  for (const StepsLayout& layout : s_.layout_list) {
    std::optional<ThreadsFigure> one;
    for (int threads : {1, 2, 4}) {
      const std::string cmd = Command("threads", layout.name, "");
      const std::string what = absl::StrCat(layout.name, ", ", threads, " thread(s)");
      absl::StatusOr<ThreadsFigure> f = MeasureThreads(env_, layout, threads, kPerThread);
      if (!f.ok()) {
        Fail(run, what, cmd, f.status());
        continue;
      }
      if (!one.has_value()) one = *f;
      Add(run, ReportRow{what,
                         f->batch.median,
                         {{"per_request", f->per_request.median}},
                         {{"kvmem min", f->batch.min},
                          {"vs 1 thread", one->batch.median / f->batch.median},
                          {"per_request vs 1 thread",
                           one->per_request.median / f->per_request.median},
                          {"reps", Reps(f->batch, f->per_request)}},
                         cmd});
    }
  }
}

void StepsDriver::Pressure() {
  const int b = s_.pressure_batch;
  ReportRun& run = Begin(ReportRun{
      "steps-pressure",
      "Decode step under memory pressure",
      absl::StrCat(absl::StrFormat(
          "A batch of the requests shown, with %d rows to spare; before each step "
          "(untimed: the 'churn' column) B/64 new requests start with the prompts of "
          "B/64 old ones, which then end, so that each request lives 64 steps and the "
          "rows of ended ones stay idle with their pages until memory is short or the "
          "next requests start in them. kvmem: the decode step of the "
          "decode table's batch path at a budget of 1.02x the peak bytes the batch held "
          "in the same run at an ample budget (the 'ample' anchor); per_request: the "
          "decode table's per-request path at 1.02x. 'reclaimed' counts the pages "
          "the virtual layout took back from the rows of ended requests per step.",
          b / 4 + 1)),
      "ns/request",
      {{"ample", "batch path, ample budget", "kvbench steps --scenarios=pressure"},
       {"per_request", "per-request path at 1.02x", "kvbench steps --scenarios=pressure"}},
      {"kvmem min", "budget MiB", "reclaimed / step", "churn us / step", "reps"},
      {},
      {}});
  for (const StepsLayout& layout : s_.layout_list) {
    const std::string cmd =
        Command("pressure", layout.name, absl::StrCat(" --pressure_batch=", b, ContextFlag()));
    const std::string what = absl::StrCat(layout.name, ", B=", b);
    absl::StatusOr<PressureFigure> f =
        MeasurePressure(env_, layout, b, s_.context_min, s_.context_max, s_.max_tokens);
    if (!f.ok()) {
      Fail(run, what, cmd, f.status());
      continue;
    }
    Add(run, ReportRow{absl::StrCat(what, ", ", Context(f->context_min, f->context_max)),
                       f->pressure.median,
                       {{"ample", f->ample.median}, {"per_request", f->per_request.median}},
                       {{"kvmem min", f->pressure.min},
                        {"budget MiB", static_cast<double>(f->budget_bytes >> 20)},
                        {"reclaimed / step", f->reclaimed_per_step},
                        {"churn us / step", f->churn_us_per_step},
                        {"reps", Reps(f->pressure, f->per_request)}},
                       cmd});
  }
}

// The first line of `command`'s output, or "unknown".
std::string FirstLineOf(const char* command) {
  std::FILE* p = popen(command, "r");
  if (p == nullptr) return "unknown";
  char buf[256] = {};
  const bool got = std::fgets(buf, sizeof(buf), p) != nullptr;
  pclose(p);
  std::string line = got ? std::string(absl::StripTrailingAsciiWhitespace(buf)) : "";
  return line.empty() ? "unknown" : line;
}

std::string CpuName() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    const size_t colon = line.find(':');
    if (absl::StartsWith(line, "model name") && colon != std::string::npos) {
      return std::string(absl::StripAsciiWhitespace(absl::string_view(line).substr(colon + 1)));
    }
  }
  return "unknown CPU";
}

std::string Today() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", &tm);
  return buf;
}

}  // namespace

int RunSteps(const StepsSettings& s) {
  StepsDriver d(s);
  std::printf("kvbench steps: %s\n", d.Shape().c_str());
  std::printf(
      "reps %d (after %d warm-up), at most %d ms per figure; at most %lld tokens per "
      "cache. Columns: kvmem, each anchor with 'x' = anchor / kvmem (above 1: kvmem's "
      "figure is lower), then the table's own columns.\n",
      s.reps, s.warmup, s.max_ms, static_cast<long long>(s.max_tokens));
  if (Listed(s.scenarios, "decode")) d.Decode();
  if (Listed(s.scenarios, "prefill")) d.Prefill();
  if (Listed(s.scenarios, "churn")) d.Churn();
  if (Listed(s.scenarios, "fork")) d.Fork();
  if (Listed(s.scenarios, "rewind")) d.Rewind();
  if (Listed(s.scenarios, "pressure")) d.Pressure();
  if (Listed(s.scenarios, "threads")) d.Threads();

  if (!s.json.empty()) {
    const std::string json = ResultsJson(
        d.runs(), "Host backend (no GPU)",
        absl::StrCat(CpuName(), ", ", std::thread::hardware_concurrency(), " hardware threads"),
        absl::StrCat("compiler ", __VERSION__, ", ", KVBENCH_BUILD_TYPE, " build"),
        FirstLineOf("git rev-parse --short HEAD 2>/dev/null"), Today(), d.Shape());
    std::ofstream out(s.json);
    out << json;
    if (!out) {
      std::fprintf(stderr, "kvbench steps: cannot write %s\n", s.json.c_str());
      return 1;
    }
    std::printf("\nwrote %s\n", s.json.c_str());
  }
  if (d.failures() > 0) {
    std::fprintf(stderr, "kvbench steps: %d figure(s) failed (rows marked 'failed')\n",
                 d.failures());
    return 1;
  }
  return 0;
}

}  // namespace kvbench
