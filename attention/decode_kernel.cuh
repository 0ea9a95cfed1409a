// The decode attention kernel (internal to attention/decode_attention.cu): one CTA per
// (work item, KV head), where a work item is a token range of one request from the
// host-side plan. A request split over several work items (flash-decoding) is merged by
// the CTA that finishes its last piece, in the same launch. Written once against the
// accessor concept of kv_accessor.h.
//
// Per CTA: all `group` query heads of the KV head are the 16 rows of an m16n8k16 MMA
// (rows >= group are zero), so K and V are read once. Tiles of kTile tokens stream
// through a kStages-deep cp.async pipeline; each tile's token offsets are resolved once
// per token and staged in shared memory, the page-table entries arriving with an earlier
// tile's copies (tile_offsets.cuh); then every thread issues 16-byte copies. Warp w owns tokens
// [16w, 16w + 16) of each tile and keeps its own online-softmax state; warps are merged at the end.
// Why this shape: docs/kernels.md. Thread 0 can time its CTA (decode_trace.h).
#ifndef KVMEM_ATTENTION_DECODE_KERNEL_CUH_
#define KVMEM_ATTENTION_DECODE_KERNEL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/decode_plan.h"
#include "attention/device_utils.cuh"
#include "attention/tile_offsets.cuh"
#if KVMEM_DECODE_TRACE
#include "kvmem/debug/decode_trace.h"
#endif

namespace kvmem::internal {

template <typename Kv>
struct DecodeParams {
  Kv kv;
  const void* q;              // [batch][num_q_heads][head_dim]
  void* out;                  // [batch][num_q_heads][head_dim]
  float* partial_o;           // [max_work][num_q_heads][head_dim], normalised
  float* partial_lse;         // [max_work][num_q_heads], log2 domain, -inf when empty
  const DecodeWork* work;     // [max_work]
  const int32_t* work_begin;  // [max_batch + 1]: first partial slot of request b
  const DecodePlanHeader* header;
  int32_t* counters;  // [max_batch][num_kv_heads], zero between launches
  int num_kv_heads;
  int group;         // query heads per KV head, 1..16
  float scale_log2;  // softmax scale * log2(e)
};

// Per head_dim: warps per CTA (16 tokens each per tile) and pipeline depth. Head_dim 128,
// the model shape: one CTA of 8 warps per SM, tiles of 128 tokens (64 KiB of K and V per
// stage). On the H100 two stages (one tile in flight while the other is read) beat three
// (two tiles, 128 KiB, in flight per SM) by 0.9-2.0 % at batch 64 and 128 and 0.5-2.7 % at
// the long contexts; on the H200 (1.5x the bandwidth per SM) three beat two by 0.5-1.4 % at
// batch 128. Both are built; the workspace picks one per device (kDeepStages above
// kDeepStagesGbpsPerSm of peak bandwidth per SM) or as DecodeOptions::pipeline_stages says
// (docs/kernels.md). Two CTAs of 4 warps per SM measured slower than one of 8. The other head_dims
// keep 16-32 KiB stages, two or more CTAs per SM, one depth.
template <int kHeadDim>
struct DecodeConfig;
template <>
struct DecodeConfig<64> {
  static constexpr int kWarps = 4;
  static constexpr int kStages = 4;
  static constexpr int kDeepStages = 4;
};
template <>
struct DecodeConfig<128> {
  static constexpr int kWarps = 8;
  static constexpr int kStages = 2;
  static constexpr int kDeepStages = 3;
};
template <>
struct DecodeConfig<256> {
  static constexpr int kWarps = 2;
  static constexpr int kStages = 3;
  static constexpr int kDeepStages = 3;
};
// Peak memory bandwidth per SM (GB/s) above which a workspace takes kDeepStages.
inline constexpr double kDeepStagesGbpsPerSm = 30.0;

template <typename T, int kHeadDim, int kStages>
struct DecodeSmem {
  using Cfg = DecodeConfig<kHeadDim>;
  static constexpr int kTile = 16 * Cfg::kWarps;
  static constexpr int kStageBytes = kTile * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kKBytes = kStages * kStageBytes;
  static constexpr int kQOffset = 2 * kKBytes;  // after K and V stages
  static constexpr int kOffOffset = kQOffset + 16 * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kBytes = kOffOffset + TileOffsetsBytes(kTile, kStages);
  // Epilogue, over the K/V stages: per-warp O [kWarps][16][kHeadDim] f32, m and l.
  static constexpr int kEpilogueBytes = Cfg::kWarps * 16 * (kHeadDim + 2) * 4;
  static_assert(kEpilogueBytes <= 2 * kKBytes, "epilogue must fit over the stages");
};

// Four outputs at out + i (i a multiple of 4), rounded to the storage type: one 8-byte store.
template <typename T>
__device__ __forceinline__ void StoreOut(void* out, int64_t i, float4 v) {
  const uint32_t lo = DTypeTraits<T>::Pack(v.x, v.y);
  const uint32_t hi = DTypeTraits<T>::Pack(v.z, v.w);
  *reinterpret_cast<uint2*>(static_cast<T*>(out) + i) = make_uint2(lo, hi);
}

#if KVMEM_DECODE_TRACE
// Where SetDecodeTrace (decode_attention.cu) points the CTAs' trace records; records null,
// as at module load: off. Aligned so both fields come in one memory transaction.
struct alignas(16) DecodeTraceTarget {
  DecodeTraceRecord* records;  // [capacity]
  int capacity;
};

// Defined here although only decode_attention.cu writes it: without relocatable device
// code a __device__ variable cannot be declared extern, and that file is this header's only
// includer.
__device__ DecodeTraceTarget g_decode_trace;

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t SmClock() {
  uint64_t c;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(c));
  return c;
}

__device__ __forceinline__ uint32_t SmId() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

// Writes this CTA's trace record while a trace is set: SM, start time and cycle count at
// construction (kernel entry), end time and cycles at destruction, so every return path records it.
// Thread 0 only; when off, one load of g_decode_trace and a branch at entry, a shared-memory flag
// and a branch at exit. Nothing lives in registers through the kernel (a record pointer, even a
// flag, made the head_dim 256 paged kernel spill): the end reloads the target, which no
// launch in flight sees change (decode_trace.h).
class DecodeTraceScope {
 public:
  __device__ __forceinline__ DecodeTraceScope() {
    if (threadIdx.x != 0) return;
    const DecodeTraceTarget t = g_decode_trace;
    const bool traced = t.records != nullptr && blockIdx.x < static_cast<uint32_t>(t.capacity);
    Traced() = traced;
    if (traced) t.records[blockIdx.x] = {SmId(), blockIdx.x, GlobalTimerNs(), 0, SmClock(), 0};
  }
  __device__ __forceinline__ ~DecodeTraceScope() {
    if (threadIdx.x != 0 || !Traced()) return;
    const uint64_t end = GlobalTimerNs();  // before the load: its latency is not the CTA's
    const uint64_t end_clock = SmClock();
    DecodeTraceRecord& r = g_decode_trace.records[blockIdx.x];
    r.end_ns = end;
    r.end_clock = end_clock;
  }
  DecodeTraceScope(const DecodeTraceScope&) = delete;
  DecodeTraceScope& operator=(const DecodeTraceScope&) = delete;

 private:
  // Thread 0's "this CTA is traced" (only thread 0 reads or writes it).
  __device__ __forceinline__ static bool& Traced() {
    __shared__ bool traced;
    return traced;
  }
};
#else
// Built without the profiling hook (KVMEM_DECODE_TRACE=OFF, the default): the scope is
// empty and the kernel carries no trace code at all.
class DecodeTraceScope {
 public:
  __device__ __forceinline__ DecodeTraceScope() {}
};
#endif  // KVMEM_DECODE_TRACE

template <typename Kv, typename T, int kHeadDim, int kStages>
__global__ void __launch_bounds__(DecodeConfig<kHeadDim>::kWarps * 32)
    DecodeKernel(const DecodeParams<Kv> p) {
  using Cfg = DecodeConfig<kHeadDim>;
  using Smem = DecodeSmem<T, kHeadDim, kStages>;
  constexpr int kWarps = Cfg::kWarps;
  constexpr int kThreads = kWarps * 32;
  constexpr int kTile = Smem::kTile;
  constexpr int kCpr = kHeadDim / 8;  // 16-byte chunks per row
  const float kNegInf = -__int_as_float(0x7f800000);
  const DecodeTraceScope trace;  // first: its start is the CTA's entry, its end every return

  const int h = blockIdx.x % p.num_kv_heads;
  const int wi = blockIdx.x / p.num_kv_heads;
  // Both loads issued before either is used: the work item is always in bounds (the grid
  // never exceeds the workspace's capacity), and reading it before the plan header's
  // check takes one global-memory round trip off every CTA's start.
  const DecodeWork wk = p.work[wi];
  if (wi >= p.header->num_work) return;  // capacity grid (fixed_grid): no work here
  const int b = wk.b;
  const int start = wk.start;
  const int end = wk.end;
  const int chunks = DecodeChunks(wk.meta);
  // A split request's partial slots start at work_begin[b]; loaded now, used at the end.
  const int slot0 = chunks == 1 ? 0 : p.work_begin[b];
  const int group = p.group;
  const int num_q_heads = p.num_kv_heads * group;

  extern __shared__ __align__(128) uint8_t smem[];
  T* k_smem = reinterpret_cast<T*>(smem);                   // [kStages][kTile][D]
  T* v_smem = reinterpret_cast<T*>(smem + Smem::kKBytes);   // [kStages][kTile][D]
  T* q_smem = reinterpret_cast<T*>(smem + Smem::kQOffset);  // [16][D]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int n_tiles = (end - start + kTile - 1) / kTile;

  const T* k_head = static_cast<const T*>(p.kv.k) + h * kHeadDim;
  const T* v_head = static_cast<const T*>(p.kv.v) + h * kHeadDim;

  // Threads < kTile resolve one token of each tile.
  TileOffsets<Kv, kTile, kStages> offsets(p.kv, b, start, end, smem + Smem::kOffOffset, tid,
                                          tid < kTile, tid);
  auto load_tile = [&](int tile) {
    offsets.template CopyTileToStage<kHeadDim, kThreads, /*kReadOnce=*/true>(tile, k_head, v_head,
                                                                             k_smem, v_smem, tid);
  };

  // Prologue (tile_offsets.cuh has the schedule): offsets of the first kStages tiles,
  // Q (rows >= group zero), tiles with the index entries kStages further on.
  // The virtual layout's row id came with the work item: no second dependent load.
#pragma unroll
  for (int s = 0; s < kStages; ++s) offsets.ResolveNow(s, wk.index);
  {
    const T* q =
        static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * num_q_heads + h * group) * kHeadDim;
    const uint32_t q_dst = SmemAddr(q_smem);
    for (int i = tid; i < 16 * kCpr; i += kThreads) {
      const int row = i / kCpr;
      const int c = i % kCpr;
      const bool valid = row < group;
      CpAsync16(q_dst + XorSwizzle<kHeadDim>(row, c) * sizeof(T),
                valid ? q + row * kHeadDim + c * 8 : q, valid ? 16 : 0);
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

  // Online softmax state of rows g = lane / 4 (i = 0) and g + 8 (i = 1); l is this
  // thread's partial sum over its columns (quad-reduced at the end).
  float m[2] = {kNegInf, kNegInf};
  float l[2] = {0.f, 0.f};
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  const int quad_col = 2 * (lane & 3);
  // ldmatrix row/chunk of this lane: Q as A (x4: rows 0-7/8-15, chunk lo/hi), K as B
  // (x4: tokens 0-7 lo/hi chunk, tokens 8-15 lo/hi), V as B transposed (x4: tokens
  // 0-7/8-15, chunk lo/hi).
  const int q_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int q_chunk = lane >> 4;
  const int k_row = warp * 16 + (lane & 7) + (lane >> 4) * 8;
  const int k_chunk = (lane >> 3) & 1;
  const int v_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
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
    const uint32_t k_base = SmemAddr(k_smem + stage * kTile * kHeadDim);
    const uint32_t v_base = SmemAddr(v_smem + stage * kTile * kHeadDim);

    // S = Q K^T over this warp's 16 tokens: two n8 tiles.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t qa[4], kb[4];
      LdMatrixX4(qa, q_base + XorSwizzle<kHeadDim>(q_row, 2 * ks + q_chunk) * sizeof(T));
      LdMatrixX4(kb, k_base + XorSwizzle<kHeadDim>(k_row, 2 * ks + k_chunk) * sizeof(T));
      Mma16816<T>(s[0], qa, kb[0], kb[1]);
      Mma16816<T>(s[1], qa, kb[2], kb[3]);
    }
    const int tok0 = start + j * kTile + warp * 16 + quad_col;  // token of s[0][0]
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = tok0 + nt * 8 + (e & 1) < end;
        s[nt][e] = valid ? s[nt][e] * p.scale_log2 : kNegInf;
      }
    }
    float pr[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = fmaxf(fmaxf(s[0][2 * i], s[0][2 * i + 1]), fmaxf(s[1][2 * i], s[1][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[i], mx);
      const float base = m_new == kNegInf ? 0.f : m_new;  // all masked so far: no NaN
      const float alpha = FastExp2(m[i] - base);
      m[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        pr[nt][2 * i] = FastExp2(s[nt][2 * i] - base);
        pr[nt][2 * i + 1] = FastExp2(s[nt][2 * i + 1] - base);
        sum += pr[nt][2 * i] + pr[nt][2 * i + 1];
      }
      l[i] = l[i] * alpha + sum;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        o[n][2 * i] *= alpha;
        o[n][2 * i + 1] *= alpha;
      }
    }
    // P (C layout of two n8 tiles) is the A fragment of the m16k16 P V product.
    const uint32_t pa[4] = {
        DTypeTraits<T>::Pack(pr[0][0], pr[0][1]), DTypeTraits<T>::Pack(pr[0][2], pr[0][3]),
        DTypeTraits<T>::Pack(pr[1][0], pr[1][1]), DTypeTraits<T>::Pack(pr[1][2], pr[1][3])};
#pragma unroll
    for (int dc = 0; dc < kHeadDim / 16; ++dc) {
      uint32_t vb[4];
      LdMatrixX4Trans(vb, v_base + XorSwizzle<kHeadDim>(v_row, 2 * dc + v_chunk) * sizeof(T));
      Mma16816<T>(o[2 * dc], pa, vb[0], vb[1]);
      Mma16816<T>(o[2 * dc + 1], pa, vb[2], vb[3]);
    }
  }

  // Epilogue: merge the warps' states through shared memory (over the drained stages).
  CpAsyncWait<0>();
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);  // [kWarps][16][D]
  float* sm = so + kWarps * 16 * kHeadDim;     // [kWarps][16]
  float* sl = sm + kWarps * 16;                // [kWarps][16]
  const int g = lane >> 2;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    const int row = g + 8 * i;
    if (row < group) {
      if ((lane & 3) == 0) {
        sm[warp * 16 + row] = m[i];
        sl[warp * 16 + row] = l[i];
      }
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        *reinterpret_cast<float2*>(so + (warp * 16 + row) * kHeadDim + n * 8 + quad_col) =
            make_float2(o[n][2 * i], o[n][2 * i + 1]);
      }
    }
  }
  __syncthreads();

  const bool direct = chunks == 1;
  constexpr int kVecs = kHeadDim / 4;
  for (int idx = tid; idx < group * kVecs; idx += kThreads) {
    const int row = idx / kVecs;
    const int d = (idx % kVecs) * 4;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm[w * 16 + row]);
    float sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mx != kNegInf) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = FastExp2(sm[w * 16 + row] - mx);
        sum += f * sl[w * 16 + row];
        const float4 v = *reinterpret_cast<const float4*>(so + (w * 16 + row) * kHeadDim + d);
        acc.x += f * v.x;
        acc.y += f * v.y;
        acc.z += f * v.z;
        acc.w += f * v.w;
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no keys: zeros
    const int qh = h * group + row;
    if (direct) {
      StoreOut<T>(p.out, (static_cast<int64_t>(b) * num_q_heads + qh) * kHeadDim + d,
                  make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
    } else {
      const int64_t slot = static_cast<int64_t>(slot0 + DecodeIndex(wk.meta)) * num_q_heads + qh;
      *reinterpret_cast<float4*>(p.partial_o + slot * kHeadDim + d) =
          make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      if (d == 0) p.partial_lse[slot] = sum > 0.f ? mx + __log2f(sum) : kNegInf;
    }
  }
  if (direct) return;

  // Split request: the last of its pieces (per KV head) to finish merges them all
  // (flash-decoding without a second launch). Fence, then count: whoever sees the count
  // reach `chunks` also sees every other piece's partials.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* counter = p.counters + b * p.num_kv_heads + h;
    const int done = atomicAdd(counter, 1) + 1;
    is_last = done == chunks;
    if (is_last) *counter = 0;  // every piece has counted: ready for the next launch
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int w0 = slot0;
  const int w1 = w0 + chunks;
  for (int idx = tid; idx < group * kVecs; idx += kThreads) {
    const int row = idx / kVecs;
    const int d = (idx % kVecs) * 4;
    const int qh = h * group + row;
    float mx = kNegInf;
    for (int w = w0; w < w1; ++w) mx = fmaxf(mx, __ldcg(p.partial_lse + w * num_q_heads + qh));
    float sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mx != kNegInf) {
      for (int w = w0; w < w1; ++w) {
        const int64_t slot = static_cast<int64_t>(w) * num_q_heads + qh;
        const float f = FastExp2(__ldcg(p.partial_lse + slot) - mx);
        const float4 v = __ldcg(reinterpret_cast<const float4*>(p.partial_o + slot * kHeadDim + d));
        sum += f;
        acc.x += f * v.x;
        acc.y += f * v.y;
        acc.z += f * v.z;
        acc.w += f * v.w;
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    StoreOut<T>(p.out, (static_cast<int64_t>(b) * num_q_heads + qh) * kHeadDim + d,
                make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
  }
}

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_DECODE_KERNEL_CUH_
