#include "tools/kvstress/policies.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvstress {

std::vector<Policy> AllPolicies() {
  return {
      {PolicyKind::kStatic, "static", false},
      {PolicyKind::kPaged1, "paged-1", true},
      {PolicyKind::kPaged16, "paged-16", true},
      {PolicyKind::kPaged64, "paged-64", true},
      {PolicyKind::kVirtualAll, "virtual", true},
      {PolicyKind::kVirtualChunked, "virtual-chunk", true},
      {PolicyKind::kVirtualPerLayer, "virtual-layer", true},
  };
}

absl::StatusOr<std::vector<Policy>> ParsePolicies(absl::string_view list) {
  const std::vector<Policy> all = AllPolicies();
  std::vector<Policy> out;
  for (absl::string_view raw : absl::StrSplit(list, ',')) {
    absl::string_view name = absl::StripAsciiWhitespace(raw);
    if (name.empty()) continue;
    if (name == "all") {
      for (const Policy& p : all) {
        if (std::none_of(out.begin(), out.end(), [&](const Policy& q) { return q.kind == p.kind; }))
          out.push_back(p);
      }
      continue;
    }
    auto it = std::find_if(all.begin(), all.end(), [&](const Policy& p) { return p.name == name; });
    if (it == all.end()) {
      std::vector<std::string> names;
      for (const Policy& p : all) names.push_back(p.name);
      return absl::InvalidArgumentError(
          absl::StrFormat("unknown policy '%s' (want a comma-separated subset of: %s, or all)",
                          name, absl::StrJoin(names, ", ")));
    }
    if (std::none_of(out.begin(), out.end(), [&](const Policy& q) { return q.kind == it->kind; }))
      out.push_back(*it);
  }
  if (out.empty()) return absl::InvalidArgumentError("--policies names no policy");
  return out;
}

kvmem::KvCacheConfig PolicyConfig(const Policy& policy, const kvmem::KvCacheConfig& base) {
  kvmem::KvCacheConfig c = base;
  c.vmm = nullptr;  // every policy gets its own backend
  switch (policy.kind) {
    case PolicyKind::kStatic:
      c.layout = kvmem::Layout::kPaged;
      c.page_tokens = static_cast<int>(std::min<int64_t>(base.max_context, 1 << 30));
      break;
    case PolicyKind::kPaged1:
      c.layout = kvmem::Layout::kPaged;
      c.page_tokens = 1;
      break;
    case PolicyKind::kPaged16:
      c.layout = kvmem::Layout::kPaged;
      c.page_tokens = 16;
      break;
    case PolicyKind::kPaged64:
      c.layout = kvmem::Layout::kPaged;
      c.page_tokens = 64;
      break;
    case PolicyKind::kVirtualAll:
      // All-layer pages, as the utilisation target of docs/benchmarks.md names them: no
      // chunks, so a request wastes under one page (the default chunk gives decode whole
      // pages per layer and wastes up to a chunk of every layer; docs/layouts.md).
      c.layout = kvmem::Layout::kVirtual;
      c.arrangement = kvmem::Arrangement::kAllLayers;
      c.chunk_tokens = 1;
      break;
    case PolicyKind::kVirtualChunked:
      c.layout = kvmem::Layout::kVirtual;
      c.arrangement = kvmem::Arrangement::kAllLayers;
      c.chunk_tokens = 0;  // the library's default
      break;
    case PolicyKind::kVirtualPerLayer:
      c.layout = kvmem::Layout::kVirtual;
      c.arrangement = kvmem::Arrangement::kPerLayer;
      break;
  }
  return c;
}

}  // namespace kvstress
