// Both layouts give identical attention: the same token history (several requests,
// Extends by various amounts, Forks, Truncate then re-Extend, Free and reuse) is built
// through the public KvCache on the host device in five caches: paged with 1, 3 and 16
// tokens per page, and virtual in the all-layer and per-layer arrangements. K/V are written
// with ReferenceAppendKv at the slots Extend returns. Then, for every layer:
//  * the K/V read back through the kernels' view (Offset(b, pos) of BuildBatchMetadata)
//    equal what was written for that request and position;
//  * ReferenceDecode and ReferenceExtend give bitwise identical outputs in every layout
//    (same data, same math order) and match a float64 dense reference.
// CheckInvariants() holds after every operation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"
#include "kvmem/reference_attention.h"
#include "tests/test_printers.h"

namespace kvmem {
namespace {

// Relative L2 error per [head_dim] output row of the fp32 reference against float64:
// d = 16 and at most ~50 keys here, so the fp32 roundings (u = 6e-8, random-walk growth
// ~ u * sqrt(d + n) ~ 5e-7) stay far below 1e-5; a wrong key or stale value moves a row
// by a whole softmax weight (>= 1e-2 with these lengths).
constexpr double kRelTol = 1e-5;

struct LayoutSpec {
  std::string name;
  Layout layout;
  Arrangement arrangement;
  int page_tokens;
  int chunk_tokens = 0;  // virtual all-layer: KvCacheConfig::chunk_tokens (0: auto)
};

const LayoutSpec kLayouts[] = {
    {"paged1", Layout::kPaged, Arrangement::kAllLayers, 1},
    {"paged3", Layout::kPaged, Arrangement::kAllLayers, 3},
    {"paged16", Layout::kPaged, Arrangement::kAllLayers, 16},
    {"virtual-all-layers", Layout::kVirtual, Arrangement::kAllLayers, 16},
    {"virtual-all-layers-unchunked", Layout::kVirtual, Arrangement::kAllLayers, 16, 1},
    {"virtual-all-layers-chunk4", Layout::kVirtual, Arrangement::kAllLayers, 16, 4},
    {"virtual-per-layer", Layout::kVirtual, Arrangement::kPerLayer, 16},
};

constexpr int kLayers = 2;
constexpr int kKvHeads = 2;
constexpr int kHeadDim = 16;
constexpr int kQHeads = 4;  // GQA groups of 2
constexpr int64_t kTokenElems = int64_t{kKvHeads} * kHeadDim;

KvCacheConfig ConfigFor(const LayoutSpec& spec, DType dtype) {
  KvCacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kKvHeads;
  c.head_dim = kHeadDim;
  c.dtype = dtype;
  c.layout = spec.layout;
  c.arrangement = spec.arrangement;
  c.page_tokens = spec.page_tokens;
  c.chunk_tokens = spec.chunk_tokens;
  c.max_requests = 12;
  c.max_context = 128;
  c.memory_budget_bytes = int64_t{4} << 20;
  c.device = DeviceKind::kHost;
  c.host_granularity = 4096;
  return c;
}

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Element e of K (kv = 0) or V (kv = 1) of the token written with `tag` in `layer`: a
// pseudo-random value in [-2, 2), rounded to the storage type so that what is stored is
// exactly what the dense reference sees. Every written token gets a fresh tag, so a
// stale or misplaced token is visible.
float TokenValue(DType t, uint64_t tag, int layer, int kv, int64_t e) {
  const uint64_t h = SplitMix((tag * kLayers + layer) * 2 + kv + (static_cast<uint64_t>(e) << 40));
  const float u = static_cast<float>(h >> 40) / static_cast<float>(1 << 24);  // [0, 1)
  return RoundTo(t, 4.f * u - 2.f);
}

float QueryValue(uint64_t salt, int64_t i) {
  const uint64_t h = SplitMix(salt * 0x100000001b3ull + static_cast<uint64_t>(i));
  return static_cast<float>(h >> 40) / static_cast<float>(1 << 24) * 2.f - 1.f;
}

// All five caches plus the model of what every request holds (tags per position).
class Harness {
 public:
  explicit Harness(DType dtype) : dtype_(dtype) {
    for (const LayoutSpec& spec : kLayouts) {
      auto cache = KvCache::Create(ConfigFor(spec, dtype));
      EXPECT_TRUE(cache.ok()) << spec.name << ": " << cache.status();
      if (!cache.ok()) return;
      caches_.push_back(std::move(*cache));
    }
    ok_ = true;
  }

  bool ok() const { return ok_; }
  DType dtype() const { return dtype_; }
  size_t size() const { return caches_.size(); }
  const KvCache& cache(size_t i) const { return *caches_[i]; }
  const std::vector<uint64_t>& tags(RequestId id) const { return model_.at(id); }
  int64_t Length(RequestId id) const { return static_cast<int64_t>(model_.at(id).size()); }

  void CheckAll(const std::string& after) {
    for (size_t i = 0; i < caches_.size(); ++i) {
      const absl::Status st = caches_[i]->CheckInvariants();
      EXPECT_TRUE(st.ok()) << kLayouts[i].name << " after " << after << ": " << st;
    }
  }

  void Add(RequestId id) {
    for (size_t i = 0; i < caches_.size(); ++i) {
      const absl::StatusOr<int32_t> row = caches_[i]->AddRequest(id);
      EXPECT_TRUE(row.ok()) << kLayouts[i].name << ": " << row.status();
    }
    model_[id];
    CheckAll("AddRequest " + std::to_string(id));
  }

  // Extends `id` by n tokens in every cache and writes fresh K/V at the returned slots.
  void Extend(RequestId id, int64_t n) {
    std::vector<uint64_t> new_tags;
    for (int64_t t = 0; t < n; ++t) new_tags.push_back(next_tag_++);
    for (size_t i = 0; i < caches_.size(); ++i) {
      absl::StatusOr<std::vector<int64_t>> slots = caches_[i]->Extend(id, n);
      ASSERT_TRUE(slots.ok()) << kLayouts[i].name << ": " << slots.status();
      ASSERT_EQ(static_cast<int64_t>(slots->size()), n) << kLayouts[i].name;
      Write(*caches_[i], kLayouts[i], *slots, new_tags);
    }
    auto& tags = model_[id];
    tags.insert(tags.end(), new_tags.begin(), new_tags.end());
    CheckAll("Extend " + std::to_string(id) + " by " + std::to_string(n));
  }

  void Fork(RequestId parent, RequestId child) {
    for (size_t i = 0; i < caches_.size(); ++i) {
      const absl::StatusOr<int32_t> row = caches_[i]->Fork(parent, child);
      EXPECT_TRUE(row.ok()) << kLayouts[i].name << ": " << row.status();
    }
    model_[child] = model_[parent];
    CheckAll("Fork " + std::to_string(parent) + " -> " + std::to_string(child));
  }

  void Truncate(RequestId id, int64_t len) {
    for (size_t i = 0; i < caches_.size(); ++i) {
      const absl::Status st = caches_[i]->Truncate(id, len);
      EXPECT_TRUE(st.ok()) << kLayouts[i].name << ": " << st;
    }
    model_[id].resize(len);
    CheckAll("Truncate " + std::to_string(id) + " to " + std::to_string(len));
  }

  void Free(RequestId id) {
    for (size_t i = 0; i < caches_.size(); ++i) {
      const absl::Status st = caches_[i]->Free(id, Fence{});
      EXPECT_TRUE(st.ok()) << kLayouts[i].name << ": " << st;
    }
    model_.erase(id);
    CheckAll("Free " + std::to_string(id));
  }

 private:
  void Write(const KvCache& cache, const LayoutSpec& spec, const std::vector<int64_t>& slots,
             const std::vector<uint64_t>& tags) {
    if (slots.empty()) return;
    AttentionShape shape = Shape(dtype_);
    std::vector<float> k(slots.size() * kTokenElems), v(slots.size() * kTokenElems);
    const BatchMetadata no_batch;  // AppendKv addresses by slot: no table needed
    for (int layer = 0; layer < kLayers; ++layer) {
      for (size_t t = 0; t < slots.size(); ++t) {
        for (int64_t e = 0; e < kTokenElems; ++e) {
          k[t * kTokenElems + e] = TokenValue(dtype_, tags[t], layer, 0, e);
          v[t * kTokenElems + e] = TokenValue(dtype_, tags[t], layer, 1, e);
        }
      }
      absl::Status st;
      if (spec.layout == Layout::kPaged) {
        absl::StatusOr<PagedKv> view = cache.PagedView(layer, no_batch);
        ASSERT_TRUE(view.ok()) << spec.name << ": " << view.status();
        st = ReferenceAppendKv(shape, *view, slots, k.data(), v.data());
      } else {
        absl::StatusOr<VirtualKv> view = cache.VirtualView(layer, no_batch);
        ASSERT_TRUE(view.ok()) << spec.name << ": " << view.status();
        st = ReferenceAppendKv(shape, *view, slots, k.data(), v.data());
      }
      ASSERT_TRUE(st.ok()) << spec.name << ": " << st;
    }
  }

 public:
  static AttentionShape Shape(DType dtype, int window = -1) {
    AttentionShape s;
    s.num_q_heads = kQHeads;
    s.num_kv_heads = kKvHeads;
    s.head_dim = kHeadDim;
    s.kv_dtype = dtype;
    s.window_left = window;
    return s;
  }

 private:
  DType dtype_;
  bool ok_ = false;
  std::vector<std::unique_ptr<KvCache>> caches_;
  std::map<RequestId, std::vector<uint64_t>> model_;
  uint64_t next_tag_ = 1;
};

// float64 attention of a query at `pos` of a request with token `tags` in `layer`.
void DenseQuery(const AttentionShape& s, const std::vector<uint64_t>& tags, int layer, int64_t pos,
                const float* q, double* out) {
  const int d = s.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t lo = s.window_left < 0 ? 0 : std::max<int64_t>(0, pos - s.window_left);
  const int group = s.num_q_heads / s.num_kv_heads;
  for (int h = 0; h < s.num_q_heads; ++h) {
    const int kvh = h / group;
    std::vector<double> score;
    for (int64_t j = lo; j <= pos; ++j) {
      double dot = 0;
      for (int i = 0; i < d; ++i) {
        dot += double{q[h * d + i]} * TokenValue(s.kv_dtype, tags[j], layer, 0, kvh * d + i);
      }
      score.push_back(dot * scale);
    }
    const double m = *std::max_element(score.begin(), score.end());
    double sum = 0;
    std::vector<double> acc(d, 0.0);
    for (int64_t j = lo; j <= pos; ++j) {
      const double w = std::exp(score[j - lo] - m);
      sum += w;
      for (int i = 0; i < d; ++i)
        acc[i] += w * TokenValue(s.kv_dtype, tags[j], layer, 1, kvh * d + i);
    }
    for (int i = 0; i < d; ++i) out[h * d + i] = acc[i] / sum;
  }
}

double MaxRowRelError(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0;
  for (size_t r = 0; r * kHeadDim < want.size(); ++r) {
    double err = 0, norm = 0;
    for (int i = 0; i < kHeadDim; ++i) {
      const double g = got[r * kHeadDim + i], w = want[r * kHeadDim + i];
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

template <typename Fn>
absl::Status WithView(const KvCache& cache, int layer, const BatchMetadata& meta, Fn&& fn) {
  if (cache.config().layout == Layout::kPaged) {
    absl::StatusOr<PagedKv> view = cache.PagedView(layer, meta);
    if (!view.ok()) return view.status();
    return fn(*view);
  }
  absl::StatusOr<VirtualKv> view = cache.VirtualView(layer, meta);
  if (!view.ok()) return view.status();
  return fn(*view);
}

// Every token of every batch entry, read through the kernels' view, equals the model.
void ExpectContents(const Harness& hx, size_t i, const std::vector<RequestId>& ids) {
  const KvCache& cache = hx.cache(i);
  BatchMetadata meta;
  ASSERT_TRUE(cache.BuildBatchMetadata(ids, &meta).ok());
  ASSERT_EQ(meta.seq_lens.size(), ids.size());
  for (int layer = 0; layer < kLayers; ++layer) {
    const absl::Status st = WithView(cache, layer, meta, [&](const auto& kv) {
      for (size_t b = 0; b < ids.size(); ++b) {
        const std::vector<uint64_t>& tags = hx.tags(ids[b]);
        EXPECT_EQ(meta.seq_lens[b], static_cast<int32_t>(tags.size()));
        int mismatches = 0;
        for (int64_t pos = 0; pos < static_cast<int64_t>(tags.size()); ++pos) {
          const int64_t base = kv.Offset(static_cast<int32_t>(b), pos);
          for (int64_t e = 0; e < kTokenElems; ++e) {
            const float gk = LoadAsFloat(kv.k, base + e, hx.dtype());
            const float gv = LoadAsFloat(kv.v, base + e, hx.dtype());
            if ((gk != TokenValue(hx.dtype(), tags[pos], layer, 0, e) ||
                 gv != TokenValue(hx.dtype(), tags[pos], layer, 1, e)) &&
                ++mismatches <= 3) {
              ADD_FAILURE() << kLayouts[i].name << ": request " << ids[b] << " layer " << layer
                            << " pos " << pos << " elem " << e;
            }
          }
        }
      }
      return absl::OkStatus();
    });
    ASSERT_TRUE(st.ok()) << kLayouts[i].name << ": " << st;
  }
}

// Decode over `ids` and extend over `ext_ids` (whose last `new_lens` tokens are the new
// ones) in every layer of every cache: bitwise equal across layouts, close to float64.
void ExpectEquivalentAttention(const Harness& hx, const std::vector<RequestId>& ids,
                               const std::vector<RequestId>& ext_ids,
                               const std::vector<int32_t>& new_lens, int window) {
  const AttentionShape s = Harness::Shape(hx.dtype(), window);
  const int64_t row = int64_t{kQHeads} * kHeadDim;
  std::vector<int32_t> prefix;
  int64_t total_new = 0;
  for (size_t b = 0; b < ext_ids.size(); ++b) {
    prefix.push_back(static_cast<int32_t>(hx.Length(ext_ids[b]) - new_lens[b]));
    total_new += new_lens[b];
  }
  std::vector<float> q_dec(ids.size() * row), q_ext(total_new * row);
  for (size_t i = 0; i < q_dec.size(); ++i) q_dec[i] = QueryValue(1, i);
  for (size_t i = 0; i < q_ext.size(); ++i) q_ext[i] = QueryValue(2, i);

  for (int layer = 0; layer < kLayers; ++layer) {
    SCOPED_TRACE("layer " + std::to_string(layer) + " window " + std::to_string(window) + " " +
                 std::string(DTypeName(hx.dtype())));
    // The dense float64 answers.
    std::vector<double> want_dec(q_dec.size(), 0.0), want_ext(q_ext.size());
    for (size_t b = 0; b < ids.size(); ++b) {
      const int64_t len = hx.Length(ids[b]);
      if (len > 0)
        DenseQuery(s, hx.tags(ids[b]), layer, len - 1, &q_dec[b * row], &want_dec[b * row]);
    }
    int64_t r = 0;
    for (size_t b = 0; b < ext_ids.size(); ++b) {
      for (int64_t pos = prefix[b]; pos < hx.Length(ext_ids[b]); ++pos, ++r) {
        DenseQuery(s, hx.tags(ext_ids[b]), layer, pos, &q_ext[r * row], &want_ext[r * row]);
      }
    }
    std::vector<float> first_dec, first_ext;
    for (size_t i = 0; i < hx.size(); ++i) {
      SCOPED_TRACE(kLayouts[i].name);
      BatchMetadata dec_meta, ext_meta;
      ASSERT_TRUE(hx.cache(i).BuildBatchMetadata(ids, &dec_meta).ok());
      ASSERT_TRUE(hx.cache(i).BuildBatchMetadata(ext_ids, &ext_meta).ok());
      std::vector<float> dec(q_dec.size(), std::numeric_limits<float>::quiet_NaN());
      std::vector<float> ext(q_ext.size(), std::numeric_limits<float>::quiet_NaN());
      absl::Status st = WithView(hx.cache(i), layer, dec_meta, [&](const auto& kv) {
        return ReferenceDecode(s, kv, dec_meta.seq_lens, q_dec.data(), dec.data());
      });
      ASSERT_TRUE(st.ok()) << st;
      st = WithView(hx.cache(i), layer, ext_meta, [&](const auto& kv) {
        return ReferenceExtend(s, kv, prefix, new_lens, q_ext.data(), ext.data());
      });
      ASSERT_TRUE(st.ok()) << st;
      EXPECT_LE(MaxRowRelError(dec, want_dec), kRelTol);
      EXPECT_LE(MaxRowRelError(ext, want_ext), kRelTol);
      if (i == 0) {
        first_dec = dec;
        first_ext = ext;
      } else {
        EXPECT_EQ(0, std::memcmp(dec.data(), first_dec.data(), dec.size() * sizeof(float)))
            << "decode differs from " << kLayouts[0].name;
        EXPECT_EQ(0, std::memcmp(ext.data(), first_ext.data(), ext.size() * sizeof(float)))
            << "extend differs from " << kLayouts[0].name;
      }
    }
  }
}

class LayoutEquivalenceTest : public ::testing::TestWithParam<DType> {};

TEST_P(LayoutEquivalenceTest, SameHistorySameAttention) {
  Harness hx(GetParam());
  ASSERT_TRUE(hx.ok());
  // Requests of various lengths, crossing 3- and 16-token pages and 4 KiB granules.
  for (RequestId id : {1, 2, 3, 4}) hx.Add(id);
  hx.Extend(1, 5);
  hx.Extend(2, 17);
  hx.Extend(3, 1);
  hx.Extend(1, 11);  // 16: exactly one 16-token page
  hx.Extend(3, 32);
  hx.Extend(2, 0);
  // Fork a request ending on a page boundary (16) and one ending mid-page (17); both
  // sides then write new tokens (copy on write of the shared partial page).
  hx.Fork(1, 5);
  hx.Extend(5, 3);
  hx.Extend(1, 2);
  hx.Fork(2, 7);
  hx.Extend(7, 1);
  hx.Extend(2, 4);
  // Speculative rewind and regrowth with new values; rewind to empty and regrow.
  hx.Truncate(2, 9);
  hx.Extend(2, 6);
  hx.Truncate(3, 0);
  hx.Extend(3, 20);
  hx.Truncate(5, 17);  // into the shared prefix of the fork
  hx.Extend(5, 2);
  // Free a forked child and an unused request; reuse their rows.
  hx.Free(7);
  hx.Free(4);
  hx.Add(8);
  hx.Extend(8, 40);
  hx.Add(6);  // stays empty: decode gives zeros
  ASSERT_FALSE(::testing::Test::HasFailure());

  const std::vector<RequestId> ids = {1, 2, 3, 5, 6, 8};
  for (size_t i = 0; i < hx.size(); ++i) ExpectContents(hx, i, ids);

  // One more step as an extend batch: prefixes of every kind, including a fresh request.
  hx.Add(9);
  hx.Extend(1, 4);
  hx.Extend(5, 1);
  hx.Extend(8, 7);
  hx.Extend(9, 3);
  const std::vector<RequestId> ext_ids = {1, 5, 8, 2, 9};
  const std::vector<int32_t> new_lens = {4, 1, 7, 0, 3};
  for (size_t i = 0; i < hx.size(); ++i) ExpectContents(hx, i, {1, 2, 3, 5, 6, 8, 9});
  for (int window : {-1, 0, 6}) ExpectEquivalentAttention(hx, ids, ext_ids, new_lens, window);
}

INSTANTIATE_TEST_SUITE_P(DTypes, LayoutEquivalenceTest,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

}  // namespace
}  // namespace kvmem
