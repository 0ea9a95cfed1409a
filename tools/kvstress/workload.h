// Workloads for kvstress: the requests a simulated serving engine receives, either
// generated from a built-in mix (chat, long-context, shared-system-prompt, adversarial)
// or read from a trace (trace.h). A workload is plain data; the scheduler replays it.
#ifndef KVMEM_TOOLS_KVSTRESS_WORKLOAD_H_
#define KVMEM_TOOLS_KVSTRESS_WORKLOAD_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvstress {

// One request. It arrives at `arrival_step`, needs `prompt_len` tokens of prefill and then
// grows by one token per step until it holds prompt_len + output_len tokens.
struct Request {
  int64_t arrival_step = 0;
  int64_t prompt_len = 0;
  int64_t output_len = 0;
  // Requests of one group start with the same `prefix_len` tokens (a shared system
  // prompt); -1: no shared prefix.
  int32_t prefix_group = -1;
};

struct Workload {
  std::string name;         // "chat", ..., or "trace:FILE"
  std::string description;  // parameters, printed at start
  // Tokens every request of a prefix group shares (0 when no request has a group).
  int64_t prefix_len = 0;
  // Sorted by arrival_step (stable: equal steps keep their order).
  std::vector<Request> requests;
};

enum class Mix { kChat, kLongContext, kSharedPrefix, kAdversarial };

// Parses "chat", "long-context", "shared-system-prompt" or "adversarial".
absl::StatusOr<Mix> ParseMix(absl::string_view name);
absl::string_view MixName(Mix mix);
// Requests per step of the mix when --arrival_rate is not given.
double DefaultArrivalRate(Mix mix);

struct MixParams {
  Mix mix = Mix::kChat;
  uint64_t seed = 1;
  double arrival_rate = 0;  // mean arrivals per step (Poisson); must be > 0
  int64_t num_requests = 0;
  int64_t max_context = 0;  // every request fits: prompt + output <= max_context
  // shared-system-prompt only.
  int64_t prefix_len = 1024;
  int num_prefixes = 4;
};

// Generates the requests of a mix, deterministic for a given seed. InvalidArgument on
// parameters that cannot produce a valid workload (e.g. prefix_len >= max_context).
absl::StatusOr<Workload> GenerateMix(const MixParams& params);

// Checks the invariants the scheduler relies on (sorted arrivals, lengths in range,
// prefixes shorter than prompts); InvalidArgument names the first bad request's index.
// Traces are checked line by line as they are parsed (trace.h).
absl::Status ValidateWorkload(const Workload& workload, int64_t max_context);

// Totals for reports.
int64_t TotalPromptTokens(const Workload& workload);
int64_t TotalOutputTokens(const Workload& workload);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_WORKLOAD_H_
