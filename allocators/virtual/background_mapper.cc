#include "allocators/virtual/background_mapper.h"

#include <utility>

#include "src/core/logging.h"

namespace kvmem::internal {

BackgroundMapper::BackgroundMapper(absl::Mutex* mu, Steps steps, absl::Duration retry_delay)
    : mu_(mu), steps_(std::move(steps)), retry_delay_(retry_delay) {
  thread_ = std::thread([this] { Loop(); });
}

BackgroundMapper::~BackgroundMapper() {
  {
    absl::MutexLock lock(mu_);
    stop_ = true;
    wake_.SignalAll();
  }
  thread_.join();
}

void BackgroundMapper::Notify() {
  pending_ = true;
  idle_ = false;
  wake_.Signal();
}

bool BackgroundMapper::WaitIdle(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!idle_ && !stop_) {
    if (changed_.WaitWithDeadline(mu_, deadline)) return idle_ || stop_;
  }
  return true;
}

void BackgroundMapper::WaitForJob() {
  while (running_) changed_.Wait(mu_);
}

void BackgroundMapper::Loop() {
  mu_->Lock();
  while (!stop_) {
    if (absl::Now() < retry_at_) {
      // Backing off after a failure; Notify and the destructor wake us early.
      wake_.WaitWithDeadline(mu_, retry_at_);
      continue;
    }
    pending_ = false;
    if (steps_.plan()) {
      running_ = true;
      idle_ = false;
      mu_->Unlock();
      absl::Status s = steps_.run();
      mu_->Lock();
      if (!s.ok()) {
        ++failures_;
        retry_at_ = absl::Now() + retry_delay_;
        Logger()->warn("background mapper: job failed, retrying in {}: {}",
                       absl::FormatDuration(retry_delay_), s.ToString());
      }
      steps_.finish(std::move(s));
      ++jobs_done_;
      running_ = false;
      changed_.SignalAll();
      continue;
    }
    // plan() ran under the lock, so no Notify came in between: nothing to do now.
    idle_ = true;
    changed_.SignalAll();
    while (!stop_ && !pending_) wake_.Wait(mu_);
  }
  mu_->Unlock();
}

}  // namespace kvmem::internal
