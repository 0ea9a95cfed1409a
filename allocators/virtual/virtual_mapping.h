// Batched backend calls of the virtual layout. cuMemSetAccess and cuMemUnmap cost the
// same per call whatever the range (docs/layouts.md), so both are issued once per run of
// adjacent granules.
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

// Where a granule ended up after MapAccessibleTracked.
enum class GranuleState : uint8_t { kUnmapped, kMapped, kAccessible };

// Maps every granule, then makes them accessible (one SetAccess per run). On error it
// unmaps what it mapped (one Unmap per run); *state says where each granule ended up, so
// that a caller can record a mapping whose unmap failed too rather than lose it.
// REQUIRES: sorted.
absl::Status MapAccessibleTracked(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules,
                                  std::vector<GranuleState>* state);

// One Unmap per run, every run tried; the first failure (logged by the caller).
// REQUIRES: sorted.
absl::Status UnmapRuns(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_MAPPING_H_
