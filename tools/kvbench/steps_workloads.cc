// The decode, prefill, churn, fork and rewind scenarios of kvbench steps (the pressure
// one is in steps_pressure.cc). Each times whole batches, never single requests: the
// clock costs tens of nanoseconds, as much as what is measured.
#include "tools/kvbench/steps_workloads.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/batch_metadata.h"
#include "kvmem/kv_cache.h"
#include "kvmem/running_batch.h"
#include "tools/kvbench/status_macros.h"

namespace kvbench {
namespace {

using kvmem::KvCache;
using kvmem::RequestId;

int64_t RoundUp(int64_t n, int64_t unit) { return (n + unit - 1) / unit * unit; }

// Adds requests ids[i] with lens[i] tokens each.
absl::Status AddAll(KvCache* cache, absl::Span<const RequestId> ids,
                    absl::Span<const int64_t> lens) {
  std::vector<int64_t> scratch;
  for (size_t i = 0; i < ids.size(); ++i) {
    KVBENCH_RETURN_IF_ERROR(cache->AddRequest(ids[i]).status());
    KVBENCH_RETURN_IF_ERROR(Prefill(cache, ids[i], lens[i], &scratch));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DecodeFigure> MeasureDecode(const StepsEnv& env, const StepsLayout& layout,
                                           int batch, int64_t context_min, int64_t context_max,
                                           int64_t max_tokens) {
  const StepsTiming& t = env.timing;
  // Two paths, each growing every request by one token per rep.
  const int64_t growth = 2 * int64_t{t.warmup + t.reps};
  const std::vector<int64_t> lens = ContextMix(batch, context_min, context_max, growth, max_tokens);
  std::vector<int64_t> longest = lens;
  for (int64_t& n : longest) n += growth;
  const int64_t max_context = RoundUp(*std::max_element(longest.begin(), longest.end()), 1024);
  KVBENCH_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                           MakeStepsCache(env.shape, layout, batch, max_context, longest));
  std::vector<RequestId> ids(batch);
  for (int i = 0; i < batch; ++i) ids[i] = static_cast<RequestId>(i) + 1;
  KVBENCH_RETURN_IF_ERROR(AddAll(cache.get(), ids, lens));

  DecodeFigure fig;
  fig.context_min = *std::min_element(lens.begin(), lens.end());
  fig.context_max = *std::max_element(lens.begin(), lens.end());

  // (a) The per-request path, with no running batch set (engines that call it keep none).
  std::vector<double> step_ns, extend_ns, meta_ns;
  std::vector<int64_t> locs;
  locs.reserve(batch);
  kvmem::BatchMetadata meta;
  auto per_request_step = [&](bool timed) -> absl::Status {
    locs.clear();
    const StepsClock::time_point t0 = StepsClock::now();
    for (RequestId id : ids) {
      KVBENCH_RETURN_IF_ERROR(cache->ExtendInto(id, 1, &locs));
    }
    const StepsClock::time_point t1 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(cache->BuildBatchMetadata(ids, &meta));
    const StepsClock::time_point t2 = StepsClock::now();
    Consume(meta.max_seq_len + locs.back());
    if (timed) {
      step_ns.push_back(NanosBetween(t0, t2));
      extend_ns.push_back(NanosBetween(t0, t1));
      meta_ns.push_back(NanosBetween(t1, t2));
    }
    return absl::OkStatus();
  };
  KVBENCH_RETURN_IF_ERROR(Repeat(t, per_request_step).status());
  fig.per_request = Summarize(step_ns, batch);
  fig.extend_into = Summarize(extend_ns, batch);
  fig.build_metadata = Summarize(meta_ns, batch);

  // (b) The batch path: the running batch is set once; each step is one call and a read
  // of the arrays the kernels would be given.
  KVBENCH_RETURN_IF_ERROR(cache->SetRunningBatch(ids));
  const std::vector<int64_t> ones(batch, 1);
  std::vector<int64_t> out(batch);
  step_ns.clear();
  auto batch_step = [&](bool timed) -> absl::Status {
    const StepsClock::time_point t0 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(cache->ExtendBatch(ids, ones, absl::MakeSpan(out)));
    const kvmem::RunningBatchView view = cache->RunningBatch();
    const StepsClock::time_point t1 = StepsClock::now();
    Consume(view.max_seq_len + out.back());
    if (timed) step_ns.push_back(NanosBetween(t0, t1));
    return absl::OkStatus();
  };
  KVBENCH_RETURN_IF_ERROR(Repeat(t, batch_step).status());
  fig.batch = Summarize(step_ns, batch);
  return fig;
}

absl::StatusOr<PrefillFigure> MeasurePrefill(const StepsEnv& env, const StepsLayout& layout,
                                             int64_t tokens) {
  // Room for two requests of `tokens`: a freed row may keep its pages (virtual) while the
  // next request maps its own.
  const std::vector<int64_t> lens = {tokens, tokens};
  KVBENCH_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                           MakeStepsCache(env.shape, layout, 4, tokens, lens));
  std::vector<int64_t> buffer(tokens);
  RequestId next = 1;
  std::vector<double> batch_ns, request_ns, trimmed_ns;
  auto rep = [&](bool timed) -> absl::Status {
    RequestId id = next++;
    KVBENCH_RETURN_IF_ERROR(cache->AddRequest(id).status());
    const StepsClock::time_point t0 = StepsClock::now();
    KVBENCH_ASSIGN_OR_RETURN(std::vector<int64_t> locs, cache->Extend(id, tokens));
    const StepsClock::time_point t1 = StepsClock::now();
    Consume(locs.back());
    KVBENCH_RETURN_IF_ERROR(cache->Free(id));

    id = next++;
    KVBENCH_RETURN_IF_ERROR(cache->AddRequest(id).status());
    const StepsClock::time_point t2 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(Prefill(cache.get(), id, tokens, &buffer));
    const StepsClock::time_point t3 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(cache->Free(id));

    KVBENCH_RETURN_IF_ERROR(cache->Trim().status());
    id = next++;
    KVBENCH_RETURN_IF_ERROR(cache->AddRequest(id).status());
    const StepsClock::time_point t4 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(Prefill(cache.get(), id, tokens, &buffer));
    const StepsClock::time_point t5 = StepsClock::now();
    Consume(buffer[tokens - 1]);
    KVBENCH_RETURN_IF_ERROR(cache->Free(id));
    if (timed) {
      request_ns.push_back(NanosBetween(t0, t1));
      batch_ns.push_back(NanosBetween(t2, t3));
      trimmed_ns.push_back(NanosBetween(t4, t5));
    }
    return absl::OkStatus();
  };
  KVBENCH_RETURN_IF_ERROR(Repeat(env.timing, rep).status());
  PrefillFigure fig;
  fig.batch = Summarize(batch_ns, tokens);
  fig.per_request = Summarize(request_ns, tokens);
  fig.trimmed = Summarize(trimmed_ns, tokens);
  return fig;
}

absl::StatusOr<ChurnFigure> MeasureChurn(const StepsEnv& env, const StepsLayout& layout, int rows) {
  const int occupants = rows - kChurnGroup;
  const std::vector<int64_t> lens(occupants, 1);
  KVBENCH_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                           MakeStepsCache(env.shape, layout, rows, 4096, lens));
  std::vector<RequestId> ids(occupants);
  for (int i = 0; i < occupants; ++i) ids[i] = static_cast<RequestId>(i) + 1;
  KVBENCH_RETURN_IF_ERROR(AddAll(cache.get(), ids, lens));

  RequestId next = static_cast<RequestId>(rows) + 1;
  std::vector<RequestId> group(kChurnGroup);
  auto add_group = [&]() -> absl::Status {
    for (RequestId& id : group) {
      id = next++;
      KVBENCH_RETURN_IF_ERROR(cache->AddRequest(id).status());
    }
    return absl::OkStatus();
  };
  std::vector<double> add_ns, free_ns, free_batch_ns, request_ns, batch_ns;
  auto rep = [&](bool timed) -> absl::Status {
    const StepsClock::time_point t0 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(add_group());
    const StepsClock::time_point t1 = StepsClock::now();
    for (RequestId id : group) KVBENCH_RETURN_IF_ERROR(cache->Free(id));
    const StepsClock::time_point t2 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(add_group());
    const StepsClock::time_point t3 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(cache->FreeBatch(group));
    const StepsClock::time_point t4 = StepsClock::now();
    if (timed) {
      add_ns.push_back(NanosBetween(t0, t1));
      add_ns.push_back(NanosBetween(t2, t3));
      free_ns.push_back(NanosBetween(t1, t2));
      free_batch_ns.push_back(NanosBetween(t3, t4));
      request_ns.push_back(NanosBetween(t0, t2));
      batch_ns.push_back(NanosBetween(t2, t4));
    }
    return absl::OkStatus();
  };
  KVBENCH_RETURN_IF_ERROR(Repeat(env.timing, rep).status());
  ChurnFigure fig;
  fig.batch = Summarize(batch_ns, kChurnGroup);
  fig.per_request = Summarize(request_ns, kChurnGroup);
  fig.add = Summarize(add_ns, kChurnGroup);
  fig.free = Summarize(free_ns, kChurnGroup);
  fig.free_batch = Summarize(free_batch_ns, kChurnGroup);
  return fig;
}

absl::StatusOr<ForkFigure> MeasureFork(const StepsEnv& env, const StepsLayout& layout,
                                       int64_t prefix, int siblings) {
  // Forks share the parent's memory: the budget of one request holds them all.
  const std::vector<int64_t> lens = {prefix};
  KVBENCH_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                           MakeStepsCache(env.shape, layout, siblings + 2, prefix, lens));
  constexpr RequestId kParent = 1;
  KVBENCH_RETURN_IF_ERROR(AddAll(cache.get(), {&kParent, 1}, lens));
  for (int i = 0; i < siblings; ++i) {
    KVBENCH_RETURN_IF_ERROR(cache->Fork(kParent, kParent + 1 + i).status());
  }
  RequestId next = kParent + 1 + siblings;
  std::vector<double> fork_ns, free_ns;
  auto rep = [&](bool timed) -> absl::Status {
    const RequestId child = next++;
    const StepsClock::time_point t0 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(cache->Fork(kParent, child).status());
    const StepsClock::time_point t1 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(cache->Free(child));
    const StepsClock::time_point t2 = StepsClock::now();
    if (timed) {
      fork_ns.push_back(NanosBetween(t0, t1));
      free_ns.push_back(NanosBetween(t1, t2));
    }
    return absl::OkStatus();
  };
  KVBENCH_RETURN_IF_ERROR(Repeat(env.timing, rep).status());
  return ForkFigure{Summarize(fork_ns, 1), Summarize(free_ns, 1)};
}

absl::StatusOr<RewindFigure> MeasureRewind(const StepsEnv& env, const StepsLayout& layout,
                                           int batch) {
  const StepsTiming& t = env.timing;
  // A step keeps at most 7 of its at most 8 draft tokens; two paths run.
  const int64_t growth = 7 * 2 * int64_t{t.warmup + t.reps};
  const int64_t max_context = RoundUp(kRewindPrefix + growth + 8, 1024);
  // Budgeted as if nothing were shared: the children's copies of the prefix's last page
  // and their own tokens fit, with room.
  const std::vector<int64_t> budget_lens(batch + 1, kRewindPrefix + growth + 8);
  KVBENCH_ASSIGN_OR_RETURN(
      std::unique_ptr<KvCache> cache,
      MakeStepsCache(env.shape, layout, batch + 1, max_context, budget_lens, 1.0));
  const RequestId parent = static_cast<RequestId>(batch) + 1;
  KVBENCH_RETURN_IF_ERROR(AddAll(cache.get(), {&parent, 1}, {&kRewindPrefix, 1}));
  std::vector<RequestId> ids(batch);
  std::vector<int64_t> lens(batch, kRewindPrefix);
  for (int i = 0; i < batch; ++i) {
    ids[i] = static_cast<RequestId>(i) + 1;
    KVBENCH_RETURN_IF_ERROR(cache->Fork(parent, ids[i]).status());
  }

  std::mt19937 rng(1);
  std::uniform_int_distribution<int> draft(1, 8);
  std::vector<int64_t> ks(batch), new_lens(batch), out(8 * int64_t{batch});
  std::vector<double> extend_ns, truncate_ns;
  // One step: every request gets k draft tokens and keeps k - r of them.
  auto step = [&](bool timed, bool batched) -> absl::Status {
    for (int64_t& k : ks) k = draft(rng);
    const StepsClock::time_point t0 = StepsClock::now();
    KVBENCH_RETURN_IF_ERROR(cache->ExtendBatch(ids, ks, absl::MakeSpan(out)));
    const StepsClock::time_point t1 = StepsClock::now();
    for (int i = 0; i < batch; ++i) {
      const int64_t rejected = std::uniform_int_distribution<int64_t>(1, ks[i])(rng);
      new_lens[i] = lens[i] + ks[i] - rejected;
    }
    const StepsClock::time_point t2 = StepsClock::now();
    if (batched) {
      KVBENCH_RETURN_IF_ERROR(cache->TruncateBatch(ids, new_lens));
    } else {
      for (int i = 0; i < batch; ++i) {
        KVBENCH_RETURN_IF_ERROR(cache->Truncate(ids[i], new_lens[i]));
      }
    }
    const StepsClock::time_point t3 = StepsClock::now();
    Consume(out[0]);
    lens.swap(new_lens);
    if (timed) {
      extend_ns.push_back(NanosBetween(t0, t1));
      truncate_ns.push_back(NanosBetween(t2, t3));
    }
    return absl::OkStatus();
  };
  RewindFigure fig;
  KVBENCH_RETURN_IF_ERROR(Repeat(t, [&](bool timed) { return step(timed, false); }).status());
  fig.per_request = Summarize(truncate_ns, batch);
  truncate_ns.clear();
  KVBENCH_RETURN_IF_ERROR(Repeat(t, [&](bool timed) { return step(timed, true); }).status());
  fig.batch = Summarize(truncate_ns, batch);
  fig.extend = Summarize(extend_ns, batch);
  return fig;
}

}  // namespace kvbench
