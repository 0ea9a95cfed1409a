// Hopper warpgroup MMA (wgmma.mma_async, sm_90a) for the extend kernel: shared-memory
// matrix descriptors for the 128-byte-swizzled tiles it stages, and the products it
// issues. Internal; fragment and descriptor layouts are those of the PTX ISA
// ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate"). The wgmma wrappers (fence,
// commit, wait and the products) must be called by all 128 threads of a warpgroup
// together; the offset, descriptor and proxy-fence helpers are per thread.
//
// Tile layout (both operands of every product): a [rows][64]-element slab per 64 columns,
// 128 bytes per row, 16-byte chunk c of row r stored at chunk c ^ (r % 8): the canonical
// SWIZZLE_128B layout, whose 8-row atoms must start 1024-byte aligned.
#ifndef KVMEM_ATTENTION_WGMMA_CUH_
#define KVMEM_ATTENTION_WGMMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kvmem::internal {

// Byte offset of 16-byte chunk c (of 8 elements) of row `row` in a swizzled tile of
// `rows` rows: chunks 0-7 in the first 64-column slab, 8-15 in the second.
template <int kRows>
__device__ __forceinline__ uint32_t Sw128Offset(int row, int c) {
  return static_cast<uint32_t>((c >> 3) * kRows * 128 + row * 128 + (((c & 7) ^ (row & 7)) << 4));
}

// A shared-memory matrix descriptor: start address, leading and stride byte offsets
// (all >> 4), SWIZZLE_128B (layout type 1 in bits 62-63), base offset 0 (1024-aligned
// atoms).
__device__ __forceinline__ uint64_t WgmmaDesc(uint32_t smem_addr, uint32_t lbo_bytes,
                                              uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_addr >> 4) & 0x3fff) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fff) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fff) << 32) | (uint64_t{1} << 62);
}

// K-major operand (Q as A, K as B): 8-row atoms 1024 bytes apart; the leading offset is
// unused by swizzled K-major layouts. `addr` is the tile's slab for the k-step, plus
// 32 bytes per 16-element step inside the 128-byte row.
__device__ __forceinline__ uint64_t KMajorDesc(uint32_t addr) { return WgmmaDesc(addr, 16, 1024); }

// MN-major operand (V as B of P V: [token][d] in smem, d contiguous): the 64-column slabs
// along N are `slab_bytes` apart (leading offset), 8-token groups along K 1024 apart.
__device__ __forceinline__ uint64_t MnMajorDesc(uint32_t addr, uint32_t slab_bytes) {
  return WgmmaDesc(addr, slab_bytes, 1024);
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulator registers across an
// in-flight wgmma (it cannot see the asynchronous use).
template <int kN>
__device__ __forceinline__ void WgmmaFenceOperands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for the A fragments of an in-flight register-A wgmma: their registers must
// keep their values until the wgmma completes.
template <int kRows>
__device__ __forceinline__ void WgmmaFenceOperands(uint32_t (&a)[kRows][4]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) asm volatile("" : "+r"(a[i][k])::"memory");
  }
}
// Makes this thread's completed cp.async writes to shared memory visible to wgmma's
// (async proxy) reads; a barrier after it publishes them to the warpgroup.
__device__ __forceinline__ void FenceProxyAsyncShared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define KVMEM_WG_D8(i)                                                                        \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define KVMEM_WG_D32 KVMEM_WG_D8(0), KVMEM_WG_D8(8), KVMEM_WG_D8(16), KVMEM_WG_D8(24)
#define KVMEM_WG_D64 \
  KVMEM_WG_D32, KVMEM_WG_D8(32), KVMEM_WG_D8(40), KVMEM_WG_D8(48), KVMEM_WG_D8(56)

// d[64] (+)= A[64x16] B[16x128]: A and B from shared memory, both K-major. scale_d 0
// overwrites d (the first k-step).
template <typename T>
__device__ __forceinline__ void WgmmaSsN128(float (&d)[64], uint64_t a, uint64_t b, int scale_d);
// d[kN/2] += A[64x16] B[16xkN]: A from registers (the m16n8k16 A fragment of each
// warp's 16 rows), B from shared memory, MN-major.
template <typename T, int kN>
__device__ __forceinline__ void WgmmaRsTransB(float (&d)[kN / 2], const uint32_t (&a)[4],
                                              uint64_t b);
// d[64] (+)= A[64x16] B[16x128]: A from registers (as above), B from shared memory,
// K-major (K as B of S = Q K^T). scale_d 0 overwrites d.
template <typename T>
__device__ __forceinline__ void WgmmaRsN128(float (&d)[64], const uint32_t (&a)[4], uint64_t b,
                                            int scale_d);

// m64n128k16 with A from registers a[4], B by descriptor b: TRANS_B "0" (K-major) or "1"
// (MN-major); SCALE_D 0 overwrites d.
#define KVMEM_WG_RS_N128(TY, TRANS_B, SCALE_D)                                                  \
  asm volatile(                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                              \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, "  \
      "1, 1, " TRANS_B ";\n}\n"                                                                 \
      : KVMEM_WG_D64                                                                            \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(SCALE_D))

#define KVMEM_WGMMA_DEFINE(T, TY)                                                                  \
  template <>                                                                                      \
  __device__ __forceinline__ void WgmmaSsN128<T>(float(&d)[64], uint64_t a, uint64_t b,            \
                                                 int scale_d) {                                    \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY                                   \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "    \
        "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "    \
        "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, "                    \
        "1, 1, 0, 0;\n}\n"                                                                         \
        : KVMEM_WG_D64                                                                             \
        : "l"(a), "l"(b), "r"(scale_d));                                                           \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void WgmmaRsTransB<T, 128>(float(&d)[64], const uint32_t(&a)[4],      \
                                                        uint64_t b) {                              \
    KVMEM_WG_RS_N128(TY, "1", 1);                                                                  \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void WgmmaRsN128<T>(float(&d)[64], const uint32_t(&a)[4], uint64_t b, \
                                                 int scale_d) {                                    \
    KVMEM_WG_RS_N128(TY, "0", scale_d);                                                            \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void WgmmaRsTransB<T, 64>(float(&d)[32], const uint32_t(&a)[4],       \
                                                       uint64_t b) {                               \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                                    \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, " \
        "%36, p, 1, 1, 1;\n}\n"                                                                    \
        : KVMEM_WG_D32                                                                             \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                             \
  }

KVMEM_WGMMA_DEFINE(__nv_bfloat16, "bf16")
KVMEM_WGMMA_DEFINE(__half, "f16")

#undef KVMEM_WGMMA_DEFINE
#undef KVMEM_WG_RS_N128
#undef KVMEM_WG_D64
#undef KVMEM_WG_D32
#undef KVMEM_WG_D8

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_WGMMA_CUH_
