// Storage element types of the KV cache and their host-side conversions.
//
// Kernels and the CPU reference store K/V in fp32, bf16 or fp16 and compute in
// fp32. The conversions below are bit-exact round-to-nearest-even, so the CPU
// reference rounds exactly as the GPU's __float2bfloat16_rn / __float2half_rn.
#ifndef KVMEM_DTYPE_H_
#define KVMEM_DTYPE_H_

#include <cstdint>
#include <cstring>
#include <string_view>

#include "kvmem/platform.h"

namespace kvmem {

enum class DType : uint8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int DTypeBytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

constexpr std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32:
      return "fp32";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat16:
      return "fp16";
  }
  return "?";
}

// Round-to-nearest-even fp32 -> bf16 bits. NaN stays NaN (quiet).
inline uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16BitsToFloat(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even fp32 -> IEEE binary16 bits, with subnormals and overflow to inf.
inline uint16_t FloatToFp16Bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (x < 0x38800000u) {                                               // subnormal or zero
    if (x < 0x33000000u) return static_cast<uint16_t>(sign);           // < half the min subnormal
    const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(x >> 23);  // 14..24
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ((x - 0x38000000u) >> 13);
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

inline float Fp16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reads element i of a buffer of type t as fp32 / writes fp32 rounded to t.
inline float LoadAsFloat(const void* base, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat32:
      return static_cast<const float*>(base)[i];
    case DType::kBFloat16:
      return Bf16BitsToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kFloat16:
      return Fp16BitsToFloat(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.f;
}

inline void StoreFromFloat(void* base, int64_t i, DType t, float v) {
  switch (t) {
    case DType::kFloat32:
      static_cast<float*>(base)[i] = v;
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = FloatToBf16Bits(v);
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = FloatToFp16Bits(v);
      return;
  }
}

// Rounds v through dtype t and back (what storing then loading gives).
inline float RoundTo(DType t, float v) {
  switch (t) {
    case DType::kFloat32:
      return v;
    case DType::kBFloat16:
      return Bf16BitsToFloat(FloatToBf16Bits(v));
    case DType::kFloat16:
      return Fp16BitsToFloat(FloatToFp16Bits(v));
  }
  return v;
}

}  // namespace kvmem

#endif  // KVMEM_DTYPE_H_
