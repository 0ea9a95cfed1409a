// Tests of the CPU reference attention (attention/reference_attention.cc).
//
// The reference is compared with an independent float64 dense implementation over
// contiguous [batch][pos][kv_head][dim] arrays. The same data is laid into five
// hand-built stores: paged pools with page sizes 1, 3 and 16 under a scrambled page table,
// and virtual tensors in the all-layer and per-layer arrangements with scrambled row ids.
// Unwritten storage is filled with NaN, so a read of any location the accessor should not
// touch shows up as a NaN output. Plus hand-checkable cases whose exact answer is known.
#include "kvmem/reference_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_printers.h"

namespace kvmem {
namespace {

using ::testing::HasSubstr;

// Tolerance of the fp32 reference against the float64 dense one, as the relative L2 error
// of each [head_dim] output row. The reference rounds each score's d-term dot product,
// the exp, and the n-term weighted sums to fp32 (unit roundoff u = 2^-24 = 6e-8). With
// random O(1) data these roundings behave as random walks: the error of a row is about
// u * sqrt(d + n) relative to its magnitude, ~1e-6 for the largest case here (d = 256,
// n = 130 keys); the largest seen over all cases below is 1.7e-6. 1e-5 leaves a margin
// of ~6x, while any indexing error (a wrong key, page, head or window edge moves a row
// by at least one key's softmax weight, >= 1e-3 here) is orders of magnitude above it.
constexpr double kRelTol = 1e-5;

// One attention problem in dense form.
struct Problem {
  AttentionShape shape;
  std::vector<int32_t> lens;          // tokens in the cache per batch entry
  std::vector<std::vector<float>> k;  // per entry: [len][kv_heads][head_dim]
  std::vector<std::vector<float>> v;  // values representable in shape.kv_dtype
  int64_t TokenElems() const { return int64_t{shape.num_kv_heads} * shape.head_dim; }
  int64_t RowElems() const { return int64_t{shape.num_q_heads} * shape.head_dim; }
};

Problem MakeProblem(const AttentionShape& shape, std::vector<int32_t> lens, uint64_t seed) {
  Problem p{shape, std::move(lens), {}, {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int32_t len : p.lens) {
    std::vector<float> k(len * p.TokenElems()), v(len * p.TokenElems());
    for (float& x : k) x = RoundTo(shape.kv_dtype, normal(rng));
    for (float& x : v) x = RoundTo(shape.kv_dtype, normal(rng));
    p.k.push_back(std::move(k));
    p.v.push_back(std::move(v));
  }
  return p;
}

std::vector<float> RandomQ(int64_t rows, const AttentionShape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> q(rows * s.num_q_heads * s.head_dim);
  for (float& x : q) x = normal(rng);
  return q;
}

// ---- the float64 dense reference ------------------------------------------------------

// One query (all heads) of entry b at position `pos` over keys [lo, pos].
void DenseQuery(const Problem& p, int b, int64_t pos, const float* q, double* out) {
  const AttentionShape& s = p.shape;
  const int d = s.head_dim;
  const double scale = s.scale != 0.f ? s.scale : 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t lo = s.window_left < 0 ? 0 : std::max<int64_t>(0, pos - s.window_left);
  const int group = s.num_q_heads / s.num_kv_heads;
  for (int h = 0; h < s.num_q_heads; ++h) {
    const int kvh = h / group;
    std::vector<double> score;
    for (int64_t j = lo; j <= pos; ++j) {
      const float* kj = &p.k[b][(j * s.num_kv_heads + kvh) * d];
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += static_cast<double>(q[h * d + i]) * kj[i];
      score.push_back(dot * scale);
    }
    const double m = *std::max_element(score.begin(), score.end());
    double sum = 0;
    std::vector<double> acc(d, 0.0);
    for (int64_t j = lo; j <= pos; ++j) {
      const double w = std::exp(score[j - lo] - m);
      sum += w;
      const float* vj = &p.v[b][(j * s.num_kv_heads + kvh) * d];
      for (int i = 0; i < d; ++i) acc[i] += w * vj[i];
    }
    for (int i = 0; i < d; ++i) out[h * d + i] = acc[i] / sum;
  }
}

std::vector<double> DenseDecode(const Problem& p, const std::vector<float>& q) {
  std::vector<double> out(p.lens.size() * p.RowElems(), 0.0);
  for (size_t b = 0; b < p.lens.size(); ++b) {
    if (p.lens[b] == 0) continue;  // no keys: zeros
    DenseQuery(p, b, p.lens[b] - 1, &q[b * p.RowElems()], &out[b * p.RowElems()]);
  }
  return out;
}

std::vector<double> DenseExtend(const Problem& p, const std::vector<int32_t>& prefix,
                                const std::vector<float>& q) {
  int64_t total = 0;
  for (size_t b = 0; b < prefix.size(); ++b) total += p.lens[b] - prefix[b];
  std::vector<double> out(total * p.RowElems());
  int64_t row = 0;
  for (size_t b = 0; b < prefix.size(); ++b) {
    for (int64_t pos = prefix[b]; pos < p.lens[b]; ++pos, ++row) {
      DenseQuery(p, b, pos, &q[row * p.RowElems()], &out[row * p.RowElems()]);
    }
  }
  return out;
}

// Largest relative L2 error over [head_dim] rows; rows whose reference is all zeros must
// be exactly zero (else +inf).
double MaxRowRelError(const std::vector<float>& got, const std::vector<double>& want, int d) {
  EXPECT_EQ(got.size(), want.size());
  double worst = 0;
  for (size_t r = 0; r * d < want.size(); ++r) {
    double err = 0, norm = 0;
    for (int i = 0; i < d; ++i) {
      const double g = got[r * d + i], w = want[r * d + i];
      if (std::isnan(g)) return std::numeric_limits<double>::infinity();
      err += (g - w) * (g - w);
      norm += w * w;
    }
    if (norm == 0) {
      if (err != 0) return std::numeric_limits<double>::infinity();
      continue;
    }
    worst = std::max(worst, std::sqrt(err / norm));
  }
  return worst;
}

// ---- stores: the same data in each layout ----------------------------------------------

enum class Kind { kPaged1, kPaged3, kPaged16, kVirtualAllLayers, kVirtualPerLayer };
constexpr Kind kAllKinds[] = {Kind::kPaged1, Kind::kPaged3, Kind::kPaged16, Kind::kVirtualAllLayers,
                              Kind::kVirtualPerLayer};

std::string KindName(Kind kind) {
  switch (kind) {
    case Kind::kPaged1:
      return "paged1";
    case Kind::kPaged3:
      return "paged3";
    case Kind::kPaged16:
      return "paged16";
    case Kind::kVirtualAllLayers:
      return "virtual-all-layers";
    case Kind::kVirtualPerLayer:
      return "virtual-per-layer";
  }
  return "?";
}

// Raw storage of `elems` elements of dtype t, every element NaN.
std::vector<uint64_t> PoisonedBuffer(int64_t elems, DType t) {
  std::vector<uint64_t> buf((elems * DTypeBytes(t) + 7) / 8 + 1);
  for (int64_t i = 0; i < elems; ++i) {
    StoreFromFloat(buf.data(), i, t, std::numeric_limits<float>::quiet_NaN());
  }
  return buf;
}

struct Store {
  Kind kind;
  std::vector<uint64_t> k_mem, v_mem;  // v_mem unused by the all-layer arrangement
  std::vector<int32_t> index;          // page table or row ids
  std::variant<PagedKv, VirtualKv> view;
};

// Lays p out as `kind`, writing K/V through ReferenceAppendKv at the slots the layout
// would hand out. Pages and rows are assigned in a seeded random order, with spare ones
// left unwritten (NaN).
std::unique_ptr<Store> MakeStore(const Problem& p, Kind kind, uint64_t seed) {
  auto st = std::make_unique<Store>();
  st->kind = kind;
  std::mt19937_64 rng(seed);
  const AttentionShape& s = p.shape;
  const int64_t tok = p.TokenElems();
  const int batch = static_cast<int>(p.lens.size());
  std::vector<std::vector<int64_t>> slots(batch);
  if (kind == Kind::kPaged1 || kind == Kind::kPaged3 || kind == Kind::kPaged16) {
    const int32_t pt = kind == Kind::kPaged1 ? 1 : kind == Kind::kPaged3 ? 3 : 16;
    int64_t total_pages = 3, max_pages = 0;
    for (int32_t len : p.lens) {
      total_pages += (len + pt - 1) / pt;
      max_pages = std::max<int64_t>(max_pages, (len + pt - 1) / pt);
    }
    std::vector<int32_t> perm(total_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    const int64_t stride = max_pages + 1;
    st->index.assign(batch * stride, 0);  // padding: page 0, as BatchMetadata pads
    int64_t next = 0;
    for (int b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < (p.lens[b] + pt - 1) / pt; ++i)
        st->index[b * stride + i] = perm[next++];
      for (int64_t pos = 0; pos < p.lens[b]; ++pos) {
        slots[b].push_back(int64_t{st->index[b * stride + pos / pt]} * pt + pos % pt);
      }
    }
    st->k_mem = PoisonedBuffer(total_pages * pt * tok, s.kv_dtype);
    st->v_mem = PoisonedBuffer(total_pages * pt * tok, s.kv_dtype);
    PagedKv kv;
    kv.k = st->k_mem.data();
    kv.v = st->v_mem.data();
    kv.page_tokens = pt;
    kv.token_stride = tok;
    kv.page_stride = pt * tok;
    kv.page_table = st->index.data();
    kv.page_table_stride = stride;
    st->view = kv;
  } else {
    const int32_t rows = batch + 2;
    const int64_t max_context = *std::max_element(p.lens.begin(), p.lens.end()) + 5;
    std::vector<int32_t> perm(rows);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    st->index.assign(perm.begin(), perm.begin() + batch);
    for (int b = 0; b < batch; ++b) {
      for (int64_t pos = 0; pos < p.lens[b]; ++pos) {
        slots[b].push_back(st->index[b] * max_context + pos);
      }
    }
    VirtualKv kv;
    kv.max_context = max_context;
    kv.row_ids = st->index.data();
    if (kind == Kind::kVirtualAllLayers) {
      // [row][token][layer][k|v][kv_head][head_dim] with 3 layers; the view is layer 1.
      const int layers = 3, layer = 1;
      kv.token_stride = layers * 2 * tok;
      kv.row_stride = max_context * kv.token_stride;
      st->k_mem = PoisonedBuffer(rows * kv.row_stride, s.kv_dtype);
      char* base = reinterpret_cast<char*>(st->k_mem.data());
      kv.k = base + layer * 2 * tok * DTypeBytes(s.kv_dtype);
      kv.v = base + (layer * 2 + 1) * tok * DTypeBytes(s.kv_dtype);
    } else {
      // Separate [row][token][kv_head][head_dim] tensors, rows padded by a few tokens.
      kv.token_stride = tok;
      kv.row_stride = (max_context + 2) * tok;
      st->k_mem = PoisonedBuffer(rows * kv.row_stride, s.kv_dtype);
      st->v_mem = PoisonedBuffer(rows * kv.row_stride, s.kv_dtype);
      kv.k = st->k_mem.data();
      kv.v = st->v_mem.data();
    }
    st->view = kv;
  }
  // Write the entries in a scrambled order, a few tokens at a time, as an engine would.
  for (int b = 0; b < batch; ++b) {
    for (int64_t pos = 0; pos < p.lens[b];) {
      const int64_t n = std::min<int64_t>(p.lens[b] - pos, 1 + rng() % 7);
      const absl::Status status = std::visit(
          [&](const auto& kv) {
            return ReferenceAppendKv(s, kv, absl::MakeConstSpan(&slots[b][pos], n),
                                     &p.k[b][pos * tok], &p.v[b][pos * tok]);
          },
          st->view);
      EXPECT_TRUE(status.ok()) << status;
      pos += n;
    }
  }
  return st;
}

absl::Status Decode(const Store& st, const Problem& p, const std::vector<float>& q,
                    std::vector<float>* out) {
  out->assign(p.lens.size() * p.RowElems(), std::numeric_limits<float>::quiet_NaN());
  return std::visit(
      [&](const auto& kv) { return ReferenceDecode(p.shape, kv, p.lens, q.data(), out->data()); },
      st.view);
}

absl::Status Extend(const Store& st, const Problem& p, const std::vector<int32_t>& prefix,
                    const std::vector<float>& q, std::vector<float>* out) {
  std::vector<int32_t> new_lens(prefix.size());
  for (size_t b = 0; b < prefix.size(); ++b) new_lens[b] = p.lens[b] - prefix[b];
  out->assign(q.size(), std::numeric_limits<float>::quiet_NaN());
  return std::visit(
      [&](const auto& kv) {
        return ReferenceExtend(p.shape, kv, prefix, new_lens, q.data(), out->data());
      },
      st.view);
}

std::string Describe(const AttentionShape& s) {
  return "q_heads=" + std::to_string(s.num_q_heads) +
         " kv_heads=" + std::to_string(s.num_kv_heads) + " head_dim=" + std::to_string(s.head_dim) +
         " " + std::string(DTypeName(s.kv_dtype)) + " window=" + std::to_string(s.window_left) +
         " scale=" + std::to_string(s.scale);
}

// ---- randomized comparisons with the dense reference -----------------------------------

struct Case {
  int q_heads, kv_heads, head_dim;
  DType dtype;
  int window;
  float scale = 0.f;
};

// "q8_kv2_d64_bf16_wnone": the test name and how ctest shows the parameter.
std::string CaseName(const Case& c) {
  return "q" + std::to_string(c.q_heads) + "_kv" + std::to_string(c.kv_heads) + "_d" +
         std::to_string(c.head_dim) + "_" + std::string(DTypeName(c.dtype)) + "_w" +
         (c.window < 0 ? std::string("none") : std::to_string(c.window)) +
         (c.scale != 0.f ? "_scaled" : "");
}
void PrintTo(const Case& c, std::ostream* os) { *os << CaseName(c); }

class ReferenceVsDenseTest : public ::testing::TestWithParam<Case> {
 protected:
  AttentionShape Shape() const {
    const Case& c = GetParam();
    AttentionShape s;
    s.num_q_heads = c.q_heads;
    s.num_kv_heads = c.kv_heads;
    s.head_dim = c.head_dim;
    s.kv_dtype = c.dtype;
    s.window_left = c.window;
    s.scale = c.scale;
    return s;
  }
  uint64_t Seed() const {
    const Case& c = GetParam();
    return 1000003ull * c.q_heads + 10007ull * c.kv_heads + 101ull * c.head_dim +
           17ull * static_cast<int>(c.dtype) + static_cast<uint64_t>(c.window + 7);
  }
};

// Ragged decode batch: an empty entry, a single token, exact page multiples (16, 48),
// lengths that straddle pages of every size.
TEST_P(ReferenceVsDenseTest, Decode) {
  const AttentionShape s = Shape();
  const Problem p = MakeProblem(s, {37, 1, 0, 16, 130, 48}, Seed());
  const std::vector<float> q = RandomQ(p.lens.size(), s, Seed() + 1);
  const std::vector<double> want = DenseDecode(p, q);
  std::vector<float> first;
  for (Kind kind : kAllKinds) {
    SCOPED_TRACE(KindName(kind) + " " + Describe(s));
    const auto st = MakeStore(p, kind, Seed() + 2 + static_cast<int>(kind));
    std::vector<float> out;
    ASSERT_TRUE(Decode(*st, p, q, &out).ok());
    EXPECT_LE(MaxRowRelError(out, want, s.head_dim), kRelTol);
    // Same data, same math order: every layout gives the same bits.
    if (first.empty()) {
      first = out;
    } else {
      EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(float)));
    }
  }
}

// Ragged extend batch: prefix 0 (a fresh prefill), a single new token (decode as extend),
// an entry with no new tokens (produces no rows), prefixes that end mid-page.
TEST_P(ReferenceVsDenseTest, Extend) {
  const AttentionShape s = Shape();
  const std::vector<int32_t> prefix = {0, 20, 9, 33, 0};
  const Problem p = MakeProblem(s, {19, 21, 9, 60, 1}, Seed() + 5);
  int64_t rows = 0;
  for (size_t b = 0; b < prefix.size(); ++b) rows += p.lens[b] - prefix[b];
  const std::vector<float> q = RandomQ(rows, s, Seed() + 6);
  const std::vector<double> want = DenseExtend(p, prefix, q);
  std::vector<float> first;
  for (Kind kind : kAllKinds) {
    SCOPED_TRACE(KindName(kind) + " " + Describe(s));
    const auto st = MakeStore(p, kind, Seed() + 7 + static_cast<int>(kind));
    std::vector<float> out;
    ASSERT_TRUE(Extend(*st, p, prefix, q, &out).ok());
    EXPECT_LE(MaxRowRelError(out, want, s.head_dim), kRelTol);
    if (first.empty()) {
      first = out;
    } else {
      EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(float)));
    }
  }
}

// Extend of the last token equals decode (same positions, same keys), bit for bit.
TEST_P(ReferenceVsDenseTest, ExtendOfOneTokenIsDecode) {
  const AttentionShape s = Shape();
  const Problem p = MakeProblem(s, {25, 7, 64}, Seed() + 9);
  const std::vector<float> q = RandomQ(p.lens.size(), s, Seed() + 10);
  const auto st = MakeStore(p, Kind::kPaged3, Seed() + 11);
  std::vector<int32_t> prefix;
  for (int32_t len : p.lens) prefix.push_back(len - 1);
  std::vector<float> dec, ext;
  ASSERT_TRUE(Decode(*st, p, q, &dec).ok());
  ASSERT_TRUE(Extend(*st, p, prefix, q, &ext).ok());
  EXPECT_EQ(0, std::memcmp(dec.data(), ext.data(), dec.size() * sizeof(float)));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ReferenceVsDenseTest,
    ::testing::Values(
        // GQA group sizes 1, 4, 8 and an odd count (28 / 4 = 7), bf16.
        Case{4, 4, 64, DType::kBFloat16, -1}, Case{16, 4, 64, DType::kBFloat16, -1},
        Case{16, 2, 64, DType::kBFloat16, -1}, Case{28, 4, 64, DType::kBFloat16, -1},
        // head_dim 64 / 128 / 256 in each storage type.
        Case{8, 2, 64, DType::kFloat32, -1}, Case{8, 2, 128, DType::kFloat32, -1},
        Case{8, 2, 256, DType::kFloat32, -1}, Case{8, 2, 128, DType::kBFloat16, -1},
        Case{8, 2, 256, DType::kBFloat16, -1}, Case{8, 2, 64, DType::kFloat16, -1},
        Case{8, 2, 128, DType::kFloat16, -1}, Case{8, 2, 256, DType::kFloat16, -1},
        // Sliding windows: only the token itself, one back, mid-context, wider than any
        // context.
        Case{8, 2, 64, DType::kBFloat16, 0}, Case{8, 2, 64, DType::kBFloat16, 1},
        Case{8, 2, 64, DType::kFloat32, 17}, Case{28, 4, 128, DType::kFloat16, 5},
        Case{8, 2, 64, DType::kBFloat16, 1000},
        // An explicit softmax scale.
        Case{8, 2, 64, DType::kFloat32, -1, 0.37f}, Case{28, 4, 128, DType::kFloat32, -1, 0.f}),
    [](const ::testing::TestParamInfo<Case>& info) { return CaseName(info.param); });

// ---- hand-checkable cases ---------------------------------------------------------------

AttentionShape SmallShape(DType t, int q_heads = 4, int kv_heads = 2, int head_dim = 8) {
  AttentionShape s;
  s.num_q_heads = q_heads;
  s.num_kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.kv_dtype = t;
  return s;
}

class HandCheckedTest : public ::testing::TestWithParam<DType> {};

// One key: its softmax weight is exp(0) / exp(0) = 1 exactly, so out = V bit for bit,
// and query head h reads KV head h / group.
TEST_P(HandCheckedTest, SingleKeyOutputIsItsValue) {
  const AttentionShape s = SmallShape(GetParam(), 8, 2, 16);
  const Problem p = MakeProblem(s, {1, 1}, 41);
  const std::vector<float> q = RandomQ(2, s, 42);
  for (Kind kind : kAllKinds) {
    SCOPED_TRACE(KindName(kind));
    const auto st = MakeStore(p, kind, 43);
    std::vector<float> out;
    ASSERT_TRUE(Decode(*st, p, q, &out).ok());
    for (int b = 0; b < 2; ++b) {
      for (int h = 0; h < 8; ++h) {
        for (int i = 0; i < 16; ++i) {
          ASSERT_EQ(out[(b * 8 + h) * 16 + i], p.v[b][(h / 4) * 16 + i]) << b << " " << h;
        }
      }
    }
  }
}

// Two keys with equal scores (identical K): weights 1/2 each, out = (v0 + v1) / 2, exact
// for small dyadic values.
TEST_P(HandCheckedTest, EqualScoresGiveTheMeanOfValues) {
  const AttentionShape s = SmallShape(GetParam(), 2, 1, 4);
  Problem p{s, {2}, {}, {}};
  p.k = {{0.5f, -1.f, 2.f, 0.25f, 0.5f, -1.f, 2.f, 0.25f}};
  p.v = {{1.f, 2.f, -3.f, 0.5f, 3.f, -6.f, 4.f, 0.25f}};
  const std::vector<float> q = {0.3f, 1.7f, -0.2f, 0.9f, -2.f, 0.1f, 0.f, 5.f};
  const std::vector<float> mean = {2.f, -2.f, 0.5f, 0.375f};
  for (Kind kind : kAllKinds) {
    SCOPED_TRACE(KindName(kind));
    const auto st = MakeStore(p, kind, 7);
    std::vector<float> out;
    ASSERT_TRUE(Decode(*st, p, q, &out).ok());
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 4; ++i) EXPECT_EQ(out[h * 4 + i], mean[i]) << h << " " << i;
    }
  }
}

// Scores of +-thousands: exp overflows (or underflows to 0/0) without the max subtraction.
// The dominant key's weight is exp(0) = 1 and every other exp(<= -2048) = 0, so out is
// exactly the dominant V; and when all scores are equal and hugely negative, the mean.
TEST_P(HandCheckedTest, HugeScoresAreSafeAndTheLargestDominates) {
  const AttentionShape s = SmallShape(GetParam(), 1, 1, 4);  // scale 1/2
  Problem p{s, {5}, {}, {}};
  // K along dim 0 only: scores = 0.5 * q0 * c_j with q0 = 1 (c exactly representable).
  const float c[5] = {16384.f, -32768.f, 32768.f, 0.f, 16384.f};
  p.k.assign(1, std::vector<float>(20, 0.f));
  p.v.assign(1, std::vector<float>(20, 0.f));
  for (int j = 0; j < 5; ++j) {
    p.k[0][j * 4] = c[j];
    for (int i = 0; i < 4; ++i) p.v[0][j * 4 + i] = static_cast<float>(j * 10 + i);
  }
  const std::vector<float> q = {1.f, 0.f, 0.f, 0.f};
  for (Kind kind : kAllKinds) {
    SCOPED_TRACE(KindName(kind));
    const auto st = MakeStore(p, kind, 8);
    std::vector<float> out;
    ASSERT_TRUE(Decode(*st, p, q, &out).ok());
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], static_cast<float>(20 + i));  // key 2
  }
  // All keys at c = -32768: equal scores of -16384 each; weights all exp(0) after the max
  // subtraction (not exp(-16384) = 0, which would give 0 / 0).
  for (int j = 0; j < 5; ++j) p.k[0][j * 4] = -32768.f;
  const auto st = MakeStore(p, Kind::kPaged3, 9);
  std::vector<float> out;
  ASSERT_TRUE(Decode(*st, p, q, &out).ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], static_cast<float>(20 + i));  // mean of j*10+i
}

// GQA mapping: KV head j holds the constant value j + 1, so query head h must return
// exactly h / group + 1 (28 query heads over 4 KV heads: groups of 7).
TEST_P(HandCheckedTest, GqaQueryHeadReadsItsGroupsKvHead) {
  const AttentionShape s = SmallShape(GetParam(), 28, 4, 8);
  Problem p = MakeProblem(s, {13}, 5);
  for (int64_t t = 0; t < 13; ++t) {
    for (int j = 0; j < 4; ++j) {
      for (int i = 0; i < 8; ++i) p.v[0][(t * 4 + j) * 8 + i] = static_cast<float>(j + 1);
    }
  }
  const std::vector<float> q = RandomQ(1, s, 6);
  const auto st = MakeStore(p, Kind::kVirtualAllLayers, 7);
  std::vector<float> out;
  ASSERT_TRUE(Decode(*st, p, q, &out).ok());
  for (int h = 0; h < 28; ++h) {
    for (int i = 0; i < 8; ++i) {
      // sum_j p_j * c / sum_j p_j: the two 13-term fp32 sums each round by at most
      // 13 * 2^-24 relative, so 4 * 13 * 2^-24 relative bounds it; a wrong head is off by 1.
      const float want = static_cast<float>(h / 7 + 1);
      EXPECT_NEAR(out[h * 8 + i], want, want * 4 * 13 * std::ldexp(1.0, -24)) << h;
    }
  }
}

// window_left 0: a query sees only itself, so decode returns the last V exactly. A window
// wider than the context is no window: bitwise the same as window_left = -1.
TEST_P(HandCheckedTest, WindowEdges) {
  AttentionShape s = SmallShape(GetParam(), 4, 2, 8);
  Problem p = MakeProblem(s, {11, 1, 30}, 12);
  const std::vector<float> q = RandomQ(3, s, 13);
  for (Kind kind : {Kind::kPaged3, Kind::kVirtualPerLayer}) {
    SCOPED_TRACE(KindName(kind));
    p.shape.window_left = 0;
    auto st = MakeStore(p, kind, 14);
    std::vector<float> out;
    ASSERT_TRUE(Decode(*st, p, q, &out).ok());
    for (int b = 0; b < 3; ++b) {
      const int64_t last = p.lens[b] - 1;
      for (int h = 0; h < 4; ++h) {
        for (int i = 0; i < 8; ++i) {
          ASSERT_EQ(out[(b * 4 + h) * 8 + i], p.v[b][(last * 2 + h / 2) * 8 + i]);
        }
      }
    }
    std::vector<float> wide, none;
    p.shape.window_left = 30;  // the longest entry has 30 tokens: keys [0, 29] all visible
    ASSERT_TRUE(Decode(*st, p, q, &wide).ok());
    p.shape.window_left = -1;
    ASSERT_TRUE(Decode(*st, p, q, &none).ok());
    EXPECT_EQ(0, std::memcmp(wide.data(), none.data(), none.size() * sizeof(float)));
    // A window one shorter than the context must differ for the longest entry only.
    p.shape.window_left = 28;
    std::vector<float> narrower;
    ASSERT_TRUE(Decode(*st, p, q, &narrower).ok());
    EXPECT_EQ(0, std::memcmp(narrower.data(), none.data(), 2 * 4 * 8 * sizeof(float)));
    EXPECT_NE(0, std::memcmp(narrower.data() + 2 * 4 * 8, none.data() + 2 * 4 * 8,
                             4 * 8 * sizeof(float)));
  }
}

// Causality of extend: changing the V of new token t changes no output of a query before
// t, and does change the query at t and later ones.
TEST_P(HandCheckedTest, ExtendQueriesDoNotSeeLaterTokens) {
  const AttentionShape s = SmallShape(GetParam(), 4, 2, 8);
  const std::vector<int32_t> prefix = {0, 6};
  Problem p = MakeProblem(s, {10, 13}, 21);
  const std::vector<float> q = RandomQ(10 + 7, s, 22);
  const int64_t row = p.RowElems();
  std::vector<float> before, after;
  ASSERT_TRUE(Extend(*MakeStore(p, Kind::kPaged3, 23), p, prefix, q, &before).ok());
  // Entry 0: new token 6 (query rows 0..9); entry 1: new token at position 9 (query rows
  // 10 + 0..6, position 6 + i).
  for (int i = 0; i < 8; ++i) {
    p.v[0][(6 * 2 + 0) * 8 + i] += 4.f;
    p.v[0][(6 * 2 + 1) * 8 + i] -= 4.f;
    p.v[1][(9 * 2 + 0) * 8 + i] += 4.f;
    p.v[1][(9 * 2 + 1) * 8 + i] -= 4.f;
  }
  ASSERT_TRUE(Extend(*MakeStore(p, Kind::kPaged3, 23), p, prefix, q, &after).ok());
  auto same_row = [&](int64_t r) {
    return std::memcmp(&before[r * row], &after[r * row], row * sizeof(float)) == 0;
  };
  for (int64_t r = 0; r < 6; ++r) EXPECT_TRUE(same_row(r)) << "entry 0 query " << r;
  for (int64_t r = 6; r < 10; ++r) EXPECT_FALSE(same_row(r)) << "entry 0 query " << r;
  for (int64_t r = 10; r < 13; ++r) EXPECT_TRUE(same_row(r)) << "entry 1 query " << r - 10;
  for (int64_t r = 13; r < 17; ++r) EXPECT_FALSE(same_row(r)) << "entry 1 query " << r - 10;
}

// A batch entry with no keys writes zeros (even over garbage), and its neighbours are
// unaffected: the same as decoding them alone.
TEST_P(HandCheckedTest, EmptyEntriesGiveZeros) {
  const AttentionShape s = SmallShape(GetParam(), 4, 2, 8);
  const Problem p = MakeProblem(s, {0, 9, 0}, 31);
  const std::vector<float> q = RandomQ(3, s, 32);
  for (Kind kind : kAllKinds) {
    SCOPED_TRACE(KindName(kind));
    const auto st = MakeStore(p, kind, 33);
    std::vector<float> out;
    ASSERT_TRUE(Decode(*st, p, q, &out).ok());  // out starts as NaN
    for (int i = 0; i < 32; ++i) {
      EXPECT_EQ(out[i], 0.f);
      EXPECT_EQ(out[64 + i], 0.f);
    }
    EXPECT_LE(MaxRowRelError(out, DenseDecode(p, q), 8), kRelTol);
  }
  // An all-empty batch needs no cache at all.
  PagedKv empty;
  std::vector<float> out(2 * 32, 1.f);
  const std::vector<int32_t> zeros = {0, 0};
  ASSERT_TRUE(ReferenceDecode(s, empty, zeros, q.data(), out.data()).ok());
  for (float x : out) EXPECT_EQ(x, 0.f);
}

INSTANTIATE_TEST_SUITE_P(DTypes, HandCheckedTest,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

// AppendKv rounds to the storage type, writes exactly the token's [kv_heads][head_dim]
// block at SlotOffset (here page 2, token 1 of 3-token pages) and nothing else.
TEST(ReferenceAppendKvTest, WritesRoundedValuesAtTheSlotOnly) {
  for (DType t : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const AttentionShape s = SmallShape(t, 2, 2, 4);
    std::vector<uint64_t> k_mem = PoisonedBuffer(4 * 3 * 8, t),
                          v_mem = PoisonedBuffer(4 * 3 * 8, t);
    PagedKv kv;
    kv.k = k_mem.data();
    kv.v = v_mem.data();
    kv.page_tokens = 3;
    kv.token_stride = 8;
    kv.page_stride = 24;
    std::vector<float> k(8), v(8);
    for (int i = 0; i < 8; ++i) {
      k[i] = 1.f + i * 0.1234567f;
      v[i] = -3.f - i * 0.7654321f;
    }
    const int64_t slot = 7;
    ASSERT_TRUE(ReferenceAppendKv(s, kv, absl::MakeConstSpan(&slot, 1), k.data(), v.data()).ok());
    for (int64_t e = 0; e < 4 * 3 * 8; ++e) {
      const float gk = LoadAsFloat(k_mem.data(), e, t), gv = LoadAsFloat(v_mem.data(), e, t);
      if (e >= 56 && e < 64) {
        EXPECT_EQ(gk, RoundTo(t, k[e - 56])) << DTypeName(t) << " " << e;
        EXPECT_EQ(gv, RoundTo(t, v[e - 56])) << DTypeName(t) << " " << e;
      } else {
        EXPECT_TRUE(std::isnan(gk) && std::isnan(gv)) << DTypeName(t) << " " << e;
      }
    }
  }
}

// ---- invalid input --------------------------------------------------------------------

TEST(ValidateAttentionShapeTest, RejectsBadShapesWithTheNumbers) {
  struct Bad {
    int q, kv, d;
    float scale;
    const char* needle;
  };
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const Bad& bad :
       {Bad{28, 8, 128, 0.f, "28"}, Bad{32, 0, 128, 0.f, "num_kv_heads"},
        Bad{0, 8, 128, 0.f, "num_q_heads"}, Bad{-8, 8, 128, 0.f, "-8"}, Bad{32, -4, 128, 0.f, "-4"},
        Bad{32, 8, 0, 0.f, "head_dim = 0"}, Bad{32, 8, -1, 0.f, "head_dim = -1"},
        Bad{32, 8, 128, nan, "nan"}, Bad{32, 8, 128, inf, "inf"}, Bad{32, 8, 128, -0.5f, "-0.5"}}) {
    AttentionShape s;
    s.num_q_heads = bad.q;
    s.num_kv_heads = bad.kv;
    s.head_dim = bad.d;
    s.scale = bad.scale;
    const absl::Status st = ValidateAttentionShape(s);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << Describe(s);
    EXPECT_THAT(st.message(), HasSubstr(bad.needle)) << st;
  }
  AttentionShape odd_dtype;
  odd_dtype.kv_dtype = static_cast<DType>(7);
  EXPECT_EQ(ValidateAttentionShape(odd_dtype).code(), absl::StatusCode::kInvalidArgument);
  // Valid shapes, including an odd GQA group and no window.
  for (auto [q, kv] : {std::pair{28, 4}, std::pair{32, 8}, std::pair{1, 1}, std::pair{7, 7}}) {
    AttentionShape s;
    s.num_q_heads = q;
    s.num_kv_heads = kv;
    EXPECT_TRUE(ValidateAttentionShape(s).ok()) << q << "/" << kv;
  }
}

TEST(EffectiveScaleTest, ZeroMeansInverseSqrtHeadDim) {
  AttentionShape s;
  s.head_dim = 64;
  EXPECT_EQ(s.EffectiveScale(), 0.125f);
  s.head_dim = 256;
  EXPECT_EQ(s.EffectiveScale(), 0.0625f);
  s.head_dim = 128;
  EXPECT_NEAR(s.EffectiveScale(), 1.0 / std::sqrt(128.0), 1e-7);
  s.scale = 0.3f;
  EXPECT_EQ(s.EffectiveScale(), 0.3f);
}

// Bad arguments return InvalidArgument and leave the output untouched: nothing is read
// out of bounds, nothing aborts.
TEST(ReferenceAttentionInvalidTest, RejectsBadArgumentsWithoutWriting) {
  const AttentionShape s = SmallShape(DType::kBFloat16);
  const Problem p = MakeProblem(s, {10, 4}, 51);
  const auto paged = MakeStore(p, Kind::kPaged3, 52);
  const auto virt = MakeStore(p, Kind::kVirtualPerLayer, 53);
  const std::vector<float> q = RandomQ(14, s, 54);
  const float sentinel = 12345.f;
  std::vector<float> out(14 * p.RowElems(), sentinel);
  auto untouched = [&] {
    return std::all_of(out.begin(), out.end(), [&](float x) { return x == sentinel; });
  };
  auto expect_invalid = [&](absl::Status st, const char* what) {
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << what << ": " << st;
    EXPECT_TRUE(untouched()) << what;
  };
  const PagedKv pkv = std::get<PagedKv>(paged->view);
  const VirtualKv vkv = std::get<VirtualKv>(virt->view);

  AttentionShape bad_shape = s;
  bad_shape.num_kv_heads = 3;
  expect_invalid(ReferenceDecode(bad_shape, pkv, p.lens, q.data(), out.data()), "bad shape");
  const std::vector<int32_t> negative = {10, -1};
  expect_invalid(ReferenceDecode(s, pkv, negative, q.data(), out.data()), "negative seq_len");
  expect_invalid(ReferenceDecode(s, vkv, negative, q.data(), out.data()), "negative seq_len");
  expect_invalid(ReferenceDecode(s, pkv, p.lens, nullptr, out.data()), "null q");
  expect_invalid(ReferenceDecode(s, vkv, p.lens, q.data(), nullptr), "null out");

  // Paged: a context longer than the page table row; a negative page id; no page table;
  // a view whose strides do not fit the shape; zero page_tokens.
  const std::vector<int32_t> too_long = {10, static_cast<int32_t>(3 * pkv.page_table_stride + 1)};
  expect_invalid(ReferenceDecode(s, pkv, too_long, q.data(), out.data()), "page table overrun");
  std::vector<int32_t> table(pkv.page_table, pkv.page_table + 2 * pkv.page_table_stride);
  table[1] = -5;
  PagedKv neg_page = pkv;
  neg_page.page_table = table.data();
  expect_invalid(ReferenceDecode(s, neg_page, p.lens, q.data(), out.data()), "negative page");
  PagedKv no_table = pkv;
  no_table.page_table = nullptr;
  expect_invalid(ReferenceDecode(s, no_table, p.lens, q.data(), out.data()), "null page table");
  PagedKv narrow = pkv;
  narrow.token_stride = 8;  // 2 heads x 8 dims need 16
  expect_invalid(ReferenceDecode(s, narrow, p.lens, q.data(), out.data()), "token_stride");
  PagedKv zero_pt = pkv;
  zero_pt.page_tokens = 0;
  expect_invalid(ReferenceDecode(s, zero_pt, p.lens, q.data(), out.data()), "page_tokens 0");
  PagedKv no_k = pkv;
  no_k.k = nullptr;
  expect_invalid(ReferenceDecode(s, no_k, p.lens, q.data(), out.data()), "null k");

  // Virtual: a negative row id; a context past max_context; overlapping rows.
  std::vector<int32_t> rows(vkv.row_ids, vkv.row_ids + 2);
  rows[1] = -1;
  VirtualKv neg_row = vkv;
  neg_row.row_ids = rows.data();
  expect_invalid(ReferenceDecode(s, neg_row, p.lens, q.data(), out.data()), "negative row");
  const std::vector<int32_t> past = {static_cast<int32_t>(vkv.max_context + 1), 4};
  expect_invalid(ReferenceDecode(s, vkv, past, q.data(), out.data()), "past max_context");
  VirtualKv overlap = vkv;
  overlap.row_stride = vkv.token_stride;
  expect_invalid(ReferenceDecode(s, overlap, p.lens, q.data(), out.data()), "row_stride");
  VirtualKv no_rows = vkv;
  no_rows.row_ids = nullptr;
  expect_invalid(ReferenceDecode(s, no_rows, p.lens, q.data(), out.data()), "null row ids");

  // Extend: mismatched spans, negative lengths, a context past the page table.
  const std::vector<int32_t> prefix = {6, 0}, new_lens = {4, 4}, one = {4};
  expect_invalid(ReferenceExtend(s, pkv, prefix, one, q.data(), out.data()), "span sizes");
  const std::vector<int32_t> neg_prefix = {-1, 0};
  expect_invalid(ReferenceExtend(s, pkv, neg_prefix, new_lens, q.data(), out.data()),
                 "negative prefix");
  const std::vector<int32_t> neg_new = {4, -4};
  expect_invalid(ReferenceExtend(s, vkv, prefix, neg_new, q.data(), out.data()), "negative new");
  const std::vector<int32_t> long_prefix = {6, static_cast<int32_t>(3 * pkv.page_table_stride)};
  expect_invalid(ReferenceExtend(s, pkv, long_prefix, new_lens, q.data(), out.data()),
                 "extend page table overrun");
  expect_invalid(ReferenceExtend(s, vkv, prefix, new_lens, nullptr, out.data()), "null q");
  ASSERT_TRUE(ReferenceExtend(s, vkv, prefix, new_lens, q.data(), out.data()).ok());
  EXPECT_FALSE(untouched());

  // AppendKv: a negative slot writes nothing at all (even the valid slot before it).
  std::vector<uint64_t> before = paged->k_mem;
  const std::vector<int64_t> slots = {0, -3};
  const std::vector<float> kv_data(2 * p.TokenElems(), 1.f);
  EXPECT_EQ(ReferenceAppendKv(s, pkv, slots, kv_data.data(), kv_data.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(before, paged->k_mem);
  EXPECT_EQ(ReferenceAppendKv(s, pkv, absl::MakeConstSpan(slots.data(), 1), nullptr, kv_data.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReferenceAppendKv(bad_shape, vkv, absl::MakeConstSpan(slots.data(), 1), kv_data.data(),
                              kv_data.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem
