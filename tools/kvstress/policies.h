// The KV-memory policies kvstress compares. Each is a KvCacheConfig over the same model
// shape and budget; the simulation gives each its own fresh KvCache.
//
//   static         the pre-paging baseline: every request reserves max_context tokens at
//                  admission (modelled with the paged layout at page_tokens = max_context,
//                  so the reservation is real kvmem memory, not arithmetic)
//   paged-1/16/64  paged layout at that many tokens per page (SGLang / vLLM / large pages)
//   virtual        virtual layout, all layers of a token together (one page of waste)
//   virtual-chunk  virtual layout, all layers in KvCacheConfig's default chunks (a
//                  layer's K and V fill a page: decode reads whole pages; up to one chunk
//                  of every layer wasted)
//   virtual-layer  virtual layout per layer (the vAttention paper's arrangement)
#ifndef KVMEM_TOOLS_KVSTRESS_POLICIES_H_
#define KVMEM_TOOLS_KVSTRESS_POLICIES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvmem/config.h"

namespace kvstress {

enum class PolicyKind {
  kStatic,
  kPaged1,
  kPaged16,
  kPaged64,
  kVirtualAll,
  kVirtualChunked,
  kVirtualPerLayer
};

struct Policy {
  PolicyKind kind;
  std::string name;
  // Whether requests of a prefix group share the prefix (Fork). The static baseline
  // does not: pre-paging systems could not share part of a reservation.
  bool shares_prefixes;
};

// Every policy, in table order.
std::vector<Policy> AllPolicies();
// Parses a comma-separated list of policy names ("all" for every one). Duplicates are
// dropped; InvalidArgument names an unknown entry and lists the valid ones.
absl::StatusOr<std::vector<Policy>> ParsePolicies(absl::string_view list);

// The cache configuration of `policy` over `base` (shape, capacity, budget, device).
kvmem::KvCacheConfig PolicyConfig(const Policy& policy, const kvmem::KvCacheConfig& base);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_POLICIES_H_
