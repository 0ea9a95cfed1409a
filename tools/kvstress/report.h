// kvstress output: the comparison table (text) and the full JSON record.
#ifndef KVMEM_TOOLS_KVSTRESS_REPORT_H_
#define KVMEM_TOOLS_KVSTRESS_REPORT_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "tools/kvstress/scheduler.h"
#include "tools/kvstress/workload.h"

namespace kvstress {

// What was simulated, shared by every policy of one run.
struct RunInfo {
  kvmem::KvCacheConfig base;  // shape, capacity, budget, device (layout fields unused)
  const Workload* workload = nullptr;
  int64_t max_steps = 0;
};

// One policy of the run: its result, or the error that stopped it.
struct PolicyOutcome {
  std::string policy;
  absl::StatusOr<SimResult> result;
};

// The error of a failed policy on one line (Status text, newlines folded).
std::string FailureLine(const absl::Status& status);

// The side-by-side table, one row per policy in run order (a failed policy's row says
// so), with a legend of the columns.
std::string FormatTable(const std::vector<PolicyOutcome>& outcomes);

// Everything: run parameters, per-policy summaries (failed policies with their error),
// final Stats and per-step series.
std::string FormatJson(const RunInfo& info, const std::vector<PolicyOutcome>& outcomes);

// Writes `contents` to `path`; errors name the path.
absl::Status WriteFile(const std::string& path, const std::string& contents);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_REPORT_H_
