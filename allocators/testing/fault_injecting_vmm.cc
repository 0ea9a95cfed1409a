// FaultInjectingVmm (declared in kvmem/vmm.h): forwards every call to an inner
// backend except the ones armed to fail, so tests can prove that each layout rolls
// back cleanly when any single backend call fails. A failed call is never forwarded,
// so the inner backend's state is exactly what it would be had the call not been made.
#include "kvmem/testing/fault_injecting_vmm.h"

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "kvmem/vmm.h"

namespace kvmem {
namespace {

constexpr int kNumOps = static_cast<int>(VmmOp::kCount);

// Call numbers are 1-based counts since construction; 0 means "not armed".
struct Trigger {
  int64_t at = 0;    // call number that fires (FailNth) or the first that fires (FailFrom)
  int64_t base = 0;  // count when armed, so messages can say "#n from arming"
  absl::StatusCode code = absl::StatusCode::kResourceExhausted;
};

}  // namespace

struct FaultInjectingVmm::State {
  mutable absl::Mutex mu;
  std::array<int64_t, kNumOps> calls ABSL_GUARDED_BY(mu){};
  std::array<Trigger, kNumOps> nth ABSL_GUARDED_BY(mu){};
  std::array<Trigger, kNumOps> from ABSL_GUARDED_BY(mu){};
  int64_t total ABSL_GUARDED_BY(mu) = 0;
  Trigger any ABSL_GUARDED_BY(mu);
  int64_t injected ABSL_GUARDED_BY(mu) = 0;
  std::optional<DeviceMemory> memory ABSL_GUARDED_BY(mu);
};

FaultInjectingVmm::FaultInjectingVmm(std::shared_ptr<Vmm> inner)
    : inner_(std::move(inner)), state_(std::make_unique<State>()) {}

FaultInjectingVmm::~FaultInjectingVmm() = default;

void FaultInjectingVmm::FailNth(VmmOp op, int64_t n, absl::StatusCode code) {
  const int i = static_cast<int>(op);
  if (i < 0 || i >= kNumOps) return;
  absl::MutexLock lock(&state_->mu);
  const int64_t now = state_->calls[i];
  state_->nth[i] = n > 0 ? Trigger{.at = now + n, .base = now, .code = code} : Trigger{};
}

void FaultInjectingVmm::FailFrom(VmmOp op, int64_t n, absl::StatusCode code) {
  const int i = static_cast<int>(op);
  if (i < 0 || i >= kNumOps) return;
  absl::MutexLock lock(&state_->mu);
  const int64_t now = state_->calls[i];
  state_->from[i] = n > 0 ? Trigger{.at = now + n, .base = now, .code = code} : Trigger{};
}

void FaultInjectingVmm::FailNthAny(int64_t n, absl::StatusCode code) {
  absl::MutexLock lock(&state_->mu);
  const int64_t now = state_->total;
  state_->any = n > 0 ? Trigger{.at = now + n, .base = now, .code = code} : Trigger{};
}

void FaultInjectingVmm::DisarmAll() {
  absl::MutexLock lock(&state_->mu);
  state_->nth.fill(Trigger{});
  state_->from.fill(Trigger{});
  state_->any = Trigger{};
}

int64_t FaultInjectingVmm::calls(VmmOp op) const {
  const int i = static_cast<int>(op);
  if (i < 0 || i >= kNumOps) return 0;
  absl::MutexLock lock(&state_->mu);
  return state_->calls[i];
}

int64_t FaultInjectingVmm::total_calls() const {
  absl::MutexLock lock(&state_->mu);
  return state_->total;
}

int64_t FaultInjectingVmm::injected_failures() const {
  absl::MutexLock lock(&state_->mu);
  return state_->injected;
}

void FaultInjectingVmm::SetAvailableMemory(DeviceMemory memory) {
  absl::MutexLock lock(&state_->mu);
  state_->memory = std::move(memory);
}

void FaultInjectingVmm::ForwardAvailableMemory() {
  absl::MutexLock lock(&state_->mu);
  state_->memory.reset();
}

absl::Status FaultInjectingVmm::Tick(VmmOp op) {
  const int i = static_cast<int>(op);
  absl::MutexLock lock(&state_->mu);
  const int64_t k = ++state_->calls[i];
  const int64_t t = ++state_->total;
  const std::string_view name = VmmOpName(op);
  // Every trigger that fires is consumed, even when another one fires on the same call.
  absl::Status result;
  if (Trigger& nth = state_->nth[i]; nth.at != 0 && nth.at == k) {
    result = absl::Status(nth.code, absl::StrFormat("injected failure of %s call #%d (call %d of "
                                                    "%s since construction)",
                                                    name, k - nth.base, k, name));
    nth = Trigger{};
  }
  if (Trigger& any = state_->any; any.at != 0 && any.at == t) {
    if (result.ok()) {
      result = absl::Status(
          any.code, absl::StrFormat("injected failure of %s call #%d of any op (call %d of %s "
                                    "since construction)",
                                    name, t - any.base, k, name));
    }
    any = Trigger{};
  }
  if (const Trigger& from = state_->from[i]; result.ok() && from.at != 0 && k >= from.at) {
    result =
        absl::Status(from.code, absl::StrFormat("injected failure of %s call #%d (call %d of "
                                                "%s since construction; failing from #%d)",
                                                name, k - from.base, k, name, from.at - from.base));
  }
  if (!result.ok()) ++state_->injected;
  return result;
}

std::string_view FaultInjectingVmm::name() const { return inner_->name(); }
int64_t FaultInjectingVmm::granularity() const { return inner_->granularity(); }
bool FaultInjectingVmm::is_device() const { return inner_->is_device(); }

absl::StatusOr<uintptr_t> FaultInjectingVmm::Reserve(int64_t bytes) {
  if (absl::Status s = Tick(VmmOp::kReserve); !s.ok()) return s;
  return inner_->Reserve(bytes);
}

absl::Status FaultInjectingVmm::FreeReservation(uintptr_t addr, int64_t bytes) {
  if (absl::Status s = Tick(VmmOp::kFreeReservation); !s.ok()) return s;
  return inner_->FreeReservation(addr, bytes);
}

absl::StatusOr<PhysHandle> FaultInjectingVmm::Create() {
  if (absl::Status s = Tick(VmmOp::kCreate); !s.ok()) return s;
  return inner_->Create();
}

absl::Status FaultInjectingVmm::Release(PhysHandle handle) {
  if (absl::Status s = Tick(VmmOp::kRelease); !s.ok()) return s;
  return inner_->Release(handle);
}

absl::Status FaultInjectingVmm::Map(uintptr_t addr, PhysHandle handle) {
  if (absl::Status s = Tick(VmmOp::kMap); !s.ok()) return s;
  return inner_->Map(addr, handle);
}

absl::Status FaultInjectingVmm::SetAccess(uintptr_t addr, int64_t bytes) {
  if (absl::Status s = Tick(VmmOp::kSetAccess); !s.ok()) return s;
  return inner_->SetAccess(addr, bytes);
}

absl::Status FaultInjectingVmm::Unmap(uintptr_t addr, int64_t bytes) {
  if (absl::Status s = Tick(VmmOp::kUnmap); !s.ok()) return s;
  return inner_->Unmap(addr, bytes);
}

absl::Status FaultInjectingVmm::Copy(uintptr_t dst, uintptr_t src, int64_t bytes) {
  if (absl::Status s = Tick(VmmOp::kCopy); !s.ok()) return s;
  return inner_->Copy(dst, src, bytes);
}

bool FaultInjectingVmm::FenceComplete(const Fence& fence) { return inner_->FenceComplete(fence); }

VmmCounters FaultInjectingVmm::counters() const { return inner_->counters(); }

absl::StatusOr<MappingState> FaultInjectingVmm::Query(uintptr_t addr) const {
  return inner_->Query(addr);
}

absl::StatusOr<DeviceMemory> FaultInjectingVmm::AvailableMemory() const {
  {
    absl::MutexLock lock(&state_->mu);
    if (state_->memory.has_value()) return *state_->memory;
  }
  return inner_->AvailableMemory();
}

}  // namespace kvmem
