// The memory backend interface: a narrow model of the CUDA driver's virtual memory
// management API (reserve / create / map / set access / unmap / release), which
// kvmem's layouts are written against. HostVmm implements it with real virtual
// memory on the CPU (PROT_NONE reservations, memfd pages mapped MAP_FIXED), CudaVmm
// with the driver API (kvmem/testing/fault_injecting_vmm.h wraps either to fail chosen calls).
//
// Units: every address and size is in bytes and a multiple of granularity(); one
// physical handle is exactly one granule. The same handle may be mapped at several
// addresses at once (aliasing); that is how prefixes are shared.
//
// Thread safety: implementations are safe to call from several threads.
#ifndef KVMEM_VMM_H_
#define KVMEM_VMM_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/platform.h"

namespace kvmem {

// A point in a device's stream of work. Memory freed with a fence is not reused,
// remapped or unmapped until the fence has completed. `event` is a CUevent on
// the CUDA backend. On the host backend a non-null `event` points to a
// std::atomic<bool> that the owner sets once its (simulated) readers are done, so
// fenced reuse can be tested without a GPU. A null event is complete at once.
struct Fence {
  void* event = nullptr;
};

using PhysHandle = uint64_t;

enum class VmmOp : int {
  kReserve = 0,
  kFreeReservation,
  kCreate,
  kRelease,
  kMap,
  kSetAccess,
  kUnmap,
  kCopy,
  kCount  // number of ops
};
KVMEM_EXPORT std::string_view VmmOpName(VmmOp op);

// Counters every backend keeps: number of calls and nanoseconds spent per op.
// Live counts let tests prove that nothing leaks.
struct VmmCounters {
  std::array<int64_t, static_cast<int>(VmmOp::kCount)> calls{};
  std::array<int64_t, static_cast<int>(VmmOp::kCount)> nanos{};
  int64_t live_reservations = 0;  // reserved and not freed
  int64_t live_handles = 0;       // created and not released
  int64_t mapped_granules = 0;    // granules mapped now (an aliased handle counts per mapping)
};

// What one granule of address space holds, as the backend itself records it.
struct MappingState {
  bool mapped = false;
  PhysHandle handle = 0;    // when mapped
  bool accessible = false;  // SetAccess covered it since it was mapped
};

// The physical memory of a backend's device, as its driver reports it at the time asked.
struct DeviceMemory {
  int64_t free_bytes = 0;   // what new physical handles can still take
  int64_t total_bytes = 0;  // the device's whole memory
  std::string device;       // what the numbers are of, for messages: "CUDA device 0 (NVIDIA H100)"
};

class KVMEM_EXPORT Vmm {
 public:
  virtual ~Vmm() = default;

  virtual std::string_view name() const = 0;
  // Bytes of one physical handle and the alignment of every address and size.
  virtual int64_t granularity() const = 0;
  // True when mapped memory is device memory (the host cannot dereference it).
  virtual bool is_device() const = 0;

  // Reserves `bytes` of address space with no memory behind it.
  virtual absl::StatusOr<uintptr_t> Reserve(int64_t bytes) = 0;
  // REQUIRES: [addr, addr + bytes) is a whole reservation with nothing mapped.
  virtual absl::Status FreeReservation(uintptr_t addr, int64_t bytes) = 0;

  // Creates one granule of physical memory. Out of memory is ResourceExhausted.
  virtual absl::StatusOr<PhysHandle> Create() = 0;
  // REQUIRES: the handle is mapped nowhere.
  virtual absl::Status Release(PhysHandle handle) = 0;

  // Maps `handle` at `addr` (one granule inside a reservation). The memory is not
  // accessible until SetAccess covers it, as with the driver.
  virtual absl::Status Map(uintptr_t addr, PhysHandle handle) = 0;
  // Makes [addr, addr + bytes) readable and writable; every granule must be mapped.
  virtual absl::Status SetAccess(uintptr_t addr, int64_t bytes) = 0;
  // Unmaps [addr, addr + bytes); every granule must be mapped.
  virtual absl::Status Unmap(uintptr_t addr, int64_t bytes) = 0;

  // Copies bytes between mapped, accessible addresses (any alignment). On a device
  // the copy is ordered before later work on the backend's stream.
  virtual absl::Status Copy(uintptr_t dst, uintptr_t src, int64_t bytes) = 0;

  // True once the work before `fence` has finished. A null fence is complete.
  virtual bool FenceComplete(const Fence& fence) = 0;

  virtual VmmCounters counters() const = 0;

  // What is mapped at the granule at `addr` (granule-aligned), so that a layout's
  // CheckInvariants can compare its records with the backend's. Not a backend call (not
  // counted, never injected to fail). Unimplemented where a backend cannot tell.
  virtual absl::StatusOr<MappingState> Query(uintptr_t addr) const {
    return absl::UnimplementedError("this memory backend cannot be queried");
  }

  // The device's free and total physical memory now (cuMemGetInfo on the CUDA backend),
  // so that a layout can check before creating any handle that what it creates up front
  // fits (allocators/vmm/device_memory.h). Not a backend call (not counted, never injected
  // to fail). Unimplemented where the backend has no such bound: the host backend without
  // a physical cap, whose memory is taken only as pages are written.
  virtual absl::StatusOr<DeviceMemory> AvailableMemory() const {
    return absl::UnimplementedError("this memory backend does not report its free memory");
  }
};

// Real virtual memory on the CPU. `granularity` is a power of two and a multiple of
// the OS page size (4 KiB, or 2 MiB to mirror GPUs). `max_physical_bytes` caps what
// Create() hands out (0: no cap) so out-of-memory can be exercised; with a cap,
// AvailableMemory() reports it as the device's memory (free: the cap less the live
// handles), as a GPU of that size would.
KVMEM_EXPORT absl::StatusOr<std::unique_ptr<Vmm>> MakeHostVmm(int64_t granularity,
                                                 int64_t max_physical_bytes = 0);

// The CUDA driver backend on device `ordinal`. Unavailable where the library was
// built without CUDA or where no driver / GPU is found (the status says which).
KVMEM_EXPORT absl::StatusOr<std::unique_ptr<Vmm>> MakeCudaVmm(int ordinal);

}  // namespace kvmem

#endif  // KVMEM_VMM_H_
