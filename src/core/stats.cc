#include "kvmem/stats.h"

#include "absl/strings/str_format.h"

namespace kvmem {

int64_t Stats::vmm_calls() const {
  int64_t n = 0;
  for (int64_t c : vmm.calls) n += c;
  return n;
}

int64_t Stats::vmm_nanos() const {
  int64_t n = 0;
  for (int64_t c : vmm.nanos) n += c;
  return n;
}

std::string Stats::ToString() const {
  constexpr double kMiB = 1 << 20;
  return absl::StrFormat(
      "requests=%d tokens=%d stored=%d live=%.1fMiB held=%.1fMiB idle=%.1fMiB "
      "mapped=%.1fMiB physical=%.1fMiB util=%.4f pages(total=%d free=%d used=%d shared=%d "
      "quarantined=%d) peaks(requests=%d held=%.1fMiB live=%.1fMiB) cow=%d stalls=%d "
      "vmm_calls=%d vmm_ms=%.3f prefix(lookups=%d hit_rate=%.4f cached=%.1fMiB "
      "evictable=%.1fMiB evictions=%d)",
      num_requests, logical_tokens, stored_tokens, live_bytes / kMiB, held_bytes / kMiB,
      idle_bytes / kMiB, mapped_bytes / kMiB, physical_bytes / kMiB, utilisation(), pages_total,
      pages_free, pages_used, pages_shared, pages_quarantined, peak_requests,
      peak_held_bytes / kMiB, peak_live_bytes / kMiB, cow_copies, map_stalls, vmm_calls(),
      vmm_nanos() / 1e6, prefix_lookups, prefix_hit_rate(), prefix_cached_bytes / kMiB,
      prefix_evictable_bytes / kMiB, prefix_evictions);
}

}  // namespace kvmem
