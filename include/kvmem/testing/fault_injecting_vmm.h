// FaultInjectingVmm: a memory backend decorator for tests. It forwards every call to
// another backend, except the calls a test chose to fail, so every failure path of the
// layouts can be driven on purpose. Test-only: it lives in the kvmem_testing library,
// which production code does not link.
#ifndef KVMEM_TESTING_FAULT_INJECTING_VMM_H_
#define KVMEM_TESTING_FAULT_INJECTING_VMM_H_

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/vmm.h"

namespace kvmem {

// Wraps `inner`, forwarding every call, except that the chosen calls fail.
// Thread-safe.
class FaultInjectingVmm : public Vmm {
 public:
  explicit FaultInjectingVmm(std::shared_ptr<Vmm> inner);
  ~FaultInjectingVmm() override;

  // The n-th call of `op` from now (1-based) fails with `code`; 0 disarms.
  void FailNth(VmmOp op, int64_t n, absl::StatusCode code = absl::StatusCode::kResourceExhausted);
  // Every call of `op` fails from the n-th on, until disarmed.
  void FailFrom(VmmOp op, int64_t n, absl::StatusCode code = absl::StatusCode::kResourceExhausted);
  void DisarmAll();
  // Calls of `op` seen since construction (failed ones included).
  int64_t calls(VmmOp op) const;
  // Total calls of all ops that can fail (every op except FenceComplete).
  int64_t total_calls() const;
  // The n-th call of any op from now fails (counts across ops).
  void FailNthAny(int64_t n, absl::StatusCode code = absl::StatusCode::kResourceExhausted);
  int64_t injected_failures() const;
  // AvailableMemory() reports `memory` instead of the inner backend's (a small or a full
  // device), until ForwardAvailableMemory().
  void SetAvailableMemory(DeviceMemory memory);
  void ForwardAvailableMemory();

  std::string_view name() const override;
  int64_t granularity() const override;
  bool is_device() const override;
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
  // Forwarded; never fails by injection (it is not a backend call).
  absl::StatusOr<MappingState> Query(uintptr_t addr) const override;
  // What SetAvailableMemory set, else forwarded; never fails by injection.
  absl::StatusOr<DeviceMemory> AvailableMemory() const override;

 private:
  struct State;
  absl::Status Tick(VmmOp op);
  std::shared_ptr<Vmm> inner_;
  std::unique_ptr<State> state_;
};

}  // namespace kvmem

#endif  // KVMEM_TESTING_FAULT_INJECTING_VMM_H_
