// Shared pieces of the GPU tests (tests/gpu/*): the GPU presence check and skip, CUDA
// status assertions, an owned device buffer, 16-bit storage conversions, the K/V storage
// of an attention case (host and device copies with the same offsets), random queries,
// and the error norms of an output against the CPU reference. Header-only: each GPU
// test binary is built from one source file (CMakeLists.txt).
#ifndef KVMEM_TESTS_GPU_GPU_TEST_UTIL_H_
#define KVMEM_TESTS_GPU_GPU_TEST_UTIL_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"

namespace kvmem::gpu_test {

inline bool GpuPresent() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// True where KVMEM_TEST_SMALL is set (and not "0"): long cases are skipped.
inline bool SmallRun() {
  const char* e = std::getenv("KVMEM_TEST_SMALL");
  return e != nullptr && *e != '\0' && std::strcmp(e, "0") != 0;
}

// Owns one cudaMalloc'd buffer; get() is null where the allocation failed.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&ptr_, std::max<size_t>(bytes, 16)) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// 16-bit storage (bf16 / fp16) bits.
inline uint16_t NanBits(DType t) { return t == DType::kBFloat16 ? 0x7fc0 : 0x7e00; }
inline uint16_t ToBits(DType t, float f) {
  return t == DType::kBFloat16 ? FloatToBf16Bits(f) : FloatToFp16Bits(f);
}
inline float FromBits(DType t, uint16_t h) {
  return t == DType::kBFloat16 ? Bf16BitsToFloat(h) : Fp16BitsToFloat(h);
}

// The K/V arrangements the kernels are tested on.
// kVirtualChunked: all layers in chunks of page_tokens tokens (a power of two).
enum class Kind { kPaged, kVirtualAllLayers, kVirtualPerLayer, kVirtualChunked };

inline std::string KindName(Kind k) {
  switch (k) {
    case Kind::kPaged:
      return "paged";
    case Kind::kVirtualAllLayers:
      return "virtual-all-layers";
    case Kind::kVirtualPerLayer:
      return "virtual-per-layer";
    case Kind::kVirtualChunked:
      return "virtual-chunked";
  }
  return "?";
}

// K/V storage of one case, on the host (for the reference) and the device (for the
// kernel) with the same element offsets. Memory that no request owns holds NaN.
// CaseT has kind, page_tokens, dtype, kv_heads and head_dim.
template <typename CaseT>
class TestKv {
 public:
  // Room for batches of up to max_batch requests, max_context tokens each and
  // pool_tokens tokens in all (paged); page-table rows get extra_table_columns entries
  // past what max_context needs.
  TestKv(const CaseT& c, int max_batch, int64_t max_context, int64_t pool_tokens,
         int64_t extra_table_columns = 0)
      : c_(c), max_context_(max_context) {
    block_ = int64_t{c.kv_heads} * c.head_dim;
    if (c.kind == Kind::kPaged) {
      num_pages_ = (pool_tokens + c.page_tokens - 1) / c.page_tokens + max_batch + 3;
      pt_stride_ = (max_context + c.page_tokens - 1) / c.page_tokens + extra_table_columns;
      k_elems_ = num_pages_ * c.page_tokens * block_;
      v_offset_ = k_elems_;  // v pool follows the k pool
      total_elems_ = 2 * k_elems_;
    } else {
      rows_ = max_batch + 3;
      // All layers: [row][chunk][layer = 2][k|v][C][H][D], tested on layer 1; without
      // chunks (C = 1) [row][token][layer = 2][k|v][H][D].
      const bool all = c.kind != Kind::kVirtualPerLayer;
      chunk_ = c.kind == Kind::kVirtualChunked ? c.page_tokens : 1;
      assert((chunk_ & (chunk_ - 1)) == 0 && "chunks are powers of two");
      token_stride_ = c.kind == Kind::kVirtualAllLayers ? 4 * block_ : block_;
      chunk_gap_ = c.kind == Kind::kVirtualChunked ? 3 * chunk_ * block_ : 0;
      row_stride_ = (max_context + chunk_ - 1) / chunk_ * (all ? 4 : 1) * chunk_ * block_;
      k_elems_ = rows_ * row_stride_;
      v_offset_ = all ? chunk_ * block_ : k_elems_;
      layer_offset_ = all ? 2 * chunk_ * block_ : 0;
      total_elems_ = all ? k_elems_ : 2 * k_elems_;
    }
    host_.resize(total_elems_);
    device_ = std::make_unique<DeviceBuffer>(total_elems_ * 2);
  }

  bool ok() const { return device_->get() != nullptr; }

  // Gives requests of `lens` tokens fresh pages (shuffled) or rows, fills their tokens
  // with random K/V and everything else with NaN, and uploads.
  void Fill(absl::Span<const int32_t> lens, std::mt19937_64& rng) {
    std::fill(host_.begin(), host_.end(), NanBits(c_.dtype));
    if (c_.kind == Kind::kPaged) {
      std::vector<int32_t> pages(num_pages_);
      std::iota(pages.begin(), pages.end(), 0);
      std::shuffle(pages.begin(), pages.end(), rng);
      page_table_.assign(std::max<size_t>(lens.size(), 1) * pt_stride_, -1);
      size_t next = 0;
      for (size_t b = 0; b < lens.size(); ++b) {
        const int64_t n = (lens[b] + c_.page_tokens - 1) / c_.page_tokens;
        for (int64_t i = 0; i < n; ++i) page_table_[b * pt_stride_ + i] = pages.at(next++);
      }
    } else {
      std::vector<int32_t> rows(rows_);
      std::iota(rows.begin(), rows.end(), 0);
      std::shuffle(rows.begin(), rows.end(), rng);
      row_ids_.assign(rows.begin(), rows.begin() + lens.size());
    }
    std::normal_distribution<float> normal(0.f, 1.f);
    for (size_t b = 0; b < lens.size(); ++b) {
      for (int64_t pos = 0; pos < lens[b]; ++pos) {
        const int64_t off = HostOffset(static_cast<int32_t>(b), pos);
        uint16_t* k = host_.data() + layer_offset_ + off;
        uint16_t* v = host_.data() + layer_offset_ + v_offset_ + off;
        for (int64_t i = 0; i < block_; ++i) {
          k[i] = ToBits(c_.dtype, normal(rng));
          v[i] = ToBits(c_.dtype, normal(rng));
        }
      }
    }
    ASSERT_EQ(cudaMemcpy(device_->get(), host_.data(), total_elems_ * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
  }

  // Views over host / device memory; the device one still needs ws.Bind(). A host view
  // from request b on (the whole batch for b = 0) feeds the reference.
  PagedKv HostPaged(int32_t b = 0) const {
    return Paged(host_.data(), page_table_.data() + int64_t{b} * pt_stride_);
  }
  PagedKv DevicePaged() const { return Paged(device_->get(), nullptr); }
  VirtualKv HostVirtual(int32_t b = 0) const { return Virtual(host_.data(), row_ids_.data() + b); }
  VirtualKv DeviceVirtual() const { return Virtual(device_->get(), nullptr); }

  const std::vector<int32_t>& page_table() const { return page_table_; }
  int64_t page_table_stride() const { return pt_stride_; }
  const std::vector<int32_t>& row_ids() const { return row_ids_; }

 private:
  int64_t HostOffset(int32_t b, int64_t pos) const {
    return c_.kind == Kind::kPaged ? HostPaged(b).Offset(0, pos) : HostVirtual(b).Offset(0, pos);
  }
  PagedKv Paged(const void* base, const int32_t* table) const {
    PagedKv kv;
    uint16_t* k = static_cast<uint16_t*>(const_cast<void*>(base));
    kv.k = k;
    kv.v = k + v_offset_;
    kv.page_tokens = c_.page_tokens;
    kv.token_stride = block_;
    kv.page_stride = c_.page_tokens * block_;
    kv.page_table = table;
    kv.page_table_stride = pt_stride_;
    return kv;
  }
  VirtualKv Virtual(const void* base, const int32_t* rows) const {
    VirtualKv kv;
    uint16_t* k = static_cast<uint16_t*>(const_cast<void*>(base)) + layer_offset_;
    kv.k = k;
    kv.v = k + v_offset_;
    kv.token_stride = token_stride_;
    kv.row_stride = row_stride_;
    kv.max_context = max_context_;
    kv.row_ids = rows;
    kv.chunk_shift = std::countr_zero(static_cast<uint64_t>(chunk_));
    kv.chunk_gap = chunk_gap_;
    return kv;
  }

  CaseT c_;
  int64_t max_context_;
  int64_t block_ = 0;
  int64_t num_pages_ = 0;
  int64_t pt_stride_ = 0;
  int64_t rows_ = 0;
  int64_t token_stride_ = 0;
  int64_t chunk_ = 1;
  int64_t chunk_gap_ = 0;
  int64_t row_stride_ = 0;
  int64_t k_elems_ = 0;
  int64_t v_offset_ = 0;
  int64_t layer_offset_ = 0;
  int64_t total_elems_ = 0;
  std::vector<uint16_t> host_;
  std::unique_ptr<DeviceBuffer> device_;
  std::vector<int32_t> page_table_;
  std::vector<int32_t> row_ids_;
};

// Random q of `rows` tokens (c.kv_heads * c.group heads of c.head_dim, N(0, c.q_std)),
// rounded to the storage type: float for the reference, bits for the device.
template <typename CaseT>
void RandomQ(const CaseT& c, int64_t rows, std::mt19937_64& rng, std::vector<float>* q,
             std::vector<uint16_t>* bits) {
  const int64_t n = rows * c.kv_heads * c.group * c.head_dim;
  std::normal_distribution<float> normal(0.f, c.q_std);
  q->resize(n);
  bits->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    (*bits)[i] = ToBits(c.dtype, normal(rng));
    (*q)[i] = FromBits(c.dtype, (*bits)[i]);
  }
}

// Squared error norms of device output bits against reference values.
struct ErrorNorms {
  double err2 = 0.0;  // ||out - ref||^2
  double ref2 = 0.0;  // ||ref||^2
  int64_t bad = 0;    // outputs not finite
};

// The norms over elements [begin, end) of out_bits and ref.
inline ErrorNorms CompareToReference(DType dtype, const std::vector<uint16_t>& out_bits,
                                     const std::vector<float>& ref, int64_t begin, int64_t end) {
  ErrorNorms n;
  for (int64_t i = begin; i < end; ++i) {
    const float o = FromBits(dtype, out_bits[i]);
    const float r = ref[i];
    if (!std::isfinite(o)) ++n.bad;
    n.err2 += (double(o) - r) * (double(o) - r);
    n.ref2 += double(r) * r;
  }
  return n;
}

}  // namespace kvmem::gpu_test

#define SKIP_WITHOUT_GPU()                                                                   \
  do {                                                                                       \
    if (!::kvmem::gpu_test::GpuPresent()) GTEST_SKIP() << "no CUDA GPU found: test skipped"; \
  } while (0)

// Asserts a CUDA runtime call succeeded (message: the call and the error string).
#define CUDA_ASSERT(expr)                                                      \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

// As CUDA_ASSERT, with the error's name too.
#define ASSERT_CUDA(expr)                                                      \
  do {                                                                         \
    const cudaError_t e_ = (expr);                                             \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorName(e_) << " " \
                               << cudaGetErrorString(e_);                      \
  } while (0)

#define ASSERT_OK(expr)                          \
  do {                                           \
    const ::absl::Status s_ = (expr);            \
    ASSERT_TRUE(s_.ok()) << #expr << ": " << s_; \
  } while (0)

// Skips the test where `vmm` (a MakeCudaVmm result) found no driver or GPU; any other
// error than Unavailable fails it.
#define SKIP_WITHOUT_CUDA_VMM(vmm)                                                        \
  do {                                                                                    \
    if (!(vmm).ok()) {                                                                    \
      ASSERT_EQ((vmm).status().code(), absl::StatusCode::kUnavailable) << (vmm).status(); \
      GTEST_SKIP() << "no CUDA driver / GPU found: " << (vmm).status();                   \
    }                                                                                     \
  } while (0)

#endif  // KVMEM_TESTS_GPU_GPU_TEST_UTIL_H_
