// Division by a run-time divisor that is fixed for a kernel's lifetime (the paged
// layout's page_tokens) as one multiply-high, an add and a shift: the hardware has no
// integer divider, and a general 32-bit division is about 20 instructions with a
// reciprocal on the SFU. Internal; plain C++ usable from host and device code, so a host
// test checks it against the / and % operators.
//
// Method (Granlund and Montgomery, "Division by invariant integers using
// multiplication", 1994): with l = ceil(log2(d)) and m = floor(2^32 (2^l - d) / d) + 1,
// n / d = (umulhi(n, m) + n) >> l for every n < 2^31; the sum cannot overflow 32 bits
// there because umulhi(n, m) < n.
#ifndef KVMEM_ATTENTION_FAST_DIVMOD_H_
#define KVMEM_ATTENTION_FAST_DIVMOD_H_

#include <cstdint>

#include "kvmem/platform.h"

namespace kvmem::internal {

class FastDivmod {
 public:
  // divisor in [1, 2^31).
  KVMEM_HOST_DEVICE explicit FastDivmod(int32_t divisor) : d_(static_cast<uint32_t>(divisor)) {
#if defined(__CUDA_ARCH__)
    l_ = d_ <= 1 ? 0 : 32 - __clz(d_ - 1);
#else
    while ((uint32_t{1} << l_) < d_) ++l_;
#endif
    const uint64_t two32 = uint64_t{1} << 32;
    m_ = static_cast<uint32_t>(two32 * ((uint64_t{1} << l_) - d_) / d_ + 1);
  }

  // n / divisor and n % divisor, for n in [0, 2^31).
  KVMEM_HOST_DEVICE int32_t Div(int32_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    return static_cast<int32_t>((MulHi(u, m_) + u) >> l_);
  }
  KVMEM_HOST_DEVICE void DivMod(int32_t n, int32_t* q, int32_t* r) const {
    *q = Div(n);
    *r = n - *q * static_cast<int32_t>(d_);
  }

 private:
  KVMEM_HOST_DEVICE static uint32_t MulHi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((uint64_t{a} * b) >> 32);
#endif
  }

  uint32_t d_;
  uint32_t m_ = 0;
  uint32_t l_ = 0;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_FAST_DIVMOD_H_
