// The Hopper (sm_90a) extend / prefill kernel for head_dim 64 and 128 (internal to
// attention/extend_attention.cu): the work list, row packing and masking of
// extend_kernel.cuh, with the products on warpgroup MMA (wgmma) and the K/V stages
// filled by a producer warpgroup.
//
// Persistent CTAs of three warpgroups, at most one per SM: CTA i runs the (work item, KV
// head) pairs of rounds 0, 1, ... (round r's pairs are [r G, r G + G) for a grid of G,
// taken in snake order so the heaviest-first list spreads evenly), each 128 packed rows
// (token r / group, query head r % group). The K/V ring runs on across pairs, and Q has
// two buffers, so the producer loads the next pair's Q and first tiles while the
// consumers finish the last ones and write O: no CTA start, Q load or pipeline fill between
// pairs. Per CTA:
//   * warpgroup 0, the producer, keeps 40 registers per thread (setmaxnreg) and fills a
//     kStages-deep ring of K and V stages. A tile of kBlockN tokens that lies wholly in
//     the request's range arrives by bulk tensor copies (TMA, kv_tensor_map.h): one box
//     per slab for an unchunked virtual row, one per tma_rows tokens of a page (a chunk
//     of a chunked virtual row) otherwise, each landing already 128-byte swizzled. The last,
//     partial tile (rows past the end zero-filled: a box would read past the request, into unmapped
//     virtual memory or another request's page, and stale V rows could hold NaNs that 0 * V keeps),
//     and every tile of pages (chunks) whose size has no multiple-of-8 power-of-two divisor, go by
//     16-byte cp.async, one token row per producer thread. Every producer thread arrives
//     on the stage's "full" mbarrier (tma.cuh): by its own TMA transaction bytes, or once
//     its cp.async copies have landed.
//   * warpgroups 1 and 2, the consumers, own rows [0, 64) and [64, 128) with 232
//     registers per thread. Per tile j: S_j = Q K_j^T (wgmma m64n128k16, Q from registers
//     loaded once per pair, K read by descriptor) is issued together with O += P_{j-1} V_{j-1} (P
//     converted in registers to the A fragment); the online softmax of S_j (exp2 domain, mask only
//     on tiles that straddle the causal or window edge) runs while that P V product is on the
//     tensor cores, then O is rescaled. Each stage is released as soon as its product landed. The
//     two consumers take turns issuing products (FA3's pingpong), so one's softmax also runs under
//     the other's tensor-core work.
// The key range starts at a multiple of kBlockN (a window's first tile is masked), so a
// full tile's boxes start page- (chunk-) aligned.
// Why not the mma.sync kernel: on Hopper mma.sync reaches about half of the tensor
// cores' rate, and its operand traffic through ldmatrix limits it before that
// (docs/kernels.md).
#ifndef KVMEM_ATTENTION_EXTEND_WGMMA_KERNEL_CUH_
#define KVMEM_ATTENTION_EXTEND_WGMMA_KERNEL_CUH_

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/device_utils.cuh"
#include "attention/extend_kernel.cuh"
#include "attention/kv_tensor_map.h"
#include "attention/tma.cuh"
#include "attention/wgmma.cuh"

namespace kvmem::internal {

template <int kHeadDim>
struct WgmmaExtendConfig;
template <>
struct WgmmaExtendConfig<64> {
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 3;
};
template <>
struct WgmmaExtendConfig<128> {
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;  // 160 KiB with Q: one CTA per SM
};

template <typename T, int kHeadDim>
struct WgmmaExtendSmem {
  using Cfg = WgmmaExtendConfig<kHeadDim>;
  static constexpr int kThreads = 384;      // producer + two consumer warpgroups
  static constexpr int kProducerRegs = 40;  // setmaxnreg: 128 x 40 + 256 x 232 <= 64 K
  static constexpr int kConsumerRegs = 232;
  static constexpr int kBlockM = 128;  // = ExtendSmem<T, kHeadDim>::kBlockM: one plan
  static constexpr int kQBytes = kBlockM * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = Cfg::kBlockN * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kKOffset = 2 * kQBytes;  // after the two Q buffers
  static constexpr int kVOffset = kKOffset + Cfg::kStages * kStageBytes;
  // The producer's token offsets of two cp.async tiles (this one's and the next's), then
  // the mbarriers (ExtendBarriers).
  static constexpr int kOffOffset = kVOffset + Cfg::kStages * kStageBytes;
  static constexpr int kBarOffset = kOffOffset + 2 * Cfg::kBlockN * 8;  // two tiles' offsets
  static constexpr int kBars = 4 + 4 * Cfg::kStages;
  static constexpr int kBytes = kBarOffset + kBars * 8;
  static_assert(kQBytes % 1024 == 0 && kStageBytes % 1024 == 0, "swizzle atoms 1024-aligned");
  static_assert(kBlockM == ExtendSmem<T, kHeadDim>::kBlockM, "both kernels run one plan");
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 65536, "register file");
};

// The CTA's mbarriers: per Q buffer "full" (its pair's Q landed; the 128 producer
// threads) and "empty" (its pair's O is written; the 256 consumer threads), then per K/V
// stage "full" and "empty". Tiles and pairs are counted over the whole CTA (g: the CTA's
// g-th tile, i: its i-th pair), so the phases run on across pairs.
template <int kStages>
struct ExtendBarriers {
  uint32_t base;  // shared-memory address of barrier 0

  __device__ __forceinline__ uint32_t QFull(int i) const { return base + 8 * (i & 1); }
  __device__ __forceinline__ uint32_t QEmpty(int i) const { return base + 8 * (2 + (i & 1)); }
  // Tile g landed in / was consumed from its stage, K (kind 0) or V (kind 1).
  __device__ __forceinline__ uint32_t Full(int kind, int g) const {
    return base + 8 * (4 + kind * kStages + g % kStages);
  }
  __device__ __forceinline__ uint32_t Empty(int kind, int g) const {
    return base + 8 * (4 + (2 + kind) * kStages + g % kStages);
  }
  // The parity of the phase that the g-th use of a ring slot of n completes.
  __device__ __forceinline__ static uint32_t Parity(int g, int n) { return (g / n) & 1; }

  // Thread 0, before a CTA barrier.
  __device__ __forceinline__ void Init() const {
    for (int i = 0; i < 2; ++i) {
      MbarInit(QFull(i), 128);
      MbarInit(QEmpty(i), 256);
    }
    for (int g = 0; g < kStages; ++g) {
      for (int kind = 0; kind < 2; ++kind) {
        MbarInit(Full(kind, g), 128);   // every producer thread
        MbarInit(Empty(kind, g), 256);  // every consumer thread
      }
    }
  }
};

// The kernel's parameters: the common ones, and the K and V tensor maps (__grid_constant__:
// a TMA copy names a map by its parameter-space address).
template <typename Kv>
struct WgmmaExtendParams {
  ExtendParams<Kv> p;
  KvTensorMaps maps;
  int tma_rows;  // tokens per box of a full tile (8..128, divides kBlockN); 0: no TMA
};

// The producer warpgroup's view of one pair's key range: where each tile's K and V go and
// how they are copied (see the kernel's comment). Thread `ptid` of the 128; the pair's
// tile t is the CTA's tile tile_base + t (its stage and phase).
template <typename Kv, typename T, int kHeadDim>
class ExtendProducer {
 public:
  using Smem = WgmmaExtendSmem<T, kHeadDim>;
  static constexpr int kBlockN = Smem::Cfg::kBlockN;
  static constexpr int kStages = Smem::Cfg::kStages;
  using Barriers = ExtendBarriers<kStages>;
  static constexpr int kCpr = kHeadDim / 8;
  static constexpr int kSlabs = kHeadDim / 64;

  __device__ __forceinline__ ExtendProducer(const WgmmaExtendParams<Kv>& wp, Barriers bars, int b,
                                            int h, int lo, int hi, int tile_base, uint8_t* smem,
                                            int ptid)
      : wp_(wp),
        bars_(bars),
        request_(Offsets::ForRequest(wp.p.kv, b)),
        h_(h),
        lo_(lo),
        hi_(hi),
        tile_base_(tile_base),
        base_(SmemAddr(smem)),
        offs_(reinterpret_cast<int64_t*>(smem + Smem::kOffOffset)),
        ptid_(ptid),
        box_((ptid & 31) * 4 + (ptid >> 5)) {}

  // Whether tile t goes by TMA (the consumers ask too: a cp.async tile needs a proxy fence).
  __device__ __forceinline__ static bool UsesTma(int tma_rows, int lo, int hi, int t) {
    return tma_rows > 0 && lo + (t + 1) * kBlockN <= hi;
  }

  // Fills stage t % kStages with tile t: K, then V (kind 0, 1), each once its stage is
  // released.
  __device__ __forceinline__ void Load(int t) {
    const int start = lo_ + t * kBlockN;
    if (UsesTma(wp_.tma_rows, lo_, hi_, t)) {
      // Box `box_` covers tokens [start + box_ * rows, + rows): inside one page or chunk
      // (rows divides its size and the start is a multiple of rows) or the row. Its coordinates
      // were fetched while the previous tile's copies were issued, unless that one had none.
      const bool issues = box_ < kBlockN / wp_.tma_rows;
      if (issues && (t == 0 || !UsesTma(wp_.tma_rows, lo_, hi_, t - 1))) FetchBox(start);
      for (int kind = 0; kind < 2; ++kind) {
        WaitFree(kind, t);
        const uint32_t full = bars_.Full(kind, tile_base_ + t);
        if (!issues) {
          MbarArrive(full);
          continue;
        }
        const int rows = wp_.tma_rows;
        MbarArriveExpectTx(full, kSlabs * rows * 128);  // rows x 64 elements per slab
        const uint32_t dst = StageAddr(kind, t) + box_ * rows * 128;
        const CUtensorMap* map = kind == 0 ? &wp_.maps.k : &wp_.maps.v;
#pragma unroll
        for (int s = 0; s < kSlabs; ++s) {
          if constexpr (Offsets::kTmaDims == 5) {
            TmaLoad5d(dst + s * kBlockN * 128, map, full, s * 64, h_, box_at_[0], box_at_[1],
                      box_at_[2]);
          } else {
            TmaLoad4d(dst + s * kBlockN * 128, map, full, s * 64, h_, box_at_[0], box_at_[1]);
          }
        }
      }
      if (issues && UsesTma(wp_.tma_rows, lo_, hi_, t + 1)) FetchBox(start + kBlockN);
      return;
    }
    // cp.async: thread ptid resolves token ptid's offset into the tile's slot of a
    // two-tile ring; after a barrier of the producer warpgroup, consecutive threads copy
    // consecutive 16-byte chunks of a row (coalesced). The next tile's offset is loaded
    // before this tile's copies and stored after them, so the page-table read's latency
    // overlaps the stage waits instead of preceding the barrier.
    int64_t* const offs = offs_ + (t & 1) * kBlockN;
    if (t == 0 || UsesTma(wp_.tma_rows, lo_, hi_, t - 1)) {  // not resolved ahead
      ProducerSync();
      offs[ptid_] = Resolve(start + ptid_);
    }
    ProducerSync();  // this tile's offsets visible; the other slot's last reader is done
    const bool next_by_cp_async = start + kBlockN < hi_;  // the tile after a cp.async tile
    const int64_t next = next_by_cp_async ? Resolve(start + kBlockN + ptid_) : -1;
    for (int kind = 0; kind < 2; ++kind) {
      WaitFree(kind, t);
      Copy(static_cast<const T*>(kind == 0 ? wp_.p.kv.k : wp_.p.kv.v) + h_ * kHeadDim,
           StageAddr(kind, t), offs);
      CpAsyncMbarArrive(bars_.Full(kind, tile_base_ + t));
    }
    if (next_by_cp_async) offs_[((t + 1) & 1) * kBlockN + ptid_] = next;
  }

  // Stage `stage` of K (kind 0) or V (kind 1), for the producer's copies and the
  // consumers' products alike.
  __device__ __forceinline__ static uint32_t StageAddr(uint32_t smem_base, int kind, int stage) {
    return smem_base + (kind == 0 ? Smem::kKOffset : Smem::kVOffset) + stage * Smem::kStageBytes;
  }

 private:
  using Offsets = SplitOffset<Kv>;

  // The 128 producer threads only (named barrier 3; the consumers use 1 and 2).
  __device__ __forceinline__ static void ProducerSync() {
    asm volatile("bar.sync 3, 128;\n" ::: "memory");
  }

  // The TMA coordinates of this thread's box of the tile starting at `start`: token in
  // page and page, or token in chunk, chunk and row (a page-table or row-id load).
  __device__ __forceinline__ void FetchBox(int start) {
    const int pos = start + box_ * wp_.tma_rows;
    Offsets::BoxCoords(wp_.p.kv, request_, Offsets::Fetch(wp_.p.kv, request_, pos), pos, box_at_);
  }

  // Tile t's stage of K (kind 0) or V (kind 1): its shared-memory address, and a wait
  // until the consumers released it (a fresh ring is free).
  __device__ __forceinline__ uint32_t StageAddr(int kind, int t) const {
    return StageAddr(base_, kind, (tile_base_ + t) % kStages);
  }
  __device__ __forceinline__ void WaitFree(int kind, int t) const {
    const int g = tile_base_ + t;
    MbarWait(bars_.Empty(kind, g), Barriers::Parity(g, kStages) ^ 1);
  }

  // Token pos's element offset, -1 past the range.
  __device__ __forceinline__ int64_t Resolve(int pos) const {
    return pos < hi_
               ? Offsets::Finish(wp_.p.kv, request_, Offsets::Fetch(wp_.p.kv, request_, pos), pos)
               : -1;
  }

  // This thread's 16-byte copies of a tile whose offsets are offs (-1: past the range,
  // zero-filled without a read).
  __device__ __forceinline__ void Copy(const T* head, uint32_t dst, const int64_t* offs) const {
#pragma unroll 4
    for (int it = 0; it < kBlockN * kCpr / 128; ++it) {
      const int i = ptid_ + it * 128;
      const int row = i / kCpr;
      const int c = i % kCpr;
      const int64_t off = offs[row];
      CpAsync16(dst + Sw128Offset<kBlockN>(row, c), off >= 0 ? head + off + c * 8 : head,
                off >= 0 ? 16 : 0);
    }
  }

  const WgmmaExtendParams<Kv>& wp_;
  const Barriers bars_;
  const typename Offsets::Request request_;
  const int h_;
  const int lo_;
  const int hi_;
  const int tile_base_;
  const uint32_t base_;
  int64_t* const offs_;
  const int ptid_;
  // The TMA box this thread issues, if the tile has that many: lanes 0-3 of the four
  // warps take turns (box i on warp i % 4), so the up to 16 boxes of a tile of 8-token
  // page pieces are issued by four warps at once, not one after another by one warp.
  const int box_;
  int box_at_[3] = {0, 0, 0};  // its coordinates above head and dim (FetchBox)
};

// The pair that CTA `cta` of `ctas` runs in its round r: rounds go through the
// heaviest-first pair list G at a time, alternately forwards and backwards (snake order),
// so every CTA's sum of key ranges comes out nearly the same. Increases with r: once past
// the work, it stays past.
__device__ __forceinline__ int PersistentPair(int r, int cta, int ctas) {
  return r * ctas + ((r & 1) ? ctas - 1 - cta : cta);
}

template <typename Kv, typename T, int kHeadDim>
__global__ void __launch_bounds__(384, 1)
    ExtendWgmmaKernel(const __grid_constant__ WgmmaExtendParams<Kv> wp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WgmmaExtendConfig<kHeadDim>;
  using Smem = WgmmaExtendSmem<T, kHeadDim>;
  using Producer = ExtendProducer<Kv, T, kHeadDim>;
  using Barriers = ExtendBarriers<Cfg::kStages>;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kStages = Cfg::kStages;
  constexpr int kBlockM = Smem::kBlockM;
  constexpr int kCpr = kHeadDim / 8;
  constexpr int kSAcc = kBlockN / 2;
  constexpr int kOAcc = kHeadDim / 2;
  constexpr int kNBlocks = kBlockN / 8;
  constexpr int kDBlocks = kHeadDim / 8;
  static_assert(kBlockN == 128,
                "S = Q K^T is one m64n128 product per k-step; one row per producer thread");
  static_assert(kBlockM * kCpr % 128 == 0, "whole Q copy rounds per producer thread");
  static_assert(64 * kCpr % 128 == 0, "whole store rounds per warpgroup in the epilogue");
  const float kNegInf = -__int_as_float(0x7f800000);
  constexpr float kSlack = 8.f;  // log2 units: P <= 256 (the softmax's comment)
  const ExtendParams<Kv>& p = wp.p;
  const int group = p.group;
  const int num_q_heads = p.num_kv_heads * group;
  const int window = p.window_left;
  // The pair of this CTA's round i.
  auto pair = [](int i) {
    return PersistentPair(i, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x));
  };

  // Its own name: an extern shared array is one symbol across kernels, and this one needs
  // 1024-byte alignment (the swizzle atoms' base offset 0).
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  const uint32_t smem_base = SmemAddr(wg_smem);
  const Barriers bars{smem_base + Smem::kBarOffset};
  // The Q buffer of the CTA's i-th pair (also where its O is staged for the stores).
  auto q_buffer = [&](int i) { return smem_base + (i & 1) * Smem::kQBytes; };

  const int tid = threadIdx.x;
  const int wg = tid >> 7;  // 0: producer; 1, 2: consumers of rows [64 (wg - 1), + 64)
  if (tid == 0) bars.Init();
  __syncthreads();

  // Each pair's key range starts at a tile boundary, so TMA boxes start page- (chunk-)
  // aligned.
  if (wg == 0) {
    WarpgroupRegsDec<Smem::kProducerRegs>();
    if (wp.tma_rows > 0 && tid == 0) {
      TmaPrefetchMap(&wp.maps.k);
      TmaPrefetchMap(&wp.maps.v);
    }
    const T* q = static_cast<const T*>(p.q);
    int tile_base = 0;
    ExtendCta c;
    for (int i = 0; LoadExtendCta(p, pair(i), kBlockN, kBlockN, &c); ++i) {
      // Q once its buffer's previous pair wrote O (rows past the work zero), then the tiles.
      MbarWait(bars.QEmpty(i), Barriers::Parity(i, 2) ^ 1);
      const uint32_t q_dst = q_buffer(i);
#pragma unroll 4  // not 16: the rounds' addresses would overflow the producer's registers
      for (int it = 0; it < kBlockM * kCpr / 128; ++it) {
        const int idx = tid + it * 128;
        const int row = idx / kCpr;
        const int ch = idx % kCpr;
        const bool valid = row < c.valid_rows;
        const int64_t src = PackedRowElement(c.wk, row, ch, group, num_q_heads, c.h, kHeadDim);
        CpAsync16(q_dst + Sw128Offset<kBlockM>(row, ch), valid ? q + src : q, valid ? 16 : 0);
      }
      CpAsyncMbarArrive(bars.QFull(i));
      Producer producer(wp, bars, c.wk.b, c.h, c.kv_lo, c.kv_hi, tile_base, wg_smem, tid);
      for (int t = 0; t < c.n_tiles; ++t) producer.Load(t);
      tile_base += c.n_tiles;
    }
    return;
  }
  WarpgroupRegsInc<Smem::kConsumerRegs>();
  const int cwg = wg - 1;            // consumer: rows [64 cwg, 64 cwg + 64)
  const int wwarp = (tid >> 5) & 3;  // warp in the warpgroup: its 16 rows
  const int lane = tid & 31;
  const int wtid = tid & 127;

  // This thread's rows of the accumulators: lane / 4 and + 8 of its warp's 16.
  const int g = lane >> 2;
  const int quad_col = 2 * (lane & 3);
  const int row0 = cwg * 64 + wwarp * 16 + g;

  // Pingpong (FA3): the consumers take turns issuing their products (named barrier 4 + cwg,
  // both warpgroups' 256 threads: one waits, the other arrives), so one's softmax runs
  // while the other's products occupy the tensor cores. Both run the same pairs and tiles,
  // so their turns pair up across pairs. Consumer 0 goes first; consumer 1 passes no turn
  // after its last of the CTA (consumer 0 has none left to take).
  auto wait_turn = [&] { asm volatile("bar.sync %0, 256;\n" ::"r"(4 + cwg) : "memory"); };
  auto pass_turn = [&] { asm volatile("bar.arrive %0, 256;\n" ::"r"(5 - cwg) : "memory"); };
  // Whether the CTA's i-th pair exists.
  auto has_pair = [&](int i) { return pair(i) / p.num_kv_heads < p.header->num_work; };
  if (cwg == 1 && has_pair(0)) pass_turn();

  int tile_base = 0;
  ExtendCta c;
  for (int i = 0; LoadExtendCta(p, pair(i), kBlockN, kBlockN, &c); ++i) {
    const int n_tiles = c.n_tiles;
    const int kv_lo = c.kv_lo;
    const int kv_hi = c.kv_hi;
    const int qpos_min = c.qpos_min;
    const int qpos_max = c.qpos_max;
    // Whether turns follow this pair's last (another pair comes after it).
    const bool more = has_pair(i + 1);
    // Rows past the work take the last token's position (finite, never stored).
    int qpos[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) qpos[r] = c.wk.pos0 + min((row0 + 8 * r) / group, c.wk.ntok - 1);
    float m[2] = {kNegInf, kNegInf};
    float l[2] = {0.f, 0.f};
    float o[kOAcc];
#pragma unroll
    for (int r = 0; r < kOAcc; ++r) o[r] = 0.f;
    // Per pair, so nothing of them is held through the epilogue.
    float s[kSAcc];  // S of the current tile, then its P (fp32); overwritten (scale_d 0)
#pragma unroll
    for (int r = 0; r < kSAcc; ++r) s[r] = 0.f;
    uint32_t pa[kBlockN / 16][4];  // P of the previous tile: the A fragments of its O += P V
    // Q of this warpgroup (rows [64 cwg, 64 cwg + 64) of the swizzled Q tile) as the A
    // operand of S = Q K^T, in registers: read from shared memory once per pair instead of
    // by every S product. Copied by cp.async and read by ldmatrix: no proxy fence.
    MbarWait(bars.QFull(i), Barriers::Parity(i, 2));
    uint32_t qa[kHeadDim / 16][4];
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      const int row = cwg * 64 + wwarp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      LdMatrixX4(qa[ks], q_buffer(i) + Sw128Offset<kBlockM>(row, 2 * ks + (lane >> 4)));
    }

    // Waits until the stage of tile j holds K (kind 0) or V (kind 1). A tile written by
    // cp.async (generic proxy) needs a proxy fence before wgmma's async-proxy reads; the
    // mbarrier wait made the writes visible to this thread.
    auto wait_tile = [&](int kind, int j) {
      MbarWait(bars.Full(kind, tile_base + j), Barriers::Parity(tile_base + j, kStages));
      if (!Producer::UsesTma(wp.tma_rows, kv_lo, kv_hi, j)) FenceProxyAsyncShared();
    };
    auto release_tile = [&](int kind, int j) { MbarArrive(bars.Empty(kind, tile_base + j)); };
    // S = Q K_j^T, k-steps of 16 over head_dim: 32 bytes within a 128-byte row, a slab
    // every 4 steps. Issued, not waited for.
    auto issue_s = [&](int j) {
      const uint32_t k_tile = Producer::StageAddr(smem_base, 0, (tile_base + j) % kStages);
      WgmmaFenceOperands(s);
      WgmmaFence();
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) {
        const uint32_t k_off = (ks >> 2) * kBlockN * 128 + (ks & 3) * 32;
        WgmmaRsN128<T>(s, qa[ks], KMajorDesc(k_tile + k_off), ks > 0);
      }
      WgmmaCommit();
    };
    // O += P V_j from pa, k-steps of 16 tokens (2048 bytes of the V tile each). Issued.
    auto issue_pv = [&](int j) {
      const uint32_t v_tile = Producer::StageAddr(smem_base, 1, (tile_base + j) % kStages);
      WgmmaFenceOperands(o);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        WgmmaRsTransB<T, kHeadDim>(o, pa[kk], MnMajorDesc(v_tile + kk * 16 * 128, kBlockN * 128));
      }
      WgmmaCommit();
    };

    // Causal / window mask (only where the tile straddles a boundary of some row) and the
    // online softmax of tile j's S, per row; P overwrites S. O is not touched: its P V
    // product may still run. A row keeps its running maximum m until a tile's exceeds it
    // by more than kSlack (FlashAttention-4's lazy rescaling): P stays below 2^kSlack, far
    // inside fp32 and bf16 / fp16 range, O / l comes out the same, and alpha is exactly 1
    // on most tiles of a long row, so O's rescale is skipped there. That matters because
    // this kernel runs at the board's power cap: work saved is clock gained.
    auto softmax = [&](int j, float(&alpha)[2]) {
      const int tile_start = kv_lo + j * kBlockN;
      const bool need_mask =
          tile_start + kBlockN - 1 > qpos_min || (window >= 0 && tile_start < qpos_max - window);
      if (need_mask) {
#pragma unroll
        for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int kp = tile_start + nb * 8 + quad_col + (e & 1);
            const int qp = qpos[e >> 1];
            const bool visible = kp <= qp && (window < 0 || kp >= qp - window);
            if (!visible) s[nb * 4 + e] = kNegInf;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int nb = 0; nb < kNBlocks; ++nb)
          mx = fmaxf(mx, fmaxf(s[nb * 4 + 2 * r], s[nb * 4 + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float tile_max = mx * p.scale_log2;
        const bool grow = tile_max > m[r] + kSlack;  // -inf + kSlack: any visible key grows
        const float m_new = grow ? tile_max : m[r];
        const float base = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: no NaN
        alpha[r] = grow ? FastExp2(m[r] - base) : 1.f;
        m[r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < kNBlocks; ++nb) {
          s[nb * 4 + 2 * r] = FastExp2(fmaf(s[nb * 4 + 2 * r], p.scale_log2, -base));
          s[nb * 4 + 2 * r + 1] = FastExp2(fmaf(s[nb * 4 + 2 * r + 1], p.scale_log2, -base));
          sum += s[nb * 4 + 2 * r] + s[nb * 4 + 2 * r + 1];
        }
        l[r] = l[r] * alpha[r] + sum;
      }
    };
    // Once O's product has landed: O rescaled, and P as the next A fragments (S's
    // accumulator layout is the m16n8k16 A layout per warp).
    auto rescale_and_pack = [&](const float(&alpha)[2]) {
      if (alpha[0] != 1.f || alpha[1] != 1.f) {
#pragma unroll
        for (int nb = 0; nb < kDBlocks; ++nb) {
          o[nb * 4 + 0] *= alpha[0];
          o[nb * 4 + 1] *= alpha[0];
          o[nb * 4 + 2] *= alpha[1];
          o[nb * 4 + 3] *= alpha[1];
        }
      }
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        pa[kk][0] = DTypeTraits<T>::Pack(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = DTypeTraits<T>::Pack(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = DTypeTraits<T>::Pack(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = DTypeTraits<T>::Pack(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };

    // Tile 0: S alone.
    float alpha[2];
    wait_tile(0, 0);
    wait_turn();
    issue_s(0);
    if (cwg == 0 || n_tiles > 1 || more) pass_turn();
    WgmmaWait<0>();
    WgmmaFenceOperands(s);
    release_tile(0, 0);
    softmax(0, alpha);
    rescale_and_pack(alpha);
    // Tiles 1..: S_j is issued together with O += P_{j-1} V_{j-1}, and the softmax of S_j
    // runs while that P V product is still on the tensor cores; O is rescaled once it
    // landed.
    for (int j = 1; j < n_tiles; ++j) {
      wait_tile(0, j);
      wait_turn();
      issue_s(j);
      wait_tile(1, j - 1);
      issue_pv(j - 1);
      if (cwg == 0 || j + 1 < n_tiles || more) pass_turn();
      WgmmaWait<1>();  // S_j landed; P_{j-1} V_{j-1} may still run
      WgmmaFenceOperands(s);
      release_tile(0, j);
      softmax(j, alpha);
      WgmmaWait<0>();  // O and P_{j-1} free again
      WgmmaFenceOperands(o);
      WgmmaFenceOperands(pa);
      release_tile(1, j - 1);
      rescale_and_pack(alpha);
    }
    // The last tile's O += P V (outside the turns: nothing follows it in this pair).
    wait_tile(1, n_tiles - 1);
    issue_pv(n_tiles - 1);
    WgmmaWait<0>();
    WgmmaFenceOperands(o);
    WgmmaFenceOperands(pa);
    release_tile(1, n_tiles - 1);

    // Epilogue: normalise, stage through this warpgroup's own rows of the Q buffer (its
    // wgmma reads of them are complete), then 16-byte stores of the valid rows; the buffer
    // is released for the pair after next once every consumer thread read its rows.
    uint8_t* const staging = wg_smem + (i & 1) * Smem::kQBytes;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = l[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const int row = row0 + 8 * r;
#pragma unroll
      for (int nb = 0; nb < kDBlocks; ++nb) {
        const uint32_t byte = Sw128Offset<kBlockM>(row, nb) + quad_col * sizeof(T);
        *reinterpret_cast<uint32_t*>(staging + byte) =
            DTypeTraits<T>::Pack(o[nb * 4 + 2 * r] * inv, o[nb * 4 + 2 * r + 1] * inv);
      }
    }
    // Only this warpgroup's 128 threads meet here (named barrier 1 + cwg).
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cwg) : "memory");
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int it = 0; it < 64 * kCpr / 128; ++it) {
      const int idx = wtid + it * 128;
      const int row = cwg * 64 + idx / kCpr;
      const int ch = idx % kCpr;
      if (row < c.valid_rows) {
        const int64_t dst = PackedRowElement(c.wk, row, ch, group, num_q_heads, c.h, kHeadDim);
        *reinterpret_cast<uint4*>(out + dst) =
            *reinterpret_cast<const uint4*>(staging + Sw128Offset<kBlockM>(row, ch));
      }
    }
    MbarArrive(bars.QEmpty(i));
    tile_base += n_tiles;
  }
#else
  __trap();  // built without sm_90a: the launcher never selects this kernel
#endif
}

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_EXTEND_WGMMA_KERNEL_CUH_
