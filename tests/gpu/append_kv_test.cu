// GPU tests of AppendKv (kvmem/attention.h) against ReferenceAppendKv: paged pools of
// several page sizes and the two virtual arrangements, bf16 / fp16 / fp32, head_dim
// 64 / 128 / 256, several layers in one launch, strided sources (a slice of a fused QKV
// output), padding slots (< 0) that must write nothing, and argument checks.
// The cache starts as random bits, so any byte written to the wrong place shows.
// Skips, saying so, where no GPU is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kvmem/attention.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/reference_attention.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::Kind;

struct Case {
  Kind kind = Kind::kPaged;
  int page_tokens = 16;
  DType dtype = DType::kBFloat16;
  int head_dim = 128;
  int kv_heads = 4;
  int layers = 3;
  int tokens = 37;
  int padding = 5;        // slots of -1 mixed into the batch
  int64_t src_extra = 0;  // source token stride beyond kv_heads * head_dim (elements)

  std::string Name() const {
    return absl::StrCat(gpu_test::KindName(kind), " page ", page_tokens, " ",
                        std::string(DTypeName(dtype)), " D", head_dim, " H", kv_heads, " L", layers,
                        " tokens ", tokens, " src_extra ", src_extra);
  }
};

// Runs one case: random cache bytes, AppendKv on the device, ReferenceAppendKv on a host
// copy of the same bytes, and a byte-for-byte comparison of the whole cache.
void RunCase(const Case& c) {
  SCOPED_TRACE(c.Name());
  std::mt19937_64 rng(std::hash<std::string>{}(c.Name()));
  const int elem = DTypeBytes(c.dtype);
  const int64_t block = int64_t{c.kv_heads} * c.head_dim;

  // Storage: per layer views differing only in k / v.
  int64_t capacity_slots = 0;  // slots the views address
  int64_t total_elems = 0;
  std::vector<int64_t> k_off(c.layers), v_off(c.layers);  // element offsets of layer bases
  PagedKv paged;
  VirtualKv virt;
  const int rows = 6;
  const int64_t max_context = 50;
  if (c.kind == Kind::kPaged) {
    const int64_t pages = 40;
    capacity_slots = pages * c.page_tokens;
    paged.page_tokens = c.page_tokens;
    paged.token_stride = block;
    paged.page_stride = c.page_tokens * block;
    const int64_t pool = pages * paged.page_stride;
    for (int l = 0; l < c.layers; ++l) {
      k_off[l] = 2 * l * pool;
      v_off[l] = k_off[l] + pool;
    }
    total_elems = 2 * c.layers * pool;
  } else if (c.kind == Kind::kVirtualAllLayers) {
    capacity_slots = rows * max_context;
    virt.token_stride = 2 * c.layers * block;
    virt.row_stride = max_context * virt.token_stride;
    virt.max_context = max_context;
    for (int l = 0; l < c.layers; ++l) {
      k_off[l] = 2 * l * block;
      v_off[l] = k_off[l] + block;
    }
    total_elems = rows * virt.row_stride;
  } else if (c.kind == Kind::kVirtualChunked) {
    // [row][chunk][layer][k|v][chunk token][H][D], chunks of page_tokens tokens.
    const int64_t chunk = c.page_tokens;
    const int64_t chunks = (max_context + chunk - 1) / chunk;
    capacity_slots = rows * max_context;
    virt.token_stride = block;
    virt.chunk_shift = std::countr_zero(static_cast<uint64_t>(chunk));
    virt.chunk_gap = (2 * c.layers - 1) * chunk * block;
    virt.row_stride = chunks * 2 * c.layers * chunk * block;
    virt.max_context = max_context;
    for (int l = 0; l < c.layers; ++l) {
      k_off[l] = 2 * l * chunk * block;
      v_off[l] = k_off[l] + chunk * block;
    }
    total_elems = rows * virt.row_stride;
  } else {
    capacity_slots = rows * max_context;
    virt.token_stride = block;
    virt.row_stride = max_context * block;
    virt.max_context = max_context;
    const int64_t tensor = rows * virt.row_stride;
    for (int l = 0; l < c.layers; ++l) {
      k_off[l] = 2 * l * tensor;
      v_off[l] = k_off[l] + tensor;
    }
    total_elems = 2 * c.layers * tensor;
  }
  ASSERT_LE(c.tokens, capacity_slots);

  std::vector<uint8_t> cache(total_elems * elem);
  for (auto& byte : cache) byte = static_cast<uint8_t>(rng());
  std::vector<uint8_t> expected = cache;

  // Distinct random slots, with padding entries (-1) mixed in.
  std::vector<int64_t> all(capacity_slots);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<int64_t> slots(all.begin(), all.begin() + c.tokens);
  for (int i = 0; i < c.padding; ++i) {
    slots.insert(slots.begin() + rng() % (slots.size() + 1), -1);
  }
  const int64_t n = static_cast<int64_t>(slots.size());

  // Source: [layers][n] tokens of token_stride elements, values exact in the dtype.
  const int64_t token_stride = block + c.src_extra;
  const int64_t layer_stride = n * token_stride;
  std::vector<float> src_k(c.layers * layer_stride), src_v(c.layers * layer_stride);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto* src : {&src_k, &src_v}) {
    for (float& x : *src) x = RoundTo(c.dtype, normal(rng));
  }
  std::vector<uint8_t> src_k_bytes(src_k.size() * elem), src_v_bytes(src_v.size() * elem);
  for (size_t i = 0; i < src_k.size(); ++i) {
    StoreFromFloat(src_k_bytes.data(), i, c.dtype, src_k[i]);
    StoreFromFloat(src_v_bytes.data(), i, c.dtype, src_v[i]);
  }

  // Expected: the reference, layer by layer, on the real slots only.
  AttentionShape shape;
  shape.num_kv_heads = c.kv_heads;
  shape.num_q_heads = c.kv_heads;
  shape.head_dim = c.head_dim;
  shape.kv_dtype = c.dtype;
  for (int l = 0; l < c.layers; ++l) {
    std::vector<int64_t> real;
    std::vector<float> k_rows, v_rows;
    for (int64_t t = 0; t < n; ++t) {
      if (slots[t] < 0) continue;
      real.push_back(slots[t]);
      const float* k = src_k.data() + l * layer_stride + t * token_stride;
      const float* v = src_v.data() + l * layer_stride + t * token_stride;
      k_rows.insert(k_rows.end(), k, k + block);
      v_rows.insert(v_rows.end(), v, v + block);
    }
    uint8_t* base = expected.data();
    const absl::Status st = [&] {
      if (c.kind == Kind::kPaged) {
        PagedKv view = paged;
        view.k = base + k_off[l] * elem;
        view.v = base + v_off[l] * elem;
        return ReferenceAppendKv(shape, view, real, k_rows.data(), v_rows.data());
      }
      VirtualKv view = virt;
      view.k = base + k_off[l] * elem;
      view.v = base + v_off[l] * elem;
      return ReferenceAppendKv(shape, view, real, k_rows.data(), v_rows.data());
    }();
    ASSERT_TRUE(st.ok()) << st;
  }

  // Device run: all layers in one launch.
  DeviceBuffer cache_dev(cache.size()), src_k_dev(src_k_bytes.size()),
      src_v_dev(src_v_bytes.size()), slots_dev(slots.size() * sizeof(int64_t));
  ASSERT_NE(cache_dev.get(), nullptr);
  CUDA_ASSERT(cudaMemcpy(cache_dev.get(), cache.data(), cache.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(
      cudaMemcpy(src_k_dev.get(), src_k_bytes.data(), src_k_bytes.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(
      cudaMemcpy(src_v_dev.get(), src_v_bytes.data(), src_v_bytes.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(slots_dev.get(), slots.data(), slots.size() * sizeof(int64_t),
                         cudaMemcpyHostToDevice));
  NewKv src;
  src.k = src_k_dev.get();
  src.v = src_v_dev.get();
  src.token_stride = token_stride;
  src.layer_stride = layer_stride;
  src.slots = static_cast<const int64_t*>(slots_dev.get());
  src.num_tokens = n;
  uint8_t* dev = static_cast<uint8_t*>(cache_dev.get());
  const absl::Status st = [&] {
    if (c.kind == Kind::kPaged) {
      std::vector<PagedKv> views(c.layers, paged);
      for (int l = 0; l < c.layers; ++l) {
        views[l].k = dev + k_off[l] * elem;
        views[l].v = dev + v_off[l] * elem;
      }
      return AppendKv<PagedKv>(shape, views, src, nullptr);
    }
    std::vector<VirtualKv> views(c.layers, virt);
    for (int l = 0; l < c.layers; ++l) {
      views[l].k = dev + k_off[l] * elem;
      views[l].v = dev + v_off[l] * elem;
    }
    return AppendKv<VirtualKv>(shape, views, src, nullptr);
  }();
  ASSERT_TRUE(st.ok()) << st;
  CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<uint8_t> got(cache.size());
  CUDA_ASSERT(cudaMemcpy(got.data(), cache_dev.get(), got.size(), cudaMemcpyDeviceToHost));
  size_t first_diff = got.size();
  size_t diffs = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != expected[i]) {
      first_diff = std::min(first_diff, i);
      ++diffs;
    }
  }
  EXPECT_EQ(diffs, 0u) << "first differing byte " << first_diff;
  // The test must have written something.
  EXPECT_NE(cache, expected);
}

TEST(AppendKvTest, PagedPageSizes) {
  SKIP_WITHOUT_GPU();
  for (int page : {1, 3, 16, 64, 256}) {
    Case c;
    c.page_tokens = page;
    RunCase(c);
  }
}

TEST(AppendKvTest, VirtualArrangements) {
  SKIP_WITHOUT_GPU();
  for (Kind kind : {Kind::kVirtualAllLayers, Kind::kVirtualPerLayer}) {
    Case c;
    c.kind = kind;
    RunCase(c);
  }
  for (int chunk : {1, 4, 16, 64}) {  // 64: one chunk past max_context (50)
    Case c;
    c.kind = Kind::kVirtualChunked;
    c.page_tokens = chunk;
    RunCase(c);
  }
}

TEST(AppendKvTest, DtypesHeadDimsAndStridedSource) {
  SKIP_WITHOUT_GPU();
  for (DType t : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    for (int d : {64, 128, 256}) {
      for (Kind kind : {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualChunked}) {
        Case c;
        c.kind = kind;
        c.dtype = t;
        c.head_dim = d;
        c.kv_heads = 2;
        c.layers = 2;
        c.src_extra = 3 * d;  // e.g. K inside a fused [q | k | v] row
        RunCase(c);
      }
    }
  }
}

TEST(AppendKvTest, OneLayerAndOnlyPadding) {
  SKIP_WITHOUT_GPU();
  Case c;
  c.layers = 1;
  c.tokens = 1;
  c.padding = 0;
  RunCase(c);
}

TEST(AppendKvTest, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  AttentionShape shape;
  shape.num_kv_heads = 2;
  shape.num_q_heads = 2;
  shape.head_dim = 128;
  DeviceBuffer buf(1 << 20);
  ASSERT_NE(buf.get(), nullptr);
  // All bytes 0xff: the slots read as -1 (padding), so the accepted launch writes nothing.
  CUDA_ASSERT(cudaMemset(buf.get(), 0xff, buf.bytes()));
  uint8_t* base = static_cast<uint8_t*>(buf.get());
  PagedKv kv;
  kv.k = base;
  kv.v = base + 65536;
  kv.page_tokens = 4;
  kv.token_stride = 256;
  kv.page_stride = 1024;
  NewKv src;
  src.k = base + 131072;
  src.v = base + 196608;
  src.slots = reinterpret_cast<const int64_t*>(base + 262144);
  src.num_tokens = 4;
  const std::vector<PagedKv> one = {kv};
  ASSERT_TRUE(AppendKv<PagedKv>(shape, one, src, nullptr).ok());
  CUDA_ASSERT(cudaDeviceSynchronize());

  EXPECT_EQ(AppendKv<PagedKv>(shape, {}, src, nullptr).code(), absl::StatusCode::kInvalidArgument);
  NewKv misaligned = src;
  misaligned.k = base + 131072 + 2;
  EXPECT_EQ(AppendKv<PagedKv>(shape, one, misaligned, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  NewKv odd_stride = src;
  odd_stride.token_stride = 256 + 1;
  EXPECT_EQ(AppendKv<PagedKv>(shape, one, odd_stride, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<PagedKv> differ = {kv, kv};
  differ[1].page_tokens = 8;
  differ[1].page_stride = 2048;
  EXPECT_EQ(AppendKv<PagedKv>(shape, differ, src, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<PagedKv> too_many(kMaxAppendLayers + 1, kv);
  EXPECT_EQ(AppendKv<PagedKv>(shape, too_many, src, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  AttentionShape odd = shape;
  odd.head_dim = 3;  // 2 heads x 3 x 2 bytes: not a multiple of 16
  PagedKv odd_kv = kv;
  odd_kv.token_stride = 6;
  odd_kv.page_stride = 24;
  EXPECT_EQ(AppendKv<PagedKv>(odd, {&odd_kv, 1}, src, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem
