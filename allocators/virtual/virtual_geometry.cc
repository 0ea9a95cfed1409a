// VirtualGeometry (allocators/virtual/virtual_geometry.h): the page arithmetic of the
// virtual layout and the checks that keep its offsets within 64 bits.
#include "allocators/virtual/virtual_geometry.h"

#include <algorithm>
#include <cstdint>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kvmem/dtype.h"

namespace kvmem::internal {
namespace {

// a * b, or false when it overflows int64 or either is negative.
bool MulOk(int64_t a, int64_t b, int64_t* out) {
  return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

// KvCacheConfig::chunk_tokens resolved: 0 gives the smallest power of two whose one
// layer's K and V (2 * chunk * layer_bytes) fill a page, at most max_context rounded up
// to a power of two. Why a page: decode reads one layer, and every page it touches costs
// an address-translation entry; with whole pages per layer it touches as few as the
// per-layer arrangement does (docs/kernels.md).
int64_t ChunkTokens(const KvCacheConfig& c, int64_t layer_bytes, int64_t granularity) {
  if (c.chunk_tokens > 0) return c.chunk_tokens;
  int64_t chunk = 1;
  while (2 * chunk * layer_bytes < granularity && chunk < c.max_context) chunk *= 2;
  return chunk;
}

}  // namespace

int64_t VirtualGeometry::CoveredBytes(int64_t tokens, int64_t page) const {
  const int64_t lo = page * granularity;
  const int64_t hi = lo + granularity;
  auto overlap = [&](int64_t a, int64_t b) {  // |[a, b) n [lo, hi)|
    return std::max<int64_t>(0, std::min(b, hi) - std::max(a, lo));
  };
  const int64_t full = ChunkStart(tokens);  // tokens of whole chunks
  int64_t bytes = overlap(0, full * segment_token_bytes);
  const int64_t partial = tokens - full;
  if (partial == 0) return bytes;
  // The partial chunk: the first `partial` tokens of each block that meets the page.
  const int64_t start = full * segment_token_bytes;
  const int64_t bb = block_bytes();
  const int64_t first = std::max<int64_t>(0, (lo - start) / bb);
  for (int64_t j = first; j < chunk_blocks && start + j * bb < hi; ++j) {
    const int64_t a = start + j * bb;
    bytes += overlap(a, a + partial * block_token_bytes());
  }
  return bytes;
}

absl::StatusOr<VirtualGeometry> VirtualGeometry::Make(const KvCacheConfig& c, int64_t granularity) {
  if (granularity <= 0 || (granularity & (granularity - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: backend granularity %d is not a power of two", granularity));
  }
  VirtualGeometry g;
  g.granularity = granularity;
  g.rows = c.max_requests;
  g.max_context = c.max_context;
  // Keep every product below 2^62 so that sums of two offsets cannot overflow either.
  constexpr int64_t kLimit = int64_t{1} << 62;
  int64_t layer_bytes = 0;
  int64_t token_bytes = 0;
  int64_t row_bytes = 0;
  int64_t total = 0;
  if (!MulOk(int64_t{c.num_kv_heads} * c.head_dim, DTypeBytes(c.dtype), &layer_bytes) ||
      !MulOk(layer_bytes, 2 * int64_t{c.num_layers}, &token_bytes) || token_bytes > kLimit) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: %d layers x %d kv heads x %d head_dim overflows 64-bit byte offsets",
        c.num_layers, c.num_kv_heads, c.head_dim));
  }
  const bool all = c.arrangement == Arrangement::kAllLayers;
  const int64_t segments = all ? 1 : 2 * int64_t{c.num_layers};
  if (segments > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("virtual layout: %d layers is too many segments", c.num_layers));
  }
  g.segments = static_cast<int32_t>(segments);
  g.segment_token_bytes = all ? token_bytes : layer_bytes;
  if (all) {
    g.chunk_tokens = ChunkTokens(c, layer_bytes, granularity);
    if (g.chunk_tokens > 1) g.chunk_blocks = 2 * int64_t{c.num_layers};
  }
  // Whole chunks: the last one may reach past max_context.
  const int64_t row_tokens = g.WholeChunks(c.max_context);
  if (!MulOk(row_tokens, g.segment_token_bytes, &row_bytes) || row_bytes > kLimit) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: %d tokens (max_context %d in chunks of %d) x %d bytes per token "
        "overflows 64-bit byte offsets",
        row_tokens, c.max_context, g.chunk_tokens, g.segment_token_bytes));
  }
  g.segment_row_stride = (row_bytes + granularity - 1) / granularity * granularity;
  g.pages_per_segment = g.segment_row_stride / granularity;
  if (!MulOk(segments * g.rows, g.segment_row_stride, &total) || total > kLimit) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtual layout: %d rows x %d segments x %d bytes of address space overflows 64-bit "
        "byte offsets",
        g.rows, segments, g.segment_row_stride));
  }
  return g;
}

}  // namespace kvmem::internal
