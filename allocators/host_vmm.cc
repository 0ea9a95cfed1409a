// HostVmm: the Vmm interface over real virtual memory on Linux, so that both layouts
// and everything above them run (and are tested) on a CPU with the same semantics as
// the CUDA driver: reservations are PROT_NONE address space, a physical handle is one
// granule-sized slot of a single memfd, Map puts that slot at an address with
// MAP_SHARED|MAP_FIXED (so one handle can be mapped at several addresses and every
// alias sees the same bytes), and memory is unreadable until SetAccess.
#include "allocators/host_vmm.h"

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
#include "kvmem/vmm.h"
#include "src/logging.h"

namespace kvmem {
namespace internal {
namespace {

constexpr int kNumOps = static_cast<int>(VmmOp::kCount);

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
      : granularity_(granularity), max_handles_(max_handles), memfd_(memfd) {}
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

  int64_t ResidentBytes() const;

 private:
  struct ReservationInfo {
    int64_t bytes = 0;
    int64_t mapped_granules = 0;
  };
  struct HandleInfo {
    int64_t slot = 0;      // offset in the memfd / granularity
    int64_t mappings = 0;  // addresses it is mapped at now
  };
  struct MappingInfo {
    PhysHandle handle = 0;
    uintptr_t reservation = 0;  // key of the reservation holding this granule
    bool accessible = false;
  };

  // Counts one call of `op` and the time until it goes out of scope.
  class OpTimer {
   public:
    OpTimer(const HostVmm* vmm, VmmOp op)
        : vmm_(vmm), op_(static_cast<int>(op)), start_(std::chrono::steady_clock::now()) {}
    ~OpTimer() {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - start_)
                          .count();
      vmm_->calls_[op_].fetch_add(1, std::memory_order_relaxed);
      vmm_->nanos_[op_].fetch_add(ns, std::memory_order_relaxed);
    }

   private:
    const HostVmm* vmm_;
    int op_;
    std::chrono::steady_clock::time_point start_;
  };

  // InvalidArgument unless addr is granule-aligned and bytes a positive multiple of the
  // granularity that does not wrap the address space.
  absl::Status CheckAlignedRange(std::string_view op, uintptr_t addr, int64_t bytes) const;
  // FailedPrecondition unless every granule touching [addr, addr + bytes) is mapped (and
  // accessible, if `need_access`).
  absl::Status CheckMapped(std::string_view op, uintptr_t addr, int64_t bytes,
                           bool need_access) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The reservation holding [addr, addr + bytes), or reservations_.end().
  std::map<uintptr_t, ReservationInfo>::iterator FindReservation(uintptr_t addr, int64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<int64_t> TakeSlot() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t granularity_;
  const int64_t max_handles_;  // 0: no cap
  const int memfd_;

  mutable absl::Mutex mu_;
  std::map<uintptr_t, ReservationInfo> reservations_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<PhysHandle, HandleInfo> handles_ ABSL_GUARDED_BY(mu_);
  // Keyed by the granule's address.
  absl::flat_hash_map<uintptr_t, MappingInfo> mappings_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> free_slots_ ABSL_GUARDED_BY(mu_);  // punched, ready for reuse
  int64_t next_slot_ ABSL_GUARDED_BY(mu_) = 0;            // slots below were handed out once
  int64_t file_slots_ ABSL_GUARDED_BY(mu_) = 0;           // memfd size / granularity
  // Ids are never reused, so a stale handle is NotFound rather than someone else's
  // memory; 0 is never valid, which catches uninitialised handles.
  PhysHandle next_handle_ ABSL_GUARDED_BY(mu_) = 1;

  mutable std::array<std::atomic<int64_t>, kNumOps> calls_{};
  mutable std::array<std::atomic<int64_t>, kNumOps> nanos_{};
};

HostVmm::~HostVmm() {
  absl::MutexLock lock(&mu_);
  if (!reservations_.empty() || !handles_.empty() || !mappings_.empty()) {
    Logger()->warn(
        "host VMM destroyed with leaked resources: {} reservations, {} physical handles, {} "
        "mapped granules; releasing them",
        reservations_.size(), handles_.size(), mappings_.size());
  }
  // Unmapping a reservation also drops every memfd mapping inside it.
  for (const auto& [addr, info] : reservations_) {
    if (munmap(reinterpret_cast<void*>(addr), info.bytes) != 0) {
      Logger()->error("host VMM: munmap of reservation {:#x} ({} bytes) failed: {}", addr,
                      info.bytes, ErrnoText(errno));
    }
  }
  if (close(memfd_) != 0) Logger()->error("host VMM: close(memfd) failed: {}", ErrnoText(errno));
}

absl::Status HostVmm::CheckAlignedRange(std::string_view op, uintptr_t addr, int64_t bytes) const {
  if (bytes <= 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host VMM %s: size %d is not a positive multiple of the granularity %d", op,
                        bytes, granularity_));
  }
  if (addr % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host VMM %s: address %#x is not aligned to the granularity %d", op, addr, granularity_));
  }
  if (static_cast<uint64_t>(bytes) > std::numeric_limits<uintptr_t>::max() - addr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host VMM %s: range %#x + %d wraps the address space", op, addr, bytes));
  }
  return absl::OkStatus();
}

absl::Status HostVmm::CheckMapped(std::string_view op, uintptr_t addr, int64_t bytes,
                                  bool need_access) const {
  const uintptr_t g = granularity_;
  const uintptr_t first = addr / g * g;
  const uintptr_t last = (addr + bytes - 1) / g * g;
  for (uintptr_t a = first;; a += g) {
    auto it = mappings_.find(a);
    if (it == mappings_.end()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "host VMM %s: granule %#x of [%#x, +%d) is not mapped", op, a, addr, bytes));
    }
    if (need_access && !it->second.accessible) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "host VMM %s: granule %#x of [%#x, +%d) is mapped but not accessible (no SetAccess)", op,
          a, addr, bytes));
    }
    if (a == last) break;
  }
  return absl::OkStatus();
}

std::map<uintptr_t, HostVmm::ReservationInfo>::iterator HostVmm::FindReservation(uintptr_t addr,
                                                                                 int64_t bytes) {
  auto it = reservations_.upper_bound(addr);
  if (it == reservations_.begin()) return reservations_.end();
  --it;
  if (addr + bytes > it->first + it->second.bytes) return reservations_.end();
  return it;
}

absl::StatusOr<uintptr_t> HostVmm::Reserve(int64_t bytes) {
  OpTimer timer(this, VmmOp::kReserve);
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
  reservations_[addr] = ReservationInfo{.bytes = bytes};
  return addr;
}

absl::Status HostVmm::FreeReservation(uintptr_t addr, int64_t bytes) {
  OpTimer timer(this, VmmOp::kFreeReservation);
  absl::MutexLock lock(&mu_);
  auto it = reservations_.find(addr);
  if (it == reservations_.end() || it->second.bytes != bytes) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "host VMM free_reservation: [%#x, +%d) is not exactly a live reservation%s", addr, bytes,
        it == reservations_.end() ? ""
                                  : absl::StrFormat(" (that one has %d bytes)", it->second.bytes)));
  }
  if (it->second.mapped_granules != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("host VMM free_reservation: [%#x, +%d) still has %d mapped granules", addr,
                        bytes, it->second.mapped_granules));
  }
  if (munmap(reinterpret_cast<void*>(addr), bytes) != 0) {
    const int err = errno;
    return absl::InternalError(absl::StrFormat("host VMM free_reservation: munmap(%#x, %d): %s",
                                               addr, bytes, ErrnoText(err)));
  }
  reservations_.erase(it);
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
  OpTimer timer(this, VmmOp::kCreate);
  absl::MutexLock lock(&mu_);
  const int64_t live = static_cast<int64_t>(handles_.size());
  if (max_handles_ > 0 && live >= max_handles_) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host VMM create: out of physical memory: %d live handles of %d bytes = %d bytes, cap "
        "%d bytes",
        live, granularity_, live * granularity_, max_handles_ * granularity_));
  }
  absl::StatusOr<int64_t> slot = TakeSlot();
  if (!slot.ok()) return slot.status();
  const PhysHandle handle = next_handle_++;
  handles_[handle] = HandleInfo{.slot = *slot};
  return handle;
}

absl::Status HostVmm::Release(PhysHandle handle) {
  OpTimer timer(this, VmmOp::kRelease);
  absl::MutexLock lock(&mu_);
  auto it = handles_.find(handle);
  if (it == handles_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("host VMM release: %d is not a live physical handle", handle));
  }
  if (it->second.mappings != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("host VMM release: handle %d is still mapped at %d addresses", handle,
                        it->second.mappings));
  }
  // Punch the slot out of the memfd so the memory really goes back to the OS (and a
  // recycled slot reads as zeros, like fresh memory).
  const int64_t slot = it->second.slot;
  if (fallocate(memfd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, slot * granularity_,
                granularity_) != 0) {
    const int err = errno;
    return absl::InternalError(absl::StrFormat(
        "host VMM release: punching slot %d of handle %d out of the memfd failed: %s", slot, handle,
        ErrnoText(err)));
  }
  free_slots_.push_back(slot);
  handles_.erase(it);
  return absl::OkStatus();
}

absl::Status HostVmm::Map(uintptr_t addr, PhysHandle handle) {
  OpTimer timer(this, VmmOp::kMap);
  if (absl::Status s = CheckAlignedRange("map", addr, granularity_); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  auto res = FindReservation(addr, granularity_);
  if (res == reservations_.end()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host VMM map: %#x is not inside a live reservation", addr));
  }
  if (mappings_.contains(addr)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("host VMM map: %#x is already mapped", addr));
  }
  auto h = handles_.find(handle);
  if (h == handles_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("host VMM map: %d is not a live physical handle", handle));
  }
  void* p = mmap(reinterpret_cast<void*>(addr), granularity_, PROT_NONE, MAP_SHARED | MAP_FIXED,
                 memfd_, h->second.slot * granularity_);
  if (p == MAP_FAILED) {
    const int err = errno;
    // A failed MAP_FIXED may have dropped the reservation's pages there: put them back.
    mmap(reinterpret_cast<void*>(addr), granularity_, PROT_NONE,
         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host VMM map: mmap of handle %d at %#x failed: %s", handle, addr, ErrnoText(err)));
  }
  mappings_[addr] = MappingInfo{.handle = handle, .reservation = res->first};
  ++h->second.mappings;
  ++res->second.mapped_granules;
  return absl::OkStatus();
}

absl::Status HostVmm::SetAccess(uintptr_t addr, int64_t bytes) {
  OpTimer timer(this, VmmOp::kSetAccess);
  if (absl::Status s = CheckAlignedRange("set_access", addr, bytes); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckMapped("set_access", addr, bytes, /*need_access=*/false); !s.ok()) {
    return s;
  }
  if (mprotect(reinterpret_cast<void*>(addr), bytes, PROT_READ | PROT_WRITE) != 0) {
    const int err = errno;
    return absl::InternalError(
        absl::StrFormat("host VMM set_access: mprotect(%#x, %d): %s", addr, bytes, ErrnoText(err)));
  }
  for (uintptr_t a = addr; a < addr + bytes; a += granularity_) mappings_[a].accessible = true;
  return absl::OkStatus();
}

absl::Status HostVmm::Unmap(uintptr_t addr, int64_t bytes) {
  OpTimer timer(this, VmmOp::kUnmap);
  if (absl::Status s = CheckAlignedRange("unmap", addr, bytes); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckMapped("unmap", addr, bytes, /*need_access=*/false); !s.ok()) return s;
  // Anonymous PROT_NONE memory over the range keeps the address space reserved.
  void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return absl::InternalError(absl::StrFormat("host VMM unmap: re-reserving [%#x, +%d): %s", addr,
                                               bytes, ErrnoText(err)));
  }
  for (uintptr_t a = addr; a < addr + bytes; a += granularity_) {
    auto it = mappings_.find(a);
    --handles_[it->second.handle].mappings;
    --reservations_[it->second.reservation].mapped_granules;
    mappings_.erase(it);
  }
  return absl::OkStatus();
}

absl::Status HostVmm::Copy(uintptr_t dst, uintptr_t src, int64_t bytes) {
  OpTimer timer(this, VmmOp::kCopy);
  if (bytes < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("host VMM copy: negative size %d", bytes));
  }
  if (bytes == 0) return absl::OkStatus();
  const uint64_t max = std::numeric_limits<uintptr_t>::max();
  if (static_cast<uint64_t>(bytes) > max - dst || static_cast<uint64_t>(bytes) > max - src) {
    return absl::InvalidArgumentError("host VMM copy: range wraps the address space");
  }
  // A reader lock: copies may run in parallel, but no Unmap can pull memory from
  // under one.
  absl::ReaderMutexLock lock(&mu_);
  if (absl::Status s = CheckMapped("copy (source)", src, bytes, true); !s.ok()) return s;
  if (absl::Status s = CheckMapped("copy (destination)", dst, bytes, true); !s.ok()) return s;
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
  return absl::OkStatus();
}

bool HostVmm::FenceComplete(const Fence& fence) {
  if (fence.event == nullptr) return true;
  return static_cast<const std::atomic<bool>*>(fence.event)->load(std::memory_order_acquire);
}

VmmCounters HostVmm::counters() const {
  VmmCounters c;
  for (int i = 0; i < kNumOps; ++i) {
    c.calls[i] = calls_[i].load(std::memory_order_relaxed);
    c.nanos[i] = nanos_[i].load(std::memory_order_relaxed);
  }
  absl::ReaderMutexLock lock(&mu_);
  c.live_reservations = static_cast<int64_t>(reservations_.size());
  c.live_handles = static_cast<int64_t>(handles_.size());
  c.mapped_granules = static_cast<int64_t>(mappings_.size());
  return c;
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
