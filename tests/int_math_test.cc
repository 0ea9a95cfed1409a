// Divider (src/core/int_math.h), the page-size division of the host bookkeeping, against
// the / and % operators: every divisor up to 130 (powers of two and others) over dense
// small dividends, and large dividends and divisors near the int64 limits.
#include "src/core/int_math.h"

#include <cstdint>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem::internal {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

void ExpectMatches(int64_t d, int64_t x) {
  const Divider div(d);
  ASSERT_EQ(div.divisor(), d);
  ASSERT_EQ(div.Quot(x), x / d) << x << " / " << d;
  ASSERT_EQ(div.Rem(x), x % d) << x << " % " << d;
  ASSERT_EQ(div.CeilQuot(x), CeilDiv(x, d)) << "ceil(" << x << " / " << d << ")";
}

TEST(DividerTest, SmallDivisorsDenseDividends) {
  for (int64_t d = 1; d <= 130; ++d) {
    for (int64_t x = 0; x <= 4 * d + 70; ++x) ExpectMatches(d, x);
  }
}

TEST(DividerTest, LargeDividendsAndDivisors) {
  const std::vector<int64_t> divisors = {
      1, 2, 3, 16, 64, 1000, int64_t{1} << 31, (int64_t{1} << 31) - 1, int64_t{1} << 62, kMax};
  const std::vector<int64_t> dividends = {
      0, 1, 15, 16, 17, (int64_t{1} << 31) + 5, int64_t{1} << 62, kMax - 1, kMax};
  for (int64_t d : divisors) {
    for (int64_t x : dividends) ExpectMatches(d, x);
  }
}

TEST(DividerTest, DefaultDividesByOne) {
  const Divider div;
  EXPECT_EQ(div.divisor(), 1);
  EXPECT_EQ(div.Quot(12345), 12345);
  EXPECT_EQ(div.Rem(12345), 0);
}

}  // namespace
}  // namespace kvmem::internal
