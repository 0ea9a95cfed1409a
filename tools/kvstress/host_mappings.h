// Linux caps the memory mappings of a process at vm.max_map_count (65530 unless raised).
// kvmem's host backend maps every page of KV memory on its own, so a large budget, small
// host pages or shared prefixes under the per-layer layout can need more mappings than
// that; mmap then fails mid-run, and undoing a change fails for the same reason. kvstress
// estimates each policy's need before simulating and stops with the numbers and the fixes
// instead. (GPU backends have no such cap.)
#ifndef KVMEM_TOOLS_KVSTRESS_HOST_MAPPINGS_H_
#define KVMEM_TOOLS_KVSTRESS_HOST_MAPPINGS_H_

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "kvmem/config.h"
#include "tools/kvstress/options.h"
#include "tools/kvstress/policies.h"
#include "tools/kvstress/workload.h"

namespace kvstress {

// The estimated peak number of host mappings of `policy`'s cache while it serves
// `workload` with `base`'s budget, page size and rows (the model is in the .cc file; it
// was checked against /proc/self/maps on every built-in mix at 64 GiB and 2 MiB pages).
int64_t EstimateHostMappings(const Policy& policy, const kvmem::KvCacheConfig& base,
                             const Workload& workload);

struct MapLimit {
  int64_t max_map_count = 0;  // /proc/sys/vm/max_map_count
  int64_t in_use = 0;         // mappings of this process before any cache exists
};

// This process's limit, or nullopt where /proc does not say (then nothing is checked).
std::optional<MapLimit> ReadMapLimit();

// OK when every policy of `rc` fits `limit` (or the device is not the host). Otherwise
// FailedPrecondition with one message: the estimates, the limit, and the fixes (raise
// vm.max_map_count, a larger --host_page_kib, a smaller --budget_gib, or the policies
// that fit).
absl::Status CheckHostMappings(const RunConfig& rc, const Workload& workload,
                               const MapLimit& limit);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_HOST_MAPPINGS_H_
