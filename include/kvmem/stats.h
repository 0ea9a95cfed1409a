// Stats: the numbers a KvCache reports. Plain values, copied out under the lock.
#ifndef KVMEM_STATS_H_
#define KVMEM_STATS_H_

#include <cstdint>
#include <string>

#include "kvmem/platform.h"
#include "kvmem/vmm.h"

namespace kvmem {

struct KVMEM_EXPORT Stats {
  // Requests and tokens.
  int64_t num_requests = 0;  // live requests
  int64_t logical_tokens =
      0;  // sum of the live requests' lengths (shared prefixes counted per request)
  int64_t stored_tokens = 0;  // distinct token slots holding a live token (shared ones once)

  // Bytes. held: physical memory assigned to live requests (paged: used pages; virtual:
  // pages mapped under live rows). live: stored_tokens * token bytes.
  // idle: physical memory kept for reuse but owned by no live request (virtual rows kept by
  // deferred reclamation, quarantined pages waiting on a fence, free pages of a mapped pool).
  // mapped: physical memory mapped anywhere. physical: handles created (what the device has
  // given the cache). budget: the configured memory budget.
  int64_t live_bytes = 0;
  int64_t held_bytes = 0;
  int64_t idle_bytes = 0;
  int64_t mapped_bytes = 0;
  int64_t physical_bytes = 0;
  int64_t budget_bytes = 0;

  // Pages: the layout's own unit (paged: a page of page_tokens tokens over all layers;
  // virtual: one granule of physical memory).
  int64_t page_bytes = 0;
  int64_t pages_total = 0;   // pages the budget allows
  int64_t pages_free = 0;    // available now (includes ones not yet created / mapped)
  int64_t pages_used = 0;    // owned by at least one live request
  int64_t pages_shared = 0;  // owned by more than one
  // Freed, waiting for their fence; also, until a later call restores or unmaps them,
  // pages a failed undo left behind (docs/errors.md, rule 8): virtual: unmapped,
  // inaccessible or mapped where no request uses them; paged: the free pages of chunks
  // left mapped outside the pool.
  int64_t pages_quarantined = 0;

  // Peaks since creation.
  int64_t peak_requests = 0;
  int64_t peak_held_bytes = 0;
  int64_t peak_live_bytes = 0;

  // Activity.
  int64_t extends = 0;
  int64_t forks = 0;
  int64_t cow_copies = 0;         // copy-on-write copies of a shared, partly filled page
  int64_t pages_reclaimed = 0;    // virtual: pages taken back from idle rows
  int64_t map_stalls = 0;         // virtual: growth that had to map synchronously
  int64_t pool_create_nanos = 0;  // creating physical handles up front
  VmmCounters vmm;                // backend calls and time spent in them

  // Prefix cache (KvCacheConfig::enable_prefix_cache; docs/prefix_cache.md).
  int64_t prefix_lookups = 0;          // AddRequestWithPrefix calls
  int64_t prefix_lookup_tokens = 0;    // token ids they brought
  int64_t prefix_hit_tokens = 0;       // of those, the ones found cached (not computed again)
  int64_t prefix_stored_blocks = 0;    // blocks (pages) published into the cache
  int64_t prefix_evictions = 0;        // blocks evicted (memory needed, the byte cap, reset)
  int64_t prefix_cached_bytes = 0;     // pages the cache keeps, held by requests or not
  int64_t prefix_evictable_bytes = 0;  // of those, the pages no live request holds
  int64_t prefix_events_dropped = 0;   // events nobody took before the queue was full

  // 1 - live / held: the fraction of held memory not holding a live token.
  double internal_fragmentation() const {
    return held_bytes == 0 ? 0.0 : 1.0 - static_cast<double>(live_bytes) / held_bytes;
  }
  // live / held.
  double utilisation() const {
    return held_bytes == 0 ? 1.0 : static_cast<double>(live_bytes) / held_bytes;
  }
  // Hit tokens per looked-up token (0 before any look-up).
  double prefix_hit_rate() const {
    return prefix_lookup_tokens == 0
               ? 0.0
               : static_cast<double>(prefix_hit_tokens) / prefix_lookup_tokens;
  }
  int64_t vmm_calls() const;
  int64_t vmm_nanos() const;
  std::string ToString() const;
};

}  // namespace kvmem

#endif  // KVMEM_STATS_H_
