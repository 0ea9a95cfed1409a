// Automatic prefix caching: the types of KvCache's prefix-cache calls (MatchPrefix,
// AddRequestWithPrefix, PublishTokens, TakePrefixEvents) and the stable block hash that
// routers use to know what a cache holds. docs/prefix_cache.md explains matching,
// publishing, eviction and their granularity.
#ifndef KVMEM_PREFIX_CACHE_H_
#define KVMEM_PREFIX_CACHE_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvmem/platform.h"

namespace kvmem {

// How a request takes part in the prefix cache.
struct PrefixRequestOptions {
  // Isolation: requests with different salts never share a cached page (a tenant, a
  // LoRA adapter, a multimodal input that the token ids alone do not name). "" is the
  // unsalted namespace.
  std::string salt;
  // Retention: when memory is needed, pages published or used by requests of lower
  // priority are evicted first (least recently used first among equals). A page keeps
  // the highest priority of the requests that published or used it.
  int32_t priority = 0;
};

// SHA-256 of one block of tokens chained to its parent block (docs/prefix_cache.md).
using BlockHash = std::array<uint8_t, 32>;

// One change of what the cache can match, in the order the changes happened.
struct PrefixEvent {
  enum class Kind : uint8_t { kStored = 0, kRemoved = 1 };
  Kind kind = Kind::kStored;
  // 1, 2, 3, ... over the cache's life: a gap means events were dropped (the queue keeps
  // the newest kMaxPrefixEvents when nobody takes them).
  uint64_t sequence = 0;
  BlockHash block_hash{};
  // The hash of the block before it; all zero for the first block of a prefix.
  BlockHash parent_hash{};
  bool has_parent = false;
  int32_t num_tokens = 0;  // tokens in the block (the layout's page_tokens)
};

inline constexpr size_t kMaxPrefixEvents = size_t{1} << 16;

// The hash of a block: SHA-256 over the parent's hash (32 zero bytes for the first
// block), the salt's length (8 bytes, little endian) and bytes, and the block's token
// ids (4 bytes each, little endian). Equal for equal (parent, salt, tokens) on every
// machine and in every process, so a router can compute the hashes of a prompt itself.
KVMEM_EXPORT BlockHash PrefixBlockHash(const BlockHash* parent, absl::string_view salt,
                                       absl::Span<const int32_t> tokens);
// The hashes of the full blocks of `tokens` (block_tokens each), in order: what the
// events of a cache of that page size call them. REQUIRES block_tokens >= 1.
KVMEM_EXPORT std::vector<BlockHash> PrefixBlockHashes(absl::Span<const int32_t> tokens,
                                                      int64_t block_tokens,
                                                      absl::string_view salt = "");

}  // namespace kvmem

#endif  // KVMEM_PREFIX_CACHE_H_
