#include "tools/kvstress/host_mappings.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

namespace kvstress {
namespace {

constexpr double kGiB = double{1 << 30};
// Mappings the process adds while it runs beyond the caches' own: heap arenas, thread
// stacks, the token index and the copy-on-write scratch page of each cache.
constexpr int64_t kHeadroom = 256;
// --host_page_kib's upper bound (options.cc).
constexpr int64_t kMaxHostPageKib = int64_t{1} << 20;

// Whether every policy can still hold one request at max_context with `unit`-byte pages:
// the paged layouts split the budget into 2 x layers pools of whole pages, and the
// per-layer virtual layout needs whole pages in every layer for K and V.
bool OneRequestFits(const kvmem::KvCacheConfig& c, double unit) {
  const double pools = 2.0 * c.num_layers;
  const double per_pool = std::floor(c.memory_budget_bytes / (pools * unit)) * unit;
  return per_pool >= static_cast<double>(c.max_context) * c.TokenLayerBytes();
}

// A budget in GiB rounded down to a number that reads well: whole GiB from 10, tenths
// from 1, two significant digits below.
double FloorNice(double gib) {
  if (gib >= 10) return std::floor(gib);
  if (gib >= 1) return std::floor(gib * 10) / 10;
  if (!(gib > 0)) return 0;
  const double step = std::pow(10.0, std::floor(std::log10(gib)) - 1);
  return std::floor(gib / step) * step;
}

int64_t MaxEstimate(const RunConfig& rc, const kvmem::KvCacheConfig& c, const Workload& w) {
  int64_t most = 0;
  for (const Policy& p : rc.policies) most = std::max(most, EstimateHostMappings(p, c, w));
  return most;
}

}  // namespace

// The model. A budget of B bytes on pages of P bytes is G = B / P pages.
//  * Paged layouts (static, paged-N) map their 2 x layers pools page by page, one mapping
//    per page, at most G (measured: G + 2 with the budget full).
//  * Virtual all-layer layouts map a row's pages at consecutive addresses: at most G page
//    mappings, plus the unmapped rest of each row's reservation, which splits off as its
//    own mapping (one per row), plus one for the shared prefix a forked row aliases (the
//    holder's pages were taken in order, so the alias merges into one range). Measured
//    0.2-1.0 x G on every mix.
//  * The per-layer virtual layout has 2 x layers tensors per row, so each row adds one
//    split-off rest per tensor, and a forked row maps the prefix's whole pages in every
//    tensor again (the aliases do not merge with the row's own pages). How many rows
//    share the budget depends on the lengths: rows R = min(max_requests, G / (2 x layers
//    x own pages per tensor)), with the own pages of a request taken at its length half
//    way through its output, averaged over the requests. Mappings = min(G, R x tensors x
//    own) + R x tensors x (1 + aliased pages), plus 5 % for the model's error. Against
//    /proc/self/maps at 64 GiB and 2 MiB pages the model (before the 5 %) gave chat 54.9k
//    for 56.2k measured, adversarial 58.9k for 59.3k, long-context 39.0k for 39.5k; on
//    shared-system-prompt at 44 GiB 65.9k where mmap failed past 64.5k. (Weighting the
//    requests by the time they hold a row gave adversarial 40k: its few long requests
//    would dominate, but the peak comes when short ones fill the budget.)
int64_t EstimateHostMappings(const Policy& policy, const kvmem::KvCacheConfig& c,
                             const Workload& w) {
  const double unit = static_cast<double>(c.host_granularity);
  const double rows = c.max_requests;
  const double mc = static_cast<double>(c.max_context);
  const double pages = std::floor(c.memory_budget_bytes / unit);
  switch (policy.kind) {
    case PolicyKind::kStatic:
    case PolicyKind::kPaged1:
    case PolicyKind::kPaged16:
    case PolicyKind::kPaged64: {
      // A pool holds no more than every row at max_context.
      const double tensors = 2.0 * c.num_layers;
      const double cap = tensors * std::ceil(rows * mc * c.TokenLayerBytes() / unit);
      return static_cast<int64_t>(std::min(pages, cap));
    }
    case PolicyKind::kVirtualAll:
    case PolicyKind::kVirtualChunked: {
      const double cap = rows * std::ceil(mc * c.TokenBytes() / unit);
      double forked = 0;
      if (policy.shares_prefixes && !w.requests.empty()) {
        for (const Request& q : w.requests) forked += q.prefix_group >= 0 ? 1 : 0;
        forked /= static_cast<double>(w.requests.size());
      }
      return static_cast<int64_t>(std::ceil(std::min(pages, cap) + rows * (1 + forked)));
    }
    case PolicyKind::kVirtualPerLayer: {
      const double tensors = 2.0 * c.num_layers;
      const double b = static_cast<double>(c.TokenLayerBytes());
      const double aliased = std::floor(w.prefix_len * b / unit);
      if (w.requests.empty()) return static_cast<int64_t>(pages);
      double own = 0, alias = 0;
      for (const Request& q : w.requests) {
        const double mid = q.prompt_len + q.output_len / 2.0;
        const double a = policy.shares_prefixes && q.prefix_group >= 0 ? aliased : 0;
        own += std::max(1.0, std::ceil(mid * b / unit) - a);
        alias += a;
      }
      own /= static_cast<double>(w.requests.size());
      alias /= static_cast<double>(w.requests.size());
      const double r = std::min(rows, std::floor(pages / (tensors * own)));
      return static_cast<int64_t>(
          std::ceil(1.05 * (std::min(pages, r * tensors * own) + r * tensors * (1 + alias))));
    }
  }
  return static_cast<int64_t>(pages);
}

std::optional<MapLimit> ReadMapLimit() {
  MapLimit m;
  std::ifstream limit("/proc/sys/vm/max_map_count");
  std::string text;
  if (!limit || !std::getline(limit, text) ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &m.max_map_count)) {
    return std::nullopt;
  }
  std::ifstream maps("/proc/self/maps");
  if (!maps) return std::nullopt;
  for (std::string line; std::getline(maps, line);) ++m.in_use;
  return m;
}

absl::Status CheckHostMappings(const RunConfig& rc, const Workload& w, const MapLimit& limit) {
  if (rc.base.device != kvmem::DeviceKind::kHost) return absl::OkStatus();
  const int64_t room = limit.max_map_count - limit.in_use - kHeadroom;
  std::vector<std::string> over, all, fit;
  int64_t most = 0;
  for (const Policy& p : rc.policies) {
    const int64_t n = EstimateHostMappings(p, rc.base, w);
    most = std::max(most, n);
    all.push_back(absl::StrFormat("%s %d", p.name, n));
    (n > room ? over : fit).push_back(p.name);
  }
  if (over.empty()) return absl::OkStatus();

  std::vector<std::string> fixes;
  // The kernel limit: enough for the largest estimate, rounded up to a multiple of 65536.
  const int64_t need = most + limit.in_use + kHeadroom;
  fixes.push_back(
      absl::StrFormat("sudo sysctl -w vm.max_map_count=%d", (need + 65535) / 65536 * 65536));
  // Larger host pages: fewer of them for the same budget. Not past the end of a shared
  // prefix, though: a prefix that ends inside a page of a layer makes every fork copy that
  // page (copy on write), and on the host the copies are real memory, up to the budget.
  bool forks = false;
  for (const Policy& p : rc.policies) {
    // (The paged layouts' pages are page_tokens long whatever the host page.)
    forks |= p.shares_prefixes &&
             (p.kind == PolicyKind::kVirtualAll || p.kind == PolicyKind::kVirtualChunked ||
              p.kind == PolicyKind::kVirtualPerLayer);
  }
  const double prefix_layer_bytes =
      w.prefix_len > 0 && forks ? static_cast<double>(w.prefix_len) * rc.base.TokenLayerBytes() : 0;
  const int64_t page_kib = rc.base.host_granularity / 1024;
  for (int64_t kib = page_kib * 2; kib <= kMaxHostPageKib; kib *= 2) {
    kvmem::KvCacheConfig c = rc.base;
    c.host_granularity = kib * 1024;
    if (!OneRequestFits(c, static_cast<double>(c.host_granularity))) break;
    if (std::fmod(prefix_layer_bytes, static_cast<double>(c.host_granularity)) != 0) break;
    if (MaxEstimate(rc, c, w) <= room) {
      fixes.push_back(absl::StrFormat("--host_page_kib=%d", kib));
      break;
    }
  }
  // A smaller budget: the largest whole number of pages that fits, found by bisection
  // (the estimates grow with the budget), shown as --budget_gib before --scale.
  {
    kvmem::KvCacheConfig c = rc.base;
    const double unit = static_cast<double>(c.host_granularity);
    int64_t lo = 0, hi = c.memory_budget_bytes / c.host_granularity;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      c.memory_budget_bytes = mid * c.host_granularity;
      if (MaxEstimate(rc, c, w) <= room) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const double gib = FloorNice(lo * unit / kGiB / rc.scale);
    c.memory_budget_bytes = static_cast<int64_t>(gib * rc.scale * kGiB);
    if (gib > 0 && c.memory_budget_bytes >= static_cast<double>(c.max_context) * c.TokenBytes() &&
        OneRequestFits(c, unit) && MaxEstimate(rc, c, w) <= room) {
      fixes.push_back(absl::StrFormat("--budget_gib=%g", gib));
    }
  }
  if (!fit.empty()) fixes.push_back("--policies=" + absl::StrJoin(fit, ","));

  const std::string who = over.size() == rc.policies.size() && over.size() > 1
                              ? std::string("every policy")
                              : absl::StrJoin(over, ", ");
  return absl::FailedPreconditionError(absl::StrFormat(
      "the host backend maps each %d KiB page of KV memory on its own, and Linux allows this "
      "process vm.max_map_count = %d mappings (%d in use now); the estimated peak of %s is more "
      "than that (estimates: %s). Any one of these fixes it:\n  %s",
      page_kib, limit.max_map_count, limit.in_use, who, absl::StrJoin(all, ", "),
      absl::StrJoin(fixes, "\n  ")));
}

}  // namespace kvstress
