// Implementation of allocators/vmm_ledger.h: the bookkeeping and argument checks the
// Vmm backends share.
#include "allocators/vmm/vmm_ledger.h"

#include <cstdint>
#include <limits>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

void VmmOpStats::Fill(VmmCounters* c) const {
  for (int i = 0; i < kNumOps; ++i) {
    c->calls[i] = calls_[i].load(std::memory_order_relaxed);
    c->nanos[i] = nanos_[i].load(std::memory_order_relaxed);
  }
}

absl::Status VmmLedger::CheckAlignedRange(std::string_view op, uintptr_t addr,
                                          int64_t bytes) const {
  if (bytes <= 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s %s: size %d is not a positive multiple of the granularity %d", backend_,
                        op, bytes, granularity_));
  }
  if (addr % granularity_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s %s: address %#x is not aligned to the granularity %d", backend_, op,
                        addr, granularity_));
  }
  if (static_cast<uint64_t>(bytes) > std::numeric_limits<uintptr_t>::max() - addr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s %s: range %#x + %d wraps the address space", backend_, op, addr, bytes));
  }
  return absl::OkStatus();
}

absl::Status VmmLedger::CheckMapped(std::string_view op, uintptr_t addr, int64_t bytes,
                                    bool need_access) const {
  const uintptr_t g = granularity_;
  const uintptr_t first = addr / g * g;
  const uintptr_t last = (addr + bytes - 1) / g * g;
  for (uintptr_t a = first;; a += g) {
    auto it = mappings_.find(a);
    if (it == mappings_.end()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s %s: granule %#x of [%#x, +%d) is not mapped", backend_, op, a, addr, bytes));
    }
    if (need_access && !it->second.accessible) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s %s: granule %#x of [%#x, +%d) is mapped but not accessible (no SetAccess)", backend_,
          op, a, addr, bytes));
    }
    if (a == last) break;
  }
  return absl::OkStatus();
}

absl::Status VmmLedger::CheckCopyArgs(uintptr_t dst, uintptr_t src, int64_t bytes) const {
  if (bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s copy: negative size %d", backend_, bytes));
  }
  const uint64_t max = std::numeric_limits<uintptr_t>::max();
  if (static_cast<uint64_t>(bytes) > max - dst || static_cast<uint64_t>(bytes) > max - src) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s copy: range wraps the address space", backend_));
  }
  return absl::OkStatus();
}

absl::Status VmmLedger::CheckFreeReservation(uintptr_t addr, int64_t bytes) const {
  auto it = reservations_.find(addr);
  if (it == reservations_.end() || it->second.bytes != bytes) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s free_reservation: [%#x, +%d) is not exactly a live reservation%s", backend_, addr,
        bytes,
        it == reservations_.end() ? ""
                                  : absl::StrFormat(" (that one has %d bytes)", it->second.bytes)));
  }
  if (it->second.mapped_granules != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s free_reservation: [%#x, +%d) still has %d mapped granules", backend_,
                        addr, bytes, it->second.mapped_granules));
  }
  return absl::OkStatus();
}

VmmLedger::Reservation VmmLedger::EraseReservation(uintptr_t addr) {
  auto it = reservations_.find(addr);
  const Reservation r = it->second;
  reservations_.erase(it);
  return r;
}

PhysHandle VmmLedger::AddHandle(uint64_t backing) {
  const PhysHandle id = next_handle_++;
  handles_[id] = Handle{.backing = backing};
  return id;
}

absl::StatusOr<VmmLedger::Handle> VmmLedger::CheckRelease(PhysHandle id) const {
  auto it = handles_.find(id);
  if (it == handles_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("%s release: %d is not a live physical handle", backend_, id));
  }
  if (it->second.mappings != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s release: handle %d is still mapped at %d addresses", backend_, id,
                        it->second.mappings));
  }
  return it->second;
}

absl::StatusOr<uint64_t> VmmLedger::CheckMap(uintptr_t addr, PhysHandle handle) const {
  if (FindReservation(addr, granularity_) == reservations_.end()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s map: %#x is not inside a live reservation", backend_, addr));
  }
  if (mappings_.contains(addr)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s map: %#x is already mapped", backend_, addr));
  }
  auto h = handles_.find(handle);
  if (h == handles_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("%s map: %d is not a live physical handle", backend_, handle));
  }
  return h->second.backing;
}

bool VmmLedger::AddMapping(uintptr_t addr, PhysHandle handle) {
  const auto res = FindReservation(addr, granularity_);
  auto h = handles_.find(handle);
  if (res == reservations_.end() || h == handles_.end()) return false;
  const uintptr_t reservation = res->first;
  mappings_[addr] = Mapping{.handle = handle, .reservation = reservation};
  ++h->second.mappings;
  ++reservations_[reservation].mapped_granules;
  return true;
}

void VmmLedger::SetAccessible(uintptr_t addr, int64_t bytes) {
  for (uintptr_t a = addr; a < addr + bytes; a += granularity_) {
    if (auto it = mappings_.find(a); it != mappings_.end()) it->second.accessible = true;
  }
}

void VmmLedger::RemoveMappings(uintptr_t addr, int64_t bytes) {
  for (uintptr_t a = addr; a < addr + bytes; a += granularity_) {
    auto it = mappings_.find(a);
    if (it == mappings_.end()) continue;  // only after a concurrent Unmap of the same range
    if (auto h = handles_.find(it->second.handle); h != handles_.end()) --h->second.mappings;
    if (auto res = reservations_.find(it->second.reservation); res != reservations_.end()) {
      --res->second.mapped_granules;
    }
    mappings_.erase(it);
  }
}

absl::StatusOr<MappingState> VmmLedger::Query(uintptr_t addr) const {
  if (addr % granularity_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s query: address %#x is not aligned to the granularity %d", backend_,
                        addr, granularity_));
  }
  MappingState state;
  if (auto it = mappings_.find(addr); it != mappings_.end()) {
    state.mapped = true;
    state.handle = it->second.handle;
    state.accessible = it->second.accessible;
  }
  return state;
}

void VmmLedger::FillLive(VmmCounters* c) const {
  c->live_reservations = static_cast<int64_t>(reservations_.size());
  c->live_handles = static_cast<int64_t>(handles_.size());
  c->mapped_granules = static_cast<int64_t>(mappings_.size());
}

std::map<uintptr_t, VmmLedger::Reservation>::const_iterator VmmLedger::FindReservation(
    uintptr_t addr, int64_t bytes) const {
  auto it = reservations_.upper_bound(addr);
  if (it == reservations_.begin()) return reservations_.end();
  --it;
  if (addr + bytes > it->first + it->second.bytes) return reservations_.end();
  return it;
}

}  // namespace kvmem::internal
