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
#include "allocators/vmm/cuda_driver.h"
#include "allocators/vmm/cuda_vmm_factory.h"
#include "allocators/vmm/vmm_ledger.h"
#include "kvmem/vmm.h"
#include "src/core/logging.h"

namespace kvmem::internal {
namespace {

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
  CudaVmm(const CudaDriver* driver, int ordinal, std::string device_name, PrimaryContext ctx,
          OwnedStream stream, int64_t granularity)
      : driver_(driver),
        ordinal_(ordinal),
        device_name_(std::move(device_name)),
        ctx_(std::move(ctx)),
        stream_(std::move(stream)),
        granularity_(granularity),
        ledger_("CUDA VMM", granularity) {}
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
  // From the ledger, which records what the driver calls did (no driver call).
  absl::StatusOr<MappingState> Query(uintptr_t addr) const override;
  // cuMemGetInfo in the device's context: its free and total memory now.
  absl::StatusOr<DeviceMemory> AvailableMemory() const override;

 private:
  absl::Status Driver(CUresult r, std::string_view what) const {
    return CudaStatus(driver_, r, what);
  }

  const CudaDriver* const driver_;
  const int ordinal_;
  const std::string device_name_;
  // Destroyed after stream_ (members are destroyed in reverse order).
  PrimaryContext ctx_;
  OwnedStream stream_;
  const int64_t granularity_;

  mutable absl::Mutex mu_;
  // Under mu_, but for CheckAlignedRange and CheckCopyArgs (they read only constants).
  VmmLedger ledger_;

  VmmOpStats stats_;
  // Failed cuEventQuery calls: the first is logged as an error, later ones at debug
  // level (a broken context fails every poll of every quarantined page).
  std::atomic<int64_t> fence_query_failures_{0};
};

CudaVmm::~CudaVmm() {
  absl::MutexLock lock(&mu_);
  if (ledger_.empty()) return;
  // One summary line for all of it, however many resources leaked, and one more only if
  // giving them back fails (docs/errors.md).
  Logger()->warn(
      "CUDA VMM destroyed with leaked resources: {} reservations, {} physical handles, {} "
      "mapped granules; releasing them",
      ledger_.reservations().size(), ledger_.handles().size(), ledger_.mappings().size());
  FailureTally synced("cuStreamSynchronize before releasing them");
  FailureTally unmapped("cuMemUnmap of mapped granules");
  FailureTally released("cuMemRelease of physical handles");
  FailureTally freed("cuMemAddressFree of reservations");
  ScopedContext scope(driver_, ctx_.get());
  // The device may still be reading leaked memory: let it finish before unmapping.
  if (CUresult r = driver_->cuStreamSynchronize(stream_.get()); r != CUDA_SUCCESS) {
    synced.Failed(CudaErrorText(driver_, r));
  }
  for (const auto& [addr, m] : ledger_.mappings()) {
    if (CUresult r = driver_->cuMemUnmap(addr, granularity_); r != CUDA_SUCCESS) {
      unmapped.Failed(absl::StrFormat("%#x: %s", addr, CudaErrorText(driver_, r)));
    } else {
      unmapped.Succeeded();
    }
  }
  for (const auto& [id, h] : ledger_.handles()) {
    if (CUresult r = driver_->cuMemRelease(static_cast<CUmemGenericAllocationHandle>(h.backing));
        r != CUDA_SUCCESS) {
      released.Failed(absl::StrFormat("handle %d: %s", id, CudaErrorText(driver_, r)));
    } else {
      released.Succeeded();
    }
  }
  for (const auto& [addr, info] : ledger_.reservations()) {
    if (CUresult r = driver_->cuMemAddressFree(addr, info.bytes); r != CUDA_SUCCESS) {
      freed.Failed(
          absl::StrFormat("%#x (%d bytes): %s", addr, info.bytes, CudaErrorText(driver_, r)));
    } else {
      freed.Succeeded();
    }
  }
  if (synced.failed() + unmapped.failed() + released.failed() + freed.failed() > 0) {
    Logger()->error("CUDA VMM: giving back the leaked resources failed: {}",
                    JoinFailures({&synced, &unmapped, &released, &freed}, ""));
  }
}

absl::StatusOr<uintptr_t> CudaVmm::Reserve(int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kReserve);
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
  ledger_.AddReservation(ptr, VmmLedger::Reservation{.bytes = bytes});
  return static_cast<uintptr_t>(ptr);
}

absl::Status CudaVmm::FreeReservation(uintptr_t addr, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kFreeReservation);
  VmmLedger::Reservation info;
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status s = ledger_.CheckFreeReservation(addr, bytes); !s.ok()) return s;
    info = ledger_.EraseReservation(addr);
  }
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemAddressFree(addr, static_cast<size_t>(bytes)); r != CUDA_SUCCESS) {
    absl::MutexLock lock(&mu_);
    ledger_.AddReservation(addr, info);  // still reserved: keep tracking it
    return Driver(
        r, absl::StrFormat("CUDA VMM free_reservation: cuMemAddressFree(%#x, %d)", addr, bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<PhysHandle> CudaVmm::Create() {
  VmmOpStats::Timer timer(&stats_, VmmOp::kCreate);
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
  static_assert(sizeof(CUmemGenericAllocationHandle) <= sizeof(uint64_t));
  return ledger_.AddHandle(static_cast<uint64_t>(cu));
}

absl::Status CudaVmm::Release(PhysHandle handle) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kRelease);
  VmmLedger::Handle info;
  {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<VmmLedger::Handle> checked = ledger_.CheckRelease(handle);
    if (!checked.ok()) return checked.status();
    info = *checked;
    ledger_.EraseHandle(handle);
  }
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemRelease(static_cast<CUmemGenericAllocationHandle>(info.backing));
      r != CUDA_SUCCESS) {
    absl::MutexLock lock(&mu_);
    ledger_.RestoreHandle(handle, info);
    return Driver(r, absl::StrFormat("CUDA VMM release: cuMemRelease(handle %d)", handle));
  }
  return absl::OkStatus();
}

absl::Status CudaVmm::Map(uintptr_t addr, PhysHandle handle) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kMap);
  if (absl::Status s = ledger_.CheckAlignedRange("map", addr, granularity_); !s.ok()) return s;
  CUmemGenericAllocationHandle cu = 0;
  {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<uint64_t> backing = ledger_.CheckMap(addr, handle);
    if (!backing.ok()) return backing.status();
    cu = static_cast<CUmemGenericAllocationHandle>(*backing);
  }
  ScopedContext scope(driver_, ctx_.get());
  if (CUresult r = driver_->cuMemMap(addr, static_cast<size_t>(granularity_), 0, cu, 0);
      r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM map: cuMemMap(handle %d at %#x)", handle, addr));
  }
  absl::MutexLock lock(&mu_);
  if (!ledger_.AddMapping(addr, handle)) {
    // Only a caller racing FreeReservation / Release against this Map gets here. The
    // status is the one report (no log line besides it).
    return absl::InternalError(absl::StrFormat(
        "CUDA VMM map: reservation or handle %d released concurrently with map at %#x", handle,
        addr));
  }
  return absl::OkStatus();
}

absl::Status CudaVmm::SetAccess(uintptr_t addr, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kSetAccess);
  if (absl::Status s = ledger_.CheckAlignedRange("set_access", addr, bytes); !s.ok()) return s;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (absl::Status s = ledger_.CheckMapped("set_access", addr, bytes, /*need_access=*/false);
        !s.ok()) {
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
  ledger_.SetAccessible(addr, bytes);
  return absl::OkStatus();
}

absl::Status CudaVmm::Unmap(uintptr_t addr, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kUnmap);
  if (absl::Status s = ledger_.CheckAlignedRange("unmap", addr, bytes); !s.ok()) return s;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (absl::Status s = ledger_.CheckMapped("unmap", addr, bytes, /*need_access=*/false);
        !s.ok()) {
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
  ledger_.RemoveMappings(addr, bytes);
  return absl::OkStatus();
}

absl::Status CudaVmm::Copy(uintptr_t dst, uintptr_t src, int64_t bytes) {
  VmmOpStats::Timer timer(&stats_, VmmOp::kCopy);
  if (absl::Status s = ledger_.CheckCopyArgs(dst, src, bytes); !s.ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  {
    absl::ReaderMutexLock lock(&mu_);
    if (absl::Status s = ledger_.CheckMapped("copy (source)", src, bytes, true); !s.ok()) return s;
    if (absl::Status s = ledger_.CheckMapped("copy (destination)", dst, bytes, true); !s.ok())
      return s;
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
    // keeping it quarantined. Every poll of every page behind such a fence fails the
    // same way, so only the first failure is an error line.
    const int64_t n = fence_query_failures_.fetch_add(1, std::memory_order_relaxed) + 1;
    Logger()->log(n == 1 ? spdlog::level::err : spdlog::level::debug,
                  "CUDA VMM: cuEventQuery({}) failed: {}; the fence stays incomplete (failure "
                  "{} of cuEventQuery; after the first, failures are logged at debug level)",
                  fence.event, CudaErrorText(driver_, r), n);
  }
  return false;
}

absl::StatusOr<DeviceMemory> CudaVmm::AvailableMemory() const {
  ScopedContext scope(driver_, ctx_.get());
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  if (CUresult r = driver_->cuMemGetInfo(&free_bytes, &total_bytes); r != CUDA_SUCCESS) {
    return Driver(r, absl::StrFormat("CUDA VMM: cuMemGetInfo on device %d", ordinal_));
  }
  return DeviceMemory{
      .free_bytes = static_cast<int64_t>(free_bytes),
      .total_bytes = static_cast<int64_t>(total_bytes),
      .device = device_name_.empty()
                    ? absl::StrFormat("CUDA device %d", ordinal_)
                    : absl::StrFormat("CUDA device %d (%s)", ordinal_, device_name_),
  };
}

VmmCounters CudaVmm::counters() const {
  VmmCounters c;
  stats_.Fill(&c);
  absl::ReaderMutexLock lock(&mu_);
  ledger_.FillLive(&c);
  return c;
}

absl::StatusOr<MappingState> CudaVmm::Query(uintptr_t addr) const {
  absl::ReaderMutexLock lock(&mu_);
  return ledger_.Query(addr);
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
  return std::make_unique<CudaVmm>(driver, ordinal, std::string(device_name), std::move(*ctx),
                                   std::move(*stream), static_cast<int64_t>(granularity));
}

}  // namespace kvmem::internal
