#include "tools/kvstress/options.h"

#include <cmath>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace kvstress {
namespace {

absl::Status Bad(absl::string_view flag, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrFormat("--%s: %s", flag, what));
}

absl::Status CheckRange(absl::string_view flag, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    return Bad(flag, absl::StrFormat("%d is out of range [%d, %d]", v, lo, hi));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RunConfig> BuildRunConfig(const FlagValues& f) {
  RunConfig rc;
  kvmem::KvCacheConfig& c = rc.base;

  // Device.
  absl::string_view dev = f.device;
  if (dev == "host") {
    c.device = kvmem::DeviceKind::kHost;
  } else if (absl::ConsumePrefix(&dev, "cuda")) {
    c.device = kvmem::DeviceKind::kCuda;
    c.device_ordinal = 0;
    if (absl::ConsumePrefix(&dev, ":")) {
      if (!absl::SimpleAtoi(dev, &c.device_ordinal) || c.device_ordinal < 0) {
        return Bad("device", absl::StrFormat("bad CUDA ordinal in '%s'", f.device));
      }
    } else if (!dev.empty()) {
      return Bad("device", absl::StrFormat("'%s' is not host, cuda or cuda:N", f.device));
    }
  } else {
    return Bad("device", absl::StrFormat("'%s' is not host, cuda or cuda:N", f.device));
  }

  // --scale multiplies the size of the run while keeping its pressure: requests, arrival
  // rate, budget and rows together.
  if (!(f.scale > 0) || !std::isfinite(f.scale) || f.scale > 1e6) {
    return Bad("scale", absl::StrFormat("%g must be > 0", f.scale));
  }
  const double scale = f.scale;

  // Model shape.
  if (absl::Status s = CheckRange("layers", f.layers, 1, 4096); !s.ok()) return s;
  if (absl::Status s = CheckRange("kv_heads", f.kv_heads, 1, 4096); !s.ok()) return s;
  if (absl::Status s = CheckRange("head_dim", f.head_dim, 1, 65536); !s.ok()) return s;
  c.num_layers = static_cast<int>(f.layers);
  c.num_kv_heads = static_cast<int>(f.kv_heads);
  c.head_dim = static_cast<int>(f.head_dim);
  if (f.dtype == "bf16") {
    c.dtype = kvmem::DType::kBFloat16;
  } else if (f.dtype == "fp16") {
    c.dtype = kvmem::DType::kFloat16;
  } else if (f.dtype == "fp32") {
    c.dtype = kvmem::DType::kFloat32;
  } else {
    return Bad("dtype", absl::StrFormat("'%s' is not bf16, fp16 or fp32", f.dtype));
  }

  // Capacity.
  if (absl::Status s = CheckRange("max_context", f.max_context, 1, int64_t{1} << 30); !s.ok())
    return s;
  c.max_context = f.max_context;
  const double rows = std::round(static_cast<double>(f.max_requests) * scale);
  if (f.max_requests < 1 || rows < 1 || rows > (1 << 24)) {
    return Bad("max_requests", absl::StrFormat("%d (x scale %g) must be in [1, %d]", f.max_requests,
                                               scale, 1 << 24));
  }
  c.max_requests = static_cast<int>(rows);
  const double budget = f.budget_gib * scale * double{1 << 30};
  if (!(f.budget_gib > 0) || !std::isfinite(budget) || budget > 0x1p62) {
    return Bad("budget_gib",
               absl::StrFormat("%g (x scale %g) must be > 0 and < 2^32 GiB", f.budget_gib, scale));
  }
  c.memory_budget_bytes = static_cast<int64_t>(budget);
  // Every policy must hold at least one request at max_context; say so in terms of the
  // flags rather than letting the first cache fail.
  const int64_t token_bytes = c.TokenBytes();
  if (c.max_context > c.memory_budget_bytes / token_bytes) {
    return Bad("budget_gib",
               absl::StrFormat("%.4g GiB holds %d tokens of %d bytes, less than one request at "
                               "--max_context=%d (%.4g GiB); raise the budget or lower the context",
                               c.memory_budget_bytes / double{1 << 30},
                               c.memory_budget_bytes / token_bytes, token_bytes, c.max_context,
                               static_cast<double>(c.max_context) * token_bytes / (1 << 30)));
  }
  if (absl::Status s = CheckRange("host_page_kib", f.host_page_kib, 4, int64_t{1} << 20); !s.ok())
    return s;
  if ((f.host_page_kib & (f.host_page_kib - 1)) != 0 || f.host_page_kib % 4 != 0) {
    return Bad("host_page_kib", absl::StrFormat("%d is not a power of two >= 4", f.host_page_kib));
  }
  c.host_granularity = f.host_page_kib * 1024;

  // Policies.
  absl::StatusOr<std::vector<Policy>> policies = ParsePolicies(f.policies);
  if (!policies.ok()) return Bad("policies", policies.status().message());
  rc.policies = *std::move(policies);

  // Workload.
  if (absl::Status s = CheckRange("prefix_len", f.prefix_len, 1, int64_t{1} << 30); !s.ok())
    return s;
  rc.mix.max_context = c.max_context;
  rc.mix.prefix_len = f.prefix_len;
  rc.mix.seed = f.seed;
  if (!f.trace.empty()) {
    rc.from_trace = true;
    rc.trace_path = f.trace;
  } else {
    absl::StatusOr<Mix> mix = ParseMix(f.workload);
    if (!mix.ok()) return Bad("workload", mix.status().message());
    rc.mix.mix = *mix;
    if (f.arrival_rate >= 0) {
      if (!(f.arrival_rate > 0) || !std::isfinite(f.arrival_rate)) {
        return Bad("arrival_rate", absl::StrFormat("%g must be > 0", f.arrival_rate));
      }
      rc.mix.arrival_rate = f.arrival_rate * scale;
    } else if (f.arrival_rate == -1) {
      rc.mix.arrival_rate = DefaultArrivalRate(*mix) * scale;
    } else {
      return Bad("arrival_rate", absl::StrFormat("%g must be > 0", f.arrival_rate));
    }
    const double n = std::round(static_cast<double>(f.requests) * scale);
    if (f.requests < 1 || n < 1 || n > 1e8) {
      return Bad("requests",
                 absl::StrFormat("%d (x scale %g) must be in [1, 1e8]", f.requests, scale));
    }
    rc.mix.num_requests = static_cast<int64_t>(n);
    if (absl::Status s = CheckRange("num_prefixes", f.num_prefixes, 1, 1 << 20); !s.ok()) return s;
    rc.mix.num_prefixes = static_cast<int>(f.num_prefixes);
    if (c.max_context < 16) {
      return Bad("max_context", absl::StrFormat("the built-in workloads need >= 16, got %d "
                                                "(use --trace for tiny contexts)",
                                                c.max_context));
    }
    if (rc.mix.mix == Mix::kSharedPrefix && f.prefix_len > c.max_context / 2) {
      return Bad("prefix_len", absl::StrFormat("%d must be <= max_context / 2 = %d", f.prefix_len,
                                               c.max_context / 2));
    }
  }

  // Simulation.
  if (absl::Status s = CheckRange("steps", f.steps, 1, int64_t{1} << 40); !s.ok()) return s;
  rc.sim.max_steps = f.steps;
  if (absl::Status s = CheckRange("check_invariants", f.check_invariants, 0, int64_t{1} << 40);
      !s.ok())
    return s;
  rc.sim.check_invariants_every = f.check_invariants;
  rc.json_path = f.json;
  rc.plot_path = f.plot;
  rc.sim.keep_series = !f.json.empty() || !f.plot.empty();
  rc.progress = f.progress;
  return rc;
}

}  // namespace kvstress
