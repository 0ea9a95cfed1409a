// The extend / prefill attention kernel (internal to attention/extend_attention.cu),
// written once against the accessor concept of kv_accessor.h.
//
// One CTA per (work item, KV head); a work item is up to tokens_per_tile consecutive new
// tokens of one request, planned on the host. GQA rows are packed: CTA row r is token
// r / group, query head r % group of the KV head, so the `group` heads that share a KV
// head read each K/V tile once, and a short extend (a few new tokens) still fills the
// tensor-core rows. Per KV tile of kBlockN tokens (FlashAttention-2 style):
//   * the tile's token offsets are resolved once per token and staged in shared memory,
//     the page-table entries arriving with an earlier tile's copies (tile_offsets.cuh);
//   * K and V stream through a kStages-deep cp.async pipeline into swizzled smem;
//   * warp w owns rows [w * 16 * kMAtoms, ...): S = Q K^T and O += P V on mma.sync
//     m16n8k16 (fp32 accumulators), online softmax in registers (exp2 domain);
//   * tiles are visited only where some row can see a key (causal end, window start);
//     the causal / window mask is applied only on tiles that straddle a boundary.
// The epilogue writes O through the warp's own Q rows in smem for 16-byte stores.
#ifndef KVMEM_ATTENTION_EXTEND_KERNEL_CUH_
#define KVMEM_ATTENTION_EXTEND_KERNEL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/device_utils.cuh"
#include "attention/tile_offsets.cuh"
#include "kvmem/kv_accessor.h"

namespace kvmem::internal {

// New tokens [pos0, pos0 + ntok) of request b (positions in its context), whose queries
// are rows [q_row, q_row + ntok) of q / out. 16 bytes: one vector load.
struct alignas(16) ExtendWork {
  int32_t b;
  int32_t q_row;
  int32_t pos0;
  int32_t ntok;
};

struct alignas(16) ExtendPlanHeader {
  int32_t num_work;
  int32_t pad[3];
};

template <typename Kv>
struct ExtendParams {
  Kv kv;
  const void* q;           // [total_new][num_q_heads][head_dim]
  void* out;               // [total_new][num_q_heads][head_dim]
  const ExtendWork* work;  // [max_work], heaviest first
  const ExtendPlanHeader* header;
  int num_kv_heads;
  int group;         // query heads per KV head
  int window_left;   // < 0: no window
  float scale_log2;  // softmax scale * log2(e)
};

// Per head_dim: warps, m16 row blocks per warp, KV tile tokens, pipeline depth, CTAs per
// SM asked of the register allocator. 32 rows per warp (kMAtoms 2) halves the smem reads
// of K/V fragments per MMA, which on Hopper's mma.sync path is the tighter limit; head_dim
// 256 keeps 16 rows (its O alone is 128 registers). docs/kernels.md has the numbers.
template <int kHeadDim>
struct ExtendConfig;
template <>
struct ExtendConfig<64> {
  static constexpr int kWarps = 4;
  static constexpr int kMAtoms = 2;
  static constexpr int kBlockN = 64;
  static constexpr int kStages = 2;
  static constexpr int kMinBlocks = 2;
};
template <>
struct ExtendConfig<128> {
  static constexpr int kWarps = 4;
  static constexpr int kMAtoms = 2;
  static constexpr int kBlockN = 64;
  static constexpr int kStages = 2;
  static constexpr int kMinBlocks = 2;
};
template <>
struct ExtendConfig<256> {
  static constexpr int kWarps = 4;
  static constexpr int kMAtoms = 1;
  static constexpr int kBlockN = 32;
  static constexpr int kStages = 2;
  static constexpr int kMinBlocks = 2;
};

template <typename T, int kHeadDim>
struct ExtendSmem {
  using Cfg = ExtendConfig<kHeadDim>;
  static constexpr int kBlockM = Cfg::kWarps * 16 * Cfg::kMAtoms;  // rows per CTA
  static constexpr int kQBytes = kBlockM * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kStageBytes = Cfg::kBlockN * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kKOffset + Cfg::kStages * kStageBytes;
  static constexpr int kOffOffset = kVOffset + Cfg::kStages * kStageBytes;
  static constexpr int kBytes = kOffOffset + TileOffsetsBytes(Cfg::kBlockN, Cfg::kStages);
};

// One (work item, KV head) pair of either extend kernel: pair `index` is work item
// index / num_kv_heads at KV head index % num_kv_heads (the mma.sync kernel's CTA runs pair
// blockIdx.x, a persistent wgmma CTA several), the positions of its new tokens and its key
// range [kv_lo, kv_hi) in n_tiles tiles of block_n tokens. kv_lo is rounded down to a
// multiple of lo_align (1: exact); the keys it adds lie below the window and are masked.
struct ExtendCta {
  int h;
  ExtendWork wk;
  int valid_rows;  // packed rows with a token: ntok x group
  int qpos_min;
  int qpos_max;
  int kv_lo;
  int kv_hi;
  int n_tiles;
};

// Fills *c; false for a pair past the planned work (a capacity grid, fixed_grid).
template <typename Kv>
__device__ __forceinline__ bool LoadExtendCta(const ExtendParams<Kv>& p, int index, int block_n,
                                              int lo_align, ExtendCta* c) {
  const int wi = index / p.num_kv_heads;
  if (wi >= p.header->num_work) return false;
  c->h = index % p.num_kv_heads;
  c->wk = p.work[wi];
  c->valid_rows = c->wk.ntok * p.group;
  c->qpos_min = c->wk.pos0;
  c->qpos_max = c->wk.pos0 + c->wk.ntok - 1;
  c->kv_hi = c->qpos_max + 1;
  c->kv_lo = p.window_left < 0 ? 0 : max(0, c->qpos_min - p.window_left) / lo_align * lo_align;
  c->n_tiles = (c->kv_hi - c->kv_lo + block_n - 1) / block_n;
  return true;
}

// Element index in q / out of packed row `row` of work item wk at KV head h (token
// row / group, query head h * group + row % group), chunk c of 8 elements.
__device__ __forceinline__ int64_t PackedRowElement(const ExtendWork& wk, int row, int c, int group,
                                                    int num_q_heads, int h, int head_dim) {
  const int t = row / group;
  return (static_cast<int64_t>(wk.q_row + t) * num_q_heads + h * group + (row - t * group)) *
             head_dim +
         c * 8;
}

template <typename Kv, typename T, int kHeadDim>
__global__ void __launch_bounds__(ExtendConfig<kHeadDim>::kWarps * 32,
                                  ExtendConfig<kHeadDim>::kMinBlocks)
    ExtendKernel(const ExtendParams<Kv> p) {
  using Cfg = ExtendConfig<kHeadDim>;
  using Smem = ExtendSmem<T, kHeadDim>;
  constexpr int kWarps = Cfg::kWarps;
  constexpr int kMAtoms = Cfg::kMAtoms;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kStages = Cfg::kStages;
  constexpr int kThreads = kWarps * 32;
  constexpr int kBlockM = Smem::kBlockM;
  constexpr int kWarpRows = 16 * kMAtoms;
  constexpr int kCpr = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kNTiles = kBlockN / 8;
  constexpr int kDTiles = kHeadDim / 8;
  constexpr bool kSkipRescale = true;
  static_assert(kThreads % kBlockN == 0, "one thread per token resolves a tile's offsets");
  static_assert(kBlockN * kCpr % kThreads == 0, "whole copy rounds per tile");
  const float kNegInf = -__int_as_float(0x7f800000);

  ExtendCta cta;  // none past the planned work: a capacity grid (fixed_grid)
  if (!LoadExtendCta(p, static_cast<int>(blockIdx.x), kBlockN, 1, &cta)) return;
  const auto [h, wk, valid_rows, qpos_min, qpos_max, kv_lo, kv_hi, n_tiles] = cta;
  const int group = p.group;
  const int num_q_heads = p.num_kv_heads * group;
  const int window = p.window_left;

  extern __shared__ __align__(128) uint8_t smem[];
  T* q_smem = reinterpret_cast<T*>(smem);                   // [kBlockM][D]
  T* k_smem = reinterpret_cast<T*>(smem + Smem::kKOffset);  // [kStages][kBlockN][D]
  T* v_smem = reinterpret_cast<T*>(smem + Smem::kVOffset);  // [kStages][kBlockN][D]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int warp_row0 = warp * kWarpRows;

  const T* k_head = static_cast<const T*>(p.kv.k) + h * kHeadDim;
  const T* v_head = static_cast<const T*>(p.kv.v) + h * kHeadDim;

  // Token `tid / kOffStride` of each tile is resolved by the threads with
  // tid % kOffStride == 0: spread over all warps.
  constexpr int kOffStride = kThreads / kBlockN;
  TileOffsets<Kv, kBlockN, kStages> offsets(p.kv, wk.b, kv_lo, kv_hi, smem + Smem::kOffOffset,
                                            tid / kOffStride, tid % kOffStride == 0, tid);
  auto load_tile = [&](int tile) {
    offsets.template CopyTileToStage<kHeadDim, kThreads>(tile, k_head, v_head, k_smem, v_smem, tid);
  };

  // Prologue (tile_offsets.cuh has the schedule): offsets of the first kStages tiles,
  // Q (rows past the work zero), tiles with the index entries kStages further on.
#pragma unroll
  for (int s = 0; s < kStages; ++s) offsets.ResolveNow(s);
  {
    const T* q = static_cast<const T*>(p.q);
    const uint32_t q_dst = SmemAddr(q_smem);
    for (int i = tid; i < kBlockM * kCpr; i += kThreads) {
      const int row = i / kCpr;
      const int c = i % kCpr;
      const bool valid = row < valid_rows;
      const int64_t src = PackedRowElement(wk, row, c, group, num_q_heads, h, kHeadDim);
      CpAsync16(q_dst + XorSwizzle<kHeadDim>(row, c) * sizeof(T), valid ? q + src : q,
                valid ? 16 : 0);
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

  // Positions of this thread's rows (lane / 4 and + 8 of each m16 block); rows past the
  // work take the last token's position (finite, never stored).
  const int g = lane >> 2;
  const int quad_col = 2 * (lane & 3);
  int qpos[kMAtoms][2];
#pragma unroll
  for (int ma = 0; ma < kMAtoms; ++ma) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int t = (warp_row0 + ma * 16 + g + 8 * i) / group;
      qpos[ma][i] = wk.pos0 + min(t, wk.ntok - 1);
    }
  }

  float m[kMAtoms][2];
  float l[kMAtoms][2];
  float o[kMAtoms][kDTiles][4];
#pragma unroll
  for (int ma = 0; ma < kMAtoms; ++ma) {
    m[ma][0] = m[ma][1] = kNegInf;
    l[ma][0] = l[ma][1] = 0.f;
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) o[ma][n][0] = o[ma][n][1] = o[ma][n][2] = o[ma][n][3] = 0.f;
  }

  // ldmatrix row/chunk of this lane: Q as A (x4: rows 0-7/8-15, chunk lo/hi), K as B
  // (x4: tokens 0-7 lo/hi chunk, tokens 8-15 lo/hi), V as B transposed (x4: tokens
  // 0-7/8-15, chunk lo/hi).
  const int q_row = warp_row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int q_chunk = lane >> 4;
  const int k_row = (lane & 7) + (lane >> 4) * 8;
  const int k_chunk = (lane >> 3) & 1;
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int v_chunk = lane >> 4;
  const uint32_t q_base = SmemAddr(q_smem);

  for (int j = 0; j < n_tiles; ++j) {
    CpAsyncWait<kStages - 2>();  // tile j and the index entries of tile j + kStages
    __syncthreads();             // tile j visible; tile j - 1 consumed by every warp
    if (j + kStages - 1 < n_tiles) load_tile(j + kStages - 1);
    CpAsyncCommit();
    offsets.Resolve(j + kStages);
    offsets.FetchIndex(j + 2 * kStages);  // joins the next iteration's group

    const int stage = j % kStages;
    const uint32_t k_base = SmemAddr(k_smem + stage * kBlockN * kHeadDim);
    const uint32_t v_base = SmemAddr(v_smem + stage * kBlockN * kHeadDim);
    const int tile_start = kv_lo + j * kBlockN;

    // S = Q K^T: kMAtoms x kNTiles m16n8 tiles per warp.
    float s[kMAtoms][kNTiles][4];
#pragma unroll
    for (int ma = 0; ma < kMAtoms; ++ma) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
        s[ma][nt][0] = s[ma][nt][1] = s[ma][nt][2] = s[ma][nt][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t qa[kMAtoms][4];
#pragma unroll
      for (int ma = 0; ma < kMAtoms; ++ma) {
        LdMatrixX4(qa[ma],
                   q_base + XorSwizzle<kHeadDim>(q_row + ma * 16, 2 * ks + q_chunk) * sizeof(T));
      }
#pragma unroll
      for (int nk = 0; nk < kBlockN / 16; ++nk) {
        uint32_t kb[4];
        LdMatrixX4(kb,
                   k_base + XorSwizzle<kHeadDim>(nk * 16 + k_row, 2 * ks + k_chunk) * sizeof(T));
#pragma unroll
        for (int ma = 0; ma < kMAtoms; ++ma) {
          Mma16816<T>(s[ma][2 * nk], qa[ma], kb[0], kb[1]);
          Mma16816<T>(s[ma][2 * nk + 1], qa[ma], kb[2], kb[3]);
        }
      }
    }

    // Causal / window mask, only where the tile straddles a boundary of some row.
    const bool need_mask =
        tile_start + kBlockN - 1 > qpos_min || (window >= 0 && tile_start < qpos_max - window);
    if (need_mask) {
#pragma unroll
      for (int ma = 0; ma < kMAtoms; ++ma) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int kp = tile_start + nt * 8 + quad_col + (e & 1);
            const int qp = qpos[ma][e >> 1];
            const bool visible = kp <= qp && (window < 0 || kp >= qp - window);
            if (!visible) s[ma][nt][e] = kNegInf;
          }
        }
      }
    }

    // Online softmax per row; P overwrites S.
    float alpha[kMAtoms][2];
    bool max_moved = false;
#pragma unroll
    for (int ma = 0; ma < kMAtoms; ++ma) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = kNegInf;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          mx = fmaxf(mx, fmaxf(s[ma][nt][2 * i], s[ma][nt][2 * i + 1]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[ma][i], mx * p.scale_log2);
        const float base = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: no NaN
        alpha[ma][i] = FastExp2(m[ma][i] - base);
        max_moved |= m_new != m[ma][i];
        m[ma][i] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          s[ma][nt][2 * i] = FastExp2(fmaf(s[ma][nt][2 * i], p.scale_log2, -base));
          s[ma][nt][2 * i + 1] = FastExp2(fmaf(s[ma][nt][2 * i + 1], p.scale_log2, -base));
          sum += s[ma][nt][2 * i] + s[ma][nt][2 * i + 1];
        }
        l[ma][i] = l[ma][i] * alpha[ma][i] + sum;
      }
    }
    // Rescale O only when some row's maximum moved (alpha is exactly 1 otherwise): deep
    // into a long row that is rare, and the skip is warp-uniform.
    if (kSkipRescale ? __any_sync(0xffffffffu, max_moved) : true) {
#pragma unroll
      for (int ma = 0; ma < kMAtoms; ++ma) {
#pragma unroll
        for (int n = 0; n < kDTiles; ++n) {
          o[ma][n][0] *= alpha[ma][0];
          o[ma][n][1] *= alpha[ma][0];
          o[ma][n][2] *= alpha[ma][1];
          o[ma][n][3] *= alpha[ma][1];
        }
      }
    }

    // O += P V. P (C layout of two n8 tiles) is the A fragment of an m16k16 product.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[kMAtoms][4];
#pragma unroll
      for (int ma = 0; ma < kMAtoms; ++ma) {
        pa[ma][0] = DTypeTraits<T>::Pack(s[ma][2 * kk][0], s[ma][2 * kk][1]);
        pa[ma][1] = DTypeTraits<T>::Pack(s[ma][2 * kk][2], s[ma][2 * kk][3]);
        pa[ma][2] = DTypeTraits<T>::Pack(s[ma][2 * kk + 1][0], s[ma][2 * kk + 1][1]);
        pa[ma][3] = DTypeTraits<T>::Pack(s[ma][2 * kk + 1][2], s[ma][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dc = 0; dc < kHeadDim / 16; ++dc) {
        uint32_t vb[4];
        LdMatrixX4Trans(
            vb, v_base + XorSwizzle<kHeadDim>(kk * 16 + v_row, 2 * dc + v_chunk) * sizeof(T));
#pragma unroll
        for (int ma = 0; ma < kMAtoms; ++ma) {
          Mma16816<T>(o[ma][2 * dc], pa[ma], vb[0], vb[1]);
          Mma16816<T>(o[ma][2 * dc + 1], pa[ma], vb[2], vb[3]);
        }
      }
    }
  }
  CpAsyncWait<0>();  // only empty groups remain; drained before the CTA's smem is reused

  // Epilogue: normalise, stage through this warp's own Q rows (no other warp reads them),
  // then 16-byte stores of the valid rows.
#pragma unroll
  for (int ma = 0; ma < kMAtoms; ++ma) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float sum = l[ma][i];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const int row = warp_row0 + ma * 16 + g + 8 * i;
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) {
        *reinterpret_cast<uint32_t*>(q_smem + XorSwizzle<kHeadDim>(row, n) + quad_col) =
            DTypeTraits<T>::Pack(o[ma][n][2 * i] * inv, o[ma][n][2 * i + 1] * inv);
      }
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int it = 0; it < kWarpRows * kCpr / 32; ++it) {
    const int idx = lane + it * 32;
    const int row = warp_row0 + idx / kCpr;
    const int c = idx % kCpr;
    if (row < valid_rows) {
      const int64_t dst = PackedRowElement(wk, row, c, group, num_q_heads, h, kHeadDim);
      *reinterpret_cast<uint4*>(out + dst) =
          *reinterpret_cast<const uint4*>(q_smem + XorSwizzle<kHeadDim>(row, c));
    }
  }
}

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_EXTEND_KERNEL_CUH_
