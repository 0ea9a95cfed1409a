// Hopper (sm_90) asynchronous-copy plumbing for the warp-specialised extend kernel:
// shared-memory mbarriers, bulk tensor copies (TMA) that complete on them, cp.async
// copies that arrive on them, and warpgroup register reallocation. Internal; semantics
// are those of the PTX ISA ("mbarrier", "cp.async.bulk.tensor", "setmaxnreg"). All
// addresses are 32-bit shared-memory addresses (SmemAddr).
//
// Why mbarriers and not __syncthreads: a producer warpgroup fills stages while the two
// consumer warpgroups compute, and each side waits only for the stage it needs (the
// full / empty pair of that stage), so the consumers never meet at a CTA-wide barrier
// and drift out of phase, one's softmax under the other's tensor-core work.
#ifndef KVMEM_ATTENTION_TMA_CUH_
#define KVMEM_ATTENTION_TMA_CUH_

#include <cuda.h>

#include <cstdint>

namespace kvmem::internal {

// An mbarrier expecting `count` arrivals per phase. One thread initialises; a barrier
// (e.g. __syncthreads) must follow before any other thread uses it.
__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// One arrival (release: this thread's earlier shared-memory accesses happen before the
// phase completes).
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
}

// One arrival that also makes the phase wait for `bytes` more of bulk-copy traffic
// (the complete_tx of this thread's following TMA copies).
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}

// Waits until the phase of parity `parity` has completed (acquire). A fresh barrier is in
// phase 0: waiting on parity 1 returns at once, which is how a producer's first pass over
// its empty stages goes through.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// An arrival on `bar` once every cp.async this thread issued so far has landed (counts
// as one of the phase's expected arrivals: .noinc).
__device__ __forceinline__ void CpAsyncMbarArrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// A 4-D box of `map` at coordinates (c0 innermost .. c3) into shared memory at `dst`
// (1024-byte aligned for 128-byte swizzling), completing `bar`'s transaction bytes.
// `map` is the address of a __grid_constant__ kernel parameter.
__device__ __forceinline__ void TmaLoad4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                          int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// TmaLoad4d of a 5-D map (c0 innermost .. c4).
__device__ __forceinline__ void TmaLoad5d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                          int c0, int c1, int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4, %5, %6, %7}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}

// Brings the tensor map's descriptor into the TMA unit's cache ahead of the first copy.
__device__ __forceinline__ void TmaPrefetchMap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Register budget per thread of the calling warpgroup (all 128 threads together): the
// producer gives registers back, the consumers take them.
template <int kRegs>
__device__ __forceinline__ void WarpgroupRegsDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void WarpgroupRegsInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_TMA_CUH_
