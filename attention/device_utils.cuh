// Device helpers shared by kvmem's CUDA kernels: storage-dtype traits, cp.async,
// ldmatrix and the m16n8k16 tensor-core MMA (sm_80+, so also an sm_80 fallback build).
// Fragment layouts are those of the PTX ISA ("Matrix fragments for mma.m16n8k16").
#ifndef KVMEM_ATTENTION_DEVICE_UTILS_CUH_
#define KVMEM_ATTENTION_DEVICE_UTILS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda_status.h"
#include "attention/fast_divmod.h"
#include "kvmem/kv_accessor.h"

namespace kvmem::internal {

// Storage types. Both have a matching mma.sync kind and a packed 2-element register type.
template <typename T>
struct DTypeTraits;

template <>
struct DTypeTraits<__nv_bfloat16> {
  static constexpr const char* kMmaType = "bf16";
  __device__ static __forceinline__ uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static __forceinline__ __nv_bfloat16 FromFloat(float f) {
    return __float2bfloat16_rn(f);
  }
};

template <>
struct DTypeTraits<__half> {
  static constexpr const char* kMmaType = "f16";
  __device__ static __forceinline__ uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static __forceinline__ __half FromFloat(float f) { return __float2half_rn(f); }
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes 0 writes zeros (and reads
// nothing), which is how rows past the end of a range are filled.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// An L2 cache policy under which the lines a load brings in are evicted first: for data a
// launch reads once (decode's K and V), so that the small data every launch of a step
// reads (plan, page table, row ids) stays in L2 instead of being streamed out.
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// CpAsync16 under an L2 cache policy from EvictFirstPolicy.
__device__ __forceinline__ void CpAsync16EvictFirst(uint32_t dst, const void* src, int src_bytes,
                                                    uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
               "l"(src), "r"(src_bytes), "l"(policy));
}
// 4-byte global -> shared copy through L1 (.ca: neighbouring tokens share a page-table line).
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);

template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void Mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Element index of 16-byte chunk c of row `row` in a [rows][kHeadDim] shared-memory tile,
// XOR-swizzled so that ldmatrix's 8 rows at one chunk hit 8 different bank groups (the
// decode and portable extend kernels).
template <int kHeadDim>
__device__ __forceinline__ int XorSwizzle(int row, int c) {
  return row * kHeadDim + ((c ^ (row & 7)) << 3);
}

// exp2 on the SFU (the softmax runs in the exp2 domain, the scale folded in by log2(e)).
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A token's element offset, in steps, for the kernels' tile loops (tile_offsets.cuh).
// ForRequest() sets up what every token of request b shares. Fetch() loads a token's index
// entry (page id or row id); Finish() turns an entry and a position into the offset. For
// per-token entries (not kPerRequest), Entry() is which entry of the request a position
// uses and EntryAddress() where it lives. BoxCoords() gives a position's TMA coordinates
// above head and dim (kv_tensor_map.h). The same math as Kv::Offset (the
// tests compare against the reference, which uses Offset), in 32-bit where positions allow it:
// plans bound positions by max_context < 2^30.
template <typename Kv>
struct SplitOffset;

template <>
struct SplitOffset<PagedKv> {
  static constexpr bool kPerRequest = false;
  struct Request {
    const int32_t* table;  // request b's row of the page table
    FastDivmod pages;      // by page_tokens: no division instruction per token
  };
  __device__ __forceinline__ static Request ForRequest(const PagedKv& kv, int b) {
    return {kv.page_table + b * kv.page_table_stride, FastDivmod(kv.page_tokens)};
  }
  __device__ __forceinline__ static int Entry(const Request& r, int pos) {
    return r.pages.Div(pos);
  }
  __device__ __forceinline__ static const int32_t* EntryAddress(const Request& r, int entry) {
    return r.table + entry;
  }
  __device__ __forceinline__ static int32_t Fetch(const PagedKv&, const Request& r, int pos) {
    return *EntryAddress(r, Entry(r, pos));
  }
  // The TMA coordinates of token pos above head and dim (kv_tensor_map.h): the in-page
  // position and the page.
  static constexpr int kTmaDims = 4;
  __device__ __forceinline__ static void BoxCoords(const PagedKv&, const Request& r, int32_t page,
                                                   int pos, int (&c)[3]) {
    int32_t entry;
    r.pages.DivMod(pos, &entry, &c[0]);
    c[1] = page;
    c[2] = 0;
  }
  __device__ __forceinline__ static int64_t Finish(const PagedKv& kv, const Request& r,
                                                   int32_t page, int pos) {
    int32_t entry;
    int32_t in_page;
    r.pages.DivMod(pos, &entry, &in_page);
    return kv.PageOffset(page) + static_cast<int64_t>(in_page) * kv.token_stride;
  }
};

template <>
struct SplitOffset<VirtualKv> {
  static constexpr bool kPerRequest = true;
  struct Request {
    int b;
  };
  __device__ __forceinline__ static Request ForRequest(const VirtualKv&, int b) { return {b}; }
  __device__ __forceinline__ static int32_t Fetch(const VirtualKv& kv, const Request& r, int) {
    return kv.row_ids[r.b];
  }
  // The TMA coordinates (kv_tensor_map.h): token in chunk, chunk, row. Without chunks the
  // whole row is one chunk: a shift of 31 gives (pos, 0).
  static constexpr int kTmaDims = 5;
  __device__ __forceinline__ static void BoxCoords(const VirtualKv& kv, const Request&, int32_t row,
                                                   int pos, int (&c)[3]) {
    const int shift = kv.chunk_shift > 0 ? kv.chunk_shift : 31;
    c[0] = pos & static_cast<int>((1u << shift) - 1);
    c[1] = pos >> shift;
    c[2] = row;
  }
  // VirtualKv::Offset, with the chunk index from a 32-bit shift.
  __device__ __forceinline__ static int64_t Finish(const VirtualKv& kv, const Request&, int32_t row,
                                                   int pos) {
    return static_cast<int64_t>(row) * kv.row_stride + static_cast<int64_t>(pos) * kv.token_stride +
           static_cast<int64_t>(pos >> kv.chunk_shift) * kv.chunk_gap;
  }
};

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_DEVICE_UTILS_CUH_
