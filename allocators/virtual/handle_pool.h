// HandlePool: the physical pages of the virtual layout. All of them are created up front
// (cuMemCreate is slow) and recycled until the layout is destroyed.
//
// Each handle is in exactly one state:
//   kFree:        mapped nowhere; in the free list, or held by the call that took it.
//   kInFlight:    taken by the background mapper for a job not yet finished.
//   kMapped:      mapped under >= 1 row (its owners; the ref count is their number).
//   kQuarantined: under no row, but still mapped at a stray address: an unmap that
//                 undid a failed call failed too. Later calls retry the unmap; until it
//                 succeeds the handle is neither free nor used.
// A mapped handle may have stray addresses too (an alias whose undo failed). Only a
// handle without owners and strays goes back to the free list.
//
// The pool also keeps the counters Stats reads (mapped handles and granules, handles
// used by live rows or held by idle ones only, in flight, quarantined, shared) and the
// one reclamation needs: handles that unmapping fence-complete idle rows would free.
//
// Not thread-safe: the layout calls it under its mutex.
#ifndef KVMEM_ALLOCATORS_VIRTUAL_HANDLE_POOL_H_
#define KVMEM_ALLOCATORS_VIRTUAL_HANDLE_POOL_H_

#include <cstdint>
#include <map>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "allocators/vmm/vmm_resources.h"
#include "kvmem/vmm.h"
#include "src/core/logging.h"

namespace kvmem::internal {

// A broken invariant of the virtual layout's bookkeeping (a kvmem bug, never bad input):
// log and abort.
#define KVMEM_VIRTUAL_CHECK(cond, ...)                                             \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      Logger()->critical("virtual layout: check failed: " #cond ": " __VA_ARGS__); \
      std::abort();                                                                \
    }                                                                              \
  } while (0)

inline constexpr int32_t kNoHandle = -1;

enum class HandleState : uint8_t { kFree, kInFlight, kMapped, kQuarantined };

struct Handle {
  PhysicalPage page;
  HandleState state = HandleState::kFree;
  int32_t seg = -1;                        // position where it is mapped (or in flight)
  int64_t index = -1;                      // page index in the segment
  absl::InlinedVector<int32_t, 2> owners;  // rows mapping it; size() is the ref count
  int32_t live_owners = 0;                 // owners that are live rows
  int32_t waiting_owners = 0;              // owners that are idle rows behind a fence
  int32_t strays = 0;                      // stray addresses it is mapped at
};

class HandlePool {
 public:
  // A mapping no row records: the handle and whether SetAccess covered it.
  struct Stray {
    int32_t handle = kNoHandle;
    bool accessible = false;
  };

  HandlePool() = default;
  HandlePool(const HandlePool&) = delete;
  HandlePool& operator=(const HandlePool&) = delete;

  // Creates `count` free handles (handed out low indices first). On error the ones
  // created so far stay (Clear or the destructor releases them); *created says how many.
  absl::Status Create(Vmm* vmm, int64_t count, int64_t* created);
  // Releases every handle, with one log line under `owner` for those that fail.
  // REQUIRES: none is mapped.
  void Clear(std::string_view owner);

  int64_t size() const { return static_cast<int64_t>(handles_.size()); }
  const Handle& get(int32_t h) const { return handles_[h]; }
  PhysHandle phys(int32_t h) const { return handles_[h].page.handle(); }
  int64_t ref_count(int32_t h) const { return static_cast<int64_t>(handles_[h].owners.size()); }
  // Mapped nowhere, taken by nobody: may go back to the free list.
  bool Unused(int32_t h) const {
    const Handle& hd = handles_[h];
    return hd.state == HandleState::kFree && hd.owners.empty() && hd.strays == 0;
  }

  // The free list.
  int64_t free_count() const { return static_cast<int64_t>(free_.size()); }
  // The next free handle (the caller now holds it). REQUIRES: free_count() > 0.
  int32_t Pop();
  // REQUIRES: Unused(h), and h not in the list.
  void Push(int32_t h);

  // Bookkeeping of one mapping of `h` under `row` at (page, seg); the backend call is the
  // caller's. A handle maps at one position under every row that maps it. `live`: the row
  // is live; `waiting`: it is idle behind a fence not yet seen complete.
  void AddOwner(int32_t h, int32_t row, bool live, bool waiting, int64_t page, int32_t seg);
  // The last owner leaving makes the handle kFree (not pushed) or, with strays, kQuarantined.
  void RemoveOwner(int32_t h, int32_t row, bool live, bool waiting);
  // One owner of `h` turned live or idle (live_delta +-1), or began or ended waiting for
  // its fence (waiting_delta +-1).
  void OwnerTurned(int32_t h, int live_delta, int waiting_delta);
  // The background mapper's job: taken for (page, seg), then mapped (AddOwner) or ended.
  void MarkInFlight(int32_t h, int64_t page, int32_t seg);
  // Back to kFree, not pushed.
  void EndInFlight(int32_t h);

  // Stray mappings, keyed by address.
  void AddStray(uintptr_t addr, int32_t h, bool accessible);
  // The backend unmapped the stray at `addr`. Returns its handle, which may now be Unused.
  int32_t RemoveStray(uintptr_t addr);
  const std::map<uintptr_t, Stray>& strays() const { return strays_; }
  const Stray* FindStray(uintptr_t addr) const {
    auto it = strays_.find(addr);
    return it == strays_.end() ? nullptr : &it->second;
  }
  // Quarantined at exactly one stray address, under no row: a page whose only mapping is
  // that stray may be taken as it is by whoever needs a page there.
  bool OnlyStray(int32_t h) const {
    const Handle& hd = handles_[h];
    return hd.state == HandleState::kQuarantined && hd.owners.empty() && hd.strays == 1;
  }

  // Counters, kept incrementally (CheckInvariants recounts them).
  int64_t mapped_handles() const { return mapped_handles_; }    // ref count > 0
  int64_t mapped_granules() const { return mapped_granules_; }  // sum of ref counts
  int64_t used_handles() const { return used_handles_; }        // under >= 1 live row
  int64_t idle_handles() const { return idle_handles_; }        // under idle rows only
  int64_t in_flight_handles() const { return in_flight_handles_; }
  int64_t quarantined_handles() const { return quarantined_handles_; }
  // Under >= 2 live rows (Stats::pages_shared).
  int64_t live_shared_handles() const { return live_shared_handles_; }
  // Mapped under idle rows only, none of them waiting for its fence, and at no stray
  // address: what unmapping every fence-complete idle row would give the free list.
  int64_t reclaimable_idle_handles() const { return reclaimable_idle_handles_; }
  const absl::flat_hash_set<int32_t>& shared() const { return shared_; }  // ref count > 1

  // The pool's half of the layout's invariants: the free list, every handle's state
  // against the mappings the rows record (refs, live_refs, waiting_refs, in_flight: per
  // handle, recounted from the rows), strays and counters. Internal on a violation.
  absl::Status CheckInvariants(absl::Span<const int32_t> refs, absl::Span<const int32_t> live_refs,
                               absl::Span<const int32_t> waiting_refs,
                               absl::Span<const int32_t> in_flight) const;

 private:
  // Counters of handle `hd`, with sign +1 / -1 (remove before a change, add after).
  void Account(const Handle& hd, int sign);
  // kFree or kQuarantined once the last owner and in-flight mark are gone.
  void Settle(Handle& hd);

  std::vector<Handle> handles_;
  std::vector<int32_t> free_;
  std::map<uintptr_t, Stray> strays_;
  int64_t mapped_handles_ = 0;
  int64_t mapped_granules_ = 0;
  int64_t used_handles_ = 0;
  int64_t idle_handles_ = 0;
  int64_t in_flight_handles_ = 0;
  int64_t quarantined_handles_ = 0;
  int64_t live_shared_handles_ = 0;
  int64_t reclaimable_idle_handles_ = 0;
  absl::flat_hash_set<int32_t> shared_;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_HANDLE_POOL_H_
