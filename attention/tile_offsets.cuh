// The token offsets of an attention kernel's KV tiles, staged in shared memory ahead of
// the copies that read them (internal; used by the decode and both extend kernels).
//
// A kernel streams tokens [lo, hi) of request b in tiles of kTile through a kStages-deep
// cp.async pipeline. Each token's element offset is resolved once, by one "resolving"
// thread per token, into a ring of kStages slots of 64-bit offsets; every thread's
// 16-byte K/V copies of the tile then read their row's offset from there.
//
// Where the index entry behind an offset differs per token (the paged layout's page id),
// the tile's distinct entries are brought into shared memory by 4-byte cp.async copies
// that travel in the commit group of the K/V copies kStages tiles earlier: they land when
// the kernel waits for that group anyway, no warp waits on a global load inside the
// loop, and the page-table traffic is one copy per page, not per token (a 4-byte
// cp.async costs a shared-memory wavefront per thread). Page and in-page position come
// from a multiply-high (fast_divmod.h), not a division. The resolving happens after the
// barrier, while the tile's math runs. The virtual layout's index (the row id) is the
// same for every token of a request: it is read once. docs/kernels.md has the measured
// history (a plain load a tile ahead; a 4-byte copy per token).
//
// The schedule every kernel follows (kStages >= 2; tiles past the range resolve to 0 and
// fetch nothing). Group g holds the K/V copies of tile g and the index entries of tile
// g + kStages; a FetchIndex issued after a commit joins the next group.
//   prologue:    ResolveNow(s) for s < kStages;  __syncthreads();
//                for s < kStages - 1: copy tile s; FetchIndex(s + kStages); commit
//                FetchIndex(2 * kStages - 1)
//   iteration j: cp.async.wait_group kStages - 2;     // groups <= j complete
//                __syncthreads();                     // tile j and index j + kStages visible
//                copy tile j + kStages - 1 (offsets resolved last iteration);  commit
//                (the tile's math may be issued here)
//                Resolve(j + kStages);  FetchIndex(j + 2 * kStages)
// Slot reuse: the offsets of tile t (slot t % kStages) are written at iteration t - kStages
// and read after the next barrier; their slot was last read at iteration t - 2 kStages + 1.
// The index entries of tile t (slot t % (kStages + 1)) are read at iteration t - kStages;
// the copy that next fills the slot (tile t + kStages + 1) is issued one barrier later.
#ifndef KVMEM_ATTENTION_TILE_OFFSETS_CUH_
#define KVMEM_ATTENTION_TILE_OFFSETS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/device_utils.cuh"

namespace kvmem::internal {

// Shared memory of a TileOffsets ring: offsets [stages][tile] int64, then index entries
// [stages + 1][tile] int32.
constexpr int TileOffsetsBytes(int tile, int stages) {
  return tile * (8 * stages + 4 * (stages + 1));
}

template <typename Kv, int kTile, int kStages>
class TileOffsets {
 public:
  static_assert(kStages >= 2, "tile t's offsets are written while tile t - 1 is copied");

  // Tokens [lo, hi) of request b; `ring` is TileOffsetsBytes(kTile, kStages) bytes of
  // shared memory, 8-byte aligned. This thread resolves token `token` of every tile when
  // `resolves`, and copies index entry `copier` of every tile when the tile has that many.
  __device__ __forceinline__ TileOffsets(const Kv& kv, int b, int lo, int hi, uint8_t* ring,
                                         int token, bool resolves, int copier)
      : kv_(kv),
        request_(Offsets::ForRequest(kv, b)),
        lo_(lo),
        hi_(hi),
        ring_(ring),
        token_(token),
        resolves_(resolves),
        copier_(copier) {}

  // The offsets of tile t from a plain load of each index entry (the prologue's first
  // kStages tiles, before the first barrier). For layouts with one entry per request (the
  // virtual row id), `index` >= 0 is that entry, already at hand (the decode work item
  // carries it): no load.
  __device__ __forceinline__ void ResolveNow(int t, int32_t index = -1) {
    if (!resolves_) return;
    const int pos = Start(t) + token_;
    if (pos >= hi_) {
      Offset(t) = 0;
      return;
    }
    if (!Offsets::kPerRequest || index < 0) index = Offsets::Fetch(kv_, request_, pos);
    // kPerRequest: every tile's entry, kept in this thread's index slot (shared memory,
    // not a register held across the kernel's loop).
    if constexpr (Offsets::kPerRequest) Index(0, token_) = index;
    Offset(t) = Offsets::Finish(kv_, request_, index, pos);
  }

  // Issues the copies of tile t's distinct index entries into the caller's open cp.async
  // group, one 4-byte copy per entry: a tile of 16-token pages needs 8 or 9.
  __device__ __forceinline__ void FetchIndex(int t) {
    if constexpr (!Offsets::kPerRequest) {
      const int start = Start(t);
      if (start >= hi_) return;
      const int first = Offsets::Entry(request_, start);
      const int count = Offsets::Entry(request_, min(start + kTile, hi_) - 1) - first + 1;
      if (copier_ < count) {
        CpAsync4(SmemAddr(&Index(t, copier_)), Offsets::EntryAddress(request_, first + copier_));
      }
    }
  }

  // The offsets of tile t, once every thread waited for the group holding its index
  // entries and a barrier followed (the entries were copied by other threads).
  __device__ __forceinline__ void Resolve(int t) {
    if (!resolves_) return;
    const int start = Start(t);
    const int pos = start + token_;
    if (pos >= hi_) {
      Offset(t) = 0;
      return;
    }
    if constexpr (Offsets::kPerRequest) {
      Offset(t) = Offsets::Finish(kv_, request_, Index(0, token_), pos);
    } else {
      const int slot = Offsets::Entry(request_, pos) - Offsets::Entry(request_, start);
      Offset(t) = Offsets::Finish(kv_, request_, Index(t, slot), pos);
    }
  }

  // Issues this thread's share of tile t's K and V copies (16 bytes each, kThreads
  // threads) into the stage at k_dst / v_dst, rows past hi zero-filled without a read (a
  // finite value the kernels mask out). dst_byte(row, chunk) is where 16-byte chunk
  // `chunk` of a row goes in the stage's swizzled layout. After the barrier that follows
  // tile t's Resolve / ResolveNow. kReadOnce: the launch reads these K/V rows once (decode),
  // so they are tagged to leave L2 first (CpAsync16EvictFirst).
  template <int kHeadDim, int kThreads, bool kReadOnce = false, typename T, typename DstByte>
  __device__ __forceinline__ void CopyTile(int t, const T* k_head, const T* v_head, uint32_t k_dst,
                                           uint32_t v_dst, int tid, DstByte dst_byte) const {
    constexpr int kCpr = kHeadDim / 8;  // 16-byte chunks per row
    static_assert(kTile * kCpr % kThreads == 0, "whole copy rounds per tile");
    const int64_t* offs = Tile(t);
    const int start = Start(t);
    const uint64_t policy = kReadOnce ? EvictFirstPolicy() : 0;
#pragma unroll
    for (int it = 0; it < kTile * kCpr / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int row = i / kCpr;
      const int c = i % kCpr;
      const bool valid = start + row < hi_;
      const int64_t src = offs[row] + c * 8;
      const uint32_t dst = dst_byte(row, c);
      const T* k_src = valid ? k_head + src : k_head;
      const T* v_src = valid ? v_head + src : v_head;
      if constexpr (kReadOnce) {
        CpAsync16EvictFirst(k_dst + dst, k_src, valid ? 16 : 0, policy);
        CpAsync16EvictFirst(v_dst + dst, v_src, valid ? 16 : 0, policy);
      } else {
        CpAsync16(k_dst + dst, k_src, valid ? 16 : 0);
        CpAsync16(v_dst + dst, v_src, valid ? 16 : 0);
      }
    }
  }

  // CopyTile into stage t % kStages of the [kStages][kTile][kHeadDim] K and V rings at
  // k_smem / v_smem, in the XorSwizzle layout that the cp.async kernels' ldmatrix reads.
  template <int kHeadDim, int kThreads, bool kReadOnce = false, typename T>
  __device__ __forceinline__ void CopyTileToStage(int t, const T* k_head, const T* v_head,
                                                  const T* k_smem, const T* v_smem, int tid) const {
    const int stage_elems = (t % kStages) * kTile * kHeadDim;
    CopyTile<kHeadDim, kThreads, kReadOnce>(
        t, k_head, v_head, SmemAddr(k_smem + stage_elems), SmemAddr(v_smem + stage_elems), tid,
        [](int row, int c) {
          return static_cast<uint32_t>(XorSwizzle<kHeadDim>(row, c) * sizeof(T));
        });
  }

  // Element offsets of tile t's tokens (0 past hi), after the barrier that follows its
  // Resolve / ResolveNow.
  __device__ __forceinline__ const int64_t* Tile(int t) const {
    return reinterpret_cast<const int64_t*>(ring_) + (t % kStages) * kTile;
  }

 private:
  using Offsets = SplitOffset<Kv>;

  __device__ __forceinline__ int Start(int t) const { return lo_ + t * kTile; }
  // This thread's offset slot of tile t, and index slot i of tile t; both arrays are
  // addressed from one base so the kernel keeps one pointer.
  __device__ __forceinline__ int64_t& Offset(int t) const {
    return reinterpret_cast<int64_t*>(ring_)[(t % kStages) * kTile + token_];
  }
  __device__ __forceinline__ int32_t& Index(int t, int i) const {
    return reinterpret_cast<int32_t*>(ring_ + kStages * kTile * 8)[(t % (kStages + 1)) * kTile + i];
  }

  const Kv& kv_;
  const typename Offsets::Request request_;
  const int lo_;
  const int hi_;
  uint8_t* const ring_;
  const int token_;
  const bool resolves_;
  const int copier_;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_TILE_OFFSETS_CUH_
