#include "tools/kvstress/run.h"

#include <sys/resource.h>

#include <cstring>
#include <optional>
#include <string>

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

struct PolicyFailure {
  std::string policy;
  absl::Status status;
};

// The error, with a hint where the cause is a known limit of the host backend: it maps
// every granule on its own, and Linux caps the mappings of a process at
// vm.max_map_count, past which mmap fails with ENOMEM (on a GPU there is no such cap).
std::string FailureText(const RunConfig& rc, const absl::Status& s) {
  std::string text(s.message());
  if (rc.base.device == kvmem::DeviceKind::kHost &&
      text.find("Cannot allocate memory") != std::string::npos) {
    std::string limit = "?";
    if (std::FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r")) {
      char buf[32] = {};
      if (std::fgets(buf, sizeof buf, f) != nullptr) limit = std::string(buf, strcspn(buf, "\n"));
      std::fclose(f);
    }
    text += absl::StrFormat(
        "\n  hint: the host backend maps each %d KiB granule separately and Linux allows "
        "vm.max_map_count = %s mappings per process; lower --budget_gib (or --scale) or raise "
        "vm.max_map_count",
        rc.base.host_granularity / 1024, limit);
  }
  return text;
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
  // Output files are created now so that a bad path fails before a long simulation.
  for (const std::string* path : {&rc.json_path, &rc.plot_path}) {
    if (path->empty()) continue;
    if (absl::Status s = WriteFile(*path, ""); !s.ok()) return s;
  }
  absl::StatusOr<Workload> workload = MakeWorkload(rc);
  if (!workload.ok()) return workload.status();
  const Workload& w = *workload;
  // Before anything runs: a policy that would hit the host's mapping limit fails deep in
  // a run, after minutes, and its caches cannot even be torn down cleanly.
  if (const std::optional<MapLimit> limit = ReadMapLimit(); limit.has_value()) {
    if (absl::Status s = CheckHostMappings(rc, w, *limit); !s.ok()) return s;
  }
  if (absl::Status s = SizePolicies(rc); !s.ok()) return s;

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

  std::vector<SimResult> results;
  std::vector<PolicyFailure> failures;
  ProgressBar bar(rc.progress);
  const int n = static_cast<int>(rc.policies.size());
  for (int i = 0; i < n; ++i) {
    const Policy& policy = rc.policies[i];
    absl::StatusOr<SimResult> r = Simulate(w, policy, PolicyConfig(policy, rc.base), rc.sim,
                                           [&](const SimProgress& p) { bar.Update(i, n, p); });
    bar.Clear();
    // One policy failing (a kvmem error, a backend limit) does not hide the others.
    if (!r.ok()) {
      failures.push_back({policy.name, r.status()});
      continue;
    }
    results.push_back(*std::move(r));
  }

  std::fprintf(out, "%s", FormatTable(results).c_str());
  for (const PolicyFailure& f : failures) {
    std::fprintf(out, "FAILED %s: %s\n", f.policy.c_str(), FailureText(rc, f.status).c_str());
  }
  struct rusage ru {};
  if (getrusage(RUSAGE_SELF, &ru) == 0) {
    double wall = 0;
    for (const SimResult& r : results) wall += r.wall_seconds;
    std::fprintf(out, "simulated in %.1f s; peak resident memory of this process %.0f MiB\n", wall,
                 ru.ru_maxrss / 1024.0);
  }

  RunInfo info{rc.base, &w, rc.sim.max_steps, {}};
  for (const PolicyFailure& f : failures) {
    info.failures.emplace_back(f.policy, FailureText(rc, f.status));
  }
  if (!rc.json_path.empty()) {
    if (absl::Status s = WriteFile(rc.json_path, FormatJson(info, results)); !s.ok()) return s;
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
    if (absl::Status s = WriteFile(rc.plot_path, RenderSvgPlot(pi, results)); !s.ok()) return s;
    std::fprintf(out, "wrote %s\n", rc.plot_path.c_str());
  }
  if (!failures.empty()) {
    return absl::Status(failures.front().status.code(),
                        absl::StrFormat("%d of %d policies failed (see FAILED above)",
                                        failures.size(), rc.policies.size()));
  }
  return results;
}

}  // namespace kvstress
