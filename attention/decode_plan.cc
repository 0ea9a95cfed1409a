// The split-KV plan of a decode step (decode_plan.h): which CTA reads which token range of
// which request. Plain host code, built with or without CUDA, so its properties are tested
// everywhere (tests/decode_plan_test.cc); cuda_decode_workspace.cc uploads what it writes.
#include "attention/decode_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "src/core/int_math.h"

namespace kvmem::internal {
namespace {

int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// Pieces a range of `tokens` is cut into for a chunk of at most `chunk` tokens: equal
// pieces of whole tiles (no short tail piece). 0 tokens make one (empty) piece.
struct Pieces {
  int64_t count;
  int64_t size;
};
Pieces CutRange(int64_t tokens, int64_t chunk, int tile_tokens) {
  if (tokens <= chunk) return {1, tokens};
  const int64_t size = RoundUp(CeilDiv(tokens, CeilDiv(tokens, chunk)), tile_tokens);
  return {CeilDiv(tokens, size), size};
}

// One work item before it is placed in the dispatch order.
struct Piece {
  int32_t b;
  int32_t start;
  int32_t end;
  int32_t index;  // among its request's pieces
};

}  // namespace

void SetDecodeRowIds(absl::Span<const int32_t> row_ids, absl::Span<DecodeWork> work) {
  for (DecodeWork& w : work) w.index = row_ids[w.b];
}

int MaxDecodeWork(int max_batch, int num_kv_heads, int resident_ctas) {
  // One piece per request, plus at most 1 / kMinPieceLoad waves of extra pieces from
  // the straggler cap (see below), or a wave from the one-wave cut.
  const int wave = static_cast<int>(CeilDiv(resident_ctas, num_kv_heads));
  return max_batch + static_cast<int>(std::ceil(1 / kMinPieceLoad)) * wave + 1;
}

absl::StatusOr<int> BuildDecodePlan(absl::Span<const int32_t> lens, int window_left,
                                    int num_kv_heads, int tile_tokens, int resident_ctas,
                                    int max_work, const DecodeSplitPolicy& policy,
                                    int32_t* work_begin, DecodeWork* work) {
  const int batch_size = static_cast<int>(lens.size());
  // The query sits at len - 1 and sees [max(0, len - 1 - window_left), len).
  std::vector<int64_t> first(batch_size), tiles(batch_size);
  int64_t total_tiles = 0;
  int64_t longest = 0;
  for (int b = 0; b < batch_size; ++b) {
    first[b] = window_left >= 0 ? std::max<int64_t>(0, int64_t{lens[b]} - 1 - window_left) : 0;
    tiles[b] = CeilDiv(lens[b] - first[b], tile_tokens);
    total_tiles += tiles[b];
    longest = std::max(longest, tiles[b]);
  }

  // The chunk, in tiles, that no piece exceeds. When batch * kv_heads fits one wave of
  // resident CTAs: the smallest whose CTAs still fit it (binary search: the count only
  // falls as the chunk grows, and fits at the longest range). Otherwise the CTAs fill the
  // device whatever the chunk, and it bounds what a late-starting or slow piece adds to
  // the launch: policy.piece_load of a slot's average load, so that one long request
  // among short ones is cut into pieces that run beside the rest instead of alone at the
  // end (its pieces are dispatched first). Uniform batches of 2 waves or more are not cut.
  int64_t chunk = std::numeric_limits<int32_t>::max();
  if (int64_t{batch_size} * num_kv_heads < resident_ctas) {
    auto ctas = [&](int64_t chunk_tiles) {
      int64_t n = 0;
      for (int b = 0; b < batch_size; ++b) n += CutRange(tiles[b], chunk_tiles, 1).count;
      return n * num_kv_heads;
    };
    int64_t lo = kMinChunkTiles;
    int64_t hi = std::max(lo, longest);
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (ctas(mid) <= resident_ctas) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    chunk = lo;
  } else if (policy.piece_load > 0) {
    const double load = std::max(policy.piece_load, kMinPieceLoad) *
                        static_cast<double>(total_tiles * num_kv_heads) / resident_ctas;
    chunk = std::max<int64_t>(kMinChunkTiles, static_cast<int64_t>(std::ceil(load)));
  }

  std::vector<Piece> pieces;
  int n = 0;
  for (int b = 0; b < batch_size; ++b) {
    const int64_t len = lens[b];
    const Pieces cut = CutRange(len - first[b], chunk * tile_tokens, tile_tokens);
    if (n + cut.count > max_work || cut.count > kMaxDecodePieces) {
      return absl::InternalError(absl::StrCat("decode plan needs more than ", max_work,
                                              " work items, or request ", b, " more than ",
                                              kMaxDecodePieces, " (a sizing bug)"));
    }
    work_begin[b] = n;
    n += static_cast<int>(cut.count);
    for (int64_t i = 0; i < cut.count; ++i) {
      pieces.push_back({b, static_cast<int32_t>(first[b] + i * cut.size),
                        static_cast<int32_t>(std::min(first[b] + (i + 1) * cut.size, len)),
                        static_cast<int32_t>(i)});
    }
  }
  work_begin[batch_size] = n;

  // Dispatch order: longest first, ties in request order (CTAs start in grid order as
  // SMs free up, so the short pieces fill in around the long ones at the end).
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& x, const Piece& y) {
    return x.end - x.start > y.end - y.start;
  });
  for (int w = 0; w < n; ++w) {
    const Piece& p = pieces[w];
    work[w] = {p.b, p.start,  p.end, PackDecodeMeta(work_begin[p.b + 1] - work_begin[p.b], p.index),
               0,   {0, 0, 0}};
  }
  return n;
}

}  // namespace kvmem::internal
