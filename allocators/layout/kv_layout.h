// internal::KvLayout: what KvCache needs from a layout (paged or virtual). KvCache owns
// request ids, lengths, validation and locking; a layout owns rows, pages, mappings and
// the token index. Layouts are not thread-safe: KvCache calls them under its mutex.
//
// Every mutating call is all-or-nothing: on error the layout is exactly as before
// (partial page grabs returned, partial maps unmapped, out-vectors restored).
// KvCache has already validated arguments (lengths within [0, max_context], rows live).
#ifndef KVMEM_ALLOCATORS_LAYOUT_KV_LAYOUT_H_
#define KVMEM_ALLOCATORS_LAYOUT_KV_LAYOUT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "kvmem/stats.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

class KvLayout {
 public:
  virtual ~KvLayout() = default;

  // Picks a free row for a new request (virtual prefers rows that kept their pages).
  // ResourceExhausted when all max_requests rows are live.
  virtual absl::StatusOr<int32_t> AcquireRow() = 0;

  // Row `row` holds `len` tokens; make room for `n` more and append their slots to *locs.
  virtual absl::Status Grow(int32_t row, int64_t len, int64_t n, std::vector<int64_t>* locs) = 0;
  // Row `row` goes from `len` to `new_len` <= len tokens.
  virtual absl::Status Shrink(int32_t row, int64_t len, int64_t new_len) = 0;
  // Empty row `child` (from AcquireRow) takes the first `len` tokens of `parent`, shared.
  virtual absl::Status Share(int32_t parent, int64_t len, int32_t child) = 0;
  // Ends the request in `row` (holding `len` tokens); its memory is reusable after
  // `fence`.
  virtual absl::Status Release(int32_t row, int64_t len, Fence fence) = 0;
  // Gives back a row from AcquireRow that the caller did not use (a Fork whose Share
  // failed), leaving the layout as it was before AcquireRow: a failed call moves nothing.
  // Where the backend fails that, the row is given back all the same, and the status
  // (the backend's code, never Internal) says what could not be restored.
  virtual absl::Status ReturnRow(int32_t row) { return Release(row, 0, Fence{}); }
  // One row of a batch call. The rows of one batch are distinct and live, each with
  // its current length `len` (KvCache has checked both).
  struct GrowStep {
    int32_t row;
    int64_t len;
    int64_t n;  // tokens to add, >= 0
  };
  struct ShrinkStep {
    int32_t row;
    int64_t len;
    int64_t new_len;  // <= len
  };
  struct ReleaseStep {
    int32_t row;
    int64_t len;
  };
  // Grows every row of `steps` and writes the new tokens' slots to out[0, sum of n), in
  // the order of the steps. All or nothing for the whole batch: on error no row grew and
  // nothing stayed mapped, taken or counted (out's contents are then unspecified).
  // The defaults run the single-row calls and undo with Shrink; a layout overrides them
  // where that undo would not restore everything (pages mapped, copies made).
  virtual absl::Status GrowBatch(absl::Span<const GrowStep> steps, int64_t* out);
  // Shrinks every row of `steps`; all or nothing.
  virtual absl::Status ShrinkBatch(absl::Span<const ShrinkStep> steps);
  // Releases every row of `steps` under one fence; all or nothing.
  virtual absl::Status ReleaseBatch(absl::Span<const ReleaseStep> steps, Fence fence);

  // Paged: the page ids of `row` (ceil(len / page_tokens) of them, in order), valid until
  // the next mutating call. Empty for a layout without pages.
  virtual absl::Span<const int32_t> Pages(int32_t row) const { return {}; }

  // Gives unused physical memory back to the backend; returns bytes released.
  virtual absl::StatusOr<int64_t> Trim() = 0;

  // Slot of token `pos` of `row` (pos < the row's length).
  virtual int64_t SlotOf(int32_t row, int64_t pos) const = 0;
  // Paged: page ids of the first ceil(len / page_tokens) pages of `row`.
  virtual absl::StatusOr<std::vector<int32_t>> BlockTable(int32_t row, int64_t len) const = 0;
  // Fills page_table / page_table_stride (paged) or nothing beyond row_ids (virtual).
  virtual void FillBatch(BatchMetadata* meta) const = 0;

  virtual absl::StatusOr<PagedKv> PagedView(int layer) const = 0;
  virtual absl::StatusOr<VirtualKv> VirtualView(int layer) const = 0;

  // ---- The prefix cache's hooks (docs/prefix_cache.md) -----------------------------
  // Tokens of one unit of sharing: a prefix is cached and matched in whole units (paged:
  // a page). 0 where the layout cannot cache prefixes (the others are then never called).
  virtual int64_t PrefixUnitTokens() const { return 0; }
  // Adds the prefix cache's reference to `page`, a page some live row holds whole.
  virtual void PinPage(int32_t page) {}
  // Drops that reference: the page is free (or quarantined behind the fences of rows
  // that dropped it) once no row holds it either.
  virtual void UnpinPage(int32_t page) {}
  // Live rows that hold `page` (the cache's reference not counted).
  virtual int32_t PageOwners(int32_t page) const { return 0; }
  virtual bool PagePinned(int32_t page) const { return false; }
  // Whether unpinning `page` would free it now: no row holds it and no row dropped it
  // under a fence still pending (such a page would wait in quarantine).
  virtual bool PageFreeOnUnpin(int32_t page) const { return false; }
  // Pages the prefix cache references, and those of them no live row holds.
  virtual int64_t PinnedPages() const { return 0; }
  virtual int64_t CachedOnlyPages() const { return 0; }
  // Empty row `row` (from AcquireRow) takes `pages`, pinned full pages, as its first
  // pages.size() units. Cannot fail on arguments KvCache has checked.
  virtual absl::Status ShareCached(int32_t row, absl::Span<const int32_t> pages) {
    return absl::UnimplementedError("this layout has no prefix cache");
  }
  // Pages an allocation may take now without evicting anything.
  virtual int64_t FreePages() const { return 0; }
  // Called by an allocation that finds fewer than `need` free pages, before it fails:
  // evicts cached pages until `need` are free, or evicts nothing when that cannot
  // succeed. Set by KvCache when the prefix cache is on.
  void set_page_reclaimer(std::function<void(int64_t need)> reclaimer) {
    page_reclaimer_ = std::move(reclaimer);
  }

  // Fills the memory and page fields of *stats, including peaks and backend counters.
  virtual void FillStats(Stats* stats) const = 0;
  // `live`: (row, length) of every live request.
  virtual absl::Status CheckInvariants(
      const std::vector<std::pair<int32_t, int64_t>>& live) const = 0;

 protected:
  std::function<void(int64_t)> page_reclaimer_;
};

// Budget too small for one request at max_context, or a shape that does not fit the
// backend: InvalidArgument with the numbers in the message.
absl::StatusOr<std::unique_ptr<KvLayout>> MakePagedLayout(const KvCacheConfig& config,
                                                          std::shared_ptr<Vmm> vmm);
absl::StatusOr<std::unique_ptr<KvLayout>> MakeVirtualLayout(const KvCacheConfig& config,
                                                            std::shared_ptr<Vmm> vmm);

// PlanMemory (kvmem/memory_plan.h) of each layout on a backend of `granularity` bytes
// (`device`: Vmm::is_device): the geometry its Make*Layout builds, and the same
// InvalidArgument for a config that it rejects, host checks included (not their
// ResourceExhausted: a pool that only does not fit beside this process's mappings now).
// With `minimal_budget`, at the smallest budget that fits instead of
// config.memory_budget_bytes. Nothing is reserved, created or mapped.
absl::StatusOr<MemoryPlan> PlanPagedLayout(const KvCacheConfig& config, int64_t granularity,
                                           bool device, bool minimal_budget);
absl::StatusOr<MemoryPlan> PlanVirtualLayout(const KvCacheConfig& config, int64_t granularity,
                                             bool device, bool minimal_budget);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_LAYOUT_KV_LAYOUT_H_
