// RAII owners of backend resources: a reservation and a physical handle. Their
// destructors give the resource back and log (never throw) if the backend fails.
// Mapped ranges are tracked by the layouts, which unmap before these are destroyed.
#ifndef KVMEM_ALLOCATORS_VMM_VMM_RESOURCES_H_
#define KVMEM_ALLOCATORS_VMM_VMM_RESOURCES_H_

#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

class Reservation {
 public:
  Reservation() = default;
  static absl::StatusOr<Reservation> Make(Vmm* vmm, int64_t bytes);
  ~Reservation() { Reset(); }
  Reservation(Reservation&& o) noexcept { *this = std::move(o); }
  Reservation& operator=(Reservation&& o) noexcept;
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;

  uintptr_t addr() const { return addr_; }
  int64_t size() const { return size_; }
  bool valid() const { return vmm_ != nullptr; }
  void Reset();

 private:
  Vmm* vmm_ = nullptr;
  uintptr_t addr_ = 0;
  int64_t size_ = 0;
};

class PhysicalPage {
 public:
  PhysicalPage() = default;
  static absl::StatusOr<PhysicalPage> Make(Vmm* vmm);
  ~PhysicalPage() { Reset(); }
  PhysicalPage(PhysicalPage&& o) noexcept { *this = std::move(o); }
  PhysicalPage& operator=(PhysicalPage&& o) noexcept;
  PhysicalPage(const PhysicalPage&) = delete;
  PhysicalPage& operator=(const PhysicalPage&) = delete;

  PhysHandle handle() const { return handle_; }
  bool valid() const { return vmm_ != nullptr; }
  // Releases the handle now. On failure the handle stays owned (and valid), so the
  // caller can retry instead of leaking it; Reset() only logs.
  absl::Status Release();
  void Reset();
  // Forgets the handle without releasing it (the caller has logged it as leaked).
  void Abandon() {
    vmm_ = nullptr;
    handle_ = 0;
  }

 private:
  Vmm* vmm_ = nullptr;
  PhysHandle handle_ = 0;
};

// Releases every valid page of `pages` and clears the vector. A page whose release
// fails is abandoned (the backend keeps it: leaked), and all such failures make one log
// line under `owner`, with their count and the first error: destructors and failed
// calls give back thousands of handles at once, and one cause (a backend that cannot
// unmap) would otherwise log a line per handle. Returns the number that failed.
int64_t ReleaseAllOrLog(std::vector<PhysicalPage>* pages, std::string_view owner);

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VMM_VMM_RESOURCES_H_
