// PagedLayout: the paged layout (vLLM / SGLang / FlashInfer style) behind
// internal::MakePagedLayout. A page holds page_tokens tokens of every layer: per layer,
// K and V pools [num_pages, page_tokens, kv_heads, head_dim] (2 * num_layers pools),
// each in its own region of one VMM reservation. Page p of pool i starts at
// base + i * region_bytes + p * pool_page_bytes (64-bit byte offsets throughout).
//
// Memory: the pools are backed in chunks; chunk c is granule c of every pool (2L
// physical handles). An elastic pool maps chunks only when an allocation needs a page
// beyond what is mapped, and Trim() gives back trailing chunks whose pages are all
// free; page p is usable only when all its bytes in every pool are mapped (pages may
// straddle granules). Pages are placed by config.page_placement (next to the request's
// last page by default, PagePool::AllocateNear); either way none beyond the mapped ones
// while a mapped page is free.
//
// Sharing: pages are ref-counted (PagePool); the prefix cache pins the pages it keeps
// (one reference each, so a pinned page counts as shared and is copied before a write;
// a page only the cache holds is idle memory, not held). A row writing into its partly filled last
// page while that page is shared, or while a row that shared it was freed under a fence
// still pending, first copies the filled slots to a new page (copy on write). Freed pages wait in
// the pool's quarantine until their fence completes; Shrink frees at once (the engine has
// synchronised before rewinding a request).
//
// Error model: every mutating call is all-or-nothing (see allocators/layout/kv_layout.h)
// unless the backend fails the undo too (docs/errors.md, rule 8); then the records stay
// exactly true to the backend. A chunk that a failed growth mapped in part (or without
// access) and cannot unmap stays mapped outside the pool, and a handle whose release
// failed stays owned (both in stranded_, retried at the start of every later mutating
// call); a whole chunk that a failed copy on write cannot unmap stays in the pool, its
// pages free; chunks Trim or an undo unmapped in part whose remap failed leave the pool
// all the same (their pages are free), so no page is ever recorded usable whose memory
// is not mapped. The status keeps the failure's code and says what was left.
// Thread safety: none; KvCache calls it under its mutex.
// Ownership: owns its reservation, physical handles and token index; keeps the backend
// alive through a shared_ptr.
#ifndef KVMEM_ALLOCATORS_PAGED_PAGED_LAYOUT_H_
#define KVMEM_ALLOCATORS_PAGED_PAGED_LAYOUT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocators/layout/kv_layout.h"
#include "allocators/paged/stranded_mappings.h"
#include "allocators/vmm/vmm_resources.h"
#include "kvmem/config.h"
#include "kvmem/vmm.h"
#include "src/core/int_math.h"
#include "src/core/page_pool.h"
#include "src/core/token_index.h"

namespace kvmem::internal {

// How many pages a budget holds, with the granularity rounding of what gets mapped:
// 2L pools x ceil(num_pages * pool_page_bytes / granularity) granules <= budget.
struct PagedGeometry {
  int64_t num_pools = 0;        // 2 * num_layers
  int64_t pool_page_bytes = 0;  // page_tokens * TokenLayerBytes
  int64_t granularity = 0;
  int32_t num_pages = 0;
  int64_t region_bytes = 0;       // one pool's region, a multiple of granularity
  int64_t chunks_total = 0;       // region_bytes / granularity
  int64_t pages_per_request = 0;  // ceil(max_context / page_tokens)
  // 2L pools x the granules of pages_per_request pages: the smallest budget that fits.
  int64_t min_budget_bytes = 0;
};
// InvalidArgument (with the numbers) when one request at max_context does not fit.
absl::StatusOr<PagedGeometry> ComputePagedGeometry(const KvCacheConfig& config,
                                                   int64_t granularity);

class PagedLayout final : public KvLayout {
 public:
  static absl::StatusOr<std::unique_ptr<PagedLayout>> Create(const KvCacheConfig& config,
                                                             std::shared_ptr<Vmm> vmm);
  ~PagedLayout() override;
  PagedLayout(const PagedLayout&) = delete;
  PagedLayout& operator=(const PagedLayout&) = delete;

  absl::StatusOr<int32_t> AcquireRow() override;
  absl::Status Grow(int32_t row, int64_t len, int64_t n, std::vector<int64_t>* locs) override;
  // All or nothing for the batch: pages for every row are taken (and chunks mapped) at
  // once, copies made, and only then is any row changed. Shrink and Release cannot fail
  // on rows KvCache has checked, so the default batch loops of those are all or nothing.
  absl::Status GrowBatch(absl::Span<const GrowStep> steps, int64_t* out) override;
  absl::Span<const int32_t> Pages(int32_t row) const override { return rows_[row].pages; }
  absl::Status Shrink(int32_t row, int64_t len, int64_t new_len) override;
  absl::Status Share(int32_t parent, int64_t len, int32_t child) override;
  absl::Status Release(int32_t row, int64_t len, Fence fence) override;
  absl::StatusOr<int64_t> Trim() override;

  // The prefix cache's hooks (KvLayout).
  int64_t PrefixUnitTokens() const override { return pt_; }
  void PinPage(int32_t page) override { pool_.Pin(page); }
  void UnpinPage(int32_t page) override;
  int32_t PageOwners(int32_t page) const override { return pool_.owners(page); }
  bool PagePinned(int32_t page) const override { return pool_.pinned(page); }
  bool PageFreeOnUnpin(int32_t page) const override;
  int64_t PinnedPages() const override { return pool_.pinned_count(); }
  int64_t CachedOnlyPages() const override { return pool_.cached_only_count(); }
  absl::Status ShareCached(int32_t row, absl::Span<const int32_t> pages) override;
  int64_t FreePages() const override;

  int64_t SlotOf(int32_t row, int64_t pos) const override;
  absl::StatusOr<std::vector<int32_t>> BlockTable(int32_t row, int64_t len) const override;
  void FillBatch(BatchMetadata* meta) const override;
  absl::StatusOr<PagedKv> PagedView(int layer) const override;
  absl::StatusOr<VirtualKv> VirtualView(int layer) const override;
  void FillStats(Stats* stats) const override;
  absl::Status CheckInvariants(const std::vector<std::pair<int32_t, int64_t>>& live) const override;

  const PagedGeometry& geometry() const { return geo_; }
  int64_t mapped_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // Pages whose bytes are mapped in every pool.
  int64_t usable_pages() const { return usable_pages_; }
  const TokenIndex& token_index() const { return index_; }

 private:
  struct Row {
    bool live = false;
    int64_t len = 0;
    std::vector<int32_t> pages;  // block table: ceil(len / page_tokens) page ids
  };

  PagedLayout(const KvCacheConfig& config, std::shared_ptr<Vmm> vmm, PagedGeometry geo,
              TokenIndex index, Reservation reservation);

  uintptr_t PoolBase(int64_t pool) const {
    return reservation_.addr() + static_cast<uintptr_t>(pool * geo_.region_bytes);
  }
  uintptr_t PageAddr(int64_t pool, int32_t page) const {
    return PoolBase(pool) + static_cast<uintptr_t>(int64_t{page} * geo_.pool_page_bytes);
  }
  int64_t Slot(int32_t page, int64_t offset) const { return int64_t{page} * pt_ + offset; }
  int64_t PagesFor(int64_t len) const { return page_div_.CeilQuot(len); }
  // Pages some live row holds (used pages less those only the prefix cache keeps).
  int64_t HeldPages() const { return pool_.used_count() - pool_.cached_only_count(); }
  int64_t UsablePagesFor(int64_t chunks) const;

  // What GrowBatch does to one row: `count` new pages at fresh_[first...], the first of
  // them a copy of the shared last page `old_tail` when `cow`.
  struct GrowPlan {
    int32_t old_tail = -1;
    bool cow = false;
    int64_t count = 0;
    int64_t first = 0;
  };
  // Takes the pages of plan_ (`total` in all) into fresh_, each row's placed by
  // config_.page_placement after its last page, reclaiming quarantine and mapping
  // chunks as needed. On error nothing is taken or mapped.
  absl::Status TakePagesForBatch(absl::Span<const GrowStep> steps, int64_t total);
  // With fewer than `total` pages free: has the prefix cache evict pages no row holds
  // until `total` are, mapping the rest of an elastic pool first (every free page will be
  // taken), so that a backend failure leaves the cache unevicted. Evicts nothing when
  // even that would not be enough. On error nothing is mapped or evicted.
  absl::Status EvictForBatch(int64_t total);
  // Starts loading what planning and committing steps[i + 8] and steps[i + 16] read.
  void PrefetchAhead(absl::Span<const GrowStep> steps, size_t i) const;
  // Clears the copies_ counts that planning set.
  void UnplanCopies();
  // Applies one planned row (cannot fail) and writes its new slots to out.
  void CommitGrow(const GrowStep& step, const GrowPlan& plan, int64_t* out);
  // Undoes TakePagesForBatch after `cause` failed the call: frees fresh_ and unmaps the
  // chunks beyond `chunks_before`. Returns `cause`, with what was left where that failed.
  absl::Status UndoTake(const absl::Status& cause, int64_t chunks_before);
  // Maps chunks [mapped, target): create 2L handles each, map, one SetAccess per pool. On
  // error no chunk is added; what its undo could not take back is in stranded_ (the
  // status says so).
  absl::Status MapChunks(int64_t target);
  // Unmaps chunks [target, mapped) and releases their handles (one whose release fails
  // waits in stranded_). On an unmap failure maps back what it unmapped and returns the
  // failure, every chunk still mapped; if mapping back fails too, the chunks leave the
  // pool all the same (REQUIRES: their pages are free), what is still mapped of them goes
  // to stranded_, and *undo_error gets that failure (and a failed release).
  absl::Status UnmapChunks(int64_t target, absl::Status* undo_error);
  // Retries what stranded_ holds (at the start of every mutating call).
  void RetryStranded();
  // `cause`, the error of a failed call, and when its undo (first failure `undo_error`)
  // left the cache unlike before the call (mapped chunks other than `chunks_before`,
  // more in stranded_ than `stranded_before`), what it left (docs/errors.md, rule 8).
  absl::Status Undone(const absl::Status& cause, const absl::Status& undo_error,
                      int64_t chunks_before, const StrandedMappings::Count& stranded_before) const;
  // Free pages whose memory lies in a chunk with a stranded granule: they cannot be
  // mapped until a later call unmaps it (Stats count them quarantined, not free).
  int64_t StrandedPages() const;
  // The records against the backend's own (Vmm::Query), where the backend can tell.
  absl::Status CheckBackend() const;
  void ReclaimQuarantine(bool scan_all);

  // Distinct live tokens of page p: the most any owner fills it.
  int64_t PageFill(int32_t page) const;
  // A row's partly filled last page is tracked in partial_refs_ / partial_sum_ (and
  // shared_fills_ where several rows end part-way through it), so that PageFill is O(1),
  // or O(log rows) on such a page.
  void DetachTail(const Row& r);
  void AttachTail(const Row& r);
  void UpdatePeaks();

  const KvCacheConfig config_;
  const std::shared_ptr<Vmm> vmm_;
  const PagedGeometry geo_;
  const int64_t pt_;        // page_tokens
  const Divider page_div_;  // by pt_: a decode step divides by it several times a request
  Reservation reservation_;
  std::vector<std::vector<PhysicalPage>> chunks_;  // [chunk][pool]
  // What failed undos left in the backend, and why the last retry failed to clear it.
  StrandedMappings stranded_;
  absl::Status stranded_error_;
  int64_t usable_pages_ = 0;
  PagePool pool_;
  TokenIndex index_;
  std::vector<Row> rows_;
  IdBitmap free_rows_;
  std::vector<int32_t> partial_refs_;  // [page] rows whose partly filled last page it is
  std::vector<int64_t> partial_sum_;   // [page] sum of those rows' fills
  // Pages where two or more rows end part-way: fill -> rows (sparse; PageFill's max).
  absl::flat_hash_map<int32_t, std::map<int64_t, int32_t>> shared_fills_;
  // GrowBatch's scratch, kept between calls so that a step allocates nothing.
  std::vector<GrowPlan> plan_;
  std::vector<int32_t> fresh_;
  std::vector<int32_t> copies_;  // [page] rows of the batch being planned that copy it

  int64_t stored_tokens_ = 0;
  int64_t cow_copies_ = 0;
  int64_t peak_held_bytes_ = 0;
  int64_t peak_live_bytes_ = 0;
  int64_t pool_create_nanos_ = 0;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_PAGED_PAGED_LAYOUT_H_
