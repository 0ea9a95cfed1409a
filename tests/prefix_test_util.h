// Helpers of the prefix-cache tests (tests/prefix_cache*_test.cc): token prompts, K/V
// written as a function of (token id, position) so that a request reading a foreign or
// stale page is caught, and a snapshot of the prefix cache's observable state.
#ifndef KVMEM_TESTS_PREFIX_TEST_UTIL_H_
#define KVMEM_TESTS_PREFIX_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "kvmem/kv_cache.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {

// A small paged cache (SmallConfig: 256 bytes per token, 8 rows of 256 tokens) with the
// prefix cache on.
inline KvCacheConfig PrefixConfig(int page_tokens = 4) {
  LayoutCase c{"Paged", Layout::kPaged, Arrangement::kAllLayers, page_tokens};
  KvCacheConfig config = SmallConfig(c);
  config.enable_prefix_cache = true;
  return config;
}

// The tag (kvmem::test::PatternValue) of token `token` at position `pos`: K/V depend on
// both, as a model's do, so equal prefixes have equal K/V and nothing else does.
inline uint32_t TokenTag(int32_t token, int64_t pos) {
  return static_cast<uint32_t>(token) * 65536u + static_cast<uint32_t>(pos) + 1u;
}

inline std::vector<uint32_t> TagsOf(absl::Span<const int32_t> tokens) {
  std::vector<uint32_t> tags(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) tags[i] = TokenTag(tokens[i], i);
  return tags;
}

// `n` token ids in [0, vocab) from `seed`.
inline std::vector<int32_t> Prompt(int64_t n, uint32_t seed, int32_t vocab = 1000) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

inline std::vector<int32_t> Concat(std::vector<int32_t> a, absl::Span<const int32_t> b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Extends `id` to tokens.size() tokens and writes the K/V of the new ones.
inline absl::Status ExtendTo(KvCache& cache, RequestId id, absl::Span<const int32_t> tokens) {
  KVMEM_ASSIGN_OR_RETURN(int64_t len, cache.Length(id));
  if (len > static_cast<int64_t>(tokens.size())) return absl::InternalError("ExtendTo: shorter");
  KVMEM_ASSIGN_OR_RETURN(std::vector<int64_t> slots,
                         cache.Extend(id, static_cast<int64_t>(tokens.size()) - len));
  const std::vector<uint32_t> tags = TagsOf(tokens);
  return WriteTokens(cache, slots, absl::MakeConstSpan(tags).subspan(len));
}

// Starts `id` on the cached prefix of `tokens`, computes the rest, publishes them all.
inline absl::StatusOr<int64_t> Serve(KvCache& cache, RequestId id, absl::Span<const int32_t> tokens,
                                     const PrefixRequestOptions& options = {}) {
  KVMEM_ASSIGN_OR_RETURN(int64_t hit, cache.AddRequestWithPrefix(id, tokens, options));
  KVMEM_RETURN_IF_ERROR(ExtendTo(cache, id, tokens));
  KVMEM_RETURN_IF_ERROR(cache.PublishTokens(id, tokens, options.salt));
  return hit;
}

// The request reads exactly the K/V of its own tokens.
inline absl::Status CheckTokens(const KvCache& cache, RequestId id,
                                absl::Span<const int32_t> tokens) {
  const std::vector<uint32_t> tags = TagsOf(tokens);
  return CheckRequestData(cache, id, tags);
}

// TakeSnapshot plus the prefix cache's numbers and what `prompts` match (under
// `salts`): what a failed call must leave as it was.
struct PrefixSnapshot {
  Snapshot base;
  std::vector<std::pair<std::string, int64_t>> numbers;
};

inline PrefixSnapshot TakePrefixSnapshot(const KvCache& cache, absl::Span<const RequestId> ids,
                                         absl::Span<const std::vector<int32_t>> prompts,
                                         absl::Span<const std::string> salts = {""}) {
  PrefixSnapshot s;
  s.base = TakeSnapshot(cache, ids);
  const Stats st = cache.GetStats();
  s.numbers = {{"prefix_lookups", st.prefix_lookups},
               {"prefix_lookup_tokens", st.prefix_lookup_tokens},
               {"prefix_hit_tokens", st.prefix_hit_tokens},
               {"prefix_stored_blocks", st.prefix_stored_blocks},
               {"prefix_evictions", st.prefix_evictions},
               {"prefix_cached_bytes", st.prefix_cached_bytes},
               {"prefix_evictable_bytes", st.prefix_evictable_bytes}};
  for (size_t p = 0; p < prompts.size(); ++p) {
    for (const std::string& salt : salts) {
      absl::StatusOr<int64_t> m = cache.MatchPrefix(prompts[p], salt);
      s.numbers.emplace_back(absl::StrFormat("match[%d,%s]", p, salt), m.value_or(-1));
    }
  }
  return s;
}

inline std::string PrefixSnapshotDiff(const PrefixSnapshot& a, const PrefixSnapshot& b) {
  std::string out = SnapshotDiff(a.base, b.base);
  for (size_t i = 0; i < a.numbers.size() && i < b.numbers.size(); ++i) {
    if (a.numbers[i].second != b.numbers[i].second) {
      absl::StrAppend(&out, a.numbers[i].first, ": ", a.numbers[i].second, " -> ",
                      b.numbers[i].second, "; ");
    }
  }
  return out;
}

}  // namespace kvmem::test

#endif  // KVMEM_TESTS_PREFIX_TEST_UTIL_H_
