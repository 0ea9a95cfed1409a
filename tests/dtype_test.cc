// Tests of the bf16 / fp16 conversions of kvmem/dtype.h against an independent model of
// the formats: values are decoded with ldexp arithmetic on the fields, and fp32 -> 16-bit
// rounding is computed in long double (scale to an integer quantum, rintl ties to even,
// overflow where the rounded magnitude reaches 2^(emax+1)), never by calling the
// functions under test.
#include "kvmem/dtype.h"

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvmem {
namespace {

// An IEEE-style binary format: `exp_bits` exponent bits, `mant_bits` stored mantissa bits.
struct Format {
  const char* name;
  int exp_bits;
  int mant_bits;
  int Bias() const { return (1 << (exp_bits - 1)) - 1; }
  int Emin() const { return 1 - Bias(); }  // exponent of the smallest normal
  int Emax() const { return Bias(); }      // exponent of the largest finite binade
  uint32_t ExpMask() const { return ((1u << exp_bits) - 1u) << mant_bits; }
  uint32_t MantMask() const { return (1u << mant_bits) - 1u; }
  uint32_t SignBit() const { return 1u << (exp_bits + mant_bits); }
  bool IsNaN(uint16_t h) const { return (h & ExpMask()) == ExpMask() && (h & MantMask()) != 0; }
};

constexpr Format kBf16{"bf16", 8, 7};
constexpr Format kFp16{"fp16", 5, 10};

// Value of bit pattern h, from its fields. NaN patterns give NaN.
long double RefDecode(const Format& f, uint16_t h) {
  const bool neg = (h & f.SignBit()) != 0;
  const uint32_t e = (h & f.ExpMask()) >> f.mant_bits;
  const uint32_t m = h & f.MantMask();
  long double mag;
  if (e == (1u << f.exp_bits) - 1u) {
    if (m != 0) return std::numeric_limits<long double>::quiet_NaN();
    mag = std::numeric_limits<long double>::infinity();
  } else if (e == 0) {
    mag = std::ldexp(static_cast<long double>(m), f.Emin() - f.mant_bits);
  } else {
    mag = std::ldexp(static_cast<long double>(m + (1u << f.mant_bits)),
                     static_cast<int>(e) - f.Bias() - f.mant_bits);
  }
  return neg ? -mag : mag;
}

// fp32 value x rounded to the format, round to nearest, ties to even; +-inf on overflow.
long double RefRound(const Format& f, float x) {
  const long double lx = x;
  if (std::isinf(lx) || lx == 0) return lx;
  int e;
  std::frexp(std::fabs(lx), &e);  // |x| in [2^(e-1), 2^e)
  const int lead = std::max(e - 1, f.Emin());
  const long double quantum = std::ldexp(1.0L, lead - f.mant_bits);
  // x / quantum is exact (a power-of-two scaling); rintl rounds to the nearest integer,
  // ties to even, and the integer's parity is the parity of the mantissa.
  const long double r = std::rint(lx / quantum) * quantum;
  if (std::fabs(r) >= std::ldexp(1.0L, f.Emax() + 1)) {
    return std::copysign(std::numeric_limits<long double>::infinity(), lx);
  }
  return r;
}

float ToFloat(const Format& f, uint16_t h) {
  return &f == &kBf16 ? Bf16BitsToFloat(h) : Fp16BitsToFloat(h);
}
uint16_t ToBits(const Format& f, float x) {
  return &f == &kBf16 ? FloatToBf16Bits(x) : FloatToFp16Bits(x);
}

float BitsToFloat32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t Float32Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Checks ToBits(f, x) against the model; returns false (with a message) on mismatch.
::testing::AssertionResult RoundsLikeModel(const Format& f, float x) {
  const uint16_t got = ToBits(f, x);
  const long double got_value = RefDecode(f, got);
  if (std::isnan(x)) {
    if (f.IsNaN(got)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << f.name << ": NaN 0x" << std::hex << Float32Bits(x) << " -> 0x" << got;
  }
  const long double want = RefRound(f, x);
  if (got_value == want && std::signbit(got_value) == std::signbit(want)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << f.name << ": x = " << static_cast<double>(x) << " (0x" << std::hex << Float32Bits(x)
         << ") -> 0x" << got << " = " << static_cast<double>(got_value) << ", want "
         << static_cast<double>(want);
}

class DTypeTest : public ::testing::TestWithParam<const Format*> {
 protected:
  void SetUp() override { ASSERT_EQ(std::fegetround(), FE_TONEAREST); }
  const Format& F() const { return *GetParam(); }
};

TEST_P(DTypeTest, DecodeMatchesFieldArithmeticForAllPatterns) {
  int mismatches = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = ToFloat(F(), static_cast<uint16_t>(h));
    const long double want = RefDecode(F(), static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      if (!std::isnan(got) && ++mismatches <= 5) ADD_FAILURE() << "0x" << std::hex << h;
      continue;
    }
    if ((static_cast<long double>(got) != want || std::signbit(got) != std::signbit(want)) &&
        ++mismatches <= 5) {
      ADD_FAILURE() << F().name << " 0x" << std::hex << h << " -> " << got << ", want "
                    << static_cast<double>(want);
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST_P(DTypeTest, RoundTripsEveryNonNaNPatternAndKeepsNaN) {
  int mismatches = 0;
  int nans = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const uint16_t back = ToBits(F(), ToFloat(F(), bits));
    if (F().IsNaN(bits)) {
      ++nans;
      if (!F().IsNaN(back) && ++mismatches <= 5) {
        ADD_FAILURE() << F().name << " NaN 0x" << std::hex << h << " -> 0x" << back;
      }
    } else if (back != bits && ++mismatches <= 5) {
      ADD_FAILURE() << F().name << " 0x" << std::hex << h << " -> 0x" << back;
    }
  }
  EXPECT_EQ(mismatches, 0);
  // Exactly the all-ones exponent with a non-zero mantissa, both signs.
  EXPECT_EQ(nans, 2 * static_cast<int>(F().MantMask()));
}

// Every midpoint between two adjacent values (including between the largest finite value
// and 2^(emax+1), the overflow threshold, and among subnormals) is a tie, and the
// floats one ulp either side of it are not: the model decides all three. Midpoints have at
// most mant_bits + 2 significant bits, so they are exact fp32 values.
TEST_P(DTypeTest, TiesToEvenAndNeighboursAtEveryMidpoint) {
  int failures = 0;
  int ties_down = 0, ties_up = 0;
  const uint32_t max_finite = F().ExpMask() - 1u;  // exponent all ones minus one, mantissa ones
  for (uint32_t h = 0; h <= max_finite; ++h) {
    const long double lo = RefDecode(F(), static_cast<uint16_t>(h));
    const long double hi = h == max_finite ? std::ldexp(1.0L, F().Emax() + 1)
                                           : RefDecode(F(), static_cast<uint16_t>(h + 1));
    const long double mid_ld = (lo + hi) / 2;
    const float mid = static_cast<float>(mid_ld);
    ASSERT_EQ(static_cast<long double>(mid), mid_ld) << "midpoint not exact in fp32";
    for (float sign : {1.f, -1.f}) {
      const float x = sign * mid;
      for (float y : {x, std::nextafter(x, 0.f), std::nextafter(x, sign * 1e30f)}) {
        if (!RoundsLikeModel(F(), y) && ++failures <= 5) {
          ADD_FAILURE() << RoundsLikeModel(F(), y).message();
        }
      }
      // The tie goes to the even neighbour (the overflow tie goes to inf: 2^(emax+1) is
      // "even").
      const uint16_t got = ToBits(F(), x) & static_cast<uint16_t>(~F().SignBit());
      if (got == h) {
        ++ties_down;
        EXPECT_EQ(h & 1u, 0u) << F().name << " tie at " << static_cast<double>(x);
      } else {
        ++ties_up;
        EXPECT_EQ(got, h + 1) << F().name << " tie at " << static_cast<double>(x);
        EXPECT_EQ((h + 1) & 1u, 0u) << F().name << " tie at " << static_cast<double>(x);
      }
    }
  }
  EXPECT_EQ(failures, 0);
  EXPECT_GT(ties_down, 0);
  EXPECT_GT(ties_up, 0);
}

// All 2^(1 + exp_bits + mant_bits) upper fp32 bit patterns of the format's precision,
// each with edge-case and random low (discarded) bits: every binade of fp32, including
// fp32 subnormals, values far below the format's smallest subnormal and far above its max.
TEST_P(DTypeTest, MatchesModelOverAllExponentsAndMantissas) {
  const int kept_bits = 1 + 8 + F().mant_bits;  // fp32 sign + exponent + the format's mantissa
  const int low_bits = 32 - kept_bits;
  const uint32_t low_mask = (1u << low_bits) - 1u;
  const uint32_t half = 1u << (low_bits - 1);
  std::mt19937 rng(1234);
  std::vector<uint32_t> lows = {0, 1, half - 1, half, half + 1, low_mask, half >> 1};
  for (int i = 0; i < 5; ++i) lows.push_back(rng() & low_mask);
  int failures = 0;
  for (uint32_t top = 0; top < (1u << kept_bits); ++top) {
    for (uint32_t low : lows) {
      const float x = BitsToFloat32((top << low_bits) | low);
      if (!RoundsLikeModel(F(), x) && ++failures <= 5) {
        ADD_FAILURE() << RoundsLikeModel(F(), x).message();
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST_P(DTypeTest, MatchesModelOnRandomFloats) {
  std::mt19937 rng(99);
  int failures = 0;
  for (int i = 0; i < (1 << 22); ++i) {
    const float x = BitsToFloat32(rng());
    if (!RoundsLikeModel(F(), x) && ++failures <= 5) {
      ADD_FAILURE() << RoundsLikeModel(F(), x).message();
    }
  }
  EXPECT_EQ(failures, 0);
}

// Every fp32 NaN payload position (a payload only in the low bits must not truncate to
// inf), both signs, signalling and quiet.
TEST_P(DTypeTest, NaNStaysNaN) {
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (int bit = 0; bit < 23; ++bit) {
      const uint32_t u = sign | 0x7f800000u | (1u << bit);
      EXPECT_TRUE(F().IsNaN(ToBits(F(), BitsToFloat32(u)))) << std::hex << u;
    }
    EXPECT_TRUE(F().IsNaN(ToBits(F(), BitsToFloat32(sign | 0x7fffffffu))));
  }
  EXPECT_TRUE(std::isnan(RoundTo(F().exp_bits == 8 ? DType::kBFloat16 : DType::kFloat16,
                                 std::numeric_limits<float>::quiet_NaN())));
}

INSTANTIATE_TEST_SUITE_P(Formats, DTypeTest, ::testing::Values(&kBf16, &kFp16),
                         [](const auto& info) { return std::string(info.param->name); });

// Hand-checked values (IEEE 754 binary16 / bfloat16 tables), independent of the model.
TEST(DTypeKnownValues, Fp16) {
  EXPECT_EQ(FloatToFp16Bits(1.f), 0x3c00);
  EXPECT_EQ(FloatToFp16Bits(-2.f), 0xc000);
  EXPECT_EQ(FloatToFp16Bits(65504.f), 0x7bff);               // largest finite
  EXPECT_EQ(FloatToFp16Bits(65519.99f), 0x7bff);             // just below the overflow tie
  EXPECT_EQ(FloatToFp16Bits(65520.f), 0x7c00);               // tie to even: inf
  EXPECT_EQ(FloatToFp16Bits(-1e6f), 0xfc00);                 // overflow to -inf
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.f, -25)), 0x0000);  // tie between 0 and 2^-24: 0
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(3.f, -25)), 0x0002);  // tie 1.5 ulp -> 2 (even)
  EXPECT_EQ(FloatToFp16Bits(-0.f), 0x8000);
  EXPECT_EQ(FloatToFp16Bits(1.f + std::ldexp(1.f, -11)), 0x3c00);      // tie -> even
  EXPECT_EQ(FloatToFp16Bits(1.f + 3 * std::ldexp(1.f, -11)), 0x3c02);  // tie -> even
  EXPECT_EQ(Fp16BitsToFloat(0x0001), std::ldexp(1.f, -24));
  EXPECT_EQ(Fp16BitsToFloat(0x03ff), std::ldexp(1023.f, -24));
  EXPECT_EQ(Fp16BitsToFloat(0x7c00), std::numeric_limits<float>::infinity());
}

TEST(DTypeKnownValues, Bf16) {
  EXPECT_EQ(FloatToBf16Bits(1.f), 0x3f80);
  EXPECT_EQ(FloatToBf16Bits(-2.f), 0xc000);
  EXPECT_EQ(FloatToBf16Bits(1.f + std::ldexp(1.f, -8)), 0x3f80);          // tie -> even
  EXPECT_EQ(FloatToBf16Bits(1.f + 3 * std::ldexp(1.f, -8)), 0x3f82);      // tie -> even
  EXPECT_EQ(FloatToBf16Bits(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  EXPECT_EQ(FloatToBf16Bits(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(Bf16BitsToFloat(0x7f7f), std::ldexp(255.f, 120));  // largest finite bf16
  EXPECT_EQ(Bf16BitsToFloat(0x0001), std::ldexp(1.f, -133));   // smallest subnormal
}

TEST(DTypeKnownValues, LoadStoreRoundTo) {
  uint16_t buf16[3] = {};
  float buf32[2] = {};
  StoreFromFloat(buf16, 1, DType::kBFloat16, 3.14159f);
  EXPECT_EQ(buf16[1], 0x4049);  // 3.140625
  EXPECT_EQ(buf16[0], 0);
  EXPECT_EQ(buf16[2], 0);
  EXPECT_EQ(LoadAsFloat(buf16, 1, DType::kBFloat16), 3.140625f);
  StoreFromFloat(buf16, 2, DType::kFloat16, 3.14159f);
  EXPECT_EQ(buf16[2], 0x4248);  // 3.140625
  EXPECT_EQ(LoadAsFloat(buf16, 2, DType::kFloat16), 3.140625f);
  StoreFromFloat(buf32, 1, DType::kFloat32, 3.14159f);
  EXPECT_EQ(LoadAsFloat(buf32, 1, DType::kFloat32), 3.14159f);
  EXPECT_EQ(RoundTo(DType::kBFloat16, 3.14159f), 3.140625f);
  EXPECT_EQ(RoundTo(DType::kFloat16, 3.14159f), 3.140625f);
  EXPECT_EQ(RoundTo(DType::kFloat32, 3.14159f), 3.14159f);
  EXPECT_EQ(DTypeBytes(DType::kFloat32), 4);
  EXPECT_EQ(DTypeBytes(DType::kBFloat16), 2);
  EXPECT_EQ(DTypeBytes(DType::kFloat16), 2);
}

}  // namespace
}  // namespace kvmem
