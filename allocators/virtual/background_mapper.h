// BackgroundMapper: the thread of the virtual layout that maps pages ahead of demand, so
// that decode steps find their pages mapped and never wait for the driver
// (cuMemMap + cuMemSetAccess cost ~32 us per page: docs/layouts.md).
//
// The mapper knows nothing about pages. Its owner supplies three steps and the mutex
// that guards the owner's state:
//   plan():        under *mu. Picks the next job and reserves what it needs (takes
//                  handles, marks pages in flight); false when there is nothing to do now.
//   run():         WITHOUT the lock: the slow backend calls of the planned job.
//   finish(s):     under *mu. Commits the job, or undoes the reservation if run() failed.
// A failed job is logged, counted and retried after `retry_delay` (never fatal).
//
// Thread safety: Notify, WaitIdle, WaitForJob and the accessors REQUIRE *mu held; the
// thread takes *mu itself. The destructor stops and joins the thread (REQUIRES *mu not
// held by the caller); a job in flight is finished first.
#ifndef KVMEM_ALLOCATORS_VIRTUAL_BACKGROUND_MAPPER_H_
#define KVMEM_ALLOCATORS_VIRTUAL_BACKGROUND_MAPPER_H_

#include <cstdint>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kvmem::internal {

class BackgroundMapper {
 public:
  struct Steps {
    absl::AnyInvocable<bool()> plan;
    absl::AnyInvocable<absl::Status()> run;
    absl::AnyInvocable<void(absl::Status)> finish;
  };

  // Starts the thread. `mu` must outlive this object.
  BackgroundMapper(absl::Mutex* mu, Steps steps,
                   absl::Duration retry_delay = absl::Milliseconds(10));
  ~BackgroundMapper();
  BackgroundMapper(const BackgroundMapper&) = delete;
  BackgroundMapper& operator=(const BackgroundMapper&) = delete;

  // There may be new work: the thread calls plan() again.
  void Notify() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Waits until the mapper has nothing it can do now: plan() found no job after the last
  // Notify, no job is in flight and no retry is pending. False on timeout.
  bool WaitIdle(absl::Duration timeout) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Waits (releasing *mu meanwhile) until no job is in flight.
  void WaitForJob() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // True while a planned job has not been finished.
  bool job_in_flight() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return running_; }
  int64_t jobs_done() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return jobs_done_; }
  int64_t failures() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return failures_; }

 private:
  void Loop();

  absl::Mutex* const mu_;
  Steps steps_;
  const absl::Duration retry_delay_;
  absl::CondVar wake_;     // Notify or stop
  absl::CondVar changed_;  // a job finished or the mapper went idle
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool pending_ ABSL_GUARDED_BY(mu_) = true;  // plan() must run again
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  bool idle_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time retry_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int64_t jobs_done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t failures_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;  // last: started once every member above exists
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_BACKGROUND_MAPPER_H_
