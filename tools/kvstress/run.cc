#include "tools/kvstress/run.h"

#include <sys/resource.h>

#include <algorithm>
#include <optional>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "kvmem/dtype.h"
#include "kvmem/vmm.h"
#include "tools/kvstress/host_mappings.h"
#include "tools/kvstress/progress.h"
#include "tools/kvstress/report.h"
#include "tools/kvstress/svg_plot.h"
#include "tools/kvstress/trace.h"

namespace kvstress {
namespace {

constexpr double kGiB = double{1 << 30};

std::string ShapeLine(const kvmem::KvCacheConfig& c) {
  return absl::StrFormat(
      "%d layers x %d KV heads x head_dim %d, %s: %.4g KiB per token; budget %.4g GiB (%d "
      "tokens); max_context %d, max_requests %d",
      c.num_layers, c.num_kv_heads, c.head_dim, kvmem::DTypeName(c.dtype), c.TokenBytes() / 1024.0,
      c.memory_budget_bytes / kGiB, c.memory_budget_bytes / c.TokenBytes(), c.max_context,
      c.max_requests);
}

// A failed policy's Status, with a hint where mmap ran out (ENOMEM) on the host: that is
// one of two limits of the process, not of the machine's memory. The host backend maps
// every page on its own, and Linux caps a process's mappings at vm.max_map_count (the
// check before the run estimates that, but can miss); and `ulimit -v` caps its address
// space, which every policy reserves for its whole capacity. A GPU has neither.
absl::Status WithHint(const RunConfig& rc, const absl::Status& s) {
  if (rc.base.device != kvmem::DeviceKind::kHost ||
      !absl::StrContains(s.message(), "Cannot allocate memory")) {
    return s;
  }
  const std::optional<MapLimit> limit = ReadMapLimit();
  std::string hint = absl::StrFormat(
      "hint: the host backend maps each %d KiB page on its own and Linux allows "
      "vm.max_map_count = %s mappings per process; lower --budget_gib, raise --host_page_kib "
      "or raise vm.max_map_count",
      rc.base.host_granularity / 1024,
      limit ? absl::StrFormat("%d", limit->max_map_count) : std::string("?"));
  struct rlimit as {};
  if (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY) {
    hint += absl::StrFormat(
        "; or the address space of this process is capped at %.4g GiB (ulimit -v): lower "
        "--max_requests or --max_context, or lift the cap",
        static_cast<double>(as.rlim_cur) / (1 << 30));
  }
  return absl::Status(s.code(), absl::StrFormat("%s (%s)", s.message(), hint));
}

}  // namespace

absl::StatusOr<Workload> MakeWorkload(const RunConfig& rc) {
  if (rc.from_trace) return LoadTrace(rc.trace_path, rc.mix.max_context, rc.mix.prefix_len);
  return GenerateMix(rc.mix);
}

absl::StatusOr<std::vector<SimResult>> Run(const RunConfig& rc, std::FILE* out) {
  if (rc.base.device == kvmem::DeviceKind::kCuda) {
    // Fail before any simulation, with the backend's own reason.
    absl::StatusOr<std::unique_ptr<kvmem::Vmm>> vmm = kvmem::MakeCudaVmm(rc.base.device_ordinal);
    if (!vmm.ok()) {
      return absl::Status(vmm.status().code(),
                          absl::StrFormat("--device=cuda:%d is not available: %s",
                                          rc.base.device_ordinal, vmm.status().message()));
    }
  }
  absl::StatusOr<Workload> workload = MakeWorkload(rc);
  if (!workload.ok()) return workload.status();
  const Workload& w = *workload;
  if (w.requests.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s has no requests: nothing to simulate", w.name));
  }
  // Before anything runs: a policy that would hit the host's mapping limit fails deep in
  // a run, after minutes, and its caches cannot even be torn down cleanly.
  if (const std::optional<MapLimit> limit = ReadMapLimit(); limit.has_value()) {
    if (absl::Status s = CheckHostMappings(rc, w, *limit); !s.ok()) return s;
  }
  if (absl::Status s = SizePolicies(rc); !s.ok()) return s;
  // Output files are created now so that a bad path fails before a long simulation.
  for (const std::string* path : {&rc.json_path, &rc.plot_path}) {
    if (path->empty()) continue;
    if (absl::Status s = WriteFile(*path, ""); !s.ok()) return s;
  }

  std::fprintf(out, "kvstress: serving simulation over kvmem's real caches (device %s)\n",
               rc.base.device == kvmem::DeviceKind::kHost
                   ? "host"
                   : absl::StrFormat("cuda:%d", rc.base.device_ordinal).c_str());
  std::fprintf(out, "model:    %s\n", ShapeLine(rc.base).c_str());
  std::fprintf(out, "workload: %s\n", w.description.c_str());
  std::fprintf(out, "          %zu requests, %lld prompt + %lld output tokens\n", w.requests.size(),
               static_cast<long long>(TotalPromptTokens(w)),
               static_cast<long long>(TotalOutputTokens(w)));
  std::string names;
  for (const Policy& p : rc.policies) names += (names.empty() ? "" : ", ") + p.name;
  std::fprintf(out, "policies: %s\n\n", names.c_str());
  std::fflush(out);

  std::vector<PolicyOutcome> outcomes;
  std::vector<SimResult> results;
  int failed = 0;
  ProgressBar bar(rc.progress);
  const int n = static_cast<int>(rc.policies.size());
  for (int i = 0; i < n; ++i) {
    const Policy& policy = rc.policies[i];
    absl::StatusOr<SimResult> r = Simulate(w, policy, PolicyConfig(policy, rc.base), rc.sim,
                                           [&](const SimProgress& p) { bar.Update(i, n, p); });
    bar.Clear();
    // One policy failing (a kvmem error, a backend limit) does not hide the others; it
    // keeps its place in the table and the JSON.
    if (!r.ok()) {
      ++failed;
      outcomes.push_back({policy.name, WithHint(rc, r.status())});
      continue;
    }
    results.push_back(*r);
    outcomes.push_back({policy.name, *std::move(r)});
  }

  std::fprintf(out, "%s", FormatTable(outcomes).c_str());
  for (const PolicyOutcome& o : outcomes) {
    if (o.result.ok()) continue;
    std::fprintf(out, "FAILED %s: %s\n", o.policy.c_str(), FailureLine(o.result.status()).c_str());
  }
  struct rusage ru {};
  if (getrusage(RUSAGE_SELF, &ru) == 0) {
    double wall = 0;
    for (const SimResult& r : results) wall += r.wall_seconds;
    std::fprintf(out, "simulated in %.1f s; peak resident memory of this process %.0f MiB\n", wall,
                 ru.ru_maxrss / 1024.0);
  }

  RunInfo info{rc.base, &w, rc.sim.max_steps};
  if (!rc.json_path.empty()) {
    if (absl::Status s = WriteFile(rc.json_path, FormatJson(info, outcomes)); !s.ok()) return s;
    std::fprintf(out, "wrote %s\n", rc.json_path.c_str());
  }
  if (!rc.plot_path.empty()) {
    PlotInfo pi;
    pi.title = absl::StrFormat("KV memory held and live per step: %s workload", w.name);
    const kvmem::KvCacheConfig& c = rc.base;
    pi.subtitle = absl::StrFormat(
        "%d layers x %d KV heads x head_dim %d, %s; budget %.4g GiB; max_context %d; "
        "%d requests",
        c.num_layers, c.num_kv_heads, c.head_dim, kvmem::DTypeName(c.dtype),
        c.memory_budget_bytes / kGiB, c.max_context, w.requests.size());
    pi.budget_bytes = rc.base.memory_budget_bytes;
    for (const PolicyOutcome& o : outcomes) {
      if (!o.result.ok()) pi.failed.push_back(o.policy);
    }
    if (absl::Status s = WriteFile(rc.plot_path, RenderSvgPlot(pi, results)); !s.ok()) return s;
    std::fprintf(out, "wrote %s\n", rc.plot_path.c_str());
  }
  if (failed > 0) {
    const absl::Status& first =
        std::find_if(outcomes.begin(), outcomes.end(), [](const PolicyOutcome& o) {
          return !o.result.ok();
        })->result.status();
    return absl::Status(first.code(),
                        absl::StrFormat("%d of %d policies failed (see FAILED above)", failed, n));
  }
  // A run that finished nothing has nothing to compare; its utilisation is undefined
  // ("-" above), and exiting 0 would let a script take it for a result.
  if (std::none_of(results.begin(), results.end(),
                   [](const SimResult& r) { return r.finished > 0; })) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no policy finished a request within --steps=%d (the first request arrives at step %d "
        "and needs %d steps of output); raise --steps",
        rc.sim.max_steps, w.requests.front().arrival_step, w.requests.front().output_len));
  }
  return results;
}

}  // namespace kvstress
