// GPU tests of the warpgroup-MMA helpers (attention/wgmma.cuh) on their own, so that a
// wrong descriptor or fragment layout shows up here by name rather than as a wrong
// attention output: S = Q K^T with both operands K-major from 128-byte-swizzled shared
// memory (two 64-column slabs), the same with Q loaded by ldmatrix into A fragments (the
// extend kernel's form), and O = P V with P from registers and V MN-major
// (N = 128 over two slabs, and N = 64), against fp64 host products of the same bf16
// inputs. Skips, saying so, without an sm_90 GPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "attention/device_utils.cuh"
#include "attention/wgmma.cuh"
#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem::internal {
namespace {

using gpu_test::DeviceBuffer;

// Copies a row-major [kRows][kCols] bf16 matrix into the swizzled tile layout.
template <int kRows, int kCols>
__device__ void StageTile(const __nv_bfloat16* src, uint8_t* tile) {
  for (int i = threadIdx.x; i < kRows * kCols / 8; i += blockDim.x) {
    const int row = i / (kCols / 8);
    const int c = i % (kCols / 8);
    *reinterpret_cast<uint4*>(tile + Sw128Offset<kRows>(row, c)) =
        *reinterpret_cast<const uint4*>(src + row * kCols + c * 8);
  }
}

// Writes accumulators d (m64nN layout) of this thread as fp32 into out[64][kN].
template <int kN>
__device__ void StoreAcc(const float (&d)[kN / 2], float* out) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int nb = 0; nb < kN / 8; ++nb) {
    for (int e = 0; e < 4; ++e) {
      const int row = warp * 16 + (lane >> 2) + 8 * (e >> 1);
      const int col = nb * 8 + 2 * (lane & 3) + (e & 1);
      out[row * kN + col] = d[nb * 4 + e];
    }
  }
}

// s[64][128] = q[64][128] k[128][128]^T; Q read by descriptor from shared memory, or
// (kQInRegisters) loaded by ldmatrix into A fragments first, as the extend kernel does.
template <bool kQInRegisters>
__global__ void QkKernel(const __nv_bfloat16* q, const __nv_bfloat16* k, float* s) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t wgmma_test_smem[];
  uint8_t* q_tile = wgmma_test_smem;             // 64 x 128: 16 KiB
  uint8_t* k_tile = wgmma_test_smem + 64 * 256;  // 128 x 128: 32 KiB
  StageTile<64, 128>(q, q_tile);
  StageTile<128, 128>(k, k_tile);
  FenceProxyAsyncShared();
  __syncthreads();
  float d[64];
  for (float& x : d) x = 0.f;
  WgmmaFenceOperands(d);
  WgmmaFence();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int ks = 0; ks < 8; ++ks) {
    const uint32_t k_off = (ks >> 2) * 128 * 128 + (ks & 3) * 32;
    if constexpr (kQInRegisters) {
      uint32_t a[4];
      const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      LdMatrixX4(a, SmemAddr(q_tile) + Sw128Offset<64>(row, 2 * ks + (lane >> 4)));
      WgmmaRsN128<__nv_bfloat16>(d, a, KMajorDesc(SmemAddr(k_tile) + k_off), ks > 0);
    } else {
      const uint32_t q_off = (ks >> 2) * 64 * 128 + (ks & 3) * 32;
      WgmmaSsN128<__nv_bfloat16>(d, KMajorDesc(SmemAddr(q_tile) + q_off),
                                 KMajorDesc(SmemAddr(k_tile) + k_off), ks > 0);
    }
  }
  WgmmaCommit();
  WgmmaWait<0>();
  WgmmaFenceOperands(d);
  StoreAcc<128>(d, s);
#endif
}

// o[64][kN] = p[64][128] v[128][kN], P as A fragments from registers.
template <int kN>
__global__ void PvKernel(const __nv_bfloat16* p, const __nv_bfloat16* v, float* o) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t wgmma_test_smem[];
  StageTile<128, kN>(v, wgmma_test_smem);
  FenceProxyAsyncShared();
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r0 = warp * 16 + (lane >> 2);
  const int c0 = 2 * (lane & 3);
  auto pack = [&](int row, int col) {
    return DTypeTraits<__nv_bfloat16>::Pack(__bfloat162float(p[row * 128 + col]),
                                            __bfloat162float(p[row * 128 + col + 1]));
  };
  float d[kN / 2];
  for (float& x : d) x = 0.f;
  WgmmaFenceOperands(d);
  WgmmaFence();
  for (int kk = 0; kk < 8; ++kk) {
    const uint32_t a[4] = {pack(r0, 16 * kk + c0), pack(r0 + 8, 16 * kk + c0),
                           pack(r0, 16 * kk + 8 + c0), pack(r0 + 8, 16 * kk + 8 + c0)};
    WgmmaRsTransB<__nv_bfloat16, kN>(
        d, a, MnMajorDesc(SmemAddr(wgmma_test_smem) + kk * 16 * 128, 128 * 128));
  }
  WgmmaCommit();
  WgmmaWait<0>();
  WgmmaFenceOperands(d);
  StoreAcc<kN>(d, o);
#endif
}

bool OnSm90() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return false;
  int major = 0;
  int minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  return major == 9 && minor == 0;
}

#if defined(KVMEM_HAS_SM90A)
constexpr bool kBuiltForSm90a = true;
#else
constexpr bool kBuiltForSm90a = false;
#endif

#define SKIP_WITHOUT_SM90()                                                                      \
  if (!kBuiltForSm90a) GTEST_SKIP() << "built without sm_90a code (KVMEM_CUDA_ARCHS): no wgmma"; \
  if (!OnSm90()) GTEST_SKIP() << "needs an sm_90 GPU (H100 / H200): wgmma is Hopper-only"

std::vector<__nv_bfloat16> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<__nv_bfloat16> v(n);
  for (auto& x : v) x = __float2bfloat16(dist(rng));
  return v;
}

double ToDouble(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }

// Largest |device - host| over the product, relative to the largest |host|: fp32
// accumulation of 128 bf16 products is good to ~1e-6 of that; a layout error is O(1).
double WorstError(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0.0;
  double scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    worst = std::max(worst, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  return worst / scale;
}

template <bool kQInRegisters>
void RunQk() {
  const auto q = Random(64 * 128, 1);
  const auto k = Random(128 * 128, 2);
  DeviceBuffer q_dev(q.size() * 2), k_dev(k.size() * 2), s_dev(64 * 128 * 4);
  CUDA_ASSERT(cudaMemcpy(q_dev.get(), q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(k_dev.get(), k.data(), k.size() * 2, cudaMemcpyHostToDevice));
  const int smem = 48 * 1024;
  CUDA_ASSERT(cudaFuncSetAttribute(QkKernel<kQInRegisters>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  QkKernel<kQInRegisters><<<1, 128, smem>>>(static_cast<const __nv_bfloat16*>(q_dev.get()),
                                            static_cast<const __nv_bfloat16*>(k_dev.get()),
                                            static_cast<float*>(s_dev.get()));
  CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<float> s(64 * 128);
  CUDA_ASSERT(cudaMemcpy(s.data(), s_dev.get(), s.size() * 4, cudaMemcpyDeviceToHost));
  std::vector<double> want(64 * 128, 0.0);
  for (int i = 0; i < 64; ++i) {
    for (int j = 0; j < 128; ++j) {
      for (int t = 0; t < 128; ++t)
        want[i * 128 + j] += ToDouble(q[i * 128 + t]) * ToDouble(k[j * 128 + t]);
    }
  }
  EXPECT_LE(WorstError(s, want), 1e-4) << (kQInRegisters ? "Q from registers" : "Q by descriptor");
}

TEST(WgmmaTest, QkBothOperandsKMajorFromSharedMemory) {
  SKIP_WITHOUT_SM90();
  RunQk<false>();
}

TEST(WgmmaTest, QkRegistersTimesKMajorSharedMemory) {
  SKIP_WITHOUT_SM90();
  RunQk<true>();
}

template <int kN>
void RunPv() {
  const auto p = Random(64 * 128, 3);
  const auto v = Random(128 * kN, 4);
  DeviceBuffer p_dev(p.size() * 2), v_dev(v.size() * 2), o_dev(64 * kN * 4);
  CUDA_ASSERT(cudaMemcpy(p_dev.get(), p.data(), p.size() * 2, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(v_dev.get(), v.data(), v.size() * 2, cudaMemcpyHostToDevice));
  const int smem = 128 * kN * 2;
  CUDA_ASSERT(
      cudaFuncSetAttribute(PvKernel<kN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  PvKernel<kN><<<1, 128, smem>>>(static_cast<const __nv_bfloat16*>(p_dev.get()),
                                 static_cast<const __nv_bfloat16*>(v_dev.get()),
                                 static_cast<float*>(o_dev.get()));
  CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<float> o(64 * kN);
  CUDA_ASSERT(cudaMemcpy(o.data(), o_dev.get(), o.size() * 4, cudaMemcpyDeviceToHost));
  std::vector<double> want(64 * kN, 0.0);
  for (int i = 0; i < 64; ++i) {
    for (int j = 0; j < kN; ++j) {
      for (int t = 0; t < 128; ++t)
        want[i * kN + j] += ToDouble(p[i * 128 + t]) * ToDouble(v[t * kN + j]);
    }
  }
  EXPECT_LE(WorstError(o, want), 1e-4) << "N = " << kN;
}

TEST(WgmmaTest, PvRegistersTimesMnMajorSharedMemoryN128) {
  SKIP_WITHOUT_SM90();
  RunPv<128>();
}

TEST(WgmmaTest, PvRegistersTimesMnMajorSharedMemoryN64) {
  SKIP_WITHOUT_SM90();
  RunPv<64>();
}

}  // namespace
}  // namespace kvmem::internal
