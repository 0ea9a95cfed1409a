// Limits of the host that a cache's configuration is checked against before anything
// is allocated (internal): the host memory kvmem's own bookkeeping may take, and the
// process's mapping limit (vm.max_map_count) that the host backend's mappings count
// against. Both checks put the real numbers and the fixes in their messages.
#ifndef KVMEM_SRC_CORE_HOST_LIMITS_H_
#define KVMEM_SRC_CORE_HOST_LIMITS_H_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"

namespace kvmem::internal {

// Estimates of the host memory kvmem keeps per unit of a cache, generous rather than
// exact (they only have to tell a plausible configuration from a runaway one).
// A request row: the layout's row record, bitmaps, the facade's entry for its request.
inline constexpr int64_t kRowBookkeepingBytes = 256;
// A paged page: its pool state, tail tracking, and the recount CheckInvariants makes.
inline constexpr int64_t kPageBookkeepingBytes = 64;
// A physical handle: the layout's record of it and the backend's ledger entry.
inline constexpr int64_t kHandleBookkeepingBytes = 128;

// The most host memory the bookkeeping of one cache may need: min(8 GiB, a quarter of
// the machine's physical memory). Configurations past it are rejected in Create: they
// are typos or runaway sizes (INT_MAX rows, a 2^30-token context), and would otherwise
// allocate that memory before anything else went wrong.
int64_t HostBookkeepingLimit();

// InvalidArgument naming `what` (the sizes that add up to `bytes`), the limit and the
// fix when `bytes` of bookkeeping exceed HostBookkeepingLimit().
absl::Status CheckHostBookkeeping(std::string_view what, int64_t bytes);

// /proc/sys/vm/max_map_count, or -1 when it cannot be read (not Linux, no /proc).
int64_t ReadMaxMapCount();
// Mappings this process has now (lines of /proc/self/maps), or -1 when unreadable.
int64_t CountProcessMappings();

// Mappings kept free for the rest of the process (heap arenas, thread stacks, other
// libraries): a cache may not plan to use them.
inline constexpr int64_t kMapHeadroom = 256;

// What a cache's full pool would map on a host (non-device) backend.
struct HostMappingNeed {
  std::string_view layout;             // "paged layout", "virtual layout": the message's start
  int64_t mappings = 0;                // granules mapped when the budget is in use, each its own
  int64_t granularity = 0;             // bytes per granule
  int64_t budget_bytes = 0;            // config.memory_budget_bytes
  int64_t min_budget_bytes = 0;        // the smallest budget that holds one request
  bool granularity_is_config = false;  // host_granularity picks it (not a user's backend)
};

// Checks `need` against vm.max_map_count. InvalidArgument when the pool needs more
// mappings than the limit allows any process (less kMapHeadroom); ResourceExhausted when
// it would fit, but not beside the mappings this process has now. Both messages give
// the numbers and the fixes: raise the limit (the sysctl command), a larger host page,
// a smaller budget. OK when the limit cannot be read, and without counting the
// process's mappings for pools under 1024 mappings (too small to be what exhausts the
// limit; a cache that meets it anyway fails cleanly with ResourceExhausted).
absl::Status CheckHostMappings(const HostMappingNeed& need);

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CORE_HOST_LIMITS_H_
