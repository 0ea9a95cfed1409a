// The whole kvstress run: build the workload, simulate it under every selected policy,
// print the header and the table, write --json and --plot.
#ifndef KVMEM_TOOLS_KVSTRESS_RUN_H_
#define KVMEM_TOOLS_KVSTRESS_RUN_H_

#include <cstdio>
#include <vector>

#include "absl/status/statusor.h"
#include "tools/kvstress/options.h"
#include "tools/kvstress/scheduler.h"
#include "tools/kvstress/workload.h"

namespace kvstress {

// Builds the run's workload (generated or from the trace).
absl::StatusOr<Workload> MakeWorkload(const RunConfig& rc);

// Runs every policy of `rc` and writes the report to `out`. Returns the results, or the
// first error (bad trace, a cache that cannot be created, an output file that cannot be
// written).
absl::StatusOr<std::vector<SimResult>> Run(const RunConfig& rc, std::FILE* out);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_RUN_H_
