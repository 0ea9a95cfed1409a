#include "kvmem/config.h"

#include "absl/strings/str_format.h"

namespace kvmem {

absl::Status ValidateShape(const KvCacheConfig& c) {
  auto bad = [](std::string_view field, int64_t value, std::string_view want) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KvCacheConfig.%s = %d: %s", field, value, want));
  };
  if (c.num_layers < 1) return bad("num_layers", c.num_layers, "must be >= 1");
  if (c.num_kv_heads < 1) return bad("num_kv_heads", c.num_kv_heads, "must be >= 1");
  if (c.head_dim < 1) return bad("head_dim", c.head_dim, "must be >= 1");
  if (c.page_tokens < 1) return bad("page_tokens", c.page_tokens, "must be >= 1");
  if (c.chunk_tokens < 0 || c.chunk_tokens > (1 << 30) ||
      (c.chunk_tokens & (c.chunk_tokens - 1)) != 0) {
    return bad("chunk_tokens", c.chunk_tokens, "must be 0 (auto) or a power of two <= 2^30");
  }
  if (c.max_requests < 1) return bad("max_requests", c.max_requests, "must be >= 1");
  if (c.max_context < 1) return bad("max_context", c.max_context, "must be >= 1");
  // Slots are int32 in the token index (SGLang's req_to_token); positions must fit too.
  if (c.max_context > (int64_t{1} << 30)) {
    return bad("max_context", c.max_context, "must be <= 2^30");
  }
  if (c.memory_budget_bytes < 1) {
    return bad("memory_budget_bytes", c.memory_budget_bytes, "must be >= 1");
  }
  if (c.map_ahead_tokens < 0) return bad("map_ahead_tokens", c.map_ahead_tokens, "must be >= 0");
  const int64_t g = c.host_granularity;
  if (c.device == DeviceKind::kHost && (g < 4096 || (g & (g - 1)) != 0)) {
    return bad("host_granularity", g, "must be a power of two >= 4096");
  }
  if (c.page_placement != PagePlacement::kContiguous &&
      c.page_placement != PagePlacement::kLowestFirst) {
    return bad("page_placement", static_cast<int>(c.page_placement), "unknown page placement");
  }
  if (c.device != DeviceKind::kHost && c.device != DeviceKind::kCuda) {
    return bad("device", static_cast<int>(c.device), "unknown device kind");
  }
  return absl::OkStatus();
}

std::string DescribeConfig(const KvCacheConfig& c) {
  return absl::StrFormat(
      "%s%s layers=%d kv_heads=%d head_dim=%d %s page_tokens=%d max_requests=%d "
      "max_context=%d budget=%.2f GiB device=%s",
      c.layout == Layout::kPaged ? "paged" : "virtual",
      c.layout == Layout::kVirtual
          ? (c.arrangement == Arrangement::kPerLayer ? std::string("/per-layer")
             : c.chunk_tokens == 0                   ? std::string("/all-layers chunk=auto")
                                   : absl::StrFormat("/all-layers chunk=%d", c.chunk_tokens))
          : std::string(c.page_placement == PagePlacement::kContiguous ? "/contiguous"
                                                                       : "/lowest-first"),
      c.num_layers, c.num_kv_heads, c.head_dim, DTypeName(c.dtype), c.page_tokens, c.max_requests,
      c.max_context, static_cast<double>(c.memory_budget_bytes) / (1 << 30),
      c.device == DeviceKind::kHost ? "host" : absl::StrFormat("cuda:%d", c.device_ordinal));
}

}  // namespace kvmem
