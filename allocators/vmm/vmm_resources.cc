#include "allocators/vmm/vmm_resources.h"

#include "spdlog/spdlog.h"
#include "src/core/logging.h"

namespace kvmem::internal {

absl::StatusOr<Reservation> Reservation::Make(Vmm* vmm, int64_t bytes) {
  absl::StatusOr<uintptr_t> addr = vmm->Reserve(bytes);
  if (!addr.ok()) return addr.status();
  Reservation r;
  r.vmm_ = vmm;
  r.addr_ = *addr;
  r.size_ = bytes;
  return r;
}

Reservation& Reservation::operator=(Reservation&& o) noexcept {
  if (this != &o) {
    Reset();
    vmm_ = std::exchange(o.vmm_, nullptr);
    addr_ = std::exchange(o.addr_, 0);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void Reservation::Reset() {
  if (vmm_ == nullptr) return;
  absl::Status s = vmm_->FreeReservation(addr_, size_);
  if (!s.ok())
    Logger()->error("freeing reservation {:#x} ({} bytes): {}", addr_, size_, s.ToString());
  vmm_ = nullptr;
  addr_ = 0;
  size_ = 0;
}

absl::StatusOr<PhysicalPage> PhysicalPage::Make(Vmm* vmm) {
  absl::StatusOr<PhysHandle> h = vmm->Create();
  if (!h.ok()) return h.status();
  PhysicalPage p;
  p.vmm_ = vmm;
  p.handle_ = *h;
  return p;
}

PhysicalPage& PhysicalPage::operator=(PhysicalPage&& o) noexcept {
  if (this != &o) {
    Reset();
    vmm_ = std::exchange(o.vmm_, nullptr);
    handle_ = std::exchange(o.handle_, 0);
  }
  return *this;
}

absl::Status PhysicalPage::Release() {
  if (vmm_ == nullptr) return absl::OkStatus();
  absl::Status s = vmm_->Release(handle_);
  if (!s.ok()) return s;
  vmm_ = nullptr;
  handle_ = 0;
  return absl::OkStatus();
}

void PhysicalPage::Reset() {
  if (vmm_ == nullptr) return;
  absl::Status s = vmm_->Release(handle_);
  if (!s.ok()) Logger()->error("releasing physical handle {}: {}", handle_, s.ToString());
  vmm_ = nullptr;
  handle_ = 0;
}

int64_t ReleaseAllOrLog(std::vector<PhysicalPage>* pages, std::string_view owner) {
  int64_t failed = 0;
  int64_t total = 0;
  absl::Status first;
  for (PhysicalPage& page : *pages) {
    if (!page.valid()) continue;
    ++total;
    absl::Status s = page.Release();
    if (s.ok()) continue;
    if (failed++ == 0) first = std::move(s);
    page.Abandon();
  }
  pages->clear();
  if (failed > 0) {
    Logger()->error(
        "{}: releasing {} of {} physical handles failed; they are leaked (the first: {})", owner,
        failed, total, first.ToString());
  }
  return failed;
}

}  // namespace kvmem::internal
