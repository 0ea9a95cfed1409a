// Batched backend calls of the virtual layout: map, set access and unmap lists of
// granules with as few calls as the driver allows. cuMemSetAccess and cuMemUnmap cost
// the same per call whatever the range (docs/layouts.md), so both are issued once per
// run of adjacent granules. Every helper is all or nothing: on error it undoes what it
// did before returning, and says so in the status if the undo failed too.
#ifndef KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_MAPPING_H_
#define KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_MAPPING_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

// One granule-sized mapping: `handle` at `addr`.
struct Granule {
  uintptr_t addr = 0;
  PhysHandle handle = 0;
};

// Sorts by address (runs are found on sorted lists).
void SortGranules(std::vector<Granule>* granules);

// Maximal runs [start, start + bytes) of adjacent granules.
// REQUIRES: `granules` sorted by address, addresses distinct.
std::vector<std::pair<uintptr_t, int64_t>> GranuleRuns(absl::Span<const Granule> granules,
                                                       int64_t granularity);

// Maps every granule, without access. On error unmaps the ones it mapped.
absl::Status MapGranules(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules);

// One SetAccess per run. REQUIRES: sorted; every granule mapped. Does not unmap on error
// (the caller owns the mappings).
absl::Status SetAccessRuns(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules);

// MapGranules then SetAccessRuns; on error nothing stays mapped. REQUIRES: sorted.
absl::Status MapAccessible(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules);

// Unmaps every granule, one Unmap per run. On error the runs already unmapped are
// mapped back (same handles, accessible), so the caller's records stay true.
// REQUIRES: sorted; every granule mapped and accessible.
absl::Status UnmapGranules(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_MAPPING_H_
