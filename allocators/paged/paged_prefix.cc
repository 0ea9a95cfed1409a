// PagedLayout's hooks for the prefix cache (KvLayout): pins, and rows that start on
// cached pages. Kept apart from the allocation paths of paged_layout.cc.
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocators/paged/paged_layout.h"

namespace kvmem::internal {

void PagedLayout::UnpinPage(int32_t page) {
  pool_.Unpin(page);
  // Nothing live changes (a page only the cache held is not live), so neither do peaks.
}

bool PagedLayout::PageFreeOnUnpin(int32_t page) const {
  return pool_.owners(page) == 0 &&
         !pool_.FencePending(page, [this](const Fence& f) { return vmm_->FenceComplete(f); });
}

int64_t PagedLayout::FreePages() const { return pool_.free_count(); }

absl::Status PagedLayout::EvictForBatch(int64_t total) {
  if (pool_.free_count() + pool_.cached_only_count() < total) return absl::OkStatus();
  const int64_t before = mapped_chunks();
  if (before < geo_.chunks_total) {
    absl::Status s = MapChunks(geo_.chunks_total);
    if (!s.ok()) {
      return absl::Status(s.code(),
                          absl::StrCat("paged layout: mapping the rest of the pool before evicting "
                                       "cached pages: ",
                                       s.message()));
    }
  }
  page_reclaimer_(total);
  ReclaimQuarantine(/*scan_all=*/true);
  // Short all the same (evicted pages wait on a fence): the pool maps no more than before.
  // A failed unmap keeps its chunks mapped, or records what it strands (rule 8): either
  // way the records stay true, and the caller's ResourceExhausted is the answer.
  if (pool_.free_count() < total && mapped_chunks() > before) {
    absl::Status undo_error;
    (void)UnmapChunks(before, &undo_error);
  }
  return absl::OkStatus();
}

absl::Status PagedLayout::ShareCached(int32_t row, absl::Span<const int32_t> pages) {
  if (row < 0 || row >= config_.max_requests || !rows_[row].live || rows_[row].len != 0) {
    return absl::InternalError(
        absl::StrFormat("paged layout ShareCached: row %d is not empty", row));
  }
  const int64_t len = static_cast<int64_t>(pages.size()) * pt_;
  if (len > config_.max_context) {
    return absl::InternalError(
        absl::StrFormat("paged layout ShareCached: %d pages exceed max_context", pages.size()));
  }
  for (int32_t page : pages) {
    if (page < 0 || page >= geo_.num_pages || !pool_.pinned(page)) {
      return absl::InternalError(
          absl::StrFormat("paged layout ShareCached: page %d is not a cached page", page));
    }
  }
  Row& r = rows_[row];
  int64_t before = 0;
  for (int32_t page : pages) before += PageFill(page);
  r.pages.assign(pages.begin(), pages.end());
  for (int32_t page : pages) pool_.AddRef(page);
  for (int64_t pos = 0; pos < len; ++pos) {
    index_.Set(row, pos, static_cast<int32_t>(Slot(r.pages[pos / pt_], pos % pt_)));
  }
  r.len = len;
  // Whole pages: no partly filled tail to track. A page only the cache held becomes live.
  int64_t after = 0;
  for (int32_t page : pages) after += PageFill(page);
  stored_tokens_ += after - before;
  UpdatePeaks();
  return absl::OkStatus();
}

}  // namespace kvmem::internal
