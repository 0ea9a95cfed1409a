#include "tools/kvstress/options.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "kvmem/memory_plan.h"

namespace kvstress {
namespace {

constexpr double kGiB = double{1 << 30};
// The user address space of a Linux process on x86-64 (4-level page tables): every
// policy reserves its whole capacity as address space up front.
constexpr int64_t kAddressSpaceBytes = int64_t{1} << 47;
// Pages a virtual layout addresses (int32 page numbers in kvmem).
constexpr int64_t kMaxVirtualPages = std::numeric_limits<int32_t>::max();
// Granularity of the CUDA backend on current GPUs, for checks made before the device is
// opened (the run itself uses the device's own).
constexpr int64_t kCudaGranularity = int64_t{2} << 20;

absl::Status Bad(absl::string_view flag, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrFormat("--%s: %s", flag, what));
}

absl::Status CheckRange(absl::string_view flag, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    return Bad(flag, absl::StrFormat("%d is out of range [%d, %d]", v, lo, hi));
  }
  return absl::OkStatus();
}

// "64 GiB", "1.5 TiB", "512 KiB": sizes in messages, with the unit that reads best.
std::string Size(double bytes) {
  if (bytes >= 0x1p40) return absl::StrFormat("%.4g TiB", bytes / 0x1p40);
  if (bytes >= 0x1p30) return absl::StrFormat("%.4g GiB", bytes / 0x1p30);
  if (bytes >= 0x1p20) return absl::StrFormat("%.4g MiB", bytes / 0x1p20);
  return absl::StrFormat("%.4g KiB", bytes / 0x1p10);
}

// a * b * c as a double when each is an exact int64: products that may not fit 64 bits
// are compared in floating point, where they cannot wrap.
double Product(double a, double b, double c = 1) { return a * b * c; }

// A flag's value as the user would type it: integers in full (4294967295, not 4.295e+09),
// other values in the fewest digits that read back the same.
std::string FlagNumber(double v) {
  if (v == std::floor(v) && std::fabs(v) < 1e18) return absl::StrFormat("%.0f", v);
  for (int digits = 1; digits < 17; ++digits) {
    const std::string s = absl::StrFormat("%.*g", digits, v);
    if (std::strtod(s.c_str(), nullptr) == v) return s;
  }
  return absl::StrFormat("%.17g", v);
}

double RoundUp(double v, double unit) { return std::ceil(v / unit) * unit; }

bool IsVirtual(PolicyKind k) {
  return k == PolicyKind::kVirtualAll || k == PolicyKind::kVirtualChunked ||
         k == PolicyKind::kVirtualPerLayer;
}

// Address space one policy reserves: the paged layouts a token index of every row at
// max_context (int32 slots), the virtual ones every row at max_context of KV bytes, in
// whole backend pages per tensor (a lower bound for chunked rows, which round up
// further). SizePolicies then asks kvmem for the exact sizes.
double ReservedBytes(const Policy& p, const kvmem::KvCacheConfig& c, int64_t unit) {
  const double rows = c.max_requests;
  const double mc = static_cast<double>(c.max_context);
  switch (p.kind) {
    case PolicyKind::kVirtualPerLayer:
      return Product(rows, 2.0 * c.num_layers,
                     RoundUp(mc * static_cast<double>(c.TokenLayerBytes()), unit));
    case PolicyKind::kVirtualAll:
    case PolicyKind::kVirtualChunked:
      return Product(rows, RoundUp(mc * static_cast<double>(c.TokenBytes()), unit));
    default:
      return Product(rows, mc, 4);
  }
}

// Flags that only a built-in mix uses, and the ones that only some mixes use.
constexpr const char* kMixOnlyFlags[] = {"workload", "arrival_rate", "requests", "seed",
                                         "num_prefixes"};

}  // namespace

absl::StatusOr<RunConfig> BuildRunConfig(const FlagValues& f) {
  RunConfig rc;
  kvmem::KvCacheConfig& c = rc.base;
  auto given = [&](const char* flag) { return f.specified.contains(flag); };

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

  // A trace brings its own requests: the mix's flags would be silently ignored, so they
  // are an error when given.
  if (!f.trace.empty()) {
    for (const char* flag : kMixOnlyFlags) {
      if (given(flag)) {
        return Bad(flag, absl::StrFormat("does not apply to --trace=%s (the trace gives the "
                                         "requests and their arrivals); drop one of the two",
                                         f.trace));
      }
    }
  } else if (f.workload != "shared-system-prompt") {
    for (const char* flag : {"num_prefixes", "prefix_len"}) {
      if (given(flag)) {
        return Bad(flag, absl::StrFormat("applies only to --workload=shared-system-prompt and "
                                         "to traces with a prefix_group column, not to "
                                         "--workload=%s",
                                         f.workload));
      }
    }
  }

  // --scale multiplies the size of the run while keeping its pressure: requests, arrival
  // rate, budget and rows together.
  if (!(f.scale > 0) || !std::isfinite(f.scale) || f.scale > 1e6) {
    return Bad("scale", absl::StrFormat("%g must be in (0, 1e6]", f.scale));
  }
  const double scale = f.scale;
  rc.scale = scale;

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
  // At most 2 x 4096 x 4096 x 65536 x 4 bytes = 2^45: TokenBytes cannot overflow.
  const int64_t token_bytes = c.TokenBytes();

  // Capacity.
  if (absl::Status s = CheckRange("max_context", f.max_context, 1, int64_t{1} << 30); !s.ok())
    return s;
  c.max_context = f.max_context;
  const double rows = std::round(static_cast<double>(f.max_requests) * scale);
  if (f.max_requests < 1 || rows < 1 || rows > (1 << 24)) {
    return Bad("max_requests", absl::StrFormat("%d (x --scale=%g = %.0f) must be in [1, %d]",
                                               f.max_requests, scale, rows, 1 << 24));
  }
  c.max_requests = static_cast<int>(rows);

  // Host pages.
  if (absl::Status s = CheckRange("host_page_kib", f.host_page_kib, 4, int64_t{1} << 20); !s.ok())
    return s;
  const int64_t os_page = sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096;
  if ((f.host_page_kib & (f.host_page_kib - 1)) != 0 || f.host_page_kib * 1024 % os_page != 0) {
    return Bad("host_page_kib", absl::StrFormat("%d is not a power of two multiple of the OS "
                                                "page (%d KiB)",
                                                f.host_page_kib, os_page / 1024));
  }
  c.host_granularity = f.host_page_kib * 1024;
  const int64_t unit = c.device == kvmem::DeviceKind::kHost ? c.host_granularity : kCudaGranularity;

  // Budget, in floating point until it is known to fit 62 bits.
  const double budget = f.budget_gib * scale * kGiB;
  if (!(f.budget_gib > 0) || !std::isfinite(budget) || budget > 0x1p62) {
    return Bad("budget_gib", absl::StrFormat("%s (x --scale=%g) must be > 0 and at most 2^32 GiB",
                                             FlagNumber(f.budget_gib), scale));
  }
  c.memory_budget_bytes = static_cast<int64_t>(budget);
  // Every policy must hold at least one request at max_context; say so in terms of the
  // flags rather than letting the first cache fail.
  if (c.max_context > c.memory_budget_bytes / token_bytes) {
    return Bad("budget_gib",
               absl::StrFormat("%.4g GiB holds %d tokens of %d bytes, less than one request at "
                               "--max_context=%d (%.4g GiB); raise the budget or lower the context",
                               c.memory_budget_bytes / kGiB, c.memory_budget_bytes / token_bytes,
                               token_bytes, c.max_context,
                               static_cast<double>(c.max_context) * token_bytes / kGiB));
  }
  // (On CUDA the device's page size is known once it is opened; Run reports that.)
  if (c.device == kvmem::DeviceKind::kHost && c.memory_budget_bytes < unit) {
    return Bad("budget_gib", absl::StrFormat("%.4g GiB is less than one host page of %s",
                                             c.memory_budget_bytes / kGiB, Size(unit)));
  }

  // Policies.
  absl::StatusOr<std::vector<Policy>> policies = ParsePolicies(f.policies);
  if (!policies.ok()) return Bad("policies", policies.status().message());
  rc.policies = *std::move(policies);
  std::vector<std::string> virtual_names;
  for (const Policy& p : rc.policies) {
    if (IsVirtual(p.kind)) virtual_names.push_back(p.name);
  }
  // The virtual layouts create every page of the budget up front and number them in 32
  // bits.
  const int64_t pages = c.memory_budget_bytes / unit;
  if (!virtual_names.empty() && pages > kMaxVirtualPages) {
    return Bad("budget_gib",
               absl::StrFormat("%s GiB is %d pages of %s, but the virtual layouts (%s) hold "
                               "at most %d pages (%s at this page size); lower --budget_gib%s",
                               FlagNumber(c.memory_budget_bytes / kGiB), pages, Size(unit),
                               absl::StrJoin(virtual_names, ", "), kMaxVirtualPages,
                               Size(static_cast<double>(kMaxVirtualPages) * unit),
                               c.device == kvmem::DeviceKind::kHost
                                   ? ", raise --host_page_kib or leave them out of --policies"
                                   : " or leave them out of --policies"));
  }
  for (const Policy& p : rc.policies) {
    // Every policy reserves its capacity as address space when its cache is created.
    const double reserved = ReservedBytes(p, c, unit);
    if (reserved > static_cast<double>(kAddressSpaceBytes)) {
      return Bad("max_requests",
                 absl::StrFormat("%d rows x --max_context=%d need %s of address space under "
                                 "policy %s, more than the %s a process has; lower "
                                 "--max_requests or --max_context",
                                 c.max_requests, c.max_context, Size(reserved), p.name,
                                 Size(static_cast<double>(kAddressSpaceBytes))));
    }
  }

  // Workload.
  // A trace's grouped lines are checked against prefix_len as they are parsed.
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
    if (f.arrival_rate == -1) {
      rc.mix.arrival_rate = DefaultArrivalRate(*mix) * scale;
    } else if (!(f.arrival_rate > 0) || !std::isfinite(f.arrival_rate) ||
               f.arrival_rate * scale > 1e6) {
      return Bad("arrival_rate",
                 absl::StrFormat("%g (x --scale=%g) must be in (0, 1e6] requests per step, or -1 "
                                 "for the mix's default",
                                 f.arrival_rate, scale));
    } else {
      rc.mix.arrival_rate = f.arrival_rate * scale;
    }
    const double n = std::round(static_cast<double>(f.requests) * scale);
    if (f.requests < 1 || n < 1 || n > 1e8) {
      return Bad("requests", absl::StrFormat("%d (x --scale=%g = %.0f) must be in [1, 1e8]",
                                             f.requests, scale, n));
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

absl::Status SizePolicies(const RunConfig& rc) {
  // On CUDA kvmem would open the device to learn its page size; Run opens it first.
  if (rc.base.device != kvmem::DeviceKind::kHost) return absl::OkStatus();
  const kvmem::KvCacheConfig& c = rc.base;
  for (const Policy& p : rc.policies) {
    absl::StatusOr<kvmem::MemoryPlan> plan = kvmem::PlanMemory(PolicyConfig(p, c));
    if (!plan.ok()) {
      return Bad("budget_gib",
                 absl::StrFormat("%s GiB at --max_context=%d and --host_page_kib=%d "
                                 "does not fit policy %s: %s",
                                 FlagNumber(c.memory_budget_bytes / kGiB / rc.scale), c.max_context,
                                 c.host_granularity / 1024, p.name, plan.status().message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvstress
