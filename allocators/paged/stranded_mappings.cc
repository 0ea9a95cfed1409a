// StrandedMappings (allocators/paged/stranded_mappings.h): the paged layout's record of
// what failed undos left in the backend, and its retry.
#include "allocators/paged/stranded_mappings.h"

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "src/core/logging.h"

namespace kvmem::internal {

bool StrandedMappings::AnyMappedIn(int64_t lo, int64_t hi) const {
  for (const auto& [addr, g] : mapped_) {
    if (g.chunk >= lo && g.chunk < hi) return true;
  }
  return false;
}

std::vector<int64_t> StrandedMappings::Chunks() const {
  std::vector<int64_t> chunks;
  for (const auto& [addr, g] : mapped_) chunks.push_back(g.chunk);
  std::sort(chunks.begin(), chunks.end());
  chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
  return chunks;
}

void StrandedMappings::AddMapped(uintptr_t addr, int64_t chunk, PhysicalPage page,
                                 bool accessible) {
  mapped_.emplace(addr, Granule{.chunk = chunk, .page = std::move(page), .accessible = accessible});
}

absl::Status StrandedMappings::Release(std::vector<PhysicalPage>* pages) {
  absl::Status first;
  for (PhysicalPage& page : *pages) {
    if (!page.valid()) continue;
    absl::Status s = page.Release();
    if (s.ok()) continue;
    first.Update(s);
    unreleased_.push_back(std::move(page));
  }
  pages->clear();
  return first;
}

absl::Status StrandedMappings::Retry(Vmm* vmm, int64_t granularity) {
  absl::Status first;
  std::vector<PhysicalPage> unmapped;
  auto run = mapped_.begin();
  while (run != mapped_.end()) {
    // The granules adjacent to `run`: one Unmap for them all (a driver call costs the
    // same for one granule or many).
    auto end = std::next(run);
    int64_t n = 1;
    while (end != mapped_.end() && end->first == run->first + n * granularity) {
      ++end;
      ++n;
    }
    if (absl::Status s = vmm->Unmap(run->first, n * granularity); !s.ok()) {
      first.Update(s);
      run = end;
      continue;
    }
    for (auto it = run; it != end; ++it) unmapped.push_back(std::move(it->second.page));
    run = mapped_.erase(run, end);
  }
  // Handles kept from earlier calls first: Release appends the ones that fail again.
  std::vector<PhysicalPage> retry = std::move(unreleased_);
  unreleased_.clear();
  for (PhysicalPage& page : unmapped) retry.push_back(std::move(page));
  first.Update(Release(&retry));
  return first;
}

void StrandedMappings::GiveBackOrLog(Vmm* vmm, int64_t granularity, std::string_view owner) {
  if (empty()) return;
  const int64_t mapped = static_cast<int64_t>(mapped_.size());
  if (absl::Status s = Retry(vmm, granularity); !s.ok() && !mapped_.empty()) {
    Logger()->error("{}: unmapping {} of {} granules left mapped by failed calls failed: {}", owner,
                    mapped_.size(), mapped, s.ToString());
  }
  std::vector<PhysicalPage> left = std::move(unreleased_);
  unreleased_.clear();
  for (auto& [addr, g] : mapped_) left.push_back(std::move(g.page));
  mapped_.clear();
  ReleaseAllOrLog(&left, owner);
}

void StrandedMappings::DescribeSince(const Count& before, std::vector<std::string>* notes) const {
  const Count now = count();
  if (now.mapped > before.mapped) {
    notes->push_back(absl::StrFormat(
        "%d granule(s) stay mapped outside the pool's chunks until a later call unmaps them",
        now.mapped - before.mapped));
  }
  if (now.unreleased > before.unreleased) {
    notes->push_back(absl::StrFormat("%d physical handle(s) wait for a later call to release them",
                                     now.unreleased - before.unreleased));
  }
}

}  // namespace kvmem::internal
