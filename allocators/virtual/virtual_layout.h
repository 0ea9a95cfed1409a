// VirtualLayout: the virtual (vAttention-style) layout of internal::KvLayout. One
// reservation holds every request row at max_context; physical pages (one backend
// granule each) are mapped under a row only as its request grows. Kernels see a plain
// strided tensor (VirtualKv). docs/layouts.md has the shapes and the arithmetic;
// virtual_geometry.h the offsets.
//
// The layout is composed of four parts, each in its own file:
//   handle_pool.h   the physical handles (all created in Create, recycled, released at
//                   destruction), their states and the counters over them;
//   row_table.h     rows, their page entries, lengths, private ranges, idle / live;
//   reclaim.h       which pages to take back from whom when the free pool runs short;
//   transaction.h   the steps one call makes, undone in reverse order unless committed,
//                   and what a failed undo leaves behind (kept, quarantined, damaged).
// This file is the KvLayout operations written with them.
//
// Rows are live (a request) or idle. An idle row keeps its pages (deferred reclamation)
// and is untouched until its fence completes; then AcquireRow prefers it (the idle row
// holding the most pages), and its pages are taken back only when another row needs
// them or by Trim. Fences are polled lazily, in release order: a row whose fence
// completed behind one that has not is seen once that one completes, or when no other
// row is available (AcquireRow, a Grow short of pages: then every fence is polled).
//
// Batches: GrowBatch, ShrinkBatch and ReleaseBatch take mu_ once and are all or nothing
// for the whole batch: every step is checked first; the rows of a batch whose growth
// needs the backend (new pages, copies, reclamation) share one Transaction, committed
// once, and on any failure every row is left as it was. Rows growing inside their
// private range (a decode step) cost O(1) with no heap allocation.
//
// Sharing: Share maps the parent's handles of the prefix under the child row (a handle
// is always mapped at the same (segment, page) position under every row that maps it).
// Copy on write is LAZY: the shared, partly filled last chunk's pages (a page without
// chunks; with the default chunk every page of the chunk, since each holds a layer's part
// of it: 32 pages for Llama-3-8B) are copied only when one side writes into them (Grow on
// a page with ref count > 1): a new handle is mapped at a one-granule scratch
// reservation, the page is copied, and the new handle replaces the old one under the
// writing row. If every other owner of the page is an idle row past its fence, their
// aliases are unmapped instead (no copy). Shrink unmaps shared pages beyond the new
// length and keeps exclusive ones.
//
// Errors: every mutating call is all or nothing (docs/errors.md), Trim included: a
// Transaction undoes what a failed call did. Where the undo fails too, the records still
// say exactly what the backend holds (transaction.h); every mutating call first retries
// what such a failure left (RetryQuarantine), and CheckInvariants compares the records
// with the backend's own (Vmm::Query).
//
// Stats: pages_shared counts pages shared by live rows; mapped_bytes is physical memory
// mapped anywhere (an aliased handle once; vmm.mapped_granules counts every alias);
// idle_bytes is pages only idle rows hold; pages_quarantined adds pages held back by a
// failed unmap. Peaks are sampled after calls that put memory to use (Grow, Share, mapper
// commits) and when stats are read.
//
// Thread safety: KvCache calls the KvLayout methods under its mutex. With
// map_ahead_tokens > 0 a BackgroundMapper thread also works on the layout, so all state
// is guarded by an internal mutex `mu_`; backend calls of the mapper run outside it,
// on pages marked in flight. Grow waits for an in-flight page instead of mapping it.
// The mapper takes pages back from idle rows under `mu_` (their Unmap calls hold it).
#ifndef KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_LAYOUT_H_
#define KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_LAYOUT_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "allocators/layout/kv_layout.h"
#include "allocators/virtual/background_mapper.h"
#include "allocators/virtual/handle_pool.h"
#include "allocators/virtual/reclaim.h"
#include "allocators/virtual/row_table.h"
#include "allocators/virtual/transaction.h"
#include "allocators/virtual/virtual_geometry.h"
#include "allocators/virtual/virtual_mapping.h"
#include "allocators/vmm/vmm_resources.h"
#include "kvmem/config.h"

namespace kvmem::internal {

class VirtualLayout final : public KvLayout {
 public:
  // InvalidArgument when the budget cannot hold one request at max_context; backend
  // failures (reservation, handle creation) are passed through with context.
  static absl::StatusOr<std::unique_ptr<VirtualLayout>> Create(const KvCacheConfig& config,
                                                               std::shared_ptr<Vmm> vmm);
  ~VirtualLayout() override;

  absl::StatusOr<int32_t> AcquireRow() override;
  absl::Status Grow(int32_t row, int64_t len, int64_t n, std::vector<int64_t>* locs) override;
  absl::Status Shrink(int32_t row, int64_t len, int64_t new_len) override;
  absl::Status Share(int32_t parent, int64_t len, int32_t child) override;
  absl::Status Release(int32_t row, int64_t len, Fence fence) override;
  absl::Status ReturnRow(int32_t row) override;
  absl::Status GrowBatch(absl::Span<const GrowStep> steps, int64_t* out) override;
  absl::Status ShrinkBatch(absl::Span<const ShrinkStep> steps) override;
  absl::Status ReleaseBatch(absl::Span<const ReleaseStep> steps, Fence fence) override;
  absl::StatusOr<int64_t> Trim() override;

  int64_t SlotOf(int32_t row, int64_t pos) const override {
    return int64_t{row} * geo_.max_context + pos;
  }
  absl::StatusOr<std::vector<int32_t>> BlockTable(int32_t row, int64_t len) const override;
  void FillBatch(BatchMetadata* meta) const override {}
  absl::StatusOr<PagedKv> PagedView(int layer) const override;
  absl::StatusOr<VirtualKv> VirtualView(int layer) const override;

  void FillStats(Stats* stats) const override;
  absl::Status CheckInvariants(const std::vector<std::pair<int32_t, int64_t>>& live) const override;

  // Waits until the background mapper has nothing it can do now (true at once without
  // a mapper). False on timeout. For tests and benchmarks.
  bool WaitForMapperIdle(absl::Duration timeout = absl::Seconds(30));
  // Jobs of the background mapper that failed (and were retried); 0 without a mapper.
  int64_t mapper_failures() const;

  const VirtualGeometry& geometry() const { return geo_; }
  uintptr_t base() const { return reservation_.addr(); }

 private:
  // The background mapper's job: pages of one row, sorted by address.
  struct MapJob {
    int32_t row = -1;
    std::vector<RowMapping> items;
  };

  VirtualLayout(const KvCacheConfig& config, std::shared_ptr<Vmm> vmm, VirtualGeometry geo);

  Transaction NewTransaction() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return Transaction(vmm_.get(), geo_, &pool_, &rows_, scratch_.addr());
  }
  // Rolls `tx` back and returns `cause` with what the undo left behind, counted in the
  // stats.
  absl::Status Fail(Transaction& tx, const absl::Status& cause) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Retries what failed undos of earlier calls left behind; logs what still fails.
  void RetryQuarantined() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t HeldHandles() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return pool_.used_handles() - rows_.surplus_handles();
  }

  // Unmaps mappings (through `tx`) until `want` more handles are free: tier 1 (idle rows
  // past their fence as polled), and tier 2 if `surplus`, never touching `exclude`
  // (ReclaimPolicy).
  absl::Status Reclaim(int64_t want, int32_t exclude, bool surplus, Transaction* tx)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unmaps the shared (or all) mappings of `row` at pages >= min_page; their handles go to
  // the free pool once unowned. The mappings removed go to *dropped when it is not null.
  absl::Status DropPages(int32_t row, int64_t min_page, bool only_shared,
                         std::vector<RowMapping>* dropped = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The batch calls under mu_ (the single-row calls are batches of one).
  absl::Status GrowRows(absl::Span<const GrowStep> steps) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ShrinkRows(absl::Span<const ShrinkStep> steps) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ReleaseRows(absl::Span<const ReleaseStep> steps, Fence fence)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Internal if a row appears twice among `steps` (their rows are checked in range).
  template <typename Step>
  absl::Status CheckDistinct(absl::Span<const Step> steps, const char* op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether growing `s` writes only into its private range (no backend call).
  bool GrowsInPrivate(const GrowStep& s) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // GrowRows for a batch with at least one row outside its private range.
  absl::Status GrowSlowRows(absl::Span<const GrowStep> steps) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A row of GrowSlowRows' batch as it was before, for the undo.
  struct GrowBefore {
    int32_t row;
    int64_t len;
    int64_t n;
    int64_t private_lo;
    int64_t private_hi;
    bool slow;
  };
  // GrowSlowRows' list, kept between calls: a decode step of a large batch takes the slow
  // path whenever one of its rows needs a page, and it should not allocate a list of
  // every row (196 KiB at B = 4096) each time.
  std::vector<GrowBefore> grow_before_ ABSL_GUARDED_BY(mu_);
  // What the slow rows of a batch did, counted in the stats once it commits.
  struct GrowTally {
    int64_t cow_copies = 0;
    int64_t map_stalls = 0;
  };
  // One row's part of a batch that maps, copies or reclaims: pages [p0, p1) of `row`
  // (which had `len` tokens) become mapped and private, through `tx`. On error the caller
  // rolls `tx` back. `stalled`: the batch waited for the mapper.
  absl::Status GrowSlow(int32_t row, int64_t len, int64_t p0, int64_t p1, bool stalled,
                        Transaction* tx, GrowTally* tally) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits (releasing mu_) until no page the slow rows of `steps` write into is in flight
  // and, if they need more handles than are free, no mapper job holds some. True if it
  // waited. Called before the batch changes anything: the mapper runs while it waits.
  bool WaitForGrowth(absl::Span<const GrowStep> steps) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The pages [p0, p1) of `row` need: new ones (no entry) and shared ones to copy. True if
  // one of them is in flight (the mapper is mapping it).
  bool ScanGrowth(int32_t row, int64_t p0, int64_t p1, std::vector<RowMapping>* fresh,
                  std::vector<RowMapping>* cow) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ResourceExhausted, with the numbers, unless `free` handles (the pool's and those the
  // call has freed) and reclamation can give `row` (of `len` tokens) fresh + cow handles.
  absl::Status CheckPagesFor(int32_t row, int64_t len, int64_t fresh, int64_t cow, int64_t free)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdatePeaks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // CheckInvariants' comparison of the records with the backend's mappings.
  absl::Status CheckBackend() const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Background mapper steps and wake-up.
  void WantMapAhead(int32_t row) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t MapAheadTarget(const Row& r) const;
  bool PlanMapAhead() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RunMapAhead();
  void FinishMapAhead(absl::Status s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const KvCacheConfig config_;
  const std::shared_ptr<Vmm> vmm_;
  const VirtualGeometry geo_;
  const int64_t token_bytes_;
  Reservation reservation_;  // every row of every segment
  Reservation scratch_;      // one granule: copy-on-write staging

  mutable absl::Mutex mu_;
  HandlePool pool_ ABSL_GUARDED_BY(mu_);
  RowTable rows_ ABSL_GUARDED_BY(mu_);
  ReclaimPolicy reclaim_ ABSL_GUARDED_BY(mu_);

  // Sampled after calls that put memory to use and whenever stats are read.
  mutable int64_t peak_held_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  mutable int64_t peak_live_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cow_copies_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pages_reclaimed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t map_stalls_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pool_create_nanos_ = 0;
  // What the last AcquireRow changed in the idle row it took, for ReturnRow: the aliases
  // of other rows' pages it dropped, and the row's place among the idle rows. Mapped back
  // only if no mapping changed since (the rows' mapping epoch).
  struct AcquireUndo {
    int32_t row = -1;
    uint64_t epoch = 0;
    uint64_t idle_since = 0;
    std::vector<RowMapping> dropped;
  };
  AcquireUndo last_acquire_ ABSL_GUARDED_BY(mu_);
  // The last failure of RetryQuarantined: why a damaged page is still damaged.
  absl::Status quarantine_error_ ABSL_GUARDED_BY(mu_);

  // CheckDistinct's marks, one per row, all 0 between calls.
  std::vector<uint8_t> batch_marks_ ABSL_GUARDED_BY(mu_);

  // Background mapper state: rows that may need pages mapped ahead, and the job.
  std::vector<int32_t> map_queue_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> queued_ ABSL_GUARDED_BY(mu_);
  MapJob job_ ABSL_GUARDED_BY(mu_);
  // The mapper's copy of the job's granules and where each ended up, used by run()
  // without the lock: written by plan() and run(), read by finish(), which the mapper
  // thread runs in sequence.
  std::vector<Granule> job_granules_;
  std::vector<GranuleState> job_state_;
  std::unique_ptr<BackgroundMapper> mapper_;  // last; reset first in the destructor
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_LAYOUT_H_
