// The threads scenario of kvbench steps: several threads, each driving its own requests
// of one cache, as an engine with one scheduler thread per model replica or a tokenizer
// thread beside the step loop would. Shows whether KvCache's one mutex limits them.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/kv_cache.h"
#include "tools/kvbench/status_macros.h"
#include "tools/kvbench/steps_workloads.h"

namespace kvbench {
namespace {

using kvmem::KvCache;
using kvmem::RequestId;

int64_t RoundUp(int64_t n, int64_t unit) { return (n + unit - 1) / unit * unit; }

}  // namespace

absl::StatusOr<ThreadsFigure> MeasureThreads(const StepsEnv& env, const StepsLayout& layout,
                                             int threads, int per_thread) {
  const StepsTiming& t = env.timing;
  const int total = threads * per_thread;
  // Each rep grows every request by one token on each of the two paths.
  const int64_t growth = 2 * int64_t{t.warmup + t.reps} + 2;
  const std::vector<int64_t> lens(total, kThreadsContext);
  std::vector<int64_t> longest(total, kThreadsContext + growth);
  KVBENCH_ASSIGN_OR_RETURN(
      std::unique_ptr<KvCache> cache,
      MakeStepsCache(env.shape, layout, total, RoundUp(kThreadsContext + growth, 1024), longest));
  std::vector<int64_t> scratch;
  for (int i = 0; i < total; ++i) {
    KVBENCH_RETURN_IF_ERROR(cache->AddRequest(static_cast<RequestId>(i) + 1).status());
    KVBENCH_RETURN_IF_ERROR(Prefill(cache.get(), static_cast<RequestId>(i) + 1, lens[i], &scratch));
  }
  // One rep: every thread runs one step over its requests, between two barriers; the
  // rep's time is the slowest thread's (the wall time of the whole step).
  auto run = [&](bool batch) -> absl::StatusOr<Sample> {
    std::vector<double> ns;
    std::atomic<bool> failed{false};
    std::barrier sync(threads + 1);
    std::atomic<bool> stop{false};
    std::vector<std::thread> workers;
    for (int w = 0; w < threads; ++w) {
      workers.emplace_back([&, w] {
        std::vector<RequestId> ids(per_thread);
        for (int i = 0; i < per_thread; ++i) ids[i] = static_cast<RequestId>(w * per_thread + i) + 1;
        const std::vector<int64_t> ones(per_thread, 1);
        std::vector<int64_t> out(per_thread);
        for (;;) {
          sync.arrive_and_wait();  // start of a rep
          if (stop.load()) return;
          if (batch) {
            failed = failed || !cache->ExtendBatch(ids, ones, absl::MakeSpan(out)).ok();
          } else {
            out.clear();
            for (RequestId id : ids) failed = failed || !cache->ExtendInto(id, 1, &out).ok();
          }
          sync.arrive_and_wait();  // end of a rep
        }
      });
    }
    absl::StatusOr<int> done = Repeat(t, [&](bool timed) -> absl::Status {
      const StepsClock::time_point a = StepsClock::now();
      sync.arrive_and_wait();
      sync.arrive_and_wait();
      const StepsClock::time_point b = StepsClock::now();
      if (timed) ns.push_back(NanosBetween(a, b));
      return failed ? absl::InternalError("an extend failed") : absl::OkStatus();
    });
    stop = true;
    sync.arrive_and_wait();
    for (std::thread& th : workers) th.join();
    if (!done.ok()) return done.status();
    return Summarize(std::move(ns), total);
  };
  ThreadsFigure fig;
  KVBENCH_ASSIGN_OR_RETURN(fig.batch, run(true));
  KVBENCH_ASSIGN_OR_RETURN(fig.per_request, run(false));
  return fig;
}

}  // namespace kvbench
