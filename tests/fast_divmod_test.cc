// FastDivmod (attention/fast_divmod.h), the page-size division of the paged kernels,
// against the / and % operators: every small divisor over dense and edge dividends, and
// large and power-of-two divisors up to 2^31 - 1.
#include "attention/fast_divmod.h"

#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem::internal {
namespace {

constexpr int32_t kMaxN = 0x7fffffff;

::testing::AssertionResult Matches(int32_t d, int32_t n) {
  const FastDivmod div(d);
  int32_t q = -1;
  int32_t r = -1;
  div.DivMod(n, &q, &r);
  if (q == n / d && r == n % d && div.Div(n) == n / d) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << n << " / " << d << ": got q " << q << " r " << r << ", want " << n / d << " " << n % d;
}

std::vector<int32_t> EdgeDividends(int32_t d) {
  std::vector<int32_t> ns = {0, 1, 2, kMaxN, kMaxN - 1, kMaxN - d};
  // Around multiples of d, where an off-by-one quotient would show.
  for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{1000}, int64_t{kMaxN} / d}) {
    for (int64_t delta = -1; delta <= 1; ++delta) {
      const int64_t n = k * d + delta;
      if (n >= 0 && n <= kMaxN) ns.push_back(static_cast<int32_t>(n));
    }
  }
  return ns;
}

TEST(FastDivmodTest, SmallDivisorsDenseDividends) {
  for (int32_t d = 1; d <= 300; ++d) {
    for (int32_t n = 0; n < 20000; ++n) ASSERT_TRUE(Matches(d, n));
    for (int32_t n : EdgeDividends(d)) ASSERT_TRUE(Matches(d, n));
  }
}

TEST(FastDivmodTest, PowersOfTwoAndTheirNeighbours) {
  for (int shift = 0; shift <= 30; ++shift) {
    const int64_t p = int64_t{1} << shift;
    for (int64_t d : {p - 1, p, p + 1}) {
      if (d < 1 || d > kMaxN) continue;
      for (int32_t n : EdgeDividends(static_cast<int32_t>(d))) {
        ASSERT_TRUE(Matches(static_cast<int32_t>(d), n));
      }
    }
  }
  for (int32_t n : EdgeDividends(kMaxN)) ASSERT_TRUE(Matches(kMaxN, n));
}

TEST(FastDivmodTest, RandomDivisorsAndDividends) {
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int32_t> any(0, kMaxN);
  std::uniform_int_distribution<int32_t> divisor(1, kMaxN);
  for (int i = 0; i < 20000; ++i) {
    const int32_t d = i % 2 == 0 ? divisor(rng) : 1 + any(rng) % 4096;
    for (int k = 0; k < 20; ++k) ASSERT_TRUE(Matches(d, any(rng)));
  }
}

}  // namespace
}  // namespace kvmem::internal
