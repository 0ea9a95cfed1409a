#include "tools/kvstress/scheduler.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <memory>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kvmem/kv_cache.h"

namespace kvstress {
namespace {

using Clock = std::chrono::steady_clock;
using kvmem::KvCache;
using kvmem::RequestId;

// Prefix holders live in their own id space, away from request indices.
constexpr RequestId kHolderIdBase = RequestId{1} << 62;

class Simulation {
 public:
  Simulation(const Workload& w, const Policy& policy, std::unique_ptr<KvCache> cache,
             const SimOptions& options)
      : w_(w),
        policy_(policy),
        cache_(std::move(cache)),
        options_(options),
        generated_(w.requests.size(), 0),
        admitted_once_(w.requests.size(), false) {
    result_.policy = policy.name;
    result_.config = kvmem::DescribeConfig(cache_->config());
    result_.requests = static_cast<int64_t>(w.requests.size());
  }

  bool Done() const {
    return next_arrival_ == w_.requests.size() && waiting_.empty() && running_.empty();
  }
  int64_t step() const { return step_; }

  absl::Status Step() {
    while (next_arrival_ < w_.requests.size() && w_.requests[next_arrival_].arrival_step <= step_) {
      waiting_.push_back(next_arrival_++);
    }
    const int64_t preemptions_before = result_.preemptions;
    if (absl::Status s = Decode(); !s.ok()) return s;
    // As vLLM's scheduler: no prefill in a step that had to preempt (memory is short, and
    // the victim would only be re-admitted to be preempted again).
    if (result_.preemptions == preemptions_before) {
      if (absl::Status s = Admit(); !s.ok()) return s;
    }
    Sample();
    ++step_;
    if (options_.check_invariants_every > 0 && step_ % options_.check_invariants_every == 0) {
      if (absl::Status s = cache_->CheckInvariants(); !s.ok()) return Context(s, "CheckInvariants");
    }
    return absl::OkStatus();
  }

  SimProgress Progress() const {
    return {&policy_.name,
            step_,
            static_cast<int64_t>(running_.size()),
            static_cast<int64_t>(waiting_.size()),
            result_.finished,
            result_.requests};
  }

  absl::StatusOr<SimResult> Finish(double wall_seconds) {
    if (absl::Status s = cache_->CheckInvariants(); !s.ok()) return Context(s, "CheckInvariants");
    SimResult& r = result_;
    r.steps = step_;
    r.drained = Done();
    r.wall_seconds = wall_seconds;
    r.final_stats = cache_->GetStats();
    r.vmm_calls = r.final_stats.vmm_calls();
    r.vmm_nanos = r.final_stats.vmm_nanos();
    if (step_ > 0) {
      r.mean_running = static_cast<double>(running_sum_) / step_;
      r.tokens_per_step = static_cast<double>(r.output_tokens) / step_;
    }
    if (first_admissions_ > 0)
      r.mean_wait_steps = static_cast<double>(wait_sum_) / first_admissions_;
    if (held_sum_ > 0) r.utilisation_mean = static_cast<double>(live_sum_) / held_sum_;
    r.internal_fragmentation = 1.0 - r.utilisation_mean;
    return std::move(result_);
  }

 private:
  struct Running {
    size_t index;    // into w_.requests
    int64_t length;  // tokens held now
    int64_t target;  // prompt_len + output_len
  };
  struct Holder {
    int64_t members = 0;
  };

  static RequestId HolderId(int32_t group) { return kHolderIdBase + static_cast<RequestId>(group); }

  absl::Status Context(const absl::Status& s, const std::string& call) const {
    return absl::Status(s.code(), absl::StrFormat("policy %s, step %d, %s: %s", policy_.name, step_,
                                                  call, s.message()));
  }

  // Times one kvmem call and counts it.
  template <typename F>
  auto Timed(F&& f) {
    const auto t0 = Clock::now();
    auto r = f();
    result_.kvmem_nanos +=
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    ++result_.kvmem_calls;
    return r;
  }

  absl::Status Extend(RequestId id, int64_t n) {
    locs_.clear();
    return Timed([&] { return cache_->ExtendInto(id, n, &locs_); });
  }
  absl::Status AddRequest(RequestId id) {
    return Timed([&] { return cache_->AddRequest(id); }).status();
  }
  absl::Status Fork(RequestId parent, RequestId child) {
    return Timed([&] { return cache_->Fork(parent, child); }).status();
  }
  absl::Status Free(RequestId id) {
    absl::Status s = Timed([&] { return cache_->Free(id); });
    return s.ok() ? s : Context(s, absl::StrFormat("Free(%d)", id));
  }

  // Drops one member of `group`'s prefix holder; the last one out frees it.
  absl::Status LeaveGroup(size_t index) {
    const Request& q = w_.requests[index];
    if (!policy_.shares_prefixes || q.prefix_group < 0) return absl::OkStatus();
    auto it = holders_.find(q.prefix_group);
    if (it == holders_.end() || --it->second.members > 0) return absl::OkStatus();
    holders_.erase(it);
    return Free(HolderId(q.prefix_group));
  }

  absl::Status Retire(size_t pos) {
    const size_t index = running_[pos].index;
    if (absl::Status s = Free(index); !s.ok()) return s;
    running_.erase(running_.begin() + pos);
    return LeaveGroup(index);
  }

  absl::Status Decode() {
    for (size_t i = 0; i < running_.size();) {
      Running& r = running_[i];
      absl::Status s = Extend(r.index, 1);
      if (s.ok()) {
        ++r.length;
        ++generated_[r.index];
        ++result_.output_tokens;
        if (r.length == r.target) {
          ++result_.finished;
          if (absl::Status f = Retire(i); !f.ok()) return f;
        } else {
          ++i;
        }
        continue;
      }
      if (!absl::IsResourceExhausted(s)) {
        return Context(s, absl::StrFormat("Extend(request %d, 1)", r.index));
      }
      if (running_.size() == 1) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "policy %s, step %d: request %d cannot grow to %d tokens even alone in the cache "
            "(%s); the budget is too small for this workload",
            policy_.name, step_, r.index, r.length + 1, s.message()));
      }
      // Preempt the most recently admitted request (possibly this one). Its generated
      // tokens stay generated; only their KV is recomputed at re-admission.
      const bool self = i == running_.size() - 1;
      const size_t victim = running_.back().index;
      if (absl::Status f = Retire(running_.size() - 1); !f.ok()) return f;
      waiting_.push_front(victim);
      ++result_.preemptions;
      if (self) break;
    }
    return absl::OkStatus();
  }

  // Tries to admit waiting request `index`. Returns false (and leaves the cache as it
  // was) when it does not fit now.
  absl::StatusOr<bool> TryAdmit(size_t index) {
    const Request& q = w_.requests[index];
    const int64_t length = q.prompt_len + generated_[index];
    const bool share = policy_.shares_prefixes && q.prefix_group >= 0;
    int64_t prefilled = length;
    auto full = [](const absl::Status& s) { return absl::IsResourceExhausted(s); };
    if (!share) {
      if (absl::Status s = AddRequest(index); !s.ok()) {
        if (full(s)) return false;
        return Context(s, absl::StrFormat("AddRequest(%d)", index));
      }
      if (absl::Status s = Extend(index, length); !s.ok()) {
        if (absl::Status f = Free(index); !f.ok()) return f;
        if (full(s)) return false;
        return Context(s, absl::StrFormat("Extend(request %d, %d)", index, length));
      }
    } else {
      const RequestId holder = HolderId(q.prefix_group);
      bool created = false;
      auto drop_new_holder = [&]() -> absl::Status {
        return created ? Free(holder) : absl::OkStatus();
      };
      if (!holders_.contains(q.prefix_group)) {
        if (absl::Status s = AddRequest(holder); !s.ok()) {
          if (full(s)) return false;
          return Context(s, absl::StrFormat("AddRequest(holder of group %d)", q.prefix_group));
        }
        created = true;
        if (absl::Status s = Extend(holder, w_.prefix_len); !s.ok()) {
          if (absl::Status f = drop_new_holder(); !f.ok()) return f;
          if (full(s)) return false;
          return Context(
              s, absl::StrFormat("Extend(holder of group %d, %d)", q.prefix_group, w_.prefix_len));
        }
      }
      if (absl::Status s = Fork(holder, index); !s.ok()) {
        if (absl::Status f = drop_new_holder(); !f.ok()) return f;
        if (full(s)) return false;
        return Context(s, absl::StrFormat("Fork(holder of group %d, %d)", q.prefix_group, index));
      }
      if (absl::Status s = Extend(index, length - w_.prefix_len); !s.ok()) {
        if (absl::Status f = Free(index); !f.ok()) return f;
        if (absl::Status f = drop_new_holder(); !f.ok()) return f;
        if (full(s)) return false;
        return Context(s, absl::StrFormat("Extend(request %d, %d)", index, length - w_.prefix_len));
      }
      ++holders_[q.prefix_group].members;
      if (created) ++result_.holders_created;
      ++result_.prefix_forks;
      prefilled = length - w_.prefix_len + (created ? w_.prefix_len : 0);
    }
    running_.push_back({index, length, q.prompt_len + q.output_len});
    if (!admitted_once_[index]) {
      admitted_once_[index] = true;
      wait_sum_ += step_ - q.arrival_step;
      ++first_admissions_;
    }
    ++result_.admissions;
    result_.prefill_tokens += prefilled;
    result_.recomputed_tokens += generated_[index];
    return true;
  }

  absl::Status Admit() {
    while (!waiting_.empty()) {
      absl::StatusOr<bool> admitted = TryAdmit(waiting_.front());
      if (!admitted.ok()) return admitted.status();
      if (!*admitted) break;
      waiting_.pop_front();
    }
    if (running_.empty() && !waiting_.empty()) {
      // Nothing is running, so no holder is alive either: the cache is empty.
      const size_t index = waiting_.front();
      const Request& q = w_.requests[index];
      return absl::FailedPreconditionError(absl::StrFormat(
          "policy %s, step %d: request %d (%d prompt + %d generated tokens) does not fit in "
          "an empty cache (%s); raise --budget_gib or lower --max_context",
          policy_.name, step_, index, q.prompt_len, generated_[index], result_.config));
    }
    return absl::OkStatus();
  }

  void Sample() {
    const kvmem::Stats s = cache_->GetStats();
    const int64_t running = static_cast<int64_t>(running_.size());
    running_sum_ += running;
    live_sum_ += static_cast<double>(s.live_bytes);
    held_sum_ += static_cast<double>(s.held_bytes);
    result_.peak_running = std::max(result_.peak_running, running);
    result_.peak_live_bytes = std::max(result_.peak_live_bytes, s.live_bytes);
    if (s.held_bytes > result_.peak_held_bytes) {
      result_.peak_held_bytes = s.held_bytes;
      result_.peak_held_step = step_;
      result_.utilisation_at_peak = static_cast<double>(s.live_bytes) / s.held_bytes;
    }
    if (options_.keep_series) {
      result_.series.push_back({static_cast<int32_t>(running),
                                static_cast<int32_t>(waiting_.size()), s.held_bytes, s.live_bytes,
                                s.idle_bytes, s.mapped_bytes});
    }
  }

  const Workload& w_;
  const Policy& policy_;
  std::unique_ptr<KvCache> cache_;
  const SimOptions options_;

  int64_t step_ = 0;
  size_t next_arrival_ = 0;
  std::deque<size_t> waiting_;
  std::vector<Running> running_;  // in admission order
  std::vector<int64_t> generated_;
  std::vector<bool> admitted_once_;
  absl::flat_hash_map<int32_t, Holder> holders_;
  std::vector<int64_t> locs_;

  int64_t running_sum_ = 0;
  int64_t wait_sum_ = 0;
  int64_t first_admissions_ = 0;
  double live_sum_ = 0;
  double held_sum_ = 0;
  SimResult result_;
};

}  // namespace

absl::StatusOr<SimResult> Simulate(const Workload& workload, const Policy& policy,
                                   const kvmem::KvCacheConfig& config, const SimOptions& options,
                                   const std::function<void(const SimProgress&)>& on_step) {
  if (absl::Status s = ValidateWorkload(workload, config.max_context); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  if (!cache.ok()) {
    return absl::Status(cache.status().code(),
                        absl::StrFormat("policy %s: cannot create the cache (%s): %s", policy.name,
                                        kvmem::DescribeConfig(config), cache.status().message()));
  }
  const auto t0 = Clock::now();
  Simulation sim(workload, policy, std::move(*cache), options);
  while (!sim.Done() && sim.step() < options.max_steps) {
    if (absl::Status s = sim.Step(); !s.ok()) return s;
    if (on_step) on_step(sim.Progress());
  }
  return sim.Finish(std::chrono::duration<double>(Clock::now() - t0).count());
}

}  // namespace kvstress
