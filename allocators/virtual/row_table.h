// RowTable: the request rows of the virtual layout and the page entries under them.
//
// Rows are live (a request) or idle. An idle row keeps its pages (deferred reclamation)
// and is untouched until its fence completes. Every row records, per (page, segment),
// the handle mapped there (or in flight for the background mapper); the table keeps the
// handle pool's owners in step with these entries.
//
// Page rule of a live row of length n: pages [0, PagesFor(n)) of every segment are
// mapped; pages beyond may be mapped only exclusively (ref count 1: mapped ahead, kept
// after a Shrink, or kept from the row's previous request: the surplus) or be in flight.
//
// Damage: an entry whose mapping a failed call could not put back as it was (the call
// and its undo both failed) is recorded as damaged: kUnmapped (the row owns the handle,
// the backend has nothing there) or kNoAccess (mapped, not accessible). Later calls retry
// the mapping; until then the row's tokens on that page cannot be read, the page is
// never private, and the backend's state is exactly what the entry says.
//
// Private range: pages [private_lo, private_hi) of a live row are mapped exclusively and
// undamaged in every segment, so a Grow inside it needs no backend call (the O(1) fast
// path).
//
// Idle rows are either waiting (behind a fence not yet seen complete; a FIFO, since
// fences are polled lazily from the front) or ready. Ready rows sit in a heap by pages
// held (AcquireRow's pick) and, while they hold pages, in a set ordered by idle_since
// (reclamation's tier 1, longest idle first); live rows with pages beyond their length
// are listed too (tier 2). Every transition keeps these up to date, so no call scans
// every row (row_sets.h).
//
// Live bytes are kept incrementally: every live row's tokens, less what pages shared by
// several live rows would count twice. A shared page holds max(covered bytes) over its
// live owners, so per shared handle the table keeps the sum and the max of its live
// owners' coverage (with a count of owners at the max, and an ordered count of the
// others only while coverages differ, which takes a Truncate into a shared prefix).
// Updates cost O(pages whose coverage changes); LiveBytesSlow, which walks every shared
// page, is left to CheckInvariants.
//
// Not thread-safe: the layout calls it under its mutex.
#ifndef KVMEM_ALLOCATORS_VIRTUAL_ROW_TABLE_H_
#define KVMEM_ALLOCATORS_VIRTUAL_ROW_TABLE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "allocators/virtual/handle_pool.h"
#include "allocators/virtual/row_sets.h"
#include "allocators/virtual/virtual_geometry.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

// One entry of a row: handle `handle` at (page, seg) of `row`.
struct RowMapping {
  int32_t row = -1;
  int64_t page = 0;
  int32_t seg = 0;
  int32_t handle = kNoHandle;
};

enum class Damage : uint8_t { kNone, kUnmapped, kNoAccess };

struct Row {
  bool live = false;
  int64_t len = 0;  // tokens (live rows; 0 for idle ones)
  Fence fence;      // idle rows: untouched until complete; null once seen complete
  uint64_t idle_since = 0;
  // [page][segment] -> handle index or kNoHandle; grown on demand.
  std::vector<int32_t> entries;
  int64_t mapped = 0;     // entries whose handle is kMapped
  int64_t in_flight = 0;  // entries whose handle is kInFlight
  int64_t shared = 0;     // mapped entries whose handle has >= 2 owners
  int64_t surplus = 0;    // live rows: mapped entries at pages >= PagesFor(len)
  int64_t private_lo = 0;
  int64_t private_hi = 0;
};

class RowTable {
 public:
  // `vmm` answers fence queries. `pool` outlives the table.
  RowTable(const VirtualGeometry& geo, int64_t token_bytes, HandlePool* pool, Vmm* vmm)
      : geo_(geo), token_bytes_(token_bytes), pool_(pool), vmm_(vmm) {}
  RowTable(const RowTable&) = delete;
  RowTable& operator=(const RowTable&) = delete;

  // Creates the rows, all idle, ready and empty, over the reservation at `base`.
  // REQUIRES: the pool holds all its handles.
  void Init(uintptr_t base);
  // 0 until Init (a Create that failed half-way).
  int32_t size() const { return static_cast<int32_t>(rows_.size()); }
  const Row& row(int32_t r) const { return rows_[r]; }

  uintptr_t Addr(int32_t row, int64_t page, int32_t seg) const {
    return base_ + static_cast<uintptr_t>(geo_.Offset(row, page, seg));
  }
  uintptr_t Addr(const RowMapping& m) const { return Addr(m.row, m.page, m.seg); }
  int32_t Entry(int32_t row, int64_t page, int32_t seg) const {
    const Row& r = rows_[row];
    const size_t i = static_cast<size_t>(page * geo_.segments + seg);
    return i < r.entries.size() ? r.entries[i] : kNoHandle;
  }
  // Pages with an entry slot (mapped or not) in every segment.
  int64_t PageLimit(int32_t row) const {
    return static_cast<int64_t>(rows_[row].entries.size()) / geo_.segments;
  }

  // Bookkeeping of one mapping (the backend call is the caller's).
  void Attach(int32_t h, int32_t row, int64_t page, int32_t seg);
  void Attach(const RowMapping& m) { Attach(m.handle, m.row, m.page, m.seg); }
  // Also forgets the entry's damage.
  void Detach(int32_t h, int32_t row, int64_t page, int32_t seg);
  void Detach(const RowMapping& m) { Detach(m.handle, m.row, m.page, m.seg); }
  // The background mapper's pages: `h` in flight at (row, page, seg), then ended (the
  // entry cleared, the handle kFree and not pushed) or attached.
  void BeginInFlight(int32_t h, int32_t row, int64_t page, int32_t seg);
  void EndInFlight(int32_t h, int32_t row, int64_t page, int32_t seg);

  // Damage of mapped entries.
  Damage DamageAt(int32_t row, int64_t page, int32_t seg) const;
  Damage DamageAt(const RowMapping& m) const { return DamageAt(m.row, m.page, m.seg); }
  void SetDamage(int32_t row, int64_t page, int32_t seg, Damage d);
  bool any_damage() const { return !damage_.empty(); }
  // Every damaged entry, in (row, page, segment) order, with its damage.
  std::vector<std::pair<RowMapping, Damage>> Damaged() const;
  // Whether any entry of pages [p0, p1) of `row` is damaged.
  bool DamagedIn(int32_t row, int64_t p0, int64_t p1) const;

  // Mapped entries of `row` at pages in [min_page, max_page) (page-major; max_page -1:
  // every page), only the shared ones if `only_shared`. A live row shares no page at or
  // beyond its length, and none in its private range: those are skipped when
  // `only_shared`.
  std::vector<RowMapping> Mappings(int32_t row, int64_t min_page, bool only_shared,
                                   int64_t max_page = -1) const;

  // Lifecycle. A ready idle row (from AcquireRow) turns live, empty; Release turns it idle
  // behind `fence`. Both cost O(pages the row holds).
  // REQUIRES: `row` is idle and not waiting for its fence.
  void MakeLive(int32_t row);
  // `idle_since`: the row's place among the idle rows (the longest idle is reclaimed
  // first); none: the newest.
  void MakeIdle(int32_t row, Fence fence, std::optional<uint64_t> idle_since = std::nullopt);
  // A live row's length. Keeps the surplus counts and the coverage of the shared pages
  // whose covered bytes change in step: O(pages between the two lengths' last chunks).
  // REQUIRES: the row's private range is private (it is between calls).
  void SetLen(int32_t row, int64_t len);
  // SetLen for a Grow inside the private range: O(1), no page entry read.
  // REQUIRES: [PageOf(len of row), PagesFor(len)) lies in the row's private range.
  void GrowPrivate(int32_t row, int64_t len);
  void AddLiveTokens(int64_t n) { live_tokens_ += n; }

  // Fences of idle rows, polled lazily. Whether `row` (idle) is past its fence; a fence
  // seen complete is forgotten and the row becomes ready.
  bool FenceDone(int32_t row);
  bool FenceDoneConst(int32_t row) const;
  // Polls the waiting rows in the order they were released until one is still waiting
  // (fences of one stream complete in order), or, with `all`, every one of them.
  void PollFences(bool all);
  // Idle rows behind a fence not yet seen complete, in release order (-1: the end).
  bool Waiting(int32_t row) const { return waiting_.Contains(row); }
  int64_t waiting_rows() const { return waiting_.size(); }
  int32_t waiting_front() const { return waiting_.front(); }
  int32_t waiting_next(int32_t row) const { return waiting_.next(row); }
  // The ready idle row holding the most pages (ties: the lowest), or -1 if none.
  int32_t BestIdleRow() const { return ready_.empty() ? -1 : ready_.top(); }
  // Ready idle rows holding pages, as (idle_since, row), longest idle first.
  const std::set<std::pair<uint64_t, int32_t>>& idle_donors() const { return idle_donors_; }
  // Live rows with pages beyond their length, in the order they got them (-1: the end).
  int32_t surplus_front() const { return surplus_rows_.front(); }
  int32_t surplus_next(int32_t row) const { return surplus_rows_.next(row); }

  // Private ranges.
  bool PagePrivate(int32_t row, int64_t page) const;
  // Extends private_hi over exclusively mapped pages.
  void ExtendPrivate(int32_t row);
  void SetPrivate(int32_t row, int64_t lo, int64_t hi);
  // Ends the private range before `page` (a page at or above it lost its mapping).
  void CutPrivate(int32_t row, int64_t page);
  // Shrinks the private range to the pages still private, then extends it (live rows).
  void RepairPrivate(int32_t row);

  // Changes with every Attach and Detach: whether any mapping changed between two
  // points (a transaction whose undo succeeded puts it back).
  uint64_t mapping_epoch() const { return mapping_epoch_; }
  void set_mapping_epoch(uint64_t epoch) { mapping_epoch_ = epoch; }

  int64_t live_rows() const { return live_rows_; }
  int64_t live_tokens() const { return live_tokens_; }
  // Bytes of live tokens, a shared page's counted once (the incremental count).
  int64_t live_bytes() const { return live_tokens_ * token_bytes_ - shared_excess_; }
  // Handles mapped under a live row beyond its length. They hold no token and are
  // reclaimable on demand, so Stats counts them idle, not held. Never shared.
  int64_t surplus_handles() const { return surplus_handles_; }

  // Internal unless `row` is live with `len` tokens (KvCache and the layout disagree).
  absl::Status CheckLiveRow(int32_t row, int64_t len, const char* op) const;

  // The rows' half of the layout's invariants: rows agree with `live` ((row, length) of
  // every live request), entries with the handles they name, live rows' pages are mapped,
  // private ranges are private, counters, row sets and shared pages' coverage match a
  // recount. Fills the per-handle counts of mappings, live mappings, waiting mappings and
  // in-flight entries (refs, live_refs, waiting_refs, in_flight: sized to the pool) for
  // HandlePool::CheckInvariants. `job_row` is the row of the mapper's job in flight (-1:
  // none). Internal on a violation.
  absl::Status CheckInvariants(const std::vector<std::pair<int32_t, int64_t>>& live,
                               int32_t job_row, std::vector<int32_t>* refs,
                               std::vector<int32_t>* live_refs, std::vector<int32_t>* waiting_refs,
                               std::vector<int32_t>* in_flight) const;
  // Live bytes recounted from scratch, two ways: every live row's tokens less what the
  // shared pages count twice (walking every shared page's owners), and per handle.
  int64_t LiveBytesSlow() const;
  int64_t LiveBytesRecount() const;

 private:
  int32_t& MutableEntry(Row& r, int64_t page, int32_t seg);
  uint64_t EntryKey(int32_t row, int64_t page, int32_t seg) const {
    return static_cast<uint64_t>(row) * static_cast<uint64_t>(geo_.pages_per_request()) +
           static_cast<uint64_t>(page * geo_.segments + seg);
  }
  // Live owners' coverage of one handle mapped under >= 2 rows.
  struct Coverage {
    int64_t sum = 0;     // covered bytes, over the live owners
    int64_t max = 0;     // the most one live owner covers (0 without one)
    int32_t count = 0;   // live owners
    int32_t at_max = 0;  // live owners covering `max`
    // Live owners covering less than `max`, by coverage; only while there are any.
    std::unique_ptr<std::map<int64_t, int32_t>> below;
  };
  int64_t Covered(int32_t row, int64_t page) const {
    return geo_.CoveredBytes(rows_[row].len, page);
  }
  void CovAdd(int32_t h, int64_t c);
  void CovRemove(int32_t h, int64_t c);
  void CovUpdate(int32_t h, int64_t from, int64_t to) {
    if (from == to) return;
    CovRemove(h, from);
    CovAdd(h, to);
  }
  // The handle is no longer shared: at most one live owner is left, counted once.
  void CovClear(int32_t h);

  // The row sets, after a change of `row`'s state or page counts.
  void EnterReady(int32_t row);
  void MarkReady(int32_t row);
  void IdleMappedChanged(int32_t row, int64_t before);
  void SurplusChanged(int32_t row);
  void AddSurplus(int32_t row, int64_t n);

  const VirtualGeometry geo_;
  const int64_t token_bytes_;
  HandlePool* const pool_;
  Vmm* const vmm_;
  uintptr_t base_ = 0;
  std::vector<Row> rows_;
  absl::flat_hash_map<uint64_t, Damage> damage_;  // damaged entries only
  uint64_t release_seq_ = 0;
  uint64_t mapping_epoch_ = 0;
  int64_t live_rows_ = 0;
  int64_t live_tokens_ = 0;  // sum of live rows' lengths
  // Over shared handles: the live owners' coverage summed less its max (bytes that
  // live_tokens_ counts more than once).
  int64_t shared_excess_ = 0;
  int64_t surplus_handles_ = 0;
  std::vector<Coverage> cov_;  // per handle; empty unless mapped under >= 2 rows
  RowList waiting_;            // idle rows behind a fence, in release order
  RowHeap ready_;              // idle rows past their fence, by pages held
  std::set<std::pair<uint64_t, int32_t>> idle_donors_;  // ready rows holding pages
  RowList surplus_rows_;                                // live rows with surplus > 0
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_ROW_TABLE_H_
