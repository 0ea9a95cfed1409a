#include "tools/kvstress/report.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string_view>

#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "kvmem/dtype.h"
#include "tools/kvstress/json_writer.h"

namespace kvstress {
namespace {

constexpr double kGiB = double{1 << 30};

// "64.0 GiB", "352 KiB": tiny test runs and real ones both read well.
std::string FormatBytes(int64_t b) {
  if (b >= (int64_t{1} << 30)) return absl::StrFormat("%.1f GiB", b / kGiB);
  if (b >= (int64_t{1} << 20)) return absl::StrFormat("%.1f MiB", b / double{1 << 20});
  return absl::StrFormat("%d KiB", b / 1024);
}

void WriteStats(JsonWriter& j, const kvmem::Stats& s) {
  j.BeginObject();
  j.Field("num_requests", s.num_requests);
  j.Field("logical_tokens", s.logical_tokens);
  j.Field("stored_tokens", s.stored_tokens);
  j.Field("live_bytes", s.live_bytes);
  j.Field("held_bytes", s.held_bytes);
  j.Field("idle_bytes", s.idle_bytes);
  j.Field("mapped_bytes", s.mapped_bytes);
  j.Field("physical_bytes", s.physical_bytes);
  j.Field("budget_bytes", s.budget_bytes);
  j.Field("page_bytes", s.page_bytes);
  j.Field("pages_total", s.pages_total);
  j.Field("pages_free", s.pages_free);
  j.Field("pages_used", s.pages_used);
  j.Field("pages_shared", s.pages_shared);
  j.Field("pages_quarantined", s.pages_quarantined);
  j.Field("peak_requests", s.peak_requests);
  j.Field("peak_held_bytes", s.peak_held_bytes);
  j.Field("peak_live_bytes", s.peak_live_bytes);
  j.Field("extends", s.extends);
  j.Field("forks", s.forks);
  j.Field("cow_copies", s.cow_copies);
  j.Field("pages_reclaimed", s.pages_reclaimed);
  j.Field("map_stalls", s.map_stalls);
  j.Field("pool_create_nanos", s.pool_create_nanos);
  j.Key("vmm");
  j.BeginObject();
  for (int op = 0; op < static_cast<int>(kvmem::VmmOp::kCount); ++op) {
    const std::string_view name = kvmem::VmmOpName(static_cast<kvmem::VmmOp>(op));
    j.Key(absl::string_view(name.data(), name.size()));
    j.BeginObject();
    j.Field("calls", s.vmm.calls[op]);
    j.Field("nanos", s.vmm.nanos[op]);
    j.EndObject();
  }
  j.Field("live_reservations", s.vmm.live_reservations);
  j.Field("live_handles", s.vmm.live_handles);
  j.Field("mapped_granules", s.vmm.mapped_granules);
  j.EndObject();
  j.EndObject();
}

template <typename F>
void Series(JsonWriter& j, absl::string_view key, const std::vector<StepSample>& series, F get) {
  j.Key(key);
  j.BeginArray();
  for (const StepSample& s : series) j.Int(get(s));
  j.EndArray();
}

}  // namespace

std::string FailureLine(const absl::Status& status) {
  return absl::StrReplaceAll(status.ToString(), {{"\n", "; "}});
}

std::string FormatTable(const std::vector<PolicyOutcome>& outcomes) {
  // A percentage, or "-" where it is undefined (no step held a byte).
  auto pct = [](double v) {
    return std::isfinite(v) ? absl::StrFormat("%.1f%%", 100 * v) : std::string("-");
  };
  auto steps = [](double v) {
    return std::isfinite(v) ? absl::StrFormat("%.1f", v) : std::string("-");
  };
  std::string out = absl::StrFormat("%-13s %6s %8s %7s %7s %7s %6s %10s %8s %10s %9s %9s %7s\n",
                                    "policy", "peak", "mean", "mean", "util", "util", "frag",
                                    "peak", "preempt", "kvmem", "kvmem", "vmm", "steps");
  out +=
      absl::StrFormat("%-13s %6s %8s %7s %7s %7s %6s %10s %8s %10s %9s %9s %7s\n", "", "run", "run",
                      "wait", "mean", "@peak", "", "held", "", "calls", "ms", "calls", "");
  bool any_cut = false, any_undefined = false, any_failed = false;
  for (const PolicyOutcome& o : outcomes) {
    if (!o.result.ok()) {
      any_failed = true;
      out += absl::StrFormat("%-13s FAILED (the error is below)\n", o.policy);
      continue;
    }
    const SimResult& r = *o.result;
    any_cut |= !r.drained;
    any_undefined |= !std::isfinite(r.utilisation_mean) || !std::isfinite(r.mean_wait_steps);
    out += absl::StrFormat("%-13s %6d %8.1f %7s %7s %7s %6s %10s %8d %10d %9.1f %9d %6d%s\n",
                           r.policy, r.peak_running, r.mean_running, steps(r.mean_wait_steps),
                           pct(r.utilisation_mean), pct(r.utilisation_at_peak),
                           pct(r.internal_fragmentation), FormatBytes(r.peak_held_bytes),
                           r.preemptions, r.kvmem_calls, r.kvmem_nanos / 1e6, r.vmm_calls, r.steps,
                           r.drained ? "" : "+");
  }
  out +=
      "\nrun = running requests after a step; wait = steps from a request's arrival to its "
      "admission;\nutil = live bytes / held bytes (kvmem Stats), mean = time-averaged (sum live / "
      "sum held over steps),\n@peak = at the step holding the most bytes; frag = 1 - mean util; "
      "kvmem calls/ms = AddRequest,\nExtend, Fork, Free made by the scheduler and the time inside "
      "them; vmm calls = backend calls";
  if (any_undefined) out += "\n- : undefined (no request was admitted, or no step held memory)";
  if (any_cut) out += "\n+ : stopped at --steps before the workload drained";
  if (any_failed) out += "\nFAILED: the policy stopped with an error; the others ran to the end";
  out += "\n";
  return out;
}

std::string FormatJson(const RunInfo& info, const std::vector<PolicyOutcome>& outcomes) {
  JsonWriter j;
  const kvmem::KvCacheConfig& c = info.base;
  j.BeginObject();
  j.Key("model");
  j.BeginObject();
  j.Field("layers", c.num_layers);
  j.Field("kv_heads", c.num_kv_heads);
  j.Field("head_dim", c.head_dim);
  j.Field("dtype", std::string(kvmem::DTypeName(c.dtype)));
  j.Field("token_bytes", c.TokenBytes());
  j.EndObject();
  j.Field("budget_bytes", c.memory_budget_bytes);
  j.Field("max_context", c.max_context);
  j.Field("max_requests", c.max_requests);
  j.Field("device", c.device == kvmem::DeviceKind::kHost
                        ? std::string("host")
                        : absl::StrFormat("cuda:%d", c.device_ordinal));
  j.Field("host_granularity", c.host_granularity);
  j.Field("max_steps", info.max_steps);
  if (info.workload != nullptr) {
    const Workload& w = *info.workload;
    j.Key("workload");
    j.BeginObject();
    j.Field("name", w.name);
    j.Field("description", w.description);
    j.Field("requests", static_cast<int64_t>(w.requests.size()));
    j.Field("prompt_tokens", TotalPromptTokens(w));
    j.Field("output_tokens", TotalOutputTokens(w));
    j.Field("prefix_len", w.prefix_len);
    j.EndObject();
  }
  j.Key("policies");
  j.BeginArray();
  for (const PolicyOutcome& o : outcomes) {
    j.BeginObject();
    j.Field("policy", o.policy);
    j.Field("failed", !o.result.ok());
    if (!o.result.ok()) {
      j.Field("error", FailureLine(o.result.status()));
      j.EndObject();
      continue;
    }
    const SimResult& r = *o.result;
    j.Field("config", r.config);
    j.Field("steps", r.steps);
    j.Field("drained", r.drained);
    j.Field("requests", r.requests);
    j.Field("admissions", r.admissions);
    j.Field("preemptions", r.preemptions);
    j.Field("finished", r.finished);
    j.Field("prefix_forks", r.prefix_forks);
    j.Field("holders_created", r.holders_created);
    j.Field("peak_running", r.peak_running);
    j.Field("mean_running", r.mean_running);
    j.Field("mean_wait_steps", r.mean_wait_steps);
    j.Field("utilisation_mean", r.utilisation_mean);
    j.Field("utilisation_at_peak", r.utilisation_at_peak);
    j.Field("internal_fragmentation", r.internal_fragmentation);
    j.Field("peak_held_bytes", r.peak_held_bytes);
    j.Field("peak_held_step", r.peak_held_step);
    j.Field("peak_live_bytes", r.peak_live_bytes);
    j.Field("output_tokens", r.output_tokens);
    j.Field("prefill_tokens", r.prefill_tokens);
    j.Field("recomputed_tokens", r.recomputed_tokens);
    j.Field("tokens_per_step", r.tokens_per_step);
    j.Field("kvmem_calls", r.kvmem_calls);
    j.Field("kvmem_nanos", r.kvmem_nanos);
    j.Field("vmm_calls", r.vmm_calls);
    j.Field("vmm_nanos", r.vmm_nanos);
    j.Field("wall_seconds", r.wall_seconds);
    j.Key("final_stats");
    WriteStats(j, r.final_stats);
    j.Key("series");
    j.BeginObject();
    Series(j, "running", r.series, [](const StepSample& s) { return int64_t{s.running}; });
    Series(j, "waiting", r.series, [](const StepSample& s) { return int64_t{s.waiting}; });
    Series(j, "held_bytes", r.series, [](const StepSample& s) { return s.held_bytes; });
    Series(j, "live_bytes", r.series, [](const StepSample& s) { return s.live_bytes; });
    Series(j, "idle_bytes", r.series, [](const StepSample& s) { return s.idle_bytes; });
    Series(j, "mapped_bytes", r.series, [](const StepSample& s) { return s.mapped_bytes; });
    j.EndObject();
    j.EndObject();
  }
  j.EndArray();
  // Also listed on their own, for readers that look for failures only.
  j.Key("failures");
  j.BeginArray();
  for (const PolicyOutcome& o : outcomes) {
    if (o.result.ok()) continue;
    j.BeginObject();
    j.Field("policy", o.policy);
    j.Field("error", FailureLine(o.result.status()));
    j.EndObject();
  }
  j.EndArray();
  j.EndObject();
  return j.str() + "\n";
}

absl::Status WriteFile(const std::string& path, const std::string& contents) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cannot write '%s': %s", path, std::strerror(errno)));
  }
  const size_t n = std::fwrite(contents.data(), 1, contents.size(), f);
  const bool ok = n == contents.size() && std::fflush(f) == 0;
  const int err = errno;
  if (std::fclose(f) != 0 || !ok) {
    return absl::DataLossError(absl::StrFormat("error writing '%s': %s", path, std::strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace kvstress
