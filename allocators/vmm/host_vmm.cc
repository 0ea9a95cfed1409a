// HostVmm: the Vmm interface over real virtual memory on Linux, so that both layouts
// and everything above them run (and are tested) on a CPU with the same semantics as
// the CUDA driver: reservations are PROT_NONE address space, a physical handle is one
// granule-sized slot of a single memfd, Map puts that slot at an address with
// MAP_SHARED|MAP_FIXED (so one handle can be mapped at several addresses and every
// alias sees the same bytes), and memory is unreadable until SetAccess.
//
// The mapping limit. Linux caps a process's mappings (VMAs) at vm.max_map_count (65530
// by default), and every mapped granule is one (a memfd mapping merges with a neighbour
// only when their file offsets are adjacent too). The kernel checks the count at the
// start of every mmap and refuses once it is above the limit; a mapping that splits
// another may take it one above, after which every mmap fails, malloc's and brk's
// included. Unmap is what brings the count back down, so it must work there, and
// replacing the granule with anonymous PROT_NONE memory (one mmap MAP_FIXED, which
// keeps the address space reserved at every instant) is refused exactly then. Measured
// on Linux 6.18 at the limit: mmap(MAP_FIXED) of anonymous memory over a mapped granule
// fails with ENOMEM; munmap of the granule succeeds (removing a whole mapping, or the end
// of one, needs no new one; only cutting a hole inside a mapping does, and that fails
// cleanly); mmap(MAP_FIXED_NOREPLACE) of the hole then succeeds and merges with the
// reservation on both sides, so the count drops by one or two. Unmap therefore replaces
// in place first and falls back to munmap + re-reserve on ENOMEM. Between those two
// calls another thread's mmap could take the hole; NOREPLACE then fails rather than
// clobber it, and the hole is remembered (unreserved_) so that Map and FreeReservation
// never touch that address blindly.
// Map, in turn, never leaves the process past the limit: the kernel lets the mmap that
// splits the reservation in the middle go one past it, so after each Map one more
// syscall asks whether the process is past it now (OverMapLimit; 1.7 us against 6.9 us
// for the Map's own mmap on the test VM), and if so the mapping is taken back and Map
// fails with ResourceExhausted. Without that, a successful call could leave the process
// where malloc fails, and the next call of kvmem or anyone else with std::bad_alloc.
#include "allocators/vmm/host_vmm.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/resource.h>
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
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "allocators/vmm/vmm_ledger.h"
#include "kvmem/vmm.h"
#include "src/core/host_limits.h"
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

// What an ENOMEM from mmap, munmap or mprotect most likely means here: the address
// space is reserved with MAP_NORESERVE, so it is the mapping limit.
std::string MapLimitText() {
  const int64_t limit = ReadMaxMapCount();
  return absl::StrFormat(
      "the process is probably at its mapping limit (vm.max_map_count = %s): raise it "
      "(sysctl vm.max_map_count), use a larger host page (host_granularity) or a smaller "
      "budget, or free memory (Trim, Free)",
      limit < 0 ? std::string("unknown") : absl::StrCat(limit));
}

// ResourceExhausted for ENOMEM (with the mapping limit named), Internal otherwise.
absl::Status MmapError(int err, const std::string& what) {
  if (err == ENOMEM) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("%s: %s; %s", what, ErrnoText(err), MapLimitText()));
  }
  return absl::InternalError(absl::StrFormat("%s: %s", what, ErrnoText(err)));
}

// Anonymous PROT_NONE memory at [addr, addr + bytes), the state of reserved address
// space. With `replace`, over whatever is mapped there (MAP_FIXED, atomic); without,
// only where nothing is (MAP_FIXED_NOREPLACE: EEXIST rather than clobber a mapping).
// Returns 0 or the errno.
int ReserveAt(uintptr_t addr, int64_t bytes, bool replace) {
  void* p = mmap(
      reinterpret_cast<void*>(addr), static_cast<size_t>(bytes), PROT_NONE,
      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (replace ? MAP_FIXED : MAP_FIXED_NOREPLACE), -1,
      0);
  if (p == MAP_FAILED) return errno;
  if (reinterpret_cast<uintptr_t>(p) != addr) {  // a kernel without MAP_FIXED_NOREPLACE
    munmap(p, static_cast<size_t>(bytes));
    return EEXIST;
  }
  return 0;
}

// Whether the process is past its mapping limit (vm.max_map_count), where the kernel
// refuses every new mapping. Asked with an mmap that cannot succeed but after that
// check: MAP_FIXED_NOREPLACE over `mapped`, an address mapped now, fails with EEXIST
// below the limit and ENOMEM past it. One syscall, nothing created.
bool OverMapLimit(uintptr_t mapped) {
  void* p = mmap(reinterpret_cast<void*>(mapped), static_cast<size_t>(OsPageSize()), PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
  if (p == MAP_FAILED) return errno == ENOMEM;
  // A kernel without MAP_FIXED_NOREPLACE took it as a hint and mapped elsewhere: below
  // the limit, then.
  munmap(p, static_cast<size_t>(OsPageSize()));
  return false;
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
  // With a physical cap: the cap as the device's memory, less the live handles.
  absl::StatusOr<DeviceMemory> AvailableMemory() const override;

  int64_t ResidentBytes() const;

 private:
  absl::StatusOr<int64_t> TakeSlot() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Puts reserved address space back over [addr, addr + bytes) after a munmap of it;
  // a granule that someone else's mapping took meanwhile (or that the mapping limit
  // refuses) goes into unreserved_. Returns how many granules are reserved again.
  int64_t Rereserve(uintptr_t addr, int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // munmap of [addr, addr + bytes) but for its unreserved granules (someone else's
  // mapping may be there), which it forgets. 0 or the first errno.
  int UnmapSkippingHoles(uintptr_t addr, int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t granularity_;
  const int64_t max_handles_;  // 0: no cap
  const int memfd_;

  mutable absl::Mutex mu_;
  // Under mu_, but for CheckAlignedRange and CheckCopyArgs (they read only constants).
  VmmLedger ledger_;
  std::vector<int64_t> free_slots_ ABSL_GUARDED_BY(mu_);  // punched, ready for reuse
  int64_t next_slot_ ABSL_GUARDED_BY(mu_) = 0;            // slots below were handed out once
  int64_t file_slots_ ABSL_GUARDED_BY(mu_) = 0;           // memfd size / granularity
  // Granules of live reservations that are not reserved any more (see the file comment):
  // empty but after a race at the mapping limit.
  absl::flat_hash_set<uintptr_t> unreserved_ ABSL_GUARDED_BY(mu_);

  VmmOpStats stats_;
};

HostVmm::~HostVmm() {
  absl::MutexLock lock(&mu_);
  if (!ledger_.empty()) {
    // One summary line for all of it, however many resources leaked, and one more only
    // if giving them back fails. The summary comes first so that nothing is allocated
    // between the munmaps and the destructor's end in the normal case.
    Logger()->warn(
        "host VMM destroyed with leaked resources: {} reservations, {} physical handles, {} "
        "mapped granules; releasing them",
        ledger_.reservations().size(), ledger_.handles().size(), ledger_.mappings().size());
    // Unmapping a reservation also drops every memfd mapping inside it.
    FailureTally unmapped("munmap of leaked reservations");
    for (const auto& [addr, info] : ledger_.reservations()) {
      if (const int err = UnmapSkippingHoles(addr, info.bytes); err != 0) {
        unmapped.Failed(ErrnoText(err));
      } else {
        unmapped.Succeeded();
      }
    }
    if (unmapped.failed() > 0) Logger()->error("host VMM: {}", unmapped.Summary());
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
  if (const int err = UnmapSkippingHoles(addr, bytes); err != 0) {
    return MmapError(err,
                     absl::StrFormat("host VMM free_reservation: munmap(%#x, %d)", addr, bytes));
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

int64_t HostVmm::Rereserve(uintptr_t addr, int64_t bytes) {
  // The whole range in one call (it merges with the reservation around it), else granule
  // by granule.
  if (ReserveAt(addr, bytes, /*replace=*/false) == 0) return bytes / granularity_;
  int64_t done = 0;
  for (uintptr_t a = addr; a < addr + bytes; a += granularity_) {
    if (ReserveAt(a, granularity_, /*replace=*/false) == 0) {
      ++done;
    } else {
      unreserved_.insert(a);
    }
  }
  return done;
}

int HostVmm::UnmapSkippingHoles(uintptr_t addr, int64_t bytes) {
  std::vector<uintptr_t> holes;
  if (!unreserved_.empty()) {
    for (uintptr_t a : unreserved_) {
      if (a >= addr && a < addr + bytes) holes.push_back(a);
    }
    std::sort(holes.begin(), holes.end());
  }
  int first_err = 0;
  uintptr_t from = addr;
  auto unmap_to = [&](uintptr_t to) {
    if (to > from && munmap(reinterpret_cast<void*>(from), to - from) != 0 && first_err == 0) {
      first_err = errno;
    }
  };
  for (uintptr_t hole : holes) {
    unmap_to(hole);
    from = hole + granularity_;
    unreserved_.erase(hole);
  }
  unmap_to(addr + bytes);
  return first_err;
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
  // Over an unreserved granule, only if it is still free: never over someone else's.
  const bool hole = unreserved_.contains(addr);
  void* p = mmap(reinterpret_cast<void*>(addr), granularity_, PROT_NONE,
                 MAP_SHARED | (hole ? MAP_FIXED_NOREPLACE : MAP_FIXED), memfd_,
                 static_cast<int64_t>(*slot) * granularity_);
  if (p != MAP_FAILED && reinterpret_cast<uintptr_t>(p) != addr) {  // NOREPLACE unknown
    munmap(p, granularity_);
    p = MAP_FAILED;
    errno = EEXIST;
  }
  if (p == MAP_FAILED) {
    const int err = errno;
    // Older kernels may drop the reservation's pages when a MAP_FIXED fails part-way:
    // reserve the granule again if it is a hole now. EEXIST means it is intact (as on
    // current kernels), and ENOMEM at the mapping limit that the kernel refused the
    // mmap before touching anything.
    if (!hole) ReserveAt(addr, granularity_, /*replace=*/false);
    const std::string what =
        absl::StrFormat("host VMM map: mmap of handle %d at %#x failed", handle, addr);
    if (err == ENOMEM) return MmapError(err, what);
    return absl::ResourceExhaustedError(absl::StrCat(what, ": ", ErrnoText(err)));
  }
  if (hole) unreserved_.erase(addr);
  // A mapping that splits the reservation may take the process one past its limit (see
  // the file comment), where every later mmap fails, malloc's too: then no call could
  // allocate, not even the one that would free memory. Take it back rather than leave
  // the process there.
  if (OverMapLimit(addr)) {
    if (munmap(reinterpret_cast<void*>(addr), granularity_) == 0) {
      // A granule not reserved again is in unreserved_ (see Rereserve); said in the status
      // rather than logged apart: one report per failure.
      const bool rereserved = Rereserve(addr, granularity_) > 0;
      return absl::ResourceExhaustedError(absl::StrFormat(
          "host VMM map: mapping handle %d at %#x would leave the process past its mapping "
          "limit%s; %s",
          handle, addr,
          rereserved ? "" : " (the granule is unmapped but could not be reserved again)",
          MapLimitText()));
    }
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
    // ENOMEM: the range splits a mapping at the mapping limit.
    return MmapError(errno, absl::StrFormat("host VMM set_access: mprotect(%#x, %d)", addr, bytes));
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
  // Anonymous PROT_NONE memory over the range keeps the address space reserved; at the
  // mapping limit, munmap and re-reserve instead (see the file comment).
  int err = ReserveAt(addr, bytes, /*replace=*/true);
  if (err == ENOMEM) {
    if (munmap(reinterpret_cast<void*>(addr), bytes) != 0) {
      // Only a hole inside a mapping needs a new one; nothing was unmapped.
      return MmapError(
          errno,
          absl::StrFormat("host VMM unmap: munmap(%#x, %d) at the mapping limit", addr, bytes));
    }
    ledger_.RemoveMappings(addr, bytes);
    if (const int64_t lost = bytes / granularity_ - Rereserve(addr, bytes); lost > 0) {
      Logger()->error(
          "host VMM unmap: {} granules of [{:#x}, +{}) are unmapped but could not be "
          "reserved again (another mapping took the address space, or the mapping limit); "
          "they are left alone until the reservation is freed",
          lost, addr, bytes);
    }
    return absl::OkStatus();
  }
  if (err != 0) {
    return MmapError(err, absl::StrFormat("host VMM unmap: re-reserving [%#x, +%d)", addr, bytes));
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

absl::StatusOr<DeviceMemory> HostVmm::AvailableMemory() const {
  if (max_handles_ == 0) {
    return absl::UnimplementedError(
        "host VMM without a physical cap: its memory is taken only as pages are written");
  }
  absl::ReaderMutexLock lock(&mu_);
  const int64_t live = static_cast<int64_t>(ledger_.handles().size());
  return DeviceMemory{
      .free_bytes = std::max<int64_t>(0, max_handles_ - live) * granularity_,
      .total_bytes = max_handles_ * granularity_,
      .device = "the host backend's physical cap",
  };
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
    const std::string what =
        absl::StrFormat("host VMM: memfd_create failed: %s", internal::ErrnoText(err));
    if (err == EMFILE) {
      // Out of file descriptors is a resource running out, not a missing driver
      // (Unavailable): the caller may close files and retry.
      struct rlimit fds = {};
      getrlimit(RLIMIT_NOFILE, &fds);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s: the process has all the %d file descriptors it may open (ulimit -n); close "
          "some or raise the limit",
          what, static_cast<int64_t>(fds.rlim_cur)));
    }
    if (err == ENFILE || err == ENOMEM) {
      return absl::ResourceExhaustedError(
          absl::StrCat(what, err == ENFILE ? ": the system's open file limit (fs.file-max)" : ""));
    }
    // ENOSYS: a kernel without memfd_create, the host's equivalent of a missing driver.
    if (err == ENOSYS) return absl::UnavailableError(what);
    return absl::InternalError(what);
  }
  internal::Logger()->debug("host VMM: granularity {} bytes, physical cap {} bytes", granularity,
                            max_physical_bytes);
  return std::make_unique<internal::HostVmm>(granularity, max_handles, fd);
}

}  // namespace kvmem
