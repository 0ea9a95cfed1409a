// Integer arithmetic shared by the allocators and the attention launchers (internal).
#ifndef KVMEM_SRC_INT_MATH_H_
#define KVMEM_SRC_INT_MATH_H_

#include <cstdint>

namespace kvmem::internal {

// ceil(a / b) for a >= 0 and b > 0.
constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_INT_MATH_H_
