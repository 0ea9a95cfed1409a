#include "src/core/host_limits.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "src/core/int_math.h"

namespace kvmem::internal {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kMaxBookkeeping = 8 * kGiB;
// host_granularity's upper bound (ValidateShape), the largest page a fix may suggest.
constexpr int64_t kMaxHostGranularity = kGiB;
// Pools below this many mappings are not checked against the process's own count.
constexpr int64_t kCountFrom = 1024;

}  // namespace

int64_t HostBookkeepingLimit() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return kMaxBookkeeping;
  return std::min(kMaxBookkeeping, SatMul(pages, page) / 4);
}

absl::Status CheckHostBookkeeping(std::string_view what, int64_t bytes) {
  const int64_t limit = HostBookkeepingLimit();
  if (bytes <= limit) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s: %s bytes of host memory for kvmem's own bookkeeping, more than the %d bytes a "
      "cache may take on this host (min(8 GiB, a quarter of physical memory)); lower "
      "max_requests, max_context or memory_budget_bytes",
      what,
      bytes == std::numeric_limits<int64_t>::max() ? std::string("more than 2^63")
                                                   : absl::StrCat(bytes),
      limit));
}

int64_t ReadMaxMapCount() {
  std::ifstream in("/proc/sys/vm/max_map_count");
  std::string text;
  int64_t value = 0;
  if (!in || !std::getline(in, text) ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &value) || value <= 0) {
    return -1;
  }
  return value;
}

int64_t CountProcessMappings() {
  std::ifstream maps("/proc/self/maps");
  if (!maps) return -1;
  int64_t lines = 0;
  for (std::string line; std::getline(maps, line);) ++lines;
  return lines;
}

absl::Status CheckHostMappings(const HostMappingNeed& need) {
  const int64_t limit = ReadMaxMapCount();
  if (limit < 0) return absl::OkStatus();
  const bool never_fits = need.mappings > limit - kMapHeadroom;
  if (!never_fits && need.mappings < kCountFrom) return absl::OkStatus();
  const int64_t in_use = std::max<int64_t>(0, CountProcessMappings());
  if (!never_fits && need.mappings <= limit - kMapHeadroom - in_use) return absl::OkStatus();

  const int64_t room = std::max<int64_t>(0, limit - kMapHeadroom - in_use);
  std::vector<std::string> fixes;
  // The kernel's limit, rounded up to a multiple of 65536 (its default is 65530).
  const int64_t want = need.mappings + in_use + kMapHeadroom;
  fixes.push_back(absl::StrFormat("raise the limit: sudo sysctl -w vm.max_map_count=%d",
                                  CeilDiv(want, 65536) * 65536));
  // A larger page: a pool maps proportionally fewer of them.
  if (need.granularity_is_config) {
    for (int64_t g = 2 * need.granularity; g <= kMaxHostGranularity; g *= 2) {
      const int64_t mappings = CeilDiv(need.mappings, g / need.granularity);
      if (mappings <= room) {
        fixes.push_back(absl::StrFormat(
            "a larger host page: host_granularity = %d (about %d mappings)", g, mappings));
        break;
      }
    }
  }
  // A smaller budget: mappings grow with budget / granularity.
  const int64_t budget = SatMul(room, need.granularity);
  if (budget >= need.min_budget_bytes && budget < need.budget_bytes) {
    fixes.push_back(absl::StrFormat("a smaller budget: memory_budget_bytes <= %d", budget));
  }
  const std::string text = absl::StrFormat(
      "%s: with its budget of %d bytes in use, the pool maps %d granules of %d bytes on the "
      "host backend, each a mapping of its own; vm.max_map_count is %d, this process has %d "
      "mappings now and %d are kept for the rest of the process, so %d fit. Any one of these "
      "fixes it: %s",
      need.layout, need.budget_bytes, need.mappings, need.granularity, limit, in_use, kMapHeadroom,
      room, absl::StrJoin(fixes, "; "));
  // Past the limit on any process: the configuration cannot run on this host as it is.
  // Otherwise it would fit beside fewer mappings: the process is short of them now.
  return never_fits ? absl::InvalidArgumentError(text) : absl::ResourceExhaustedError(text);
}

}  // namespace kvmem::internal
