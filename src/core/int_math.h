// Integer arithmetic shared by the allocators and the attention launchers (internal).
#ifndef KVMEM_SRC_CORE_INT_MATH_H_
#define KVMEM_SRC_CORE_INT_MATH_H_

#include <cstddef>
#include <cstdint>

namespace kvmem::internal {

// ceil(a / b) for a >= 0 and b > 0.
constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n rounded up to a multiple of 16 (the alignment of the records the launchers upload).
constexpr size_t Align16(size_t n) { return (n + 15) & ~size_t{15}; }

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CORE_INT_MATH_H_
