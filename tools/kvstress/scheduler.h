// The serving simulation: continuous batching over one real KvCache, one step at a time.
//
// Each step:
//   1. requests whose arrival_step has come join the waiting queue (FIFO);
//   2. decode: every running request, oldest first, grows by one token (Extend 1). On
//      ResourceExhausted the most recently admitted running request is preempted (Free,
//      back to the front of the queue; its prompt and generated tokens are recomputed
//      when it is admitted again, as vLLM's recompute preemption does) and the growth is
//      retried. A request that reaches prompt_len + output_len tokens finishes (Free);
//   3. admission (skipped in a step that preempted, as vLLM does): waiting requests, FIFO, while
//   memory allows: AddRequest + Extend by
//      prompt (+ tokens generated before a preemption). With a prefix group and a policy
//      that shares prefixes, the request Forks from the group's prefix holder (a request
//      holding just the shared prefix, created on demand and freed with the group's last
//      member) and Extends its own part. The first request that does not fit stops
//      admission for the step (head-of-line FIFO);
//   4. the cache's Stats are sampled.
// Requests admitted in a step start growing in the next one. The run ends when every
// request has finished (drained) or at max_steps.
#ifndef KVMEM_TOOLS_KVSTRESS_SCHEDULER_H_
#define KVMEM_TOOLS_KVSTRESS_SCHEDULER_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "kvmem/stats.h"
#include "tools/kvstress/policies.h"
#include "tools/kvstress/workload.h"

namespace kvstress {

struct SimOptions {
  int64_t max_steps = 1'000'000;
  // Run KvCache::CheckInvariants every this many steps (0: only at the end). Tests use 1.
  int64_t check_invariants_every = 0;
  // Keep the per-step series (for --json and --plot).
  bool keep_series = true;
};

// The cache after one step.
struct StepSample {
  int32_t running = 0;
  int32_t waiting = 0;
  int64_t held_bytes = 0;
  int64_t live_bytes = 0;
  int64_t idle_bytes = 0;
  int64_t mapped_bytes = 0;
};

struct SimResult {
  std::string policy;
  std::string config;  // kvmem::DescribeConfig of the policy's cache
  int64_t steps = 0;   // steps simulated (to drain, when drained)
  bool drained = false;

  int64_t requests = 0;    // in the workload
  int64_t admissions = 0;  // including re-admissions after preemption
  int64_t preemptions = 0;
  int64_t finished = 0;
  int64_t prefix_forks = 0;     // requests that started from a shared prefix
  int64_t holders_created = 0;  // prefix holders prefilled

  int64_t peak_running = 0;
  double mean_running = 0;  // running requests after each step, averaged over steps
  // Steps from a request's arrival to its first admission, averaged over the requests
  // admitted (NaN when none was): the queueing a smaller footprint saves.
  double mean_wait_steps = std::numeric_limits<double>::quiet_NaN();

  // Utilisation = live / held bytes (Stats). Time-averaged: sum of live over steps /
  // sum of held over steps (byte-weighted, so near-empty steps at start and drain do not
  // dominate). At peak: at the step with the most held bytes. NaN when no step held a
  // byte: there is nothing to measure, and 100 % would claim a perfect run.
  double utilisation_mean = std::numeric_limits<double>::quiet_NaN();
  double utilisation_at_peak = std::numeric_limits<double>::quiet_NaN();
  // 1 - utilisation_mean: held bytes that hold no live token (NaN with it).
  double internal_fragmentation = std::numeric_limits<double>::quiet_NaN();
  int64_t peak_held_bytes = 0;
  int64_t peak_held_step = -1;
  int64_t peak_live_bytes = 0;

  int64_t output_tokens = 0;      // decode tokens that survived (= total output when drained)
  int64_t prefill_tokens = 0;     // tokens prefilled, recomputation included
  int64_t recomputed_tokens = 0;  // of which generated tokens recomputed after preemption
  // output_tokens / steps. A running request decodes one token per step, so this is
  // mean_running less preemptions / steps (a request preempted in a step was counted
  // running after the step before and decoded nothing): the table shows mean_running.
  double tokens_per_step = 0;

  // kvmem calls made by the scheduler (AddRequest, Extend, Fork, Free) and the steady-clock
  // time spent inside them; backend (VMM) calls and time from Stats.
  int64_t kvmem_calls = 0;
  int64_t kvmem_nanos = 0;
  int64_t vmm_calls = 0;
  int64_t vmm_nanos = 0;
  double wall_seconds = 0;

  kvmem::Stats final_stats;
  std::vector<StepSample> series;  // one per step, when SimOptions::keep_series
};

struct SimProgress {
  const std::string* policy;
  int64_t step;
  int64_t running;
  int64_t waiting;
  int64_t finished;
  int64_t total;
};

// Simulates `workload` on a fresh KvCache made from `config` under `policy`'s sharing
// rule. Errors: the cache cannot be created (bad config, no device), a request cannot fit
// even in an empty cache (FailedPrecondition), or kvmem fails other than with
// ResourceExhausted (passed through with the step and call). `on_step` (may be empty) is
// called after every step.
absl::StatusOr<SimResult> Simulate(const Workload& workload, const Policy& policy,
                                   const kvmem::KvCacheConfig& config, const SimOptions& options,
                                   const std::function<void(const SimProgress&)>& on_step = {});

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_SCHEDULER_H_
