// StrandedMappings: what the paged layout's failed undos leave in the backend, recorded so
// that the layout's records stay exactly true to what the backend holds (docs/errors.md,
// rule 8):
//   * granules mapped outside the pool's chunks: a chunk that a failed growth mapped in
//     part, or one that Trim gave back, whose unmap failed (with or without access);
//   * handles mapped nowhere whose release failed.
// The layout retries them at the start of every mutating call (Retry): one Unmap per run
// of adjacent granules, then the release of every handle. A chunk with a stranded granule
// cannot be mapped into the pool until then.
//
// Ownership: owns the handles it records. Thread safety: none; the layout calls it under
// KvCache's mutex.
#ifndef KVMEM_ALLOCATORS_PAGED_STRANDED_MAPPINGS_H_
#define KVMEM_ALLOCATORS_PAGED_STRANDED_MAPPINGS_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "allocators/vmm/vmm_resources.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

class StrandedMappings {
 public:
  // A granule mapped where the pool records no chunk: granule `chunk` of one pool.
  struct Granule {
    int64_t chunk = 0;
    PhysicalPage page;
    bool accessible = false;
  };
  // How much is recorded, so that a failed call can say what it left (DescribeSince).
  struct Count {
    int64_t mapped = 0;
    int64_t unreleased = 0;
  };

  bool empty() const { return mapped_.empty() && unreleased_.empty(); }
  Count count() const {
    return {static_cast<int64_t>(mapped_.size()), static_cast<int64_t>(unreleased_.size())};
  }
  // Stranded granules by address.
  const std::map<uintptr_t, Granule>& mapped() const { return mapped_; }
  const std::vector<PhysicalPage>& unreleased() const { return unreleased_; }
  // Whether a granule of a chunk in [lo, hi) is stranded.
  bool AnyMappedIn(int64_t lo, int64_t hi) const;
  // The distinct chunks of the stranded granules, ascending.
  std::vector<int64_t> Chunks() const;

  // Records `page`, mapped at `addr` (granule `chunk` of its pool).
  // REQUIRES: nothing is recorded at addr.
  void AddMapped(uintptr_t addr, int64_t chunk, PhysicalPage page, bool accessible);
  // Releases every valid handle of `pages` (mapped nowhere) and clears it; a handle whose
  // release fails is kept here. Returns the first failure.
  absl::Status Release(std::vector<PhysicalPage>* pages);
  // Unmaps every run of adjacent stranded granules with one call and releases their
  // handles, then retries the release of the others. What fails stays recorded; returns
  // the first failure.
  absl::Status Retry(Vmm* vmm, int64_t granularity);
  // At destruction: Retry, then releases every handle left, the mapped ones too (a
  // backend may free those once unmapped), logging what fails once under `owner`.
  void GiveBackOrLog(Vmm* vmm, int64_t granularity, std::string_view owner);

  // What was recorded since `before`, as phrases of a status (none when nothing was).
  void DescribeSince(const Count& before, std::vector<std::string>* notes) const;

 private:
  std::map<uintptr_t, Granule> mapped_;
  std::vector<PhysicalPage> unreleased_;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_PAGED_STRANDED_MAPPINGS_H_
