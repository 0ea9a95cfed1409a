#include "allocators/virtual/virtual_mapping.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace kvmem::internal {

void SortGranules(std::vector<Granule>* granules) {
  std::sort(granules->begin(), granules->end(),
            [](const Granule& a, const Granule& b) { return a.addr < b.addr; });
}

std::vector<std::pair<uintptr_t, int64_t>> GranuleRuns(absl::Span<const Granule> granules,
                                                       int64_t granularity) {
  std::vector<std::pair<uintptr_t, int64_t>> runs;
  for (const Granule& g : granules) {
    if (!runs.empty() && runs.back().first + runs.back().second == g.addr) {
      runs.back().second += granularity;
    } else {
      runs.emplace_back(g.addr, granularity);
    }
  }
  return runs;
}

absl::Status MapAccessibleTracked(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules,
                                  std::vector<GranuleState>* state) {
  state->assign(granules.size(), GranuleState::kUnmapped);
  absl::Status s;
  size_t mapped = 0;
  for (; mapped < granules.size(); ++mapped) {
    s = vmm.Map(granules[mapped].addr, granules[mapped].handle);
    if (!s.ok()) break;
    (*state)[mapped] = GranuleState::kMapped;
  }
  if (s.ok()) {
    size_t first = 0;
    for (const auto& [addr, bytes] : GranuleRuns(granules, granularity)) {
      const size_t n = static_cast<size_t>(bytes / granularity);
      s = vmm.SetAccess(addr, bytes);
      if (!s.ok()) break;
      for (size_t i = first; i < first + n; ++i) (*state)[i] = GranuleState::kAccessible;
      first += n;
    }
    if (s.ok()) return s;
  }
  // Undo: unmap, run by run, what was mapped.
  absl::Status undo;
  const absl::Span<const Granule> done = granules.subspan(0, mapped);
  size_t first = 0;
  for (const auto& [addr, bytes] : GranuleRuns(done, granularity)) {
    const size_t n = static_cast<size_t>(bytes / granularity);
    if (absl::Status u = vmm.Unmap(addr, bytes); u.ok()) {
      for (size_t i = first; i < first + n; ++i) (*state)[i] = GranuleState::kUnmapped;
    } else {
      undo.Update(u);
    }
    first += n;
  }
  if (undo.ok()) return s;
  return absl::Status(s.code(), absl::StrFormat("%s; undoing the partial change failed too: %s",
                                                s.message(), undo.ToString()));
}

absl::Status UnmapRuns(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules) {
  absl::Status first;
  for (const auto& [addr, bytes] : GranuleRuns(granules, granularity)) {
    first.Update(vmm.Unmap(addr, bytes));
  }
  return first;
}

}  // namespace kvmem::internal
