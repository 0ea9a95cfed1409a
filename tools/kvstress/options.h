// kvstress's command line, separated from absl flags so it can be tested: main.cc copies
// the flags into FlagValues and BuildRunConfig checks every value, naming the flag in
// its error.
#ifndef KVMEM_TOOLS_KVSTRESS_OPTIONS_H_
#define KVMEM_TOOLS_KVSTRESS_OPTIONS_H_

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "tools/kvstress/policies.h"
#include "tools/kvstress/scheduler.h"
#include "tools/kvstress/workload.h"

namespace kvstress {

// One field per flag, with the flags' defaults (see main.cc and docs/kvstress.md for why
// these values).
struct FlagValues {
  std::string device = "host";
  std::string workload = "chat";
  std::string trace;
  uint64_t seed = 1;
  double arrival_rate = -1;  // < 0: the workload's default
  int64_t requests = 2000;
  double scale = 1.0;
  int64_t layers = 32;
  int64_t kv_heads = 8;
  int64_t head_dim = 128;
  std::string dtype = "bf16";
  double budget_gib = 64;
  int64_t max_context = 8192;
  int64_t max_requests = 1024;
  int64_t steps = 1'000'000;
  std::string policies = "all";
  std::string json;
  std::string plot;
  int64_t prefix_len = 1024;
  int64_t num_prefixes = 4;
  int64_t host_page_kib = 2048;
  int64_t check_invariants = 0;
  bool progress = true;
  // Names of the flags given on the command line (not left at their defaults): a flag
  // that does not apply to the run is an error only when the user set it.
  std::set<std::string> specified;
};

struct RunConfig {
  kvmem::KvCacheConfig base;  // shape, capacity, budget, device; layout set per policy
  std::vector<Policy> policies;
  bool from_trace = false;
  std::string trace_path;
  MixParams mix;  // also carries max_context and prefix_len for traces
  SimOptions sim;
  std::string json_path;
  std::string plot_path;
  bool progress = true;
  double scale = 1.0;  // --scale, already applied above; kept to state sizes as flags
};

// Checks and converts the flags (after --scale): every numeric flag against its range,
// sizes computed without overflow, the budget against what the selected layouts can
// address, and flags given together that do not apply together. InvalidArgument names
// the flag and the numbers.
absl::StatusOr<RunConfig> BuildRunConfig(const FlagValues& flags);

// kvmem's own sizing of every policy's cache (kvmem::PlanMemory), which takes no memory:
// a configuration that KvCache::Create would reject, InvalidArgument with kvmem's reason
// and numbers. Host only (on CUDA it would open the device). Run calls it after its check
// of the host's mapping limit, which names the fixes in kvstress's flags.
absl::Status SizePolicies(const RunConfig& rc);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_OPTIONS_H_
