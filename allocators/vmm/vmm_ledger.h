// VmmLedger: the bookkeeping the Vmm backends (host_vmm.cc, cuda_vmm.cc) share: live
// reservations, physical handles and mapped granules, the argument checks made against
// them, and VmmOpStats, the per-operation call counts and times. The backends keep
// their own OS / driver calls and locking around these. Internal.
#ifndef KVMEM_ALLOCATORS_VMM_VMM_LEDGER_H_
#define KVMEM_ALLOCATORS_VMM_VMM_LEDGER_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

// Call counts and total times of each VmmOp. Thread-safe (relaxed atomics).
class VmmOpStats {
 public:
  // Counts one call of `op` and the time until it goes out of scope.
  class Timer {
   public:
    Timer(const VmmOpStats* stats, VmmOp op)
        : stats_(stats), op_(static_cast<int>(op)), start_(std::chrono::steady_clock::now()) {}
    ~Timer() {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - start_)
                          .count();
      stats_->calls_[op_].fetch_add(1, std::memory_order_relaxed);
      stats_->nanos_[op_].fetch_add(ns, std::memory_order_relaxed);
    }
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;

   private:
    const VmmOpStats* stats_;
    int op_;
    std::chrono::steady_clock::time_point start_;
  };

  // Fills c->calls and c->nanos.
  void Fill(VmmCounters* c) const;

 private:
  static constexpr int kNumOps = static_cast<int>(VmmOp::kCount);
  mutable std::array<std::atomic<int64_t>, kNumOps> calls_{};
  mutable std::array<std::atomic<int64_t>, kNumOps> nanos_{};
};

// Live reservations, handles and mappings of one backend, with its granularity. Error
// messages start with the backend's name ("host VMM", "CUDA VMM").
//
// Not thread-safe: the backend serialises calls under its own lock (const methods may
// run concurrently with each other).
class VmmLedger {
 public:
  struct Reservation {
    int64_t bytes = 0;
    int64_t mapped_granules = 0;
  };
  struct Handle {
    uint64_t backing = 0;  // the backend's own handle: a memfd slot, a CUDA allocation
    int64_t mappings = 0;  // addresses it is mapped at now
  };
  struct Mapping {
    PhysHandle handle = 0;
    uintptr_t reservation = 0;  // key of the reservation holding this granule
    bool accessible = false;
  };

  // REQUIRES: granularity is a power of two.
  VmmLedger(std::string_view backend, int64_t granularity)
      : backend_(backend), granularity_(granularity) {}

  // InvalidArgument unless addr is granule-aligned and bytes a positive multiple of the
  // granularity that does not wrap the address space.
  absl::Status CheckAlignedRange(std::string_view op, uintptr_t addr, int64_t bytes) const;
  // FailedPrecondition unless every granule touching [addr, addr + bytes) is mapped (and
  // accessible, if `need_access`).
  absl::Status CheckMapped(std::string_view op, uintptr_t addr, int64_t bytes,
                           bool need_access) const;
  // InvalidArgument for a negative size or a range that wraps the address space: the
  // checks of Copy before its ranges are looked up (bytes == 0 passes).
  absl::Status CheckCopyArgs(uintptr_t dst, uintptr_t src, int64_t bytes) const;

  // Reservations.
  void AddReservation(uintptr_t addr, Reservation r) { reservations_[addr] = r; }
  // FailedPrecondition unless [addr, +bytes) is exactly a live reservation without
  // mapped granules.
  absl::Status CheckFreeReservation(uintptr_t addr, int64_t bytes) const;
  // REQUIRES: addr is a live reservation. Returns what it was.
  Reservation EraseReservation(uintptr_t addr);

  // Handles. Ids are never reused, so a stale handle is NotFound rather than someone
  // else's memory; 0 is never valid, which catches uninitialised handles.
  PhysHandle AddHandle(uint64_t backing);
  // Puts back a handle EraseHandle removed.
  void RestoreHandle(PhysHandle id, Handle h) { handles_[id] = h; }
  // The handle, unless it is not live (NotFound) or still mapped (FailedPrecondition).
  absl::StatusOr<Handle> CheckRelease(PhysHandle id) const;
  void EraseHandle(PhysHandle id) { handles_.erase(id); }

  // Mappings. The backing of `handle` if the granule at addr may be mapped to it:
  // InvalidArgument outside a live reservation, FailedPrecondition if already mapped,
  // NotFound for a handle that is not live.
  absl::StatusOr<uint64_t> CheckMap(uintptr_t addr, PhysHandle handle) const;
  // Records the granule at addr as mapped to `handle`; false (nothing recorded) where
  // the reservation or the handle is gone.
  bool AddMapping(uintptr_t addr, PhysHandle handle);
  // Marks the mapped granules of [addr, addr + bytes) accessible.
  void SetAccessible(uintptr_t addr, int64_t bytes);
  // Forgets the mappings of the granules of [addr, addr + bytes).
  void RemoveMappings(uintptr_t addr, int64_t bytes);

  // What the granule at addr holds. InvalidArgument for an unaligned address.
  absl::StatusOr<MappingState> Query(uintptr_t addr) const;

  // Fills the live counts of c.
  void FillLive(VmmCounters* c) const;
  bool empty() const { return reservations_.empty() && handles_.empty() && mappings_.empty(); }

  const std::map<uintptr_t, Reservation>& reservations() const { return reservations_; }
  const absl::flat_hash_map<PhysHandle, Handle>& handles() const { return handles_; }
  // Keyed by the granule's address.
  const absl::flat_hash_map<uintptr_t, Mapping>& mappings() const { return mappings_; }

 private:
  // The reservation holding [addr, addr + bytes), or reservations_.end().
  std::map<uintptr_t, Reservation>::const_iterator FindReservation(uintptr_t addr,
                                                                   int64_t bytes) const;

  const std::string backend_;
  const int64_t granularity_;
  std::map<uintptr_t, Reservation> reservations_;
  absl::flat_hash_map<PhysHandle, Handle> handles_;
  absl::flat_hash_map<uintptr_t, Mapping> mappings_;
  PhysHandle next_handle_ = 1;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VMM_VMM_LEDGER_H_
