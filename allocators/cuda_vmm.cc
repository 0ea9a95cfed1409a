// CudaVmm: the Vmm interface (kvmem/vmm.h) over the CUDA driver's virtual memory
// management API, on one device, in that device's primary context (the one the CUDA
// runtime uses, so memory mapped here is usable by runtime-launched kernels).
//
// Semantics mirror HostVmm so that layouts tested on the CPU behave the same on the GPU:
// every address and size is granule-aligned; a physical handle is one granule; Map does
// not make memory accessible until SetAccess covers it; Release of a mapped handle and
// FreeReservation of a range with mappings fail (the driver itself would defer the free
// silently, which would hide a layout's leak); live counters prove nothing leaks.
//
// Driver calls are made outside the backend's lock (they take 1-30 us, and a background
// mapper must not block a decode step's Copy or FenceComplete): arguments are validated
// against the tracked state under the lock, the driver is called, and the result is
// committed under the lock. Concurrent calls on the same address or handle are a caller
// error, as with the driver.
//
// Copy orders itself after earlier work on the legacy default stream (the backend's stream
// is a blocking stream) and synchronises before returning, so kernels launched after a
// Copy (on any stream) see its result. Work on other streams that writes the source must
// be finished by the caller first. Copies happen only on copy-on-write, which is rare.
#include <cuda.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "allocators/cuda_driver.h"
#include "allocators/cuda_vmm_factory.h"
#include "kvmem/vmm.h"
#include "src/logging.h"

namespace kvmem::internal {
namespace {

constexpr int kNumOps = static_cast<int>(VmmOp::kCount);

// Makes `ctx` current on this thread for the scope, restoring the caller's context
// after. Callers (the background mapper, an engine's threads) may have no context or
// another one current; the driver's VMM and stream calls need ours.
class ScopedContext {
 public:
  ScopedContext(const CudaDriver* driver, CUcontext ctx) : driver_(driver) {
    CUcontext current = nullptr;
    if (driver_->cuCtxGetCurrent(&current) == CUDA_SUCCESS && current == ctx) return;
    pushed_ = driver_->cuCtxPushCurrent(ctx) == CUDA_SUCCESS;
  }
  ~ScopedContext() {
    if (!pushed_) return;
    CUcontext popped = nullptr;
    if (CUresult r = driver_->cuCtxPopCurrent(&popped); r != CUDA_SUCCESS) {
      Logger()->error("CUDA VMM: cuCtxPopCurrent failed: {}", CudaErrorText(driver_, r));
    }
  }
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

 private:
  const CudaDriver* driver_;
  bool pushed_ = false;
};

// A retained primary context; released on destruction.
class PrimaryContext {
 public:
  PrimaryContext() = default;
  static absl::StatusOr<PrimaryContext> Retain(const CudaDriver* driver, CUdevice device) {
    PrimaryContext p;
    CUresult r = driver->cuDevicePrimaryCtxRetain(&p.ctx_, device);
    if (r != CUDA_SUCCESS) {
      return CudaStatus(driver, r, absl::StrFormat("cuDevicePrimaryCtxRetain(device %d)", device));
    }
    p.driver_ = driver;
    p.device_ = device;
    return p;
  }
  ~PrimaryContext() { Reset(); }
  PrimaryContext(PrimaryContext&& o) noexcept { *this = std::move(o); }
  PrimaryContext& operator=(PrimaryContext&& o) noexcept {
    if (this != &o) {
      Reset();
      driver_ = std::exchange(o.driver_, nullptr);
      device_ = o.device_;
      ctx_ = std::exchange(o.ctx_, nullptr);
    }
    return *this;
  }
  CUcontext get() const { return ctx_; }

 private:
  void Reset() {
    if (driver_ == nullptr) return;
    if (CUresult r = driver_->cuDevicePrimaryCtxRelease(device_); r != CUDA_SUCCESS) {
      Logger()->error("CUDA VMM: cuDevicePrimaryCtxRelease(device {}) failed: {}", device_,
                      CudaErrorText(driver_, r));
    }
    driver_ = nullptr;
    ctx_ = nullptr;
  }
  const CudaDriver* driver_ = nullptr;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
};

// A stream created in `ctx`; synchronised and destroyed on destruction.
class OwnedStream {
 public:
  OwnedStream() = default;
  static absl::StatusOr<OwnedStream> Create(const CudaDriver* driver, CUcontext ctx) {
    ScopedContext scope(driver, ctx);
    OwnedStream s;
    // CU_STREAM_DEFAULT (blocking): work on it waits for earlier work on the legacy
    // default stream, so a copy-on-write copy sees what earlier default-stream kernels
    // wrote into its source.
    if (CUresult r = driver->cuStreamCreate(&s.stream_, CU_STREAM_DEFAULT); r != CUDA_SUCCESS) {
      return CudaStatus(driver, r, "cuStreamCreate");
    }
    s.driver_ = driver;
    s.ctx_ = ctx;
    return s;
  }
  ~OwnedStream() { Reset(); }
  OwnedStream(OwnedStream&& o) noexcept { *this = std::move(o); }
  OwnedStream& operator=(OwnedStream&& o) noexcept {
    if (this != &o) {
      Reset();
      driver_ = std::exchange(o.driver_, nullptr);
      ctx_ = std::exchange(o.ctx_, nullptr);
      stream_ = std::exchange(o.stream_, nullptr);
    }
    return *this;
  }
  CUstream get() const { return stream_; }

 private:
  void Reset() {
    if (driver_ == nullptr) return;
    ScopedContext scope(driver_, ctx_);
    if (CUresult r = driver_->cuStreamSynchronize(stream_); r != CUDA_SUCCESS) {
      Logger()->error("CUDA VMM: cuStreamSynchronize at destruction failed: {}",
                      CudaErrorText(driver_, r));
    }
    if (CUresult r = driver_->cuStreamDestroy(stream_); r != CUDA_SUCCESS) {
      Logger()->error("CUDA VMM: cuStreamDestroy failed: {}", CudaErrorText(driver_, r));
    }
    driver_ = nullptr;
    stream_ = nullptr;
  }
  const CudaDriver* driver_ = nullptr;
  CUcontext ctx_ = nullptr;
  CUstream stream_ = nullptr;
};

class CudaVmm final : public Vmm {
 public:
  CudaVmm(const CudaDriver* driver, int ordinal, PrimaryContext ctx, OwnedStream stream,
          int64_t granularity)
      : driver_(driver),
        ordinal_(ordinal),
        ctx_(std::move(ctx)),
        stream_(std::move(stream)),
        granularity_(granularity) {}
  ~CudaVmm() override;

  std::string_view name() const override { return "cuda"; }
  int64_t granularity() const override { return granularity_; }
  bool is_device() const override { return true; }

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

 private:
  struct ReservationInfo {
    int64_t bytes = 0;
    int64_t mapped_granules = 0;
  };
  struct HandleInfo {
    CUmemGenericAllocationHandle cu = 0;
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
    OpTimer(const CudaVmm* vmm, VmmOp op)
        : vmm_(vmm), op_(static_cast<int>(op)), start_(std::chrono::steady_clock::now()) {}
    ~OpTimer() {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - start_)
                          .count();
      vmm_->calls_[op_].fetch_add(1, std::memory_order_relaxed);
      vmm_->nanos_[op_].fetch_add(ns, std::memory_order_relaxed);
    }

   private:
    const CudaVmm* vmm_;
    int op_;
    std::chrono::steady_clock::time_point start_;
  };

  absl::Status Driver(CUresult r, std::string_view what) const {
    return CudaStatus(driver_, r, what);
  }
  absl::Status CheckAlignedRange(std::string_view op, uintptr_t addr, int64_t bytes) const;
  absl::Status CheckMapped(std::string_view op, uintptr_t addr, int64_t bytes,
                           bool need_access) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  std::map<uintptr_t, ReservationInfo>::iterator FindReservation(uintptr_t addr, int64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CudaDriver* const driver_;
  const int ordinal_;
  // Destroyed after stream_ (members are destroyed in reverse order).
  PrimaryContext ctx_;
  OwnedStream stream_;
  const int64_t granularity_;

  mutable absl::Mutex mu_;
  std::map<uintptr_t, ReservationInfo> reservations_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<PhysHandle, HandleInfo> handles_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uintptr_t, MappingInfo> mappings_ ABSL_GUARDED_BY(mu_);
  // Ids are never reused, so a stale handle is NotFound rather than another granule;
  // 0 is never valid, which catches uninitialised handles.
  PhysHandle next_handle_ ABSL_GUARDED_BY(mu_) = 1;

  mutable std::array<std::atomic<int64_t>, kNumOps> calls_{};
  mutable std::array<std::atomic<int64_t>, kNumOps> nanos_{};
};

CudaVmm::~CudaVmm() {
  absl::MutexLock lock(&mu_);
  if (reservations_.empty() && handles_.empty() && mappings_.empty()) return;
  Logger()->warn(
      "CUDA VMM destroyed with leaked resources: {} reservations, {} physical handles, {} "
      "mapped granules; releasing them",
      reservations_.size(), handles_.size(), mappings_.size());
  ScopedContext scope(driver_, ctx_.get());
  // The device may still be reading leaked memory: let it finish before unmapping.
  if (CUresult r = driver_->cuStreamSynchronize(stream_.get()); r != CUDA_SUCCESS) {
    Logger()->error("CUDA VMM: cuStreamSynchronize failed: {}", CudaErrorText(driver_, r));
  }
  for (const auto& [addr, m] : mappings_) {
    if (CUresult r = driver_->cuMemUnmap(addr, granularity_); r != CUDA_SUCCESS) {
      Logger()->error("CUDA VMM: cuMemUnmap({:#x}) failed: {}", addr, CudaErrorText(driver_, r));
    }
  }
  for (const auto& [id, h] : handles_) {
    if (CUresult r = driver_->cuMemRelease(h.cu); r != CUDA_SUCCESS) {
      Logger()->error("CUDA VMM: cuMemRelease(handle {}) failed: {}", id,
                      CudaErrorText(driver_, r));
    }
  }
  for (const auto& [addr, info] : reservations_) {
    if (CUresult r = driver_->cuMemAddressFree(addr, info.bytes); r != CUDA_SUCCESS) {
      Logger()->error("CUDA VMM: cuMemAddressFree({:#x}, {}) failed: {}", addr, info.bytes,
                      CudaErrorText(driver_, r));
    }
  }
}

absl::Status CudaVmm::CheckAlignedRange(std::string_view op, uintptr_t addr, int64_t bytes) const {
  if (bytes <= 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CUDA VMM %s: size %d is not a positive multiple of the granularity %d", op,
                        bytes, granularity_));
  }
  if (addr % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA VMM %s: address %#x is not aligned to the granularity %d", op, addr, granularity_));
  }
  if (static_cast<uint64_t>(bytes) > std::numeric_limits<uintptr_t>::max() - addr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CUDA VMM %s: range %#x + %d wraps the address space", op, addr, bytes));
  }
  return absl::OkStatus();
}

absl::Status CudaVmm::CheckMapped(std::string_view op, uintptr_t addr, int64_t bytes,
                                  bool need_access) const {
  const uintptr_t g = granularity_;
  const uintptr_t first = addr / g * g;
  const uintptr_t last = (addr + bytes - 1) / g * g;
  for (uintptr_t a = first;; a += g) {
    auto it = mappings_.find(a);
    if (it == mappings_.end()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "CUDA VMM %s: granule %#x of [%#x, +%d) is not mapped", op, a, addr, bytes));
    }
    if (need_access && !it->second.accessible) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "CUDA VMM %s: granule %#x of [%#x, +%d) is mapped but not accessible (no SetAccess)", op,
          a, addr, bytes));
    }
    if (a == last) break;
  }
  return absl::OkStatus();
}

std::map<uintptr_t, CudaVmm::ReservationInfo>::iterator CudaVmm::FindReservation(uintptr_t addr,
                                                                                 int64_t bytes) {
  auto it = reservations_.upper_bound(addr);
  if (it == reservations_.begin()) return reservations_.end();
  --it;
  if (addr + bytes > it->first + it->second.bytes) return reservations_.end();
  return it;
}

absl::StatusOr<uintptr_t> CudaVmm::Reserve(int64_t bytes) {
  OpTimer timer(this, VmmOp::kReserve);
  if (bytes <= 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA VMM reserve: size %d is not a positive multiple of the granularity %d", bytes,
        granularity_));
  }
  ScopedContext scope(driver_, ctx_.get());
  CUdeviceptr ptr = 0;
  if (CUresult r =
          driver_->cuMemAddressReserve(&ptr, static_cast<size_t>(bytes), granularity_, 0, 0);
      r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM reserve: cuMemAddressReserve(%d bytes)", bytes));
  }
  absl::MutexLock lock(&mu_);
  reservations_[ptr] = ReservationInfo{.bytes = bytes};
  return static_cast<uintptr_t>(ptr);
}

absl::Status CudaVmm::FreeReservation(uintptr_t addr, int64_t bytes) {
  OpTimer timer(this, VmmOp::kFreeReservation);
  ReservationInfo info;
  {
    absl::MutexLock lock(&mu_);
    auto it = reservations_.find(addr);
    if (it == reservations_.end() || it->second.bytes != bytes) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "CUDA VMM free_reservation: [%#x, +%d) is not exactly a live reservation%s", addr, bytes,
          it == reservations_.end()
              ? ""
              : absl::StrFormat(" (that one has %d bytes)", it->second.bytes)));
    }
    if (it->second.mapped_granules != 0) {
      return absl::FailedPreconditionError(
          absl::StrFormat("CUDA VMM free_reservation: [%#x, +%d) still has %d mapped granules",
                          addr, bytes, it->second.mapped_granules));
    }
    info = it->second;
    reservations_.erase(it);
  }
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemAddressFree(addr, static_cast<size_t>(bytes)); r != CUDA_SUCCESS) {
    absl::MutexLock lock(&mu_);
    reservations_[addr] = info;  // still reserved: keep tracking it
    return Driver(
        r, absl::StrFormat("CUDA VMM free_reservation: cuMemAddressFree(%#x, %d)", addr, bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<PhysHandle> CudaVmm::Create() {
  OpTimer timer(this, VmmOp::kCreate);
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal_;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  ScopedContext scope(driver_, ctx_.get());
  CUmemGenericAllocationHandle cu = 0;
  if (CUresult r = driver_->cuMemCreate(&cu, static_cast<size_t>(granularity_), &prop, 0);
      r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM create: cuMemCreate(%d bytes on device %d)",
                                     granularity_, ordinal_));
  }
  absl::MutexLock lock(&mu_);
  const PhysHandle handle = next_handle_++;
  handles_[handle] = HandleInfo{.cu = cu};
  return handle;
}

absl::Status CudaVmm::Release(PhysHandle handle) {
  OpTimer timer(this, VmmOp::kRelease);
  HandleInfo info;
  {
    absl::MutexLock lock(&mu_);
    auto it = handles_.find(handle);
    if (it == handles_.end()) {
      return absl::NotFoundError(
          absl::StrFormat("CUDA VMM release: %d is not a live physical handle", handle));
    }
    if (it->second.mappings != 0) {
      return absl::FailedPreconditionError(
          absl::StrFormat("CUDA VMM release: handle %d is still mapped at %d addresses", handle,
                          it->second.mappings));
    }
    info = it->second;
    handles_.erase(it);
  }
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemRelease(info.cu); r != CUDA_SUCCESS) {
    absl::MutexLock lock(&mu_);
    handles_[handle] = info;
    return Driver(r, absl::StrFormat("CUDA VMM release: cuMemRelease(handle %d)", handle));
  }
  return absl::OkStatus();
}

absl::Status CudaVmm::Map(uintptr_t addr, PhysHandle handle) {
  OpTimer timer(this, VmmOp::kMap);
  if (absl::Status s = CheckAlignedRange("map", addr, granularity_); !s.ok()) return s;
  CUmemGenericAllocationHandle cu = 0;
  {
    absl::MutexLock lock(&mu_);
    if (FindReservation(addr, granularity_) == reservations_.end()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("CUDA VMM map: %#x is not inside a live reservation", addr));
    }
    if (mappings_.contains(addr)) {
      return absl::FailedPreconditionError(
          absl::StrFormat("CUDA VMM map: %#x is already mapped", addr));
    }
    auto h = handles_.find(handle);
    if (h == handles_.end()) {
      return absl::NotFoundError(
          absl::StrFormat("CUDA VMM map: %d is not a live physical handle", handle));
    }
    cu = h->second.cu;
  }
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemMap(addr, static_cast<size_t>(granularity_), 0, cu, 0);
      r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM map: cuMemMap(handle %d at %#x)", handle, addr));
  }
  absl::MutexLock lock(&mu_);
  auto res = FindReservation(addr, granularity_);
  auto h = handles_.find(handle);
  if (res == reservations_.end() || h == handles_.end()) {
    // Only a caller racing FreeReservation / Release against this Map gets here.
    Logger()->error("CUDA VMM map: reservation or handle {} vanished during the map at {:#x}",
                    handle, addr);
    return absl::InternalError(absl::StrFormat(
        "CUDA VMM map: reservation or handle %d released concurrently with map at %#x", handle,
        addr));
  }
  mappings_[addr] = MappingInfo{.handle = handle, .reservation = res->first};
  ++h->second.mappings;
  ++res->second.mapped_granules;
  return absl::OkStatus();
}

absl::Status CudaVmm::SetAccess(uintptr_t addr, int64_t bytes) {
  OpTimer timer(this, VmmOp::kSetAccess);
  if (absl::Status s = CheckAlignedRange("set_access", addr, bytes); !s.ok()) return s;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (absl::Status s = CheckMapped("set_access", addr, bytes, /*need_access=*/false); !s.ok()) {
      return s;
    }
  }
  CUmemAccessDesc desc = {};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = ordinal_;
  desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemSetAccess(addr, static_cast<size_t>(bytes), &desc, 1);
      r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM set_access: cuMemSetAccess(%#x, %d)", addr, bytes));
  }
  absl::MutexLock lock(&mu_);
  for (uintptr_t a = addr; a < addr + bytes; a += granularity_) {
    if (auto it = mappings_.find(a); it != mappings_.end()) it->second.accessible = true;
  }
  return absl::OkStatus();
}

absl::Status CudaVmm::Unmap(uintptr_t addr, int64_t bytes) {
  OpTimer timer(this, VmmOp::kUnmap);
  if (absl::Status s = CheckAlignedRange("unmap", addr, bytes); !s.ok()) return s;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (absl::Status s = CheckMapped("unmap", addr, bytes, /*need_access=*/false); !s.ok()) {
      return s;
    }
  }
  ScopedContext scope(driver_, ctx_.get());
  // One call for the whole range: every granule in it is a whole mapping (Map maps one
  // granule), which is what cuMemUnmap requires.
  if (CUresult r = driver_->cuMemUnmap(addr, static_cast<size_t>(bytes)); r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM unmap: cuMemUnmap(%#x, %d)", addr, bytes));
  }
  absl::MutexLock lock(&mu_);
  for (uintptr_t a = addr; a < addr + bytes; a += granularity_) {
    auto it = mappings_.find(a);
    if (it == mappings_.end()) continue;  // only after a concurrent Unmap of the same range
    if (auto h = handles_.find(it->second.handle); h != handles_.end()) --h->second.mappings;
    if (auto res = reservations_.find(it->second.reservation); res != reservations_.end()) {
      --res->second.mapped_granules;
    }
    mappings_.erase(it);
  }
  return absl::OkStatus();
}

absl::Status CudaVmm::Copy(uintptr_t dst, uintptr_t src, int64_t bytes) {
  OpTimer timer(this, VmmOp::kCopy);
  if (bytes < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("CUDA VMM copy: negative size %d", bytes));
  }
  if (bytes == 0) return absl::OkStatus();
  const uint64_t max = std::numeric_limits<uintptr_t>::max();
  if (static_cast<uint64_t>(bytes) > max - dst || static_cast<uint64_t>(bytes) > max - src) {
    return absl::InvalidArgumentError("CUDA VMM copy: range wraps the address space");
  }
  {
    absl::ReaderMutexLock lock(&mu_);
    if (absl::Status s = CheckMapped("copy (source)", src, bytes, true); !s.ok()) return s;
    if (absl::Status s = CheckMapped("copy (destination)", dst, bytes, true); !s.ok()) return s;
  }
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemcpyDtoDAsync(dst, src, static_cast<size_t>(bytes), stream_.get());
      r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM copy: cuMemcpyDtoDAsync(%#x <- %#x, %d bytes)", dst,
                                     src, bytes));
  }
  // Synchronising here orders the copy before every later launch on every stream; copies
  // are rare (copy on write of one partly filled page), so the wait is cheap overall.
  if (CUresult r = driver_->cuStreamSynchronize(stream_.get()); r != CUDA_SUCCESS) {
    return Driver(r, "CUDA VMM copy: cuStreamSynchronize");
  }
  return absl::OkStatus();
}

bool CudaVmm::FenceComplete(const Fence& fence) {
  if (fence.event == nullptr) return true;
  ScopedContext scope(driver_, ctx_.get());
  const CUresult r = driver_->cuEventQuery(static_cast<CUevent>(fence.event));
  if (r == CUDA_SUCCESS) return true;
  if (r != CUDA_ERROR_NOT_READY) {
    // Treated as not complete: reusing memory a kernel may still read is worse than
    // keeping it quarantined.
    Logger()->error("CUDA VMM: cuEventQuery({}) failed: {}; the fence stays incomplete",
                    fence.event, CudaErrorText(driver_, r));
  }
  return false;
}

VmmCounters CudaVmm::counters() const {
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

}  // namespace

absl::StatusOr<std::unique_ptr<Vmm>> MakeCudaVmmImpl(int ordinal) {
  if (ordinal < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CUDA VMM: device ordinal %d is negative", ordinal));
  }
  absl::StatusOr<const CudaDriver*> loaded = GetCudaDriver();
  if (!loaded.ok()) return loaded.status();
  const CudaDriver* driver = *loaded;

  int count = 0;
  if (CUresult r = driver->cuDeviceGetCount(&count); r != CUDA_SUCCESS) {
    return absl::UnavailableError(
        absl::StrFormat("CUDA VMM: cuDeviceGetCount failed: %s", CudaErrorText(driver, r)));
  }
  if (count == 0) return absl::UnavailableError("CUDA VMM: no CUDA device found");
  if (ordinal >= count) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA VMM: no CUDA device with ordinal %d (%d device(s) found)", ordinal, count));
  }
  CUdevice device = 0;
  if (CUresult r = driver->cuDeviceGet(&device, ordinal); r != CUDA_SUCCESS) {
    return CudaStatus(driver, r, absl::StrFormat("CUDA VMM: cuDeviceGet(%d)", ordinal));
  }
  char device_name[256] = {};
  if (driver->cuDeviceGetName(device_name, sizeof(device_name) - 1, device) != CUDA_SUCCESS) {
    device_name[0] = '\0';
  }
  int vmm_supported = 0;
  if (CUresult r = driver->cuDeviceGetAttribute(
          &vmm_supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device);
      r != CUDA_SUCCESS || vmm_supported == 0) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA VMM: device %d (%s) does not support the virtual memory management API", ordinal,
        device_name));
  }

  absl::StatusOr<PrimaryContext> ctx = PrimaryContext::Retain(driver, device);
  if (!ctx.ok()) return ctx.status();

  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal;
  size_t granularity = 0;
  {
    ScopedContext scope(driver, ctx->get());
    if (CUresult r = driver->cuMemGetAllocationGranularity(&granularity, &prop,
                                                           CU_MEM_ALLOC_GRANULARITY_MINIMUM);
        r != CUDA_SUCCESS) {
      return CudaStatus(driver, r, "CUDA VMM: cuMemGetAllocationGranularity");
    }
  }
  if (granularity == 0 || (granularity & (granularity - 1)) != 0) {
    return absl::InternalError(absl::StrFormat(
        "CUDA VMM: driver reports granularity %d, not a power of two", granularity));
  }
  absl::StatusOr<OwnedStream> stream = OwnedStream::Create(driver, ctx->get());
  if (!stream.ok()) return stream.status();

  Logger()->info("CUDA VMM on device {} ({}): granularity {} bytes (minimum)", ordinal, device_name,
                 granularity);
  return std::make_unique<CudaVmm>(driver, ordinal, std::move(*ctx), std::move(*stream),
                                   static_cast<int64_t>(granularity));
}

}  // namespace kvmem::internal
