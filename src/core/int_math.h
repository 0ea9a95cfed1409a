// Integer arithmetic shared by the allocators and the attention launchers (internal).
#ifndef KVMEM_SRC_CORE_INT_MATH_H_
#define KVMEM_SRC_CORE_INT_MATH_H_

#include <cstddef>
#include <cstdint>
#include <limits>

namespace kvmem::internal {

// ceil(a / b) for a >= 0 and b > 0. Written without a + b - 1, which overflows for a
// near INT64_MAX (a budget of INT64_MAX bytes is a valid config).
constexpr int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

// n rounded up to a multiple of 16 (the alignment of the records the launchers upload).
constexpr size_t Align16(size_t n) { return (n + 15) & ~size_t{15}; }

// a * b into *out for a, b >= 0; false (and *out untouched) when either is negative or
// the product overflows int64. Plain arithmetic rather than __builtin_mul_overflow, so
// that the header also compiles in nvcc's front end.
constexpr bool CheckedMul(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

// a * b for a, b >= 0, or INT64_MAX when the product overflows (or an operand is
// negative). For numbers that go into messages and comparisons against limits: a
// saturated value still reads as "too large", where a wrapped one could read as small.
constexpr int64_t SatMul(int64_t a, int64_t b) {
  int64_t out = 0;
  return CheckedMul(a, b, &out) ? out : std::numeric_limits<int64_t>::max();
}

// a + b for a, b >= 0, or INT64_MAX when the sum overflows.
constexpr int64_t SatAdd(int64_t a, int64_t b) {
  return a > std::numeric_limits<int64_t>::max() - b ? std::numeric_limits<int64_t>::max() : a + b;
}

// Division of non-negative numbers by a fixed positive divisor: a shift and a mask when
// the divisor is a power of two (page sizes usually are), else the plain operators. A
// 64-bit divide costs tens of cycles, and a decode step makes several per request.
class Divider {
 public:
  Divider() = default;
  // REQUIRES: d > 0.
  explicit constexpr Divider(int64_t d) : d_(d) {
    if ((d & (d - 1)) == 0) {
      shift_ = 0;
      while ((int64_t{1} << shift_) != d) ++shift_;
    }
  }
  constexpr int64_t divisor() const { return d_; }
  // x / d, x % d and ceil(x / d). REQUIRES: x >= 0.
  constexpr int64_t Quot(int64_t x) const { return shift_ >= 0 ? x >> shift_ : x / d_; }
  constexpr int64_t Rem(int64_t x) const { return shift_ >= 0 ? x & (d_ - 1) : x % d_; }
  constexpr int64_t CeilQuot(int64_t x) const { return Quot(x) + (Rem(x) != 0 ? 1 : 0); }

 private:
  int64_t d_ = 1;
  int shift_ = -1;  // log2(d_) when d_ is a power of two
};

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CORE_INT_MATH_H_
