#include "allocators/virtual/virtual_mapping.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace kvmem::internal {
namespace {

// Keeps the code and text of `first`, adding that the undo failed too: the backend
// then holds mappings the caller does not know about (a broken backend).
absl::Status UndoFailed(const absl::Status& first, const absl::Status& undo) {
  return absl::InternalError(absl::StrFormat("%s; undoing the partial change failed too: %s",
                                             first.ToString(), undo.ToString()));
}

absl::Status UnmapEach(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules) {
  for (const Granule& g : granules) {
    if (absl::Status s = vmm.Unmap(g.addr, granularity); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

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

absl::Status MapGranules(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules) {
  for (size_t i = 0; i < granules.size(); ++i) {
    absl::Status s = vmm.Map(granules[i].addr, granules[i].handle);
    if (s.ok()) continue;
    if (absl::Status u = UnmapEach(vmm, granularity, granules.subspan(0, i)); !u.ok()) {
      return UndoFailed(s, u);
    }
    return s;
  }
  return absl::OkStatus();
}

absl::Status SetAccessRuns(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules) {
  for (const auto& [addr, bytes] : GranuleRuns(granules, granularity)) {
    if (absl::Status s = vmm.SetAccess(addr, bytes); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status MapAccessible(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules) {
  if (absl::Status s = MapGranules(vmm, granularity, granules); !s.ok()) return s;
  absl::Status s = SetAccessRuns(vmm, granularity, granules);
  if (s.ok()) return s;
  if (absl::Status u = UnmapGranules(vmm, granularity, granules); !u.ok()) return UndoFailed(s, u);
  return s;
}

absl::Status UnmapGranules(Vmm& vmm, int64_t granularity, absl::Span<const Granule> granules) {
  size_t done = 0;  // granules unmapped so far (whole runs)
  for (const auto& [addr, bytes] : GranuleRuns(granules, granularity)) {
    absl::Status s = vmm.Unmap(addr, bytes);
    if (!s.ok()) {
      if (absl::Status u = MapAccessible(vmm, granularity, granules.subspan(0, done)); !u.ok()) {
        return UndoFailed(s, u);
      }
      return s;
    }
    done += static_cast<size_t>(bytes / granularity);
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
