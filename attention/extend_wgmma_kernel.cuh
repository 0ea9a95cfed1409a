// The Hopper (sm_90a) extend / prefill kernel for head_dim 64 and 128 (internal to
// attention/extend_attention.cu): the work list, row packing and masking of
// extend_kernel.cuh, with the products on warpgroup MMA (wgmma) instead of mma.sync.
//
// One CTA of two warpgroups per (work item, KV head): 128 packed rows (token r / group,
// query head r % group), warpgroup g owning rows [64g, 64g + 64). Per KV tile of kBlockN
// tokens:
//   * the tile's token offsets are resolved once per token and staged in shared memory
//     (tile_offsets.cuh); all 256 threads then copy K and V with 16-byte cp.async into
//     128-byte-swizzled tiles (wgmma.cuh), kStages deep;
//   * S = Q K^T: wgmma m64n128k16 with Q and K read from shared memory by descriptor;
//   * online softmax on the S accumulators in registers (exp2 domain), mask only on
//     tiles that straddle the causal or window edge;
//   * O += P V: P converted in registers to the A fragment (the accumulator layout of S
//     is the m16n8k16 A layout per warp), V read from shared memory as an MN-major B.
// Why not the mma.sync kernel: on Hopper mma.sync reaches about half of the tensor
// cores' rate, and its operand traffic through ldmatrix limits it before that; wgmma
// reads the tiles from shared memory once per warpgroup (docs/prefill.md).
#ifndef KVMEM_ATTENTION_EXTEND_WGMMA_KERNEL_CUH_
#define KVMEM_ATTENTION_EXTEND_WGMMA_KERNEL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/device_utils.cuh"
#include "attention/extend_kernel.cuh"
#include "attention/tile_offsets.cuh"
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
  static constexpr int kStages = 2;  // 164 KiB with Q and the offset ring: one CTA per SM
};

template <typename T, int kHeadDim>
struct WgmmaExtendSmem {
  using Cfg = WgmmaExtendConfig<kHeadDim>;
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kBlockM = 128;   // = ExtendSmem<T, kHeadDim>::kBlockM: one plan
  static constexpr int kQBytes = kBlockM * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = Cfg::kBlockN * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kKOffset + Cfg::kStages * kStageBytes;
  static constexpr int kOffOffset = kVOffset + Cfg::kStages * kStageBytes;
  static constexpr int kBytes = kOffOffset + TileOffsetsBytes(Cfg::kBlockN, Cfg::kStages);
  static_assert(kQBytes % 1024 == 0 && kStageBytes % 1024 == 0, "swizzle atoms 1024-aligned");
  static_assert(kBlockM == ExtendSmem<T, kHeadDim>::kBlockM, "both kernels run one plan");
};

template <typename Kv, typename T, int kHeadDim>
__global__ void __launch_bounds__(256, 1) ExtendWgmmaKernel(const ExtendParams<Kv> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WgmmaExtendConfig<kHeadDim>;
  using Smem = WgmmaExtendSmem<T, kHeadDim>;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kStages = Cfg::kStages;
  constexpr int kThreads = Smem::kThreads;
  constexpr int kBlockM = Smem::kBlockM;
  constexpr int kCpr = kHeadDim / 8;
  constexpr int kSAcc = kBlockN / 2;
  constexpr int kOAcc = kHeadDim / 2;
  constexpr int kNBlocks = kBlockN / 8;
  constexpr int kDBlocks = kHeadDim / 8;
  static_assert(kBlockN == 128, "S = Q K^T is one m64n128 product per k-step");
  static_assert(kThreads % kBlockN == 0, "every token of a tile has a resolving thread");
  static_assert(kBlockN * kCpr % kThreads == 0, "whole copy rounds per tile");
  static_assert(64 * kCpr % 128 == 0, "whole store rounds per warpgroup in the epilogue");
  const float kNegInf = -__int_as_float(0x7f800000);

  const int h = blockIdx.x % p.num_kv_heads;
  const int wi = blockIdx.x / p.num_kv_heads;
  if (wi >= p.header->num_work) return;  // capacity grid (fixed_grid): no work here
  const ExtendWork wk = p.work[wi];
  const int group = p.group;
  const int num_q_heads = p.num_kv_heads * group;
  const int valid_rows = wk.ntok * group;
  const int window = p.window_left;
  const int qpos_min = wk.pos0;
  const int qpos_max = wk.pos0 + wk.ntok - 1;
  const int kv_hi = qpos_max + 1;
  const int kv_lo = window < 0 ? 0 : max(0, qpos_min - window);
  const int n_tiles = (kv_hi - kv_lo + kBlockN - 1) / kBlockN;

  // Its own name: an extern shared array is one symbol across kernels, and this one needs
  // 1024-byte alignment (the swizzle atoms' base offset 0).
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  const uint32_t q_base = SmemAddr(wg_smem);
  const uint32_t k_base = q_base + Smem::kKOffset;
  const uint32_t v_base = q_base + Smem::kVOffset;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;           // warpgroup: rows [64 wg, 64 wg + 64)
  const int wwarp = (tid >> 5) & 3;  // warp in the warpgroup: its 16 rows
  const int lane = tid & 31;

  const T* k_head = static_cast<const T*>(p.kv.k) + h * kHeadDim;
  const T* v_head = static_cast<const T*>(p.kv.v) + h * kHeadDim;
  // Token tid / kOffStride of each tile is resolved by the threads with
  // tid % kOffStride == 0 (spread over every warp).
  constexpr int kOffStride = kThreads / kBlockN;
  TileOffsets<Kv, kBlockN, kStages> offsets(p.kv, wk.b, kv_lo, kv_hi, wg_smem + Smem::kOffOffset,
                                            tid / kOffStride, tid % kOffStride == 0, tid);
  auto load_tile = [&](int tile) {
    const int stage = tile % kStages;
    offsets.template CopyTile<kHeadDim, kThreads>(
        tile, k_head, v_head, k_base + stage * Smem::kStageBytes,
        v_base + stage * Smem::kStageBytes, tid,
        [](int row, int c) { return Sw128Offset<kBlockN>(row, c); });
  };
  // Prologue (tile_offsets.cuh has the schedule): offsets of the first kStages tiles,
  // Q (rows past the work zero), tiles with the index entries kStages further on.
#pragma unroll
  for (int s = 0; s < kStages; ++s) offsets.ResolveNow(s);
  {
    const T* q = static_cast<const T*>(p.q);
    for (int i = tid; i < kBlockM * kCpr; i += kThreads) {
      const int row = i / kCpr;
      const int c = i % kCpr;
      const bool valid = row < valid_rows;
      const int64_t src = PackedRowElement(wk, row, c, group, num_q_heads, h, kHeadDim);
      CpAsync16(q_base + Sw128Offset<kBlockM>(row, c), valid ? q + src : q, valid ? 16 : 0);
    }
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s);
    offsets.FetchIndex(s + kStages);
    CpAsyncCommit();
  }
  offsets.FetchIndex(2 * kStages - 1);  // joins the first iteration's group

  // This thread's rows of the accumulators: lane / 4 and + 8 of its warp's 16. Rows past
  // the work take the last token's position (finite, never stored).
  const int g = lane >> 2;
  const int quad_col = 2 * (lane & 3);
  const int row0 = wg * 64 + wwarp * 16 + g;
  int qpos[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) qpos[i] = wk.pos0 + min((row0 + 8 * i) / group, wk.ntok - 1);
  float m[2] = {kNegInf, kNegInf};
  float l[2] = {0.f, 0.f};
  float o[kOAcc];
#pragma unroll
  for (int i = 0; i < kOAcc; ++i) o[i] = 0.f;
  float s[kSAcc];  // overwritten by the first k-step of every tile (scale_d 0)
#pragma unroll
  for (int i = 0; i < kSAcc; ++i) s[i] = 0.f;
  // Q of this warpgroup: rows [64 wg, 64 wg + 64) of the swizzled Q tile.
  const uint32_t q_wg = q_base + wg * 64 * 128;

  for (int j = 0; j < n_tiles; ++j) {
    CpAsyncWait<kStages - 2>();  // tile j and the index entries of tile j + kStages
    FenceProxyAsyncShared();     // this thread's landed copies, to wgmma's async-proxy reads
    __syncthreads();             // all visible; tile j - 1 consumed by both warpgroups
    if (j + kStages - 1 < n_tiles) load_tile(j + kStages - 1);
    CpAsyncCommit();
    const int stage = j % kStages;
    const uint32_t k_tile = k_base + stage * Smem::kStageBytes;
    const uint32_t v_tile = v_base + stage * Smem::kStageBytes;
    const int tile_start = kv_lo + j * kBlockN;
    // S = Q K^T, k-steps of 16 over head_dim: 32 bytes within a 128-byte row, a slab
    // every 4 steps.
    WgmmaFenceOperands(s);
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      const uint32_t k_off = (ks >> 2) * kBlockN * 128 + (ks & 3) * 32;
      const uint32_t q_off = (ks >> 2) * kBlockM * 128 + (ks & 3) * 32;
      WgmmaSsN128<T>(s, KMajorDesc(q_wg + q_off), KMajorDesc(k_tile + k_off), ks > 0);
    }
    WgmmaCommit();
    // While S runs: the offsets of tile j + kStages, and the index entries of the tile
    // kStages further (they join the next iteration's group).
    offsets.Resolve(j + kStages);
    offsets.FetchIndex(j + 2 * kStages);
    WgmmaWait<0>();
    WgmmaFenceOperands(s);
    // Causal / window mask, only where the tile straddles a boundary of some row.
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
    // Online softmax per row; P overwrites S.
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = kNegInf;
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb)
        mx = fmaxf(mx, fmaxf(s[nb * 4 + 2 * i], s[nb * 4 + 2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[i], mx * p.scale_log2);
      const float base = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: no NaN
      alpha[i] = FastExp2(m[i] - base);
      m[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb) {
        s[nb * 4 + 2 * i] = FastExp2(fmaf(s[nb * 4 + 2 * i], p.scale_log2, -base));
        s[nb * 4 + 2 * i + 1] = FastExp2(fmaf(s[nb * 4 + 2 * i + 1], p.scale_log2, -base));
        sum += s[nb * 4 + 2 * i] + s[nb * 4 + 2 * i + 1];
      }
      l[i] = l[i] * alpha[i] + sum;
    }
#pragma unroll
    for (int nb = 0; nb < kDBlocks; ++nb) {
      o[nb * 4 + 0] *= alpha[0];
      o[nb * 4 + 1] *= alpha[0];
      o[nb * 4 + 2] *= alpha[1];
      o[nb * 4 + 3] *= alpha[1];
    }
    // O += P V, k-steps of 16 tokens (2048 bytes of the V tile each); P in registers as
    // the A fragments (S's accumulator layout is the m16n8k16 A layout per warp).
    uint32_t pa[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pa[kk][0] = DTypeTraits<T>::Pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = DTypeTraits<T>::Pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = DTypeTraits<T>::Pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = DTypeTraits<T>::Pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
    WgmmaFenceOperands(o);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      WgmmaRsTransB<T, kHeadDim>(o, pa[kk], MnMajorDesc(v_tile + kk * 16 * 128, kBlockN * 128));
    }
    WgmmaCommit();
    WgmmaWait<0>();  // before the next barrier lets this stage be overwritten
    WgmmaFenceOperands(o);
    WgmmaFenceOperands(pa);
  }
  CpAsyncWait<0>();  // only empty groups remain; drained before the CTA's shared memory is reused

  // Epilogue: normalise, stage through this warpgroup's own Q rows (its wgmma reads of
  // them are complete), then 16-byte stores of the valid rows.
  T* q_smem = reinterpret_cast<T*>(wg_smem);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = l[i];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int row = row0 + 8 * i;
#pragma unroll
    for (int nb = 0; nb < kDBlocks; ++nb) {
      const uint32_t byte = Sw128Offset<kBlockM>(row, nb) + quad_col * sizeof(T);
      *reinterpret_cast<uint32_t*>(reinterpret_cast<uint8_t*>(q_smem) + byte) =
          DTypeTraits<T>::Pack(o[nb * 4 + 2 * i] * inv, o[nb * 4 + 2 * i + 1] * inv);
    }
  }
  // Only this warpgroup's 128 threads meet here (named barrier 1 + wg).
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
  T* out = static_cast<T*>(p.out);
  const int wtid = tid & 127;
#pragma unroll
  for (int it = 0; it < 64 * kCpr / 128; ++it) {
    const int idx = wtid + it * 128;
    const int row = wg * 64 + idx / kCpr;
    const int c = idx % kCpr;
    if (row < valid_rows) {
      const int64_t dst = PackedRowElement(wk, row, c, group, num_q_heads, h, kHeadDim);
      *reinterpret_cast<uint4*>(out + dst) = *reinterpret_cast<const uint4*>(
          reinterpret_cast<const uint8_t*>(q_smem) + Sw128Offset<kBlockM>(row, c));
    }
  }
#else
  __trap();  // built without sm_90a: the launcher never selects this kernel
#endif
}

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_EXTEND_WGMMA_KERNEL_CUH_
