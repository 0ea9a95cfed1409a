#include "kvmem/config.h"

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "src/core/host_limits.h"
#include "src/core/int_math.h"

namespace kvmem {
namespace {

// Largest max_context: slots and positions are int32 in the token index.
constexpr int64_t kMaxContext = int64_t{1} << 30;
// Largest host_granularity: one granule is what a copy on write copies.
constexpr int64_t kMaxHostGranularity = int64_t{1} << 30;

}  // namespace

absl::Status ValidateShape(const KvCacheConfig& c) {
  auto bad = [](std::string_view field, int64_t value, std::string_view want) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KvCacheConfig.%s = %d: %s", field, value, want));
  };
  // Enums first: a value outside the enum (a cast from a wrong integer) would otherwise
  // run as one of the others.
  if (c.layout != Layout::kPaged && c.layout != Layout::kVirtual) {
    return bad("layout", static_cast<int>(c.layout), "unknown layout (kPaged = 0, kVirtual = 1)");
  }
  if (c.arrangement != Arrangement::kAllLayers && c.arrangement != Arrangement::kPerLayer) {
    return bad("arrangement", static_cast<int>(c.arrangement),
               "unknown arrangement (kAllLayers = 0, kPerLayer = 1)");
  }
  if (c.dtype != DType::kFloat32 && c.dtype != DType::kBFloat16 && c.dtype != DType::kFloat16) {
    return bad("dtype", static_cast<int>(c.dtype),
               "unknown dtype (kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2)");
  }
  if (c.page_placement != PagePlacement::kContiguous &&
      c.page_placement != PagePlacement::kLowestFirst) {
    return bad("page_placement", static_cast<int>(c.page_placement),
               "unknown page placement (kContiguous = 0, kLowestFirst = 1)");
  }
  if (c.device != DeviceKind::kHost && c.device != DeviceKind::kCuda) {
    return bad("device", static_cast<int>(c.device), "unknown device kind (kHost = 0, kCuda = 1)");
  }
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
  if (c.max_context > kMaxContext) return bad("max_context", c.max_context, "must be <= 2^30");
  if (c.memory_budget_bytes < 1) {
    return bad("memory_budget_bytes", c.memory_budget_bytes, "must be >= 1");
  }
  if (c.prefix_cache_max_bytes < 0) {
    return bad("prefix_cache_max_bytes", c.prefix_cache_max_bytes, "must be >= 0");
  }
  if (c.map_ahead_tokens < 0 || c.map_ahead_tokens > c.max_context) {
    return bad("map_ahead_tokens", c.map_ahead_tokens,
               absl::StrFormat("must be in [0, max_context = %d]", c.max_context));
  }
  const int64_t g = c.host_granularity;
  if (c.device == DeviceKind::kHost &&
      (g < 4096 || g > kMaxHostGranularity || (g & (g - 1)) != 0)) {
    return bad("host_granularity", g,
               "must be a power of two in [4096, 2^30] (a copy on write copies one granule)");
  }
  if (c.device == DeviceKind::kCuda && c.device_ordinal < 0) {
    return bad("device_ordinal", c.device_ordinal, "must be >= 0");
  }

  // Every product the layouts form from the shape must fit 64 bits: the bytes of a token,
  // of one request at max_context (a budget holds at least that), and of a paged page.
  // The fields are each at most INT_MAX, so kv_heads * head_dim fits.
  const int64_t heads_dim = int64_t{c.num_kv_heads} * c.head_dim;
  int64_t layer_bytes = 0;
  int64_t token_bytes = 0;
  if (!internal::CheckedMul(heads_dim, DTypeBytes(c.dtype), &layer_bytes) ||
      !internal::CheckedMul(layer_bytes, 2 * int64_t{c.num_layers}, &token_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KvCacheConfig: a token's K and V (num_layers %d x 2 x num_kv_heads %d x head_dim %d x "
        "%d bytes of %s) is more than 2^63 bytes",
        c.num_layers, c.num_kv_heads, c.head_dim, DTypeBytes(c.dtype), DTypeName(c.dtype)));
  }
  int64_t request_bytes = 0;
  if (!internal::CheckedMul(c.max_context, token_bytes, &request_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KvCacheConfig: one request at max_context %d tokens of %d bytes is more than 2^63 "
        "bytes, more than any budget",
        c.max_context, token_bytes));
  }
  int64_t page_bytes = 0;
  if (c.layout == Layout::kPaged &&
      !internal::CheckedMul(c.page_tokens, token_bytes, &page_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KvCacheConfig: a page of page_tokens %d tokens of %d bytes is more than 2^63 bytes",
        c.page_tokens, token_bytes));
  }

  // Host bookkeeping that grows with the rows, checked before anyone allocates it: a
  // record per row and, for paged, the int32 token index [max_requests][max_context]
  // (address space at first; resident as rows are written, up to all of it).
  const int64_t per_row =
      internal::kRowBookkeepingBytes +
      (c.layout == Layout::kPaged ? internal::SatMul(c.max_context, sizeof(int32_t)) : 0);
  const int64_t rows_bytes = internal::SatMul(c.max_requests, per_row);
  return internal::CheckHostBookkeeping(
      c.layout == Layout::kPaged
          ? absl::StrFormat("KvCacheConfig: max_requests %d rows x (%d bytes of row records + "
                            "max_context %d x 4 bytes of token index)",
                            c.max_requests, internal::kRowBookkeepingBytes, c.max_context)
          : absl::StrFormat("KvCacheConfig: max_requests %d rows x %d bytes of row records",
                            c.max_requests, internal::kRowBookkeepingBytes),
      rows_bytes);
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
