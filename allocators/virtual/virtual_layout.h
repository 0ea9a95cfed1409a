// VirtualLayout: the virtual (vAttention-style) layout of internal::KvLayout. One
// reservation holds every request row at max_context; physical pages (one backend
// granule each) are mapped under a row only as its request grows. Kernels see a plain
// strided tensor (VirtualKv). docs/layouts.md has the shapes and the arithmetic.
//
// Geometry. Segments: kAllLayers has one per row,
// [row][chunk][layer][k|v][chunk token][head][dim]; kPerLayer has 2 * layers (layer l: K
// is segment 2l, V is 2l + 1), each [row][token][head][dim]. Segment s of row r starts at
// (s * max_requests + r) * segment_row_stride, the stride being max_context tokens in
// whole chunks, rounded up to the granularity. Page k of a segment covers its bytes
// [k * G, (k + 1) * G); a token or a block may straddle two pages; tokens [0, n) need
// the pages of whole chunks, PagesFor(n), of every segment. A handle is always mapped at the same
// (segment, page) position under every row that maps it, since sharing aliases a prefix page for
// page.
//
// Physical pool: memory_budget / G handles, all created in Create and recycled, never
// released before destruction (cuMemCreate is slow). Each handle is in exactly one of:
// the free pool, in flight (taken by the background mapper, not yet committed), or
// mapped under >= 1 row (its ref count = number of rows mapping it).
//
// Rows are live (a request) or idle. An idle row keeps its pages (deferred reclamation)
// and is untouched until its fence completes; then AcquireRow prefers it (the idle row
// holding the most pages), and its pages are taken back only when another row needs
// them (Grow reclaims from fence-complete idle rows, highest page first, then from other
// live rows' pages beyond their length) or by Trim.
//
// Page rule of a live row of length n: pages [0, PagesFor(n)) of every segment are
// mapped; pages beyond may be mapped only exclusively (ref count 1: mapped ahead, kept
// after a Shrink, or kept from the row's previous request) or be in flight.
//
// Sharing: Share maps the parent's handles of the prefix under the child row. Copy on
// write is LAZY: the shared, partly filled last chunk's pages (a page without chunks;
// with the default chunk every page of the chunk, since each holds a layer's part of it:
// 32 pages for Llama-3-8B) are copied only when one side writes into them (Grow on a page
// with ref count > 1): a new handle is mapped at a
// one-granule scratch reservation, the page is copied, and the new handle replaces the
// old one under the writing row. If every other owner of the page is an idle row past
// its fence, their aliases are unmapped instead (no copy). Shrink unmaps shared pages
// beyond the new length and keeps exclusive ones.
//
// Errors: every mutating call is all or nothing (docs/errors.md), Trim included. Pages
// and aliases taken from idle rows for a Grow that then fails are mapped back.
//
// Stats: pages_shared counts pages shared by live rows; mapped_bytes is physical memory
// mapped anywhere (an aliased handle once; vmm.mapped_granules counts every alias);
// idle_bytes is pages only idle rows hold. Peaks are sampled after calls that put
// memory to use (Grow, Share, mapper commits) and when stats are read.
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
#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "allocators/layout/kv_layout.h"
#include "allocators/virtual/background_mapper.h"
#include "allocators/virtual/virtual_mapping.h"
#include "allocators/vmm/vmm_resources.h"
#include "kvmem/config.h"

namespace kvmem::internal {

// Where bytes of the virtual layout live. Plain arithmetic, 64-bit throughout.
//
// A segment row is a run of chunks of chunk_tokens tokens (kPerLayer and unchunked
// kAllLayers: chunks of one token). A chunk is chunk_blocks equal blocks (kAllLayers: one
// per layer and K/V, in that order), and token i of a chunk takes bytes
// [i * block_token_bytes, + block_token_bytes) of every block. Rows map whole chunks:
// tokens [0, n) need the pages of chunks [0, ceil(n / chunk_tokens)).
struct VirtualGeometry {
  int64_t granularity = 0;
  int32_t rows = 0;
  int64_t max_context = 0;
  int32_t segments = 0;
  int64_t segment_token_bytes = 0;  // bytes of one token in one segment
  int64_t chunk_tokens = 1;         // a power of two
  int64_t chunk_blocks = 1;
  int64_t segment_row_stride = 0;  // max_context tokens in whole chunks, rounded up to pages
  int64_t pages_per_segment = 0;   // segment_row_stride / granularity

  // InvalidArgument when the shape overflows 64-bit offsets.
  static absl::StatusOr<VirtualGeometry> Make(const KvCacheConfig& config, int64_t granularity);

  int64_t chunk_bytes() const { return chunk_tokens * segment_token_bytes; }
  int64_t block_bytes() const { return chunk_bytes() / chunk_blocks; }
  int64_t block_token_bytes() const { return segment_token_bytes / chunk_blocks; }
  // The first token of the chunk holding `token`.
  int64_t ChunkStart(int64_t token) const { return token & ~(chunk_tokens - 1); }
  // `tokens` rounded up to whole chunks.
  int64_t WholeChunks(int64_t tokens) const { return ChunkStart(tokens + chunk_tokens - 1); }
  // Pages of each segment that hold tokens [0, tokens): whole chunks.
  int64_t PagesFor(int64_t tokens) const {
    const int64_t bytes = WholeChunks(tokens) * segment_token_bytes;
    return (bytes + granularity - 1) / granularity;
  }
  // The first page of the chunk holding `token`: where a write of it may need a page (a
  // chunk's pages are mapped together); at or before the first page its own bytes touch.
  int64_t PageOf(int64_t token) const {
    return ChunkStart(token) * segment_token_bytes / granularity;
  }
  // Bytes of page `page` (of any segment) holding one of the first `tokens` tokens.
  int64_t CoveredBytes(int64_t tokens, int64_t page) const;
  // Byte offset of page `page` of segment `seg` of row `row` in the reservation.
  int64_t Offset(int32_t row, int64_t page, int32_t seg) const {
    return (int64_t{seg} * rows + row) * segment_row_stride + page * granularity;
  }
  int64_t reservation_bytes() const { return int64_t{segments} * rows * segment_row_stride; }
  int64_t pages_per_request() const { return int64_t{segments} * pages_per_segment; }
};

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
  static constexpr int32_t kNoHandle = -1;

  enum class HandleState : uint8_t { kFree, kInFlight, kMapped };
  struct Handle {
    PhysicalPage page;
    HandleState state = HandleState::kFree;
    int32_t seg = -1;                        // position where it is mapped (or in flight)
    int64_t index = -1;                      // page index in the segment
    absl::InlinedVector<int32_t, 2> owners;  // rows mapping it; size() is the ref count
    int32_t live_owners = 0;                 // owners that are live rows
  };
  struct Row {
    bool live = false;
    int64_t len = 0;  // tokens (live rows)
    Fence fence;      // idle rows: untouched until complete
    uint64_t idle_since = 0;
    // [page][segment] -> handle index or kNoHandle; grown on demand.
    std::vector<int32_t> entries;
    int64_t mapped = 0;     // entries whose handle is kMapped
    int64_t in_flight = 0;  // entries whose handle is kInFlight
    // Pages [private_lo, private_hi) of every segment are mapped with ref count 1:
    // Grow inside it needs no backend call and no bookkeeping (the O(1) fast path).
    int64_t private_lo = 0;
    int64_t private_hi = 0;
  };
  // Mappings a call took from other rows; undone (mapped back) if the call fails.
  struct Reclaimed {
    int32_t row;
    int64_t page;
    int32_t seg;
    int32_t handle;
  };
  struct MapJob {
    int32_t row = -1;
    std::vector<std::pair<int64_t, int32_t>> pos;  // (page, segment) per handle
    std::vector<int32_t> handles;
  };

  VirtualLayout(const KvCacheConfig& config, std::shared_ptr<Vmm> vmm, VirtualGeometry geo);

  int32_t Entry(const Row& r, int64_t page, int32_t seg) const {
    const size_t i = static_cast<size_t>(page * geo_.segments + seg);
    return i < r.entries.size() ? r.entries[i] : kNoHandle;
  }
  int32_t& MutableEntry(Row& r, int64_t page, int32_t seg);
  uintptr_t Addr(int32_t row, int64_t page, int32_t seg) const {
    return reservation_.addr() + static_cast<uintptr_t>(geo_.Offset(row, page, seg));
  }
  int64_t PageLimit(const Row& r) const {
    return static_cast<int64_t>(r.entries.size()) / geo_.segments;
  }

  absl::Status CheckLiveRow(int32_t row, int64_t len, const char* op) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  bool FenceDone(Row& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool FenceDoneConst(const Row& r) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Bookkeeping of one mapping (the backend call is the caller's).
  void AddMapping(int32_t h, int32_t row, int64_t page, int32_t seg)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveMapping(int32_t h, int32_t row, int64_t page, int32_t seg)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counters of handle `h`, with sign +1 / -1 (remove before a change, add after).
  void Account(const Handle& h, int sign) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetLive(int32_t row, bool live) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Extends private_hi over exclusively mapped pages.
  void ExtendPrivate(Row& r) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  bool PagePrivate(const Row& r, int64_t page) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Handles Reclaim can free without touching `exclude`: tier 1 (fence-complete idle
  // rows) and, if `surplus`, tier 2 (other live rows' exclusive pages beyond their
  // length).
  // Pages that reclamation could take, counted only up to `limit` (the caller needs to
  // know whether enough exist; a full count walks every row's pages).
  int64_t ReclaimableIdle(int64_t limit) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t ReclaimableSurplus(int32_t exclude, int64_t limit) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Mapped pages of live row `r` at page index >= `from` (over all segments).
  int64_t MappedFrom(const Row& r, int64_t from) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Sets a row's length, keeping surplus_handles_ in step.
  void SetLen(Row& r, int64_t len) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t HeldHandles() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return used_handles_ - surplus_handles_;
  }
  // Unmaps mappings until `want` handles are free (pushed to *freed, not to free_),
  // recording them in *journal. On error the journal holds what was done.
  absl::Status Reclaim(int64_t want, int32_t exclude, bool surplus, std::vector<int32_t>* freed,
                       std::vector<Reclaimed>* journal) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ReclaimRow(int32_t row, int64_t min_page, int64_t want, bool only_exclusive,
                          std::vector<int32_t>* freed, std::vector<Reclaimed>* journal)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Maps the journal's mappings back (best effort; logs when it cannot).
  void UndoReclaim(const std::vector<Reclaimed>& journal, std::vector<int32_t>* freed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unmaps every mapping of `row` whose page >= min_page and (if only_shared) whose
  // ref count > 1; handles left unmapped go to the free pool. Returns them. The mappings
  // removed are appended to *dropped when it is not null.
  absl::StatusOr<int64_t> DropPages(int32_t row, int64_t min_page, bool only_shared,
                                    std::vector<Reclaimed>* dropped = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Status GrowSlow(int32_t row, int64_t p0, int64_t p1) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives the page at `addr` (mapped to `old_phys`) a private copy in `new_phys`.
  absl::Status CopyOnWrite(uintptr_t addr, PhysHandle old_phys, PhysHandle new_phys)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status UndoCopyOnWrite(uintptr_t addr, PhysHandle old_phys)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void RecomputeLiveBytes() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t LiveBytesSlow() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void UpdatePeaks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

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
  std::vector<Handle> handles_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);
  std::vector<Row> rows_ ABSL_GUARDED_BY(mu_);
  uint64_t release_seq_ ABSL_GUARDED_BY(mu_) = 0;

  // Counters kept incrementally (CheckInvariants recounts them).
  int64_t mapped_handles_ ABSL_GUARDED_BY(mu_) = 0;   // ref count > 0
  int64_t mapped_granules_ ABSL_GUARDED_BY(mu_) = 0;  // sum of ref counts
  int64_t used_handles_ ABSL_GUARDED_BY(mu_) = 0;     // mapped under >= 1 live row
  int64_t idle_handles_ ABSL_GUARDED_BY(mu_) = 0;     // mapped under idle rows only
  // Handles mapped under a live row beyond its length (mapped ahead, kept after a
  // Truncate, or kept from the row's previous request). They hold no token and are
  // reclaimable on demand, so Stats counts them idle, not held. Never shared.
  int64_t surplus_handles_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_handles_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_set<int32_t> shared_ ABSL_GUARDED_BY(mu_);  // ref count > 1
  int64_t live_rows_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t live_tokens_ ABSL_GUARDED_BY(mu_) = 0;  // sum of live rows' lengths
  int64_t live_bytes_ ABSL_GUARDED_BY(mu_) = 0;

  // Sampled after calls that put memory to use and whenever stats are read.
  mutable int64_t peak_held_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  mutable int64_t peak_live_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cow_copies_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pages_reclaimed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t map_stalls_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pool_create_nanos_ = 0;
  // Bumped by every AddMapping and RemoveMapping: ReturnRow maps back what AcquireRow
  // dropped only if no mapping changed in between.
  uint64_t mapping_epoch_ ABSL_GUARDED_BY(mu_) = 0;
  // What the last AcquireRow changed in the idle row it took, for ReturnRow: the aliases
  // of other rows' pages it dropped, and the row's place among the idle rows.
  struct AcquireUndo {
    int32_t row = -1;
    uint64_t epoch = 0;  // mapping_epoch_ when AcquireRow returned
    uint64_t idle_since = 0;
    std::vector<Reclaimed> dropped;
  };
  AcquireUndo last_acquire_ ABSL_GUARDED_BY(mu_);

  // Background mapper state: rows that may need pages mapped ahead, and the job.
  std::vector<int32_t> map_queue_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> queued_ ABSL_GUARDED_BY(mu_);
  MapJob job_ ABSL_GUARDED_BY(mu_);
  // The mapper's copy of the job's granules, read by run() without the lock: written by
  // plan() and read by run(), which the mapper thread runs in sequence.
  std::vector<Granule> job_granules_;
  std::unique_ptr<BackgroundMapper> mapper_;  // last; reset first in the destructor
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_LAYOUT_H_
