// HostVmm: the Vmm interface over real virtual memory on Linux, so that both layouts
// and everything above them run (and are tested) on a CPU with the same semantics as
// the CUDA driver: reservations are PROT_NONE address space, a physical handle is one
// granule-sized slot of a single memfd, Map puts that slot at an address with
// MAP_SHARED|MAP_FIXED (so one handle can be mapped at several addresses and every
// alias sees the same bytes), and memory is unreadable until SetAccess.
#include "allocators/vmm/host_vmm.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "allocators/vmm/vmm_ledger.h"
#include "kvmem/vmm.h"
#include "src/core/logging.h"

namespace kvmem {
namespace internal {
namespace {

// The memfd is sparse, so growing it costs nothing until pages are touched; growing
// in big steps keeps ftruncate off the Create path.
constexpr int64_t kMinGrowBytes = int64_t{256} << 20;

std::string ErrnoText(int err) { return std::error_code(err, std::generic_category()).message(); }

int64_t OsPageSize() {
  static const int64_t page = sysconf(_SC_PAGESIZE);
  return page;
}

class HostVmm final : public Vmm {
 public:
  // REQUIRES: granularity is validated; memfd is an open memfd this object now owns.
  HostVmm(int64_t granularity, int64_t max_handles, int memfd)
      : granularity_(granularity),
        max_handles_(max_handles),
        memfd_(memfd),
        ledger_("host VMM", granularity) {}
  ~HostVmm() override;

  std::string_view name() const override { return "host"; }
  int64_t granularity() const override { return granularity_; }
  bool is_device() const override { return false; }

  absl::StatusOr<uintptr_t> Reserve(int64_t bytes) override;
  absl::Status FreeReservation(uintptr_t addr, int64_t bytes) override;
  absl::StatusOr<PhysHandle> Create() override;
  absl::Status Release(PhysHandle handle) override;
  absl::Status Map(uintptr_t addr, PhysHandle handle) override;
  absl::Status SetAccess(uintptr_t addr, int64_t bytes) override;
  absl::Status Unmap(uintptr_t addr, int64_t bytes) override;
  absl::Status Copy(uintptr_t dst, uintptr_t src, int64_t bytes) override;
  bool FenceComplete(const Fence& fence) override;
  VmmCounters counters() const override;
  absl::StatusOr<MappingState> Query(uintptr_t addr) const override;

  int64_t ResidentBytes() const;

 private:
  absl::StatusOr<int64_t> TakeSlot() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t granularity_;
  const int64_t max_handles_;  // 0: no cap
  const int memfd_;

  mutable absl::Mutex mu_;
  // Under mu_, but for CheckAlignedRange and CheckCopyArgs (they read only constants).
  VmmLedger ledger_;
  std::vector<int64_t> free_slots_ ABSL_GUARDED_BY(mu_);  // punched, ready for reuse
  int64_t next_slot_ ABSL_GUARDED_BY(mu_) = 0;            // slots below were handed out once
  int64_t file_slots_ ABSL_GUARDED_BY(mu_) = 0;           // memfd size / granularity

  VmmOpStats stats_;
};

HostVmm::~HostVmm() {
  absl::MutexLock lock(&mu_);
  if (!ledger_.empty()) {
    Logger()->warn(
        "host VMM destroyed with leaked resources: {} reservations, {} physical handles, {} "
        "mapped granules; releasing them",
        ledger_.reservations().size(), ledger_.handles().size(), ledger_.mappings().size());
  }
  // Unmapping a reservation also drops every memfd mapping inside it.
  for (const auto& [addr, info] : ledger_.reservations()) {
    if (munmap(reinterpret_cast<void*>(addr), info.bytes) != 0) {
      Logger()->error("host VMM: munmap of reservation {:#x} ({} bytes) failed: {}", addr,
                      info.bytes, ErrnoText(errno));
    }
  }
  if (close(memfd_) != 0) Logger()->error("host VMM: close(memfd) failed: {}", ErrnoText(errno));
}

absl::StatusOr<uintptr_t> HostVmm::Reserve(int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kReserve);
  if (bytes <= 0 || bytes % granularity_ != 0 ||
      bytes > std::numeric_limits<int64_t>::max() - granularity_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host VMM reserve: size %d is not a positive multiple of the granularity %d", bytes,
        granularity_));
  }
  // mmap aligns only to the OS page: over-reserve by one granule and trim both ends.
  const int64_t extra = granularity_ > OsPageSize() ? granularity_ : 0;
  const size_t total = static_cast<size_t>(bytes + extra);
  void* p = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host VMM reserve: mmap of %d bytes of address space failed: %s", total, ErrnoText(err)));
  }
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t addr = (raw + granularity_ - 1) / granularity_ * granularity_;
  const size_t head = addr - raw;
  const size_t tail = total - head - bytes;
  if (head > 0) munmap(p, head);
  if (tail > 0) munmap(reinterpret_cast<void*>(addr + bytes), tail);

  absl::MutexLock lock(&mu_);
  ledger_.AddReservation(addr, VmmLedger::Reservation{.bytes = bytes});
  return addr;
}

absl::Status HostVmm::FreeReservation(uintptr_t addr, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kFreeReservation);
  absl::MutexLock lock(&mu_);
  if (absl::Status s = ledger_.CheckFreeReservation(addr, bytes); !s.ok()) return s;
  if (munmap(reinterpret_cast<void*>(addr), bytes) != 0) {
    const int err = errno;
    return absl::InternalError(absl::StrFormat("host VMM free_reservation: munmap(%#x, %d): %s",
                                               addr, bytes, ErrnoText(err)));
  }
  ledger_.EraseReservation(addr);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> HostVmm::TakeSlot() {
  if (!free_slots_.empty()) {
    const int64_t slot = free_slots_.back();
    free_slots_.pop_back();
    return slot;
  }
  const int64_t slot = next_slot_;
  if (slot >= file_slots_) {
    int64_t new_slots = std::max({slot + 1, 2 * file_slots_, kMinGrowBytes / granularity_});
    if (max_handles_ > 0) new_slots = std::max(slot + 1, std::min(new_slots, max_handles_));
    if (ftruncate(memfd_, new_slots * granularity_) != 0) {
      const int err = errno;
      return absl::ResourceExhaustedError(
          absl::StrFormat("host VMM create: growing the memfd to %d bytes failed: %s",
                          new_slots * granularity_, ErrnoText(err)));
    }
    file_slots_ = new_slots;
  }
  ++next_slot_;
  return slot;
}

absl::StatusOr<PhysHandle> HostVmm::Create() {
  VmmOpStats::Timer timer(&stats_, VmmOp::kCreate);
  absl::MutexLock lock(&mu_);
  const int64_t live = static_cast<int64_t>(ledger_.handles().size());
  if (max_handles_ > 0 && live >= max_handles_) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host VMM create: out of physical memory: %d live handles of %d bytes = %d bytes, cap "
        "%d bytes",
        live, granularity_, live * granularity_, max_handles_ * granularity_));
  }
  absl::StatusOr<int64_t> slot = TakeSlot();
  if (!slot.ok()) return slot.status();
  return ledger_.AddHandle(static_cast<uint64_t>(*slot));
}

absl::Status HostVmm::Release(PhysHandle handle) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kRelease);
  absl::MutexLock lock(&mu_);
  absl::StatusOr<VmmLedger::Handle> info = ledger_.CheckRelease(handle);
  if (!info.ok()) return info.status();
  // Punch the slot out of the memfd so the memory really goes back to the OS (and a
  // recycled slot reads as zeros, like fresh memory).
  const int64_t slot = static_cast<int64_t>(info->backing);
  if (fallocate(memfd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, slot * granularity_,
                granularity_) != 0) {
    const int err = errno;
    return absl::InternalError(absl::StrFormat(
        "host VMM release: punching slot %d of handle %d out of the memfd failed: %s", slot, handle,
        ErrnoText(err)));
  }
  free_slots_.push_back(slot);
  ledger_.EraseHandle(handle);
  return absl::OkStatus();
}

absl::Status HostVmm::Map(uintptr_t addr, PhysHandle handle) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kMap);
  if (absl::Status s = ledger_.CheckAlignedRange("map", addr, granularity_); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  absl::StatusOr<uint64_t> slot = ledger_.CheckMap(addr, handle);
  if (!slot.ok()) return slot.status();
  void* p = mmap(reinterpret_cast<void*>(addr), granularity_, PROT_NONE, MAP_SHARED | MAP_FIXED,
                 memfd_, static_cast<int64_t>(*slot) * granularity_);
  if (p == MAP_FAILED) {
    const int err = errno;
    // A failed MAP_FIXED may have dropped the reservation's pages there: put them back.
    mmap(reinterpret_cast<void*>(addr), granularity_, PROT_NONE,
         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host VMM map: mmap of handle %d at %#x failed: %s", handle, addr, ErrnoText(err)));
  }
  ledger_.AddMapping(addr, handle);  // the lock held since CheckMap: cannot fail
  return absl::OkStatus();
}

absl::Status HostVmm::SetAccess(uintptr_t addr, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kSetAccess);
  if (absl::Status s = ledger_.CheckAlignedRange("set_access", addr, bytes); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (absl::Status s = ledger_.CheckMapped("set_access", addr, bytes, /*need_access=*/false);
      !s.ok()) {
    return s;
  }
  if (mprotect(reinterpret_cast<void*>(addr), bytes, PROT_READ | PROT_WRITE) != 0) {
    const int err = errno;
    return absl::InternalError(
        absl::StrFormat("host VMM set_access: mprotect(%#x, %d): %s", addr, bytes, ErrnoText(err)));
  }
  ledger_.SetAccessible(addr, bytes);
  return absl::OkStatus();
}

absl::Status HostVmm::Unmap(uintptr_t addr, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kUnmap);
  if (absl::Status s = ledger_.CheckAlignedRange("unmap", addr, bytes); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (absl::Status s = ledger_.CheckMapped("unmap", addr, bytes, /*need_access=*/false); !s.ok())
    return s;
  // Anonymous PROT_NONE memory over the range keeps the address space reserved.
  void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return absl::InternalError(absl::StrFormat("host VMM unmap: re-reserving [%#x, +%d): %s", addr,
                                               bytes, ErrnoText(err)));
  }
  ledger_.RemoveMappings(addr, bytes);
  return absl::OkStatus();
}

absl::Status HostVmm::Copy(uintptr_t dst, uintptr_t src, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kCopy);
  if (absl::Status s = ledger_.CheckCopyArgs(dst, src, bytes); !s.ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  // A reader lock: copies may run in parallel, but no Unmap can pull memory from
  // under one.
  absl::ReaderMutexLock lock(&mu_);
  if (absl::Status s = ledger_.CheckMapped("copy (source)", src, bytes, true); !s.ok()) return s;
  if (absl::Status s = ledger_.CheckMapped("copy (destination)", dst, bytes, true); !s.ok())
    return s;
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
  return absl::OkStatus();
}

bool HostVmm::FenceComplete(const Fence& fence) {
  if (fence.event == nullptr) return true;
  return static_cast<const std::atomic<bool>*>(fence.event)->load(std::memory_order_acquire);
}

VmmCounters HostVmm::counters() const {
  VmmCounters c;
  stats_.Fill(&c);
  absl::ReaderMutexLock lock(&mu_);
  ledger_.FillLive(&c);
  return c;
}

absl::StatusOr<MappingState> HostVmm::Query(uintptr_t addr) const {
  absl::ReaderMutexLock lock(&mu_);
  return ledger_.Query(addr);
}

int64_t HostVmm::ResidentBytes() const {
  struct stat st;
  if (fstat(memfd_, &st) != 0) return -1;
  return static_cast<int64_t>(st.st_blocks) * 512;
}

}  // namespace

absl::StatusOr<int64_t> HostVmmResidentBytes(const Vmm& vmm) {
  const auto* host = dynamic_cast<const HostVmm*>(&vmm);
  if (host == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("backend '%s' is not the host backend", vmm.name()));
  }
  const int64_t bytes = host->ResidentBytes();
  if (bytes < 0) return absl::InternalError("fstat of the host VMM's memfd failed");
  return bytes;
}

}  // namespace internal

absl::StatusOr<std::unique_ptr<Vmm>> MakeHostVmm(int64_t granularity, int64_t max_physical_bytes) {
  const int64_t page = internal::OsPageSize();
  if (granularity <= 0 || (granularity & (granularity - 1)) != 0 || granularity % page != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host VMM: granularity %d is not a power of two multiple of the OS page size %d",
        granularity, page));
  }
  if (max_physical_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host VMM: max_physical_bytes %d is negative", max_physical_bytes));
  }
  const int64_t max_handles = max_physical_bytes / granularity;
  if (max_physical_bytes > 0 && max_handles == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host VMM: max_physical_bytes %d is smaller than one granule (%d bytes)",
                        max_physical_bytes, granularity));
  }
  const int fd = memfd_create("kvmem-host-vmm", MFD_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return absl::UnavailableError(
        absl::StrFormat("host VMM: memfd_create failed: %s", internal::ErrnoText(err)));
  }
  internal::Logger()->debug("host VMM: granularity {} bytes, physical cap {} bytes", granularity,
                            max_physical_bytes);
  return std::make_unique<internal::HostVmm>(granularity, max_handles, fd);
}

}  // namespace kvmem
