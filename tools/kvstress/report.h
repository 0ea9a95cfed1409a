// kvstress output: the comparison table (text) and the full JSON record.
#ifndef KVMEM_TOOLS_KVSTRESS_REPORT_H_
#define KVMEM_TOOLS_KVSTRESS_REPORT_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kvmem/config.h"
#include "tools/kvstress/scheduler.h"
#include "tools/kvstress/workload.h"

namespace kvstress {

// What was simulated, shared by every policy of one run.
struct RunInfo {
  kvmem::KvCacheConfig base;  // shape, capacity, budget, device (layout fields unused)
  const Workload* workload = nullptr;
  int64_t max_steps = 0;
  // Policies that could not be simulated: (name, error).
  std::vector<std::pair<std::string, std::string>> failures;
};

// The side-by-side table, one row per policy, with a legend of the columns.
std::string FormatTable(const std::vector<SimResult>& results);

// Everything: run parameters, per-policy summaries, final Stats and per-step series.
std::string FormatJson(const RunInfo& info, const std::vector<SimResult>& results);

// Writes `contents` to `path`; errors name the path.
absl::Status WriteFile(const std::string& path, const std::string& contents);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_REPORT_H_
