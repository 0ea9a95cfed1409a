// What the kvbench steps scenarios (steps_workloads.h) share: the host cache of a layout
// with a budget that fits a workload, the context mix of a batch, and the loop that
// repeats and times a figure.
#ifndef KVMEM_TOOLS_KVBENCH_STEPS_COMMON_H_
#define KVMEM_TOOLS_KVBENCH_STEPS_COMMON_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "tools/kvbench/settings.h"

namespace kvbench {

// Model shape and host page of every steps cache (Llama-3-8B's heads, fewer layers:
// StepsSettings says why).
struct StepsShape {
  int layers = 1;
  int kv_heads = 8;
  int head_dim = 128;
  int64_t granularity = int64_t{2} << 20;
};

// How a figure is repeated: up to `warmup` untimed reps, then up to `reps` timed ones.
// Each loop stops early once it has run `max_ms` (the warm-up after one rep, the timed
// reps after kMinReps): a step of the per-request path at page size 1 takes a second.
struct StepsTiming {
  int warmup = 20;
  int reps = 200;
  int max_ms = 2000;
};
inline constexpr int kMinReps = 3;

// What every scenario is given.
struct StepsEnv {
  StepsShape shape;
  StepsTiming timing;
};

// Median and minimum over the reps of one figure, per unit (request, token or call).
struct Sample {
  double median = 0;
  double min = 0;
  int reps = 0;
};
// `ns`: one value per timed rep (the whole batch); `units`: what one rep did.
Sample Summarize(std::vector<double> ns, double units);

using StepsClock = std::chrono::steady_clock;
inline double NanosBetween(StepsClock::time_point a, StepsClock::time_point b) {
  return std::chrono::duration<double, std::nano>(b - a).count();
}

// Runs rep(false) for the warm-up, then rep(true) for the timed reps (see StepsTiming);
// rep records its own timings when told. Returns the timed reps done, or the first error.
template <typename Rep>
absl::StatusOr<int> Repeat(const StepsTiming& t, Rep&& rep) {
  const StepsClock::time_point warm = StepsClock::now();
  for (int i = 0; i < t.warmup; ++i) {
    if (absl::Status s = rep(false); !s.ok()) return s;
    if (NanosBetween(warm, StepsClock::now()) > t.max_ms * 1e6) break;
  }
  const StepsClock::time_point start = StepsClock::now();
  int done = 0;
  while (done < t.reps) {
    if (absl::Status s = rep(true); !s.ok()) return s;
    ++done;
    if (done >= kMinReps && NanosBetween(start, StepsClock::now()) > t.max_ms * 1e6) break;
  }
  return done;
}

// The cache config of `layout` in `shape`, for max_requests rows of max_context tokens.
kvmem::KvCacheConfig StepsConfig(const StepsShape& shape, const StepsLayout& layout,
                                 int max_requests, int64_t max_context, int64_t budget_bytes);

// The budget that holds requests of `lengths` tokens, none shared, each rounded up to
// the layout's unit of growth (a page, a chunk), with a few granules to spare; at least
// the smallest budget the config takes.
absl::StatusOr<int64_t> BudgetFor(const kvmem::KvCacheConfig& config,
                                  absl::Span<const int64_t> lengths);

// A host cache of `layout` whose budget holds `lengths` (BudgetFor) times `scale`.
absl::StatusOr<std::unique_ptr<kvmem::KvCache>> MakeStepsCache(
    const StepsShape& shape, const StepsLayout& layout, int max_requests, int64_t max_context,
    absl::Span<const int64_t> lengths, double scale = 1.25);

// Contexts of `batch` requests spread geometrically over [min, max], in no sorted order
// (a low-discrepancy sequence, so a batch of any size spans the range), scaled down
// together where their sum plus `growth` tokens each would pass `max_tokens`.
std::vector<int64_t> ContextMix(int batch, int64_t min, int64_t max, int64_t growth,
                                int64_t max_tokens);

// Extends request `id` by `n` tokens with ExtendBatch, through *scratch (resized to fit).
absl::Status Prefill(kvmem::KvCache* cache, kvmem::RequestId id, int64_t n,
                     std::vector<int64_t>* scratch);

// Keeps a value the compiler would otherwise drop (a timed call's result).
void Consume(int64_t v);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_STEPS_COMMON_H_
