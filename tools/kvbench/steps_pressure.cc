// The pressure scenario of kvbench steps: decode steps of a batch whose requests end and
// start on a rotation, at an ample budget and at 1.02x the bytes the batch held, so that
// growth must take memory back (the virtual layout from rows that ended requests keep).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "kvmem/batch_metadata.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "kvmem/running_batch.h"
#include "kvmem/stats.h"
#include "tools/kvbench/status_macros.h"
#include "tools/kvbench/steps_workloads.h"

namespace kvbench {
namespace {

using kvmem::KvCache;
using kvmem::RequestId;

// A batch of prompts.size() requests in groups of `group`: each step the next group's
// requests end and new ones start with the same prompts, so a request lives one rotation
// (groups() steps) and the batch's bytes go round the same cycle.
class Rotation {
 public:
  Rotation(KvCache* cache, std::vector<int64_t> prompts, int group)
      : cache_(cache), prompts_(std::move(prompts)), group_(group), ids_(prompts_.size()) {}

  int groups() const { return static_cast<int>((prompts_.size() + group_ - 1) / group_); }
  absl::Span<const RequestId> ids() const { return ids_; }

  // Starts every request as far into its life as the rotation has it in its steady state
  // (group g has decoded groups() - g steps when step 0 comes), so that step 0 is
  // already like every later one.
  absl::Status Start() {
    for (size_t j = 0; j < ids_.size(); ++j) {
      const int g = static_cast<int>(j / group_);
      KVBENCH_RETURN_IF_ERROR(StartOne(j, g == 0 ? 0 : groups() - g));
    }
    return absl::OkStatus();
  }

  // Starts the successors of the next group's requests, then ends those (an engine
  // admits at the start of a step and frees what finished at its end), so the rows of
  // ended requests stay idle, keeping their pages, until memory runs short or the next
  // step's requests start in them. With `running`, the new ids take the old ones' entries
  // in the running batch.
  absl::Status Churn(bool running) {
    const size_t begin = static_cast<size_t>(step_ % groups()) * group_;
    const size_t end = std::min(ids_.size(), begin + group_);
    ++step_;
    ending_.assign(ids_.begin() + begin, ids_.begin() + end);
    for (size_t j = begin; j < end; ++j) KVBENCH_RETURN_IF_ERROR(StartOne(j, 0));
    KVBENCH_RETURN_IF_ERROR(cache_->FreeBatch(ending_));
    if (running) KVBENCH_RETURN_IF_ERROR(cache_->SetRunningBatch(ids_));
    return absl::OkStatus();
  }

 private:
  absl::Status StartOne(size_t j, int64_t decoded) {
    ids_[j] = next_id_++;
    KVBENCH_RETURN_IF_ERROR(cache_->AddRequest(ids_[j]).status());
    return Prefill(cache_, ids_[j], prompts_[j] + decoded, &scratch_);
  }

  KvCache* cache_;
  std::vector<int64_t> prompts_;
  int group_;
  std::vector<RequestId> ids_;
  std::vector<RequestId> ending_;
  RequestId next_id_ = 1;
  int64_t step_ = 0;
  std::vector<int64_t> scratch_;
};

struct PhaseResult {
  Sample step;
  double churn_us_per_step = 0;
  double reclaimed_per_step = 0;
};

// Decode steps of `rotation` (churn untimed, then the step timed) through the batch path
// or the per-request path. The first phase of a cache warms up over a whole rotation
// first, so that every row has been reused before the timing.
absl::StatusOr<PhaseResult> RunPhase(const StepsTiming& timing, KvCache* cache, Rotation* rotation,
                                     bool batched, bool first) {
  const int batch = static_cast<int>(rotation->ids().size());
  const std::vector<int64_t> ones(batch, 1);
  std::vector<int64_t> out(batch);
  std::vector<int64_t> locs;
  locs.reserve(batch);
  kvmem::BatchMetadata meta;
  std::vector<double> step_ns;
  double churn_ns = 0;
  int steps = 0;
  auto step = [&](bool timed) -> absl::Status {
    const StepsClock::time_point t0 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(rotation->Churn(batched));
    const StepsClock::time_point t1 = StepsClock::now();
    const absl::Span<const RequestId> ids = rotation->ids();
    if (batched) {
      KVBENCH_RETURN_IF_ERROR(cache->ExtendBatch(ids, ones, absl::MakeSpan(out)));
      Consume(cache->RunningBatch().max_seq_len + out.back());
    } else {
      locs.clear();
      for (RequestId id : ids) KVBENCH_RETURN_IF_ERROR(cache->ExtendInto(id, 1, &locs));
      KVBENCH_RETURN_IF_ERROR(cache->BuildBatchMetadata(ids, &meta));
      Consume(meta.max_seq_len + locs.back());
    }
    const StepsClock::time_point t2 = StepsClock::now();
    churn_ns += NanosBetween(t0, t1);
    ++steps;
    if (timed) step_ns.push_back(NanosBetween(t1, t2));
    return absl::OkStatus();
  };
  KVBENCH_RETURN_IF_ERROR(batched ? cache->SetRunningBatch(rotation->ids())
                                  : cache->SetRunningBatch({}));
  const int64_t reclaimed_before = cache->GetStats().pages_reclaimed;
  for (int i = 0; first && i < rotation->groups(); ++i) KVBENCH_RETURN_IF_ERROR(step(false));
  KVBENCH_RETURN_IF_ERROR(Repeat(timing, step).status());
  PhaseResult r;
  r.step = Summarize(step_ns, batch);
  r.churn_us_per_step = churn_ns / 1e3 / steps;
  r.reclaimed_per_step =
      static_cast<double>(cache->GetStats().pages_reclaimed - reclaimed_before) / steps;
  return r;
}

}  // namespace

absl::StatusOr<PressureFigure> MeasurePressure(const StepsEnv& env, const StepsLayout& layout,
                                               int batch, int64_t context_min, int64_t context_max,
                                               int64_t max_tokens) {
  const int group = std::max(1, batch / 64);
  const int lifetime = (batch + group - 1) / group;  // steps
  const std::vector<int64_t> prompts =
      ContextMix(batch, context_min, context_max, lifetime + 1, max_tokens);
  std::vector<int64_t> longest = prompts;
  for (int64_t& n : longest) n += lifetime + 1;
  const int64_t max_context =
      (*std::max_element(longest.begin(), longest.end()) + 1023) / 1024 * 1024;
  // Rows to spare, as an engine keeps (at least a group's: the new requests start before
  // the old ones end).
  const int rows = batch + batch / 4 + 1;

  PressureFigure fig;
  fig.context_min = *std::min_element(prompts.begin(), prompts.end());
  fig.context_max = *std::max_element(prompts.begin(), prompts.end());
  {
    KVBENCH_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                             MakeStepsCache(env.shape, layout, rows, max_context, longest, 1.5));
    Rotation rotation(cache.get(), prompts, group);
    KVBENCH_RETURN_IF_ERROR(rotation.Start());
    KVBENCH_ASSIGN_OR_RETURN(PhaseResult ample,
                             RunPhase(env.timing, cache.get(), &rotation, true, true));
    fig.ample = ample.step;
    fig.peak_held_bytes = cache->GetStats().peak_held_bytes;
  }

  kvmem::KvCacheConfig config = StepsConfig(env.shape, layout, rows, max_context, 0);
  KVBENCH_ASSIGN_OR_RETURN(const kvmem::MemoryPlan minimal, kvmem::PlanMinimalMemory(config));
  // Whole granules of every paged pool (K and V of each layer): a paged budget buys
  // only those.
  const int64_t g = 2 * int64_t{env.shape.layers} * env.shape.granularity;
  config.memory_budget_bytes =
      std::max(minimal.min_budget_bytes, (fig.peak_held_bytes * 102 / 100 + g - 1) / g * g);
  fig.budget_bytes = config.memory_budget_bytes;
  KVBENCH_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache, KvCache::Create(config));
  Rotation rotation(cache.get(), prompts, group);
  auto pressed = [&](absl::Status s) {
    return absl::Status(s.code(),
                        absl::StrCat("at a budget of ", fig.budget_bytes,
                                     " bytes (1.02x the ample run's peak): ", s.message()));
  };
  if (absl::Status s = rotation.Start(); !s.ok()) return pressed(s);
  absl::StatusOr<PhaseResult> batched = RunPhase(env.timing, cache.get(), &rotation, true, true);
  if (!batched.ok()) return pressed(batched.status());
  fig.pressure = batched->step;
  fig.churn_us_per_step = batched->churn_us_per_step;
  fig.reclaimed_per_step = batched->reclaimed_per_step;
  absl::StatusOr<PhaseResult> single = RunPhase(env.timing, cache.get(), &rotation, false, false);
  if (!single.ok()) return pressed(single.status());
  fig.per_request = single->step;
  return fig;
}

}  // namespace kvbench
