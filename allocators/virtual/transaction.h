// Transaction: one mutating call of the virtual layout, as the steps it made. Every step
// changes the backend and the bookkeeping (HandlePool, RowTable) together and is recorded;
// Commit keeps them, Rollback (or the destructor, if neither ran) undoes them in reverse
// order. So each undo is written once, here, next to the step it undoes.
//
// An undo may fail too (a backend that keeps failing). Then the bookkeeping is made to
// say exactly what the backend holds, never to lose a handle or a token:
//   * a fresh page that cannot be unmapped stays with its row (beyond the row's length:
//     surplus, reclaimable), made accessible if it was not;
//   * a mapping that cannot be unmapped and belongs to no row (an alias, the scratch
//     granule, a page that cannot be made accessible) becomes a stray: its handle is
//     quarantined, and later calls retry the unmap (RetryQuarantine); a later call that
//     needs a page at a stray's position takes the stray's page as it is (Map) rather
//     than mapping over it;
//   * a page holding a live row's tokens that cannot be mapped back (or made accessible)
//     is recorded damaged under its row; later calls retry, and until then the row's
//     tokens on it cannot be read;
//   * an idle row's page that cannot be mapped back goes to the free pool (it held no
//     live token), as does a page the row no longer needs.
// Rollback's status keeps the cause's code and, where an undo failed, says what failed
// and what state the cache is in.
//
// Not thread-safe: used under the layout's mutex, within one call.
#ifndef KVMEM_ALLOCATORS_VIRTUAL_TRANSACTION_H_
#define KVMEM_ALLOCATORS_VIRTUAL_TRANSACTION_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "allocators/virtual/handle_pool.h"
#include "allocators/virtual/row_table.h"
#include "allocators/virtual/virtual_geometry.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

class Transaction {
 public:
  // `scratch`: the one-granule reservation copy on write stages its copies in.
  Transaction(Vmm* vmm, const VirtualGeometry& geo, HandlePool* pool, RowTable* rows,
              uintptr_t scratch)
      : vmm_(vmm),
        geo_(geo),
        pool_(pool),
        rows_(rows),
        scratch_(scratch),
        epoch_(rows->mapping_epoch()) {}
  // Undoes every recorded step unless Commit or Rollback ran (logs an undo failure).
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

  // Unmaps the row mappings `items`, one Unmap per run of adjacent granules, and detaches
  // each (a damaged kUnmapped entry needs no backend call). Handles left without owners
  // are held by this call: Take hands them out first; Commit frees the rest. On error the
  // runs unmapped so far stay recorded.
  absl::Status Unmap(absl::Span<const RowMapping> items);
  // Handles Unmap left without owners, in order.
  const std::vector<int32_t>& freed() const { return freed_; }
  // Of those, how many Take has not handed out yet.
  int64_t spare() const { return static_cast<int64_t>(freed_.size() - freed_taken_); }

  // A handle for this call: one Unmap freed first, then the free pool's.
  // REQUIRES: one is available.
  int32_t Take();

  // Maps each item's handle at its position (in the order given; callers sort by address)
  // without access and attaches it. `fresh`: handles taken by this call; otherwise aliases
  // of handles mapped elsewhere. On error the ones mapped so far stay recorded.
  //
  // A position where a failed undo left a stray mapping (its unmap failed) is never mapped
  // over: a stray of the item's own handle is adopted as it is, with no backend call (and
  // becomes a stray again if this call is undone); a stray of another handle is unmapped
  // first, and if that fails again the call fails with that status, the item untouched.
  absl::Status Map(absl::Span<const RowMapping> items, bool fresh);
  // One SetAccess per run of `addrs` (sorted, distinct, each mapped by this call).
  absl::Status SetAccess(absl::Span<const uintptr_t> addrs);

  // Copies the page at `src` into handle `h` through the scratch granule: map, access,
  // copy, unmap (retried once). If the scratch granule cannot be unmapped, `h` stays
  // mapped there as a stray (later calls retry) and the status says so.
  absl::Status CopyViaScratch(uintptr_t src, int32_t h);
  // Puts handle `h` (holding a copy) under `m`'s row at m's position, in place of
  // m.handle, which stays mapped under its other owners. Without access: SetAccess
  // follows.
  absl::Status Remap(const RowMapping& m, int32_t h);

  // Keeps every step; handles freed and not taken go to the free pool.
  void Commit();
  // Undoes every step and returns `cause`, extended with what failed and the state the
  // cache is in where an undo failed too.
  absl::Status Rollback(const absl::Status& cause);

  // After a rollback: copies kept under their row because their undo failed (copy on
  // write happened for those pages after all), and idle pages that could not be mapped
  // back (now free).
  int64_t kept_copies() const { return kept_copies_; }
  // After a rollback: whether everything is back exactly as it was.
  bool exact() const {
    return undo_error_.ok() && kept_surplus_.empty() && kept_copy_.empty() && damaged_.empty() &&
           lost_.empty() && strays_ == 0;
  }
  int64_t lost_pages() const { return lost_pages_; }

 private:
  enum class Kind : uint8_t { kUnmapped, kMapped, kRemapped };
  struct Step {
    Kind kind;
    int batch;                // steps of one Unmap or Map call are undone together
    RowMapping m;             // kUnmapped: the mapping removed; kMapped, kRemapped: the one added
    int32_t old = kNoHandle;  // kRemapped: the handle m.handle replaced
    bool fresh = false;       // kMapped: m.handle was taken by this call
    bool mapped = false;      // kRemapped: m.handle is mapped at the address
    bool had_owners = false;  // kUnmapped: the handle kept other owners
    bool adopted = false;     // kMapped: m.handle was a stray at the address, not mapped now
    Damage damage = Damage::kNone;  // kUnmapped: the entry's damage before
  };

  void Undo();
  void UndoUnmapped(absl::Span<const Step> steps);
  void UndoMapped(absl::Span<const Step> steps);
  void UndoRemapped(const Step& step);
  // Remembers the private range of `row` before this call first changes the row.
  void Touch(int32_t row);
  void UndoFailed(const absl::Status& s);
  // Unmaps the stray mapping at `addr` that an earlier call could not unmap (its handle
  // goes to the free pool once unused). On failure the stray stays recorded and the status,
  // with the backend's code, names `what` was still mapped.
  absl::Status UnmapStray(uintptr_t addr, absl::string_view what);
  bool InLength(const RowMapping& m) const;
  std::string StateNotes() const;

  Vmm* const vmm_;
  const VirtualGeometry geo_;
  HandlePool* const pool_;
  RowTable* const rows_;
  const uintptr_t scratch_;
  const uint64_t epoch_;  // the rows' mapping epoch before this call

  std::vector<Step> steps_;
  int batches_ = 0;
  // Addresses known accessible: given access by this call, or strays it adopted that were.
  absl::flat_hash_set<uintptr_t> accessible_;
  std::vector<int32_t> freed_;
  size_t freed_taken_ = 0;
  std::vector<int32_t> popped_;                             // taken from the free pool, in order
  std::map<int32_t, std::pair<int64_t, int64_t>> private_;  // row -> private range before
  bool done_ = false;

  // What undoing left behind, for the status.
  absl::Status undo_error_;
  std::map<int32_t, int64_t> kept_surplus_;  // row -> pages
  std::map<int32_t, int64_t> kept_copy_;     // row -> pages
  std::map<int32_t, int64_t> damaged_;       // row -> pages
  std::map<int32_t, int64_t> lost_;          // row -> pages
  int64_t strays_ = 0;
  int64_t kept_copies_ = 0;
  int64_t lost_pages_ = 0;
};

// Retries what failed undos left behind: unmaps stray mappings (their handles go back
// to the free pool once unused) and maps damaged entries back with access. Returns the
// first failure (what stays quarantined or damaged waits for the next call).
absl::Status RetryQuarantine(Vmm* vmm, int64_t granularity, HandlePool* pool, RowTable* rows);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_TRANSACTION_H_
