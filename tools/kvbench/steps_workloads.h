// The scenarios of kvbench steps: what an engine asks of a KvCache on the host around
// each model step, each timed through the per-request calls engines make today and
// through the batch calls (KvCache::ExtendBatch, TruncateBatch, FreeBatch and the running
// batch). Each builds its own host cache (steps_common.h), times whole batches with
// std::chrono::steady_clock, and returns figures per request, token or call. Nothing here
// prints; steps_bench.cc does.
#ifndef KVMEM_TOOLS_KVBENCH_STEPS_WORKLOADS_H_
#define KVMEM_TOOLS_KVBENCH_STEPS_WORKLOADS_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/steps_common.h"

namespace kvbench {

// Requests that start and end together in the churn scenario.
inline constexpr int kChurnGroup = 8;
// Tokens of the prefix every rewind request is forked from: not a whole page or chunk,
// so each child's first extend copies the shared last page, as real prompts do.
inline constexpr int64_t kRewindPrefix = 2000;

// Decode: every request of the batch grows by one token per step. per_request: ExtendInto(id,
// 1) for each request, then BuildBatchMetadata(ids) (the step as engines call it today;
// extend_into and build_metadata are its two parts). batch: one ExtendBatch(ids, ones,
// out) and a read of RunningBatch(), the running batch set once before. ns per request.
struct DecodeFigure {
  Sample batch;
  Sample per_request;
  Sample extend_into;
  Sample build_metadata;
  int64_t context_min = 0;  // the batch's contexts when the timing started
  int64_t context_max = 0;
};
absl::StatusOr<DecodeFigure> MeasureDecode(const StepsEnv& env, const StepsLayout& layout,
                                           int batch, int64_t context_min, int64_t context_max,
                                           int64_t max_tokens);

// Prefill: one new request extended by `tokens`. batch: ExtendBatch into a buffer the
// caller keeps; per_request: Extend(id, n), which returns a new vector; trimmed: ExtendBatch
// after Trim() gave back the memory that ended requests left (new memory is mapped). Each
// request ends before the next starts. ns per token.
struct PrefillFigure {
  Sample batch;
  Sample per_request;
  Sample trimmed;
};
absl::StatusOr<PrefillFigure> MeasurePrefill(const StepsEnv& env, const StepsLayout& layout,
                                             int64_t tokens);

// Churn: a cache of `rows` rows, all but kChurnGroup holding a one-token request;
// kChurnGroup requests start (AddRequest) and end. batch: AddRequest each + one FreeBatch;
// per_request: AddRequest each + Free each. ns per request (start and end); add, free and
// free_batch are the parts.
struct ChurnFigure {
  Sample batch;
  Sample per_request;
  Sample add;
  Sample free;
  Sample free_batch;
};
absl::StatusOr<ChurnFigure> MeasureChurn(const StepsEnv& env, const StepsLayout& layout, int rows);

// Fork: Fork(parent, child) of a parent of `prefix` tokens that `siblings` children
// already share, then Free(child). ns per call.
struct ForkFigure {
  Sample fork;
  Sample free;
};
absl::StatusOr<ForkFigure> MeasureFork(const StepsEnv& env, const StepsLayout& layout,
                                       int64_t prefix, int siblings);

// Speculative rewinds: `batch` requests forked from one kRewindPrefix-token request; each
// step extends every one by k in [1, 8] draft tokens (ExtendBatch; `extend`), then
// rewinds each by r in [1, k] rejected ones. batch: one TruncateBatch; per_request:
// Truncate for each request. ns per request.
struct RewindFigure {
  Sample batch;
  Sample per_request;
  Sample extend;
};
absl::StatusOr<RewindFigure> MeasureRewind(const StepsEnv& env, const StepsLayout& layout,
                                           int batch);

// Decode under memory pressure: before every step, batch / 64 new requests (at least one)
// start with the prompts of as many old ones, which then end (untimed); then the decode
// step is timed. pressure: the batch path at a budget 1.02x the peak bytes the batch held
// in a run at an ample budget (ample: that run, also the batch path); per_request: the
// per-request path (DecodeFigure) at the pressed budget. ns per request.
struct PressureFigure {
  Sample pressure;
  Sample ample;
  Sample per_request;
  int64_t budget_bytes = 0;       // the pressed cache's
  int64_t peak_held_bytes = 0;    // of the ample run
  double reclaimed_per_step = 0;  // virtual pages taken back from idle rows (pressed, batch path)
  double churn_us_per_step = 0;   // the untimed ends and starts (pressed, batch path)
  int64_t context_min = 0;
  int64_t context_max = 0;
};
absl::StatusOr<PressureFigure> MeasurePressure(const StepsEnv& env, const StepsLayout& layout,
                                               int batch, int64_t context_min, int64_t context_max,
                                               int64_t max_tokens);

// Tokens every request of the threads scenario holds.
inline constexpr int64_t kThreadsContext = 2048;

// Threads (steps_threads.cc): `threads` threads, each with its own `per_thread` requests
// of one cache, all growing every request by one token per step at once. batch: one
// ExtendBatch per thread and step; per_request: ExtendInto for each request. A step's
// time is the wall time until every thread is done; ns per request (of all threads), so
// a figure that stays flat as threads are added means they run side by side.
struct ThreadsFigure {
  Sample batch;
  Sample per_request;
};
absl::StatusOr<ThreadsFigure> MeasureThreads(const StepsEnv& env, const StepsLayout& layout,
                                             int threads, int per_thread);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_STEPS_WORKLOADS_H_
