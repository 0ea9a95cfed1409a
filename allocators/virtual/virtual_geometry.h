// VirtualGeometry: where the bytes of the virtual layout live. Plain arithmetic, 64-bit
// throughout; docs/layouts.md has the shapes.
//
// Segments: kAllLayers has one per row, [row][chunk][layer][k|v][chunk token][head][dim];
// kPerLayer has 2 * layers (layer l: K is segment 2l, V is 2l + 1), each
// [row][token][head][dim]. Segment s of row r starts at (s * max_requests + r) *
// segment_row_stride, the stride being max_context tokens in whole chunks, rounded up to
// the granularity. Page k of a segment covers its bytes [k * G, (k + 1) * G); a token or a
// block may straddle two pages.
//
// A segment row is a run of chunks of chunk_tokens tokens (kPerLayer and unchunked
// kAllLayers: chunks of one token). A chunk is chunk_blocks equal blocks (kAllLayers: one
// per layer and K/V, in that order), and token i of a chunk takes bytes
// [i * block_token_bytes, + block_token_bytes) of every block. Rows map whole chunks:
// tokens [0, n) need the pages of chunks [0, ceil(n / chunk_tokens)).
#ifndef KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_GEOMETRY_H_
#define KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_GEOMETRY_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "kvmem/config.h"

namespace kvmem::internal {

struct VirtualGeometry {
  int64_t granularity = 0;
  int32_t rows = 0;
  int64_t max_context = 0;
  int32_t segments = 0;
  int64_t segment_token_bytes = 0;  // bytes of one token in one segment
  int64_t chunk_tokens = 1;         // a power of two
  int64_t chunk_blocks = 1;
  int64_t segment_row_stride = 0;  // max_context tokens in whole chunks, rounded up to pages
  int64_t pages_per_segment = 0;   // segment_row_stride / granularity

  // InvalidArgument when the shape overflows 64-bit offsets.
  static absl::StatusOr<VirtualGeometry> Make(const KvCacheConfig& config, int64_t granularity);

  int64_t chunk_bytes() const { return chunk_tokens * segment_token_bytes; }
  int64_t block_bytes() const { return chunk_bytes() / chunk_blocks; }
  int64_t block_token_bytes() const { return segment_token_bytes / chunk_blocks; }
  // The first token of the chunk holding `token`.
  int64_t ChunkStart(int64_t token) const { return token & ~(chunk_tokens - 1); }
  // `tokens` rounded up to whole chunks.
  int64_t WholeChunks(int64_t tokens) const { return ChunkStart(tokens + chunk_tokens - 1); }
  // Pages of each segment that hold tokens [0, tokens): whole chunks.
  int64_t PagesFor(int64_t tokens) const {
    const int64_t bytes = WholeChunks(tokens) * segment_token_bytes;
    return (bytes + granularity - 1) / granularity;
  }
  // The first page of the chunk holding `token`: where a write of it may need a page (a
  // chunk's pages are mapped together); at or before the first page its own bytes touch.
  int64_t PageOf(int64_t token) const {
    return ChunkStart(token) * segment_token_bytes / granularity;
  }
  // Bytes of page `page` (of any segment) holding one of the first `tokens` tokens.
  int64_t CoveredBytes(int64_t tokens, int64_t page) const;
  // Byte offset of page `page` of segment `seg` of row `row` in the reservation.
  int64_t Offset(int32_t row, int64_t page, int32_t seg) const {
    return (int64_t{seg} * rows + row) * segment_row_stride + page * granularity;
  }
  int64_t reservation_bytes() const { return int64_t{segments} * rows * segment_row_stride; }
  int64_t pages_per_request() const { return int64_t{segments} * pages_per_segment; }
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_VIRTUAL_GEOMETRY_H_
