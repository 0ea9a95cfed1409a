#include "tools/kvstress/workload.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_format.h"

namespace kvstress {
namespace {

// Every 16th request of the adversarial mix grows to max_context.
constexpr int kAdversarialLongEvery = 16;

int64_t Clamp(double v, int64_t lo, int64_t hi) {
  if (!(v >= static_cast<double>(lo))) return lo;  // also catches NaN
  if (v >= static_cast<double>(hi)) return hi;
  return static_cast<int64_t>(std::llround(v));
}

// Lognormal with the given median (exp(mu)) and shape sigma.
class LogNormal {
 public:
  LogNormal(double median, double sigma) : dist_(std::log(median), sigma) {}
  double operator()(std::mt19937_64& rng) { return dist_(rng); }

 private:
  std::lognormal_distribution<double> dist_;
};

}  // namespace

absl::StatusOr<Mix> ParseMix(absl::string_view name) {
  if (name == "chat") return Mix::kChat;
  if (name == "long-context") return Mix::kLongContext;
  if (name == "shared-system-prompt") return Mix::kSharedPrefix;
  if (name == "adversarial") return Mix::kAdversarial;
  return absl::InvalidArgumentError(absl::StrFormat(
      "unknown workload '%s' (want chat, long-context, shared-system-prompt or adversarial)",
      name));
}

absl::string_view MixName(Mix mix) {
  switch (mix) {
    case Mix::kChat:
      return "chat";
    case Mix::kLongContext:
      return "long-context";
    case Mix::kSharedPrefix:
      return "shared-system-prompt";
    case Mix::kAdversarial:
      return "adversarial";
  }
  return "?";
}

double DefaultArrivalRate(Mix mix) {
  switch (mix) {
    case Mix::kChat:
      return 2.0;
    case Mix::kLongContext:
      return 0.3;
    case Mix::kSharedPrefix:
      return 2.0;
    case Mix::kAdversarial:
      return 4.0;
  }
  return 1.0;
}

absl::StatusOr<Workload> GenerateMix(const MixParams& p) {
  if (!(p.arrival_rate > 0) || !std::isfinite(p.arrival_rate)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("arrival_rate must be > 0 requests per step, got %g", p.arrival_rate));
  }
  if (p.num_requests < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("number of requests must be >= 0, got %d", p.num_requests));
  }
  // The mixes need room for a prompt and some output.
  if (p.max_context < 16) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the built-in workloads need max_context >= 16, got %d (use --trace for tiny contexts)",
        p.max_context));
  }
  if (p.mix == Mix::kSharedPrefix) {
    if (p.num_prefixes < 1) {
      return absl::InvalidArgumentError(
          absl::StrFormat("num_prefixes must be >= 1, got %d", p.num_prefixes));
    }
    if (p.prefix_len < 1 || p.prefix_len > p.max_context / 2) {
      return absl::InvalidArgumentError(
          absl::StrFormat("prefix_len must be in [1, max_context / 2 = %d], got %d",
                          p.max_context / 2, p.prefix_len));
    }
  }

  Workload w;
  w.name = std::string(MixName(p.mix));
  const int64_t mc = p.max_context;
  std::mt19937_64 rng(p.seed);
  std::poisson_distribution<int64_t> arrivals(p.arrival_rate);
  // Length distributions (medians in tokens). Chat follows the shape of public chat
  // traces (ShareGPT / LMSYS): long-tailed prompts that include conversation history and
  // shorter, less skewed answers.
  LogNormal chat_prompt(512, 1.0), chat_output(192, 0.8);
  LogNormal long_output(256, 0.7);
  LogNormal user_part(128, 1.0);
  std::uniform_int_distribution<int64_t> long_prompt(mc / 4, mc * 7 / 8);
  std::uniform_int_distribution<int> group(0, std::max(p.num_prefixes, 1) - 1);
  std::uniform_int_distribution<int64_t> short_len(16, 128);
  std::uniform_int_distribution<int64_t> grower_prompt(16, 64);

  switch (p.mix) {
    case Mix::kChat:
      w.description = absl::StrFormat(
          "chat: prompt ~ lognormal(median 512, sigma 1.0), output ~ lognormal(median 192, "
          "sigma 0.8), clamped to max_context %d",
          mc);
      break;
    case Mix::kLongContext:
      w.description = absl::StrFormat(
          "long-context: prompt ~ uniform[%d, %d], output ~ lognormal(median 256, sigma 0.7)",
          mc / 4, mc * 7 / 8);
      break;
    case Mix::kSharedPrefix:
      w.prefix_len = p.prefix_len;
      w.description = absl::StrFormat(
          "shared-system-prompt: %d shared prefixes of %d tokens (uniform choice), user part "
          "~ lognormal(median 128, sigma 1.0), output ~ lognormal(median 192, sigma 0.8)",
          p.num_prefixes, p.prefix_len);
      break;
    case Mix::kAdversarial:
      w.description = absl::StrFormat(
          "adversarial: prompt and output ~ uniform[16, 128], except every %dth request: "
          "prompt ~ uniform[16, 64] growing to max_context %d",
          kAdversarialLongEvery, mc);
      break;
  }
  w.description += absl::StrFormat("; %d requests, Poisson arrivals %.3g per step, seed %d",
                                   p.num_requests, p.arrival_rate, p.seed);

  w.requests.reserve(p.num_requests);
  for (int64_t step = 0; static_cast<int64_t>(w.requests.size()) < p.num_requests; ++step) {
    int64_t n = arrivals(rng);
    for (; n > 0 && static_cast<int64_t>(w.requests.size()) < p.num_requests; --n) {
      Request r;
      r.arrival_step = step;
      switch (p.mix) {
        case Mix::kChat:
          r.prompt_len = Clamp(chat_prompt(rng), 1, mc - 1);
          r.output_len = Clamp(chat_output(rng), 1, mc - r.prompt_len);
          break;
        case Mix::kLongContext:
          r.prompt_len = long_prompt(rng);
          r.output_len = Clamp(long_output(rng), 1, mc - r.prompt_len);
          break;
        case Mix::kSharedPrefix:
          r.prefix_group = group(rng);
          r.prompt_len = p.prefix_len + Clamp(user_part(rng), 1, mc / 4);
          r.output_len = Clamp(chat_output(rng), 1, mc - r.prompt_len);
          break;
        case Mix::kAdversarial:
          if (w.requests.size() % kAdversarialLongEvery == kAdversarialLongEvery - 1) {
            r.prompt_len = grower_prompt(rng);
            r.output_len = mc - r.prompt_len;
          } else {
            r.prompt_len = short_len(rng);
            r.output_len = short_len(rng);
          }
          break;
      }
      w.requests.push_back(r);
    }
  }
  return w;
}

absl::Status ValidateWorkload(const Workload& w, int64_t max_context) {
  int64_t prev_arrival = 0;
  for (size_t i = 0; i < w.requests.size(); ++i) {
    const Request& r = w.requests[i];
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrFormat("request %d: %s", i, what));
    };
    if (r.arrival_step < prev_arrival) return bad("arrivals are not sorted");
    prev_arrival = r.arrival_step;
    if (r.prompt_len < 1) return bad("prompt_len must be >= 1");
    if (r.output_len < 1) return bad("output_len must be >= 1");
    if (r.prompt_len + r.output_len > max_context) {
      return bad(absl::StrFormat("prompt_len + output_len = %d exceeds max_context %d",
                                 r.prompt_len + r.output_len, max_context));
    }
    if (r.prefix_group >= 0 && r.prompt_len <= w.prefix_len) {
      return bad(absl::StrFormat("prompt_len %d must exceed the shared prefix (%d tokens)",
                                 r.prompt_len, w.prefix_len));
    }
  }
  return absl::OkStatus();
}

int64_t TotalPromptTokens(const Workload& w) {
  int64_t n = 0;
  for (const Request& r : w.requests) n += r.prompt_len;
  return n;
}

int64_t TotalOutputTokens(const Workload& w) {
  int64_t n = 0;
  for (const Request& r : w.requests) n += r.output_len;
  return n;
}

}  // namespace kvstress
