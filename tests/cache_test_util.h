// Shared helpers of the KvCache contract tests (tests/kv_cache*_test.cc): the layouts
// under test, small host configs, a K/V data pattern written with ReferenceAppendKv and
// read back through the views, a model of what every request should hold, and a
// snapshot of everything a caller can observe (to prove that failed calls change
// nothing).
#ifndef KVMEM_TESTS_CACHE_TEST_UTIL_H_
#define KVMEM_TESTS_CACHE_TEST_UTIL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "kvmem/reference_attention.h"
#include "kvmem/stats.h"
#include "kvmem/vmm.h"
#include "src/core/status_macros.h"

namespace kvmem::test {

// ---- Status assertions ---------------------------------------------------------------

inline const absl::Status& ToStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& ToStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

#define KVMEM_TEST_CONCAT_INNER_(a, b) a##b
#define KVMEM_TEST_CONCAT_(a, b) KVMEM_TEST_CONCAT_INNER_(a, b)

// Evaluate `expr` once; fail the test (fatally / not) unless it is OK.
#define KVMEM_ASSERT_OK(expr)                                        \
  do {                                                               \
    const ::absl::Status kvmem_s_ = ::kvmem::test::ToStatus((expr)); \
    ASSERT_TRUE(kvmem_s_.ok()) << kvmem_s_;                          \
  } while (0)
#define KVMEM_EXPECT_OK(expr)                                        \
  do {                                                               \
    const ::absl::Status kvmem_s_ = ::kvmem::test::ToStatus((expr)); \
    EXPECT_TRUE(kvmem_s_.ok()) << kvmem_s_;                          \
  } while (0)
// `expr` fails with `code`.
#define KVMEM_EXPECT_CODE(expr, want_code)                           \
  do {                                                               \
    const ::absl::Status kvmem_s_ = ::kvmem::test::ToStatus((expr)); \
    EXPECT_EQ(kvmem_s_.code(), (want_code)) << kvmem_s_;             \
  } while (0)
#define KVMEM_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  KVMEM_ASSERT_OK_AND_ASSIGN_IMPL_(KVMEM_TEST_CONCAT_(kvmem_so_, __LINE__), lhs, expr)
#define KVMEM_ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                     \
  ASSERT_TRUE(tmp.ok()) << tmp.status();                 \
  lhs = std::move(*tmp)

// ---- Layouts under test --------------------------------------------------------------

struct LayoutCase {
  std::string name;
  Layout layout = Layout::kPaged;
  Arrangement arrangement = Arrangement::kAllLayers;
  int page_tokens = 16;
  int chunk_tokens = 0;  // virtual all-layer: KvCacheConfig::chunk_tokens
};

// gtest prints the case by name.
inline void PrintTo(const LayoutCase& c, std::ostream* os) { *os << c.name; }

inline std::vector<LayoutCase> AllLayouts() {
  return {
      {"Paged1", Layout::kPaged, Arrangement::kAllLayers, 1},
      {"Paged3", Layout::kPaged, Arrangement::kAllLayers, 3},
      {"Paged16", Layout::kPaged, Arrangement::kAllLayers, 16},
      {"VirtualAllLayers", Layout::kVirtual, Arrangement::kAllLayers, 16},
      {"VirtualAllLayersUnchunked", Layout::kVirtual, Arrangement::kAllLayers, 16, 1},
      {"VirtualPerLayer", Layout::kVirtual, Arrangement::kPerLayer, 16},
  };
}

inline std::string LayoutCaseName(const ::testing::TestParamInfo<LayoutCase>& info) {
  return info.param.name;
}

// Multiplier of iteration counts: KVMEM_TEST_SCALE (tools/test.sh sets 0.25 under the
// sanitizers), 1 by default.
inline double TestScale() {
  const char* s = std::getenv("KVMEM_TEST_SCALE");
  if (s == nullptr) return 1.0;
  const double v = std::atof(s);
  return v > 0 ? v : 1.0;
}

inline int Scaled(int n) { return std::max(1, static_cast<int>(n * TestScale())); }

// 2 layers, 2 KV heads, head_dim 8, fp32 (256 bytes per token over all layers), 4 KiB
// host granules, 8 rows of 256 tokens, 1 MiB budget.
inline KvCacheConfig SmallConfig(const LayoutCase& c, DType dtype = DType::kFloat32) {
  KvCacheConfig config;
  config.num_layers = 2;
  config.num_kv_heads = 2;
  config.head_dim = 8;
  config.dtype = dtype;
  config.layout = c.layout;
  config.arrangement = c.arrangement;
  config.page_tokens = c.page_tokens;
  config.chunk_tokens = c.chunk_tokens;
  config.max_requests = 8;
  config.max_context = 256;
  config.memory_budget_bytes = int64_t{1} << 20;
  config.device = DeviceKind::kHost;
  config.host_granularity = 4096;
  return config;
}

// Tokens per chunk of a virtual all-layer row (1: no chunks; docs/layouts.md).
inline int64_t ChunkTokens(const KvCacheConfig& c) {
  absl::StatusOr<MemoryPlan> plan = PlanMinimalMemory(c);
  return plan.ok() ? plan->chunk_tokens : 1;
}

// Tokens of one request per unit the layout grows by (a page, a granule of the row, or a
// chunk).
inline int64_t TokensPerPage(const KvCacheConfig& c) {
  absl::StatusOr<MemoryPlan> plan = PlanMinimalMemory(c);
  if (!plan.ok()) {
    ADD_FAILURE() << "TokensPerPage of a config kvmem rejects: " << plan.status();
    return 1;
  }
  return plan->unit_tokens;
}

// Physical pages one request may waste in a partly filled tail (virtual per-layer: one
// per layer and per K/V; chunked all-layer: the pages one chunk touches).
inline int64_t TailPages(const KvCacheConfig& c) {
  if (c.layout == Layout::kVirtual && c.arrangement == Arrangement::kPerLayer) {
    return 2 * int64_t{c.num_layers};
  }
  if (const int64_t chunk = ChunkTokens(c); chunk > 1) {
    const int64_t bytes = chunk * c.TokenBytes();
    return (bytes + c.host_granularity - 1) / c.host_granularity +
           (bytes % c.host_granularity != 0 ? 1 : 0);
  }
  return 1;
}

// The smallest budget Create accepts for `config` (memory_plan_test proves that Create
// accepts it and rejects one byte less). 0 when no budget fits.
inline int64_t MinimalBudget(const KvCacheConfig& config) {
  absl::StatusOr<MemoryPlan> plan = PlanMinimalMemory(config);
  return plan.ok() ? plan->min_budget_bytes : 0;
}

// ---- Data pattern --------------------------------------------------------------------

inline AttentionShape ShapeOf(const KvCacheConfig& c) {
  AttentionShape s;
  s.num_q_heads = c.num_kv_heads;
  s.num_kv_heads = c.num_kv_heads;
  s.head_dim = c.head_dim;
  s.kv_dtype = c.dtype;
  return s;
}

inline int64_t TokenElems(const KvCacheConfig& c) { return int64_t{c.num_kv_heads} * c.head_dim; }

// Element `elem` of the K (kv 0) or V (kv 1) of a token written with `tag` in `layer`.
// Integers in [0, 255], exact in every dtype; the bytes of an injective key of
// (tag, layer, kv), so any two tokens, layers or K/V differ somewhere.
inline float PatternValue(const KvCacheConfig& c, uint32_t tag, int layer, int kv, int64_t elem) {
  const uint32_t key = tag * (2u * static_cast<uint32_t>(c.num_layers)) +
                       static_cast<uint32_t>(layer) * 2u + static_cast<uint32_t>(kv);
  const uint32_t mixed = key ^ (static_cast<uint32_t>(elem / 4) * 0x9E3779B9u);
  return static_cast<float>((mixed >> (8 * (elem % 4))) & 0xffu);
}

// Writes the pattern of `tags` (one per slot) into every layer with ReferenceAppendKv.
inline absl::Status WriteTokens(const KvCache& cache, absl::Span<const int64_t> slots,
                                absl::Span<const uint32_t> tags) {
  const KvCacheConfig& c = cache.config();
  if (slots.size() != tags.size()) return absl::InternalError("slots and tags differ in size");
  if (slots.empty()) return absl::OkStatus();
  const int64_t te = TokenElems(c);
  std::vector<float> k(slots.size() * te), v(slots.size() * te);
  const BatchMetadata empty;
  for (int layer = 0; layer < c.num_layers; ++layer) {
    for (size_t t = 0; t < slots.size(); ++t) {
      for (int64_t e = 0; e < te; ++e) {
        k[t * te + e] = PatternValue(c, tags[t], layer, 0, e);
        v[t * te + e] = PatternValue(c, tags[t], layer, 1, e);
      }
    }
    if (c.layout == Layout::kPaged) {
      KVMEM_ASSIGN_OR_RETURN(PagedKv view, cache.PagedView(layer, empty));
      KVMEM_RETURN_IF_ERROR(ReferenceAppendKv(ShapeOf(c), view, slots, k.data(), v.data()));
    } else {
      KVMEM_ASSIGN_OR_RETURN(VirtualKv view, cache.VirtualView(layer, empty));
      KVMEM_RETURN_IF_ERROR(ReferenceAppendKv(ShapeOf(c), view, slots, k.data(), v.data()));
    }
  }
  return absl::OkStatus();
}

// Index of element e of K/V `kv` of token `pos` in `layer` in the vectors below.
inline int64_t DataIndex(const KvCacheConfig& c, int64_t pos, int layer, int kv, int64_t e) {
  return ((pos * c.num_layers + layer) * 2 + kv) * TokenElems(c) + e;
}

// Reads every token of `id` back through a one-entry batch's views ([pos][layer][kv][elem]).
// Also checks that the batch view and the token index agree on where each token lives.
inline absl::StatusOr<std::vector<float>> ReadRequest(const KvCache& cache, RequestId id) {
  const KvCacheConfig& c = cache.config();
  KVMEM_ASSIGN_OR_RETURN(int64_t len, cache.Length(id));
  std::vector<int32_t> r2t;
  KVMEM_RETURN_IF_ERROR(cache.ReqToToken(id, &r2t));
  if (static_cast<int64_t>(r2t.size()) != len) {
    return absl::InternalError(
        absl::StrFormat("request %d: ReqToToken has %d entries, length %d", id, r2t.size(), len));
  }
  BatchMetadata meta;
  const RequestId ids[] = {id};
  KVMEM_RETURN_IF_ERROR(cache.BuildBatchMetadata(ids, &meta));
  const int64_t te = TokenElems(c);
  std::vector<float> out(len * c.num_layers * 2 * te);
  auto read = [&](const auto& view, int layer) -> absl::Status {
    for (int64_t pos = 0; pos < len; ++pos) {
      const int64_t off = view.Offset(0, pos);
      if (off != view.SlotOffset(r2t[pos])) {
        return absl::InternalError(absl::StrFormat(
            "request %d pos %d layer %d: batch view offset %d, slot %d gives offset %d", id, pos,
            layer, off, r2t[pos], view.SlotOffset(r2t[pos])));
      }
      for (int kv = 0; kv < 2; ++kv) {
        const void* base = kv == 0 ? view.k : view.v;
        for (int64_t e = 0; e < te; ++e) {
          out[DataIndex(c, pos, layer, kv, e)] = LoadAsFloat(base, off + e, c.dtype);
        }
      }
    }
    return absl::OkStatus();
  };
  for (int layer = 0; layer < c.num_layers; ++layer) {
    if (c.layout == Layout::kPaged) {
      KVMEM_ASSIGN_OR_RETURN(PagedKv view, cache.PagedView(layer, meta));
      KVMEM_RETURN_IF_ERROR(read(view, layer));
    } else {
      KVMEM_ASSIGN_OR_RETURN(VirtualKv view, cache.VirtualView(layer, meta));
      KVMEM_RETURN_IF_ERROR(read(view, layer));
    }
  }
  return out;
}

// Compares the data of `id` with the pattern of `tags`; the first difference otherwise.
inline absl::Status CheckRequestData(const KvCache& cache, RequestId id,
                                     absl::Span<const uint32_t> tags) {
  const KvCacheConfig& c = cache.config();
  KVMEM_ASSIGN_OR_RETURN(std::vector<float> got, ReadRequest(cache, id));
  const int64_t te = TokenElems(c);
  if (got.size() != tags.size() * c.num_layers * 2 * te) {
    return absl::InternalError(absl::StrFormat("request %d: %d tokens, model has %d", id,
                                               got.size() / (c.num_layers * 2 * te), tags.size()));
  }
  for (int64_t pos = 0; pos < static_cast<int64_t>(tags.size()); ++pos) {
    for (int layer = 0; layer < c.num_layers; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int64_t e = 0; e < te; ++e) {
          const float want = RoundTo(c.dtype, PatternValue(c, tags[pos], layer, kv, e));
          const float have = got[DataIndex(c, pos, layer, kv, e)];
          if (have != want) {
            return absl::InternalError(
                absl::StrFormat("request %d pos %d (tag %d) layer %d %s elem %d: read %g, want %g",
                                id, pos, tags[pos], layer, kv == 0 ? "K" : "V", e, have, want));
          }
        }
      }
    }
  }
  return absl::OkStatus();
}

// ---- Model ---------------------------------------------------------------------------

// Drives a cache and remembers what every request it made should hold: one tag per
// token (a fresh tag per written token; Fork copies the parent's). The cache is changed
// only through the model's calls for the ids it owns; calls that fail leave the model
// as it was. Several models may share one cache (distinct ids and tag ranges).
class CacheModel {
 public:
  explicit CacheModel(KvCache* cache, uint32_t first_tag = 1)
      : cache_(cache), next_tag_(first_tag) {}

  absl::StatusOr<int32_t> Add(RequestId id) {
    absl::StatusOr<int32_t> row = cache_->AddRequest(id);
    if (row.ok()) requests_[id];
    return row;
  }

  // Extends `id` by n, writes fresh tags into the new slots and checks that the slots
  // are distinct and that the index lists them.
  absl::StatusOr<std::vector<int64_t>> Extend(RequestId id, int64_t n) {
    absl::StatusOr<std::vector<int64_t>> slots = cache_->Extend(id, n);
    if (!slots.ok()) return slots;
    if (static_cast<int64_t>(slots->size()) != n) {
      return absl::InternalError(
          absl::StrFormat("Extend(%d, %d) gave %d slots", id, n, slots->size()));
    }
    std::set<int64_t> distinct(slots->begin(), slots->end());
    if (static_cast<int64_t>(distinct.size()) != n) {
      return absl::InternalError(absl::StrFormat("Extend(%d, %d) gave repeated slots", id, n));
    }
    std::vector<uint32_t> tags(n);
    for (auto& t : tags) t = next_tag_++;
    KVMEM_RETURN_IF_ERROR(WriteTokens(*cache_, *slots, tags));
    std::vector<uint32_t>& model = requests_.at(id);
    std::vector<int32_t> r2t;
    KVMEM_RETURN_IF_ERROR(cache_->ReqToToken(id, &r2t));
    if (r2t.size() != model.size() + n) {
      return absl::InternalError(absl::StrFormat("request %d: index has %d tokens, want %d", id,
                                                 r2t.size(), model.size() + n));
    }
    for (int64_t i = 0; i < n; ++i) {
      if (r2t[model.size() + i] != (*slots)[i]) {
        return absl::InternalError(absl::StrFormat("request %d pos %d: index %d, Extend gave %d",
                                                   id, model.size() + i, r2t[model.size() + i],
                                                   (*slots)[i]));
      }
    }
    model.insert(model.end(), tags.begin(), tags.end());
    return slots;
  }

  // ExtendBatch over `ids` (distinct, owned by the model), then as Extend for each: fresh
  // tags written, slots distinct across the whole batch and listed by the index. The
  // out buffer is one entry longer than needed: that entry must stay untouched.
  absl::StatusOr<std::vector<int64_t>> ExtendBatch(absl::Span<const RequestId> ids,
                                                   absl::Span<const int64_t> counts) {
    int64_t total = 0;
    for (int64_t n : counts) total += std::max<int64_t>(n, 0);
    constexpr int64_t kGuard = -12345;
    std::vector<int64_t> out(total + 1, kGuard);
    KVMEM_RETURN_IF_ERROR(cache_->ExtendBatch(ids, counts, absl::MakeSpan(out)));
    if (out.back() != kGuard) {
      return absl::InternalError("ExtendBatch wrote past the batch's tokens");
    }
    out.pop_back();
    std::set<int64_t> distinct(out.begin(), out.end());
    if (static_cast<int64_t>(distinct.size()) != total) {
      return absl::InternalError("ExtendBatch gave repeated slots");
    }
    std::vector<uint32_t> tags(total);
    for (auto& t : tags) t = next_tag_++;
    KVMEM_RETURN_IF_ERROR(WriteTokens(*cache_, out, tags));
    int64_t at = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      std::vector<uint32_t>& model = requests_.at(ids[i]);
      std::vector<int32_t> r2t;
      KVMEM_RETURN_IF_ERROR(cache_->ReqToToken(ids[i], &r2t));
      for (int64_t k = 0; k < counts[i]; ++k) {
        const size_t pos = model.size() + k;
        if (pos >= r2t.size() || r2t[pos] != out[at + k]) {
          return absl::InternalError(absl::StrFormat(
              "request %d pos %d: the index disagrees with ExtendBatch's slot %d", ids[i], pos,
              out[at + k]));
        }
      }
      model.insert(model.end(), tags.begin() + at, tags.begin() + at + counts[i]);
      at += counts[i];
    }
    return out;
  }

  absl::Status TruncateBatch(absl::Span<const RequestId> ids,
                             absl::Span<const int64_t> new_lengths) {
    KVMEM_RETURN_IF_ERROR(cache_->TruncateBatch(ids, new_lengths));
    for (size_t i = 0; i < ids.size(); ++i) requests_.at(ids[i]).resize(new_lengths[i]);
    return absl::OkStatus();
  }

  absl::Status FreeBatch(absl::Span<const RequestId> ids, Fence fence = {}) {
    KVMEM_RETURN_IF_ERROR(cache_->FreeBatch(ids, fence));
    for (RequestId id : ids) requests_.erase(id);
    return absl::OkStatus();
  }

  absl::Status Truncate(RequestId id, int64_t new_length) {
    KVMEM_RETURN_IF_ERROR(cache_->Truncate(id, new_length));
    requests_.at(id).resize(new_length);
    return absl::OkStatus();
  }

  absl::StatusOr<int32_t> Fork(RequestId parent, RequestId child) {
    absl::StatusOr<int32_t> row = cache_->Fork(parent, child);
    if (row.ok()) requests_[child] = requests_.at(parent);
    return row;
  }

  absl::Status Free(RequestId id, Fence fence = {}) {
    KVMEM_RETURN_IF_ERROR(cache_->Free(id, fence));
    requests_.erase(id);
    return absl::OkStatus();
  }

  // The cache holds `id` with the model's length and data.
  absl::Status Verify(RequestId id) const {
    auto it = requests_.find(id);
    if (it == requests_.end()) {
      if (cache_->Contains(id)) {
        return absl::InternalError(absl::StrFormat("request %d should not exist", id));
      }
      return absl::OkStatus();
    }
    if (!cache_->Contains(id)) return absl::InternalError(absl::StrFormat("request %d lost", id));
    KVMEM_ASSIGN_OR_RETURN(int64_t len, cache_->Length(id));
    if (len != static_cast<int64_t>(it->second.size())) {
      return absl::InternalError(
          absl::StrFormat("request %d: length %d, model %d", id, len, it->second.size()));
    }
    return CheckRequestData(*cache_, id, it->second);
  }

  absl::Status VerifyAll() const {
    for (const auto& [id, tags] : requests_) KVMEM_RETURN_IF_ERROR(Verify(id));
    return absl::OkStatus();
  }

  bool Has(RequestId id) const { return requests_.contains(id); }
  int64_t LengthOf(RequestId id) const { return static_cast<int64_t>(requests_.at(id).size()); }
  const std::vector<uint32_t>& TagsOf(RequestId id) const { return requests_.at(id); }
  std::vector<RequestId> ids() const {
    std::vector<RequestId> out;
    for (const auto& [id, tags] : requests_) out.push_back(id);
    return out;
  }
  size_t size() const { return requests_.size(); }
  KvCache* cache() const { return cache_; }

 private:
  KvCache* cache_;
  uint32_t next_tag_;
  std::map<RequestId, std::vector<uint32_t>> requests_;
};

// ---- Snapshot ------------------------------------------------------------------------

struct RequestSnapshot {
  int32_t row = -1;
  int64_t length = 0;
  std::vector<int32_t> req_to_token;
  std::vector<float> data;
  bool operator==(const RequestSnapshot&) const = default;
};

// What a caller can observe: the stats that describe state (not timings or backend call
// counts), the backend's live resources, and row, length, index and K/V data of every
// id asked about (nullopt where the id is unknown).
struct Snapshot {
  std::vector<std::pair<std::string, int64_t>> numbers;
  std::map<RequestId, std::optional<RequestSnapshot>> requests;
};

// Without `with_data` the K/V contents are left out (cheaper).
inline Snapshot TakeSnapshot(const KvCache& cache, absl::Span<const RequestId> ids,
                             bool with_data = true) {
  Snapshot snap;
  const Stats s = cache.GetStats();
  snap.numbers = {
      {"num_requests", s.num_requests},
      {"logical_tokens", s.logical_tokens},
      {"stored_tokens", s.stored_tokens},
      {"live_bytes", s.live_bytes},
      {"held_bytes", s.held_bytes},
      {"idle_bytes", s.idle_bytes},
      {"mapped_bytes", s.mapped_bytes},
      {"physical_bytes", s.physical_bytes},
      {"budget_bytes", s.budget_bytes},
      {"page_bytes", s.page_bytes},
      {"pages_total", s.pages_total},
      {"pages_free", s.pages_free},
      {"pages_used", s.pages_used},
      {"pages_shared", s.pages_shared},
      {"pages_quarantined", s.pages_quarantined},
      {"peak_requests", s.peak_requests},
      {"peak_held_bytes", s.peak_held_bytes},
      {"peak_live_bytes", s.peak_live_bytes},
      {"extends", s.extends},
      {"forks", s.forks},
      {"cow_copies", s.cow_copies},
      {"pages_reclaimed", s.pages_reclaimed},
  };
  const VmmCounters vc = cache.config().vmm->counters();
  snap.numbers.emplace_back("vmm.live_reservations", vc.live_reservations);
  snap.numbers.emplace_back("vmm.live_handles", vc.live_handles);
  snap.numbers.emplace_back("vmm.mapped_granules", vc.mapped_granules);
  for (RequestId id : ids) {
    if (!cache.Contains(id)) {
      snap.requests[id] = std::nullopt;
      continue;
    }
    RequestSnapshot r;
    r.row = cache.Row(id).value_or(-2);
    r.length = cache.Length(id).value_or(-2);
    if (!cache.ReqToToken(id, &r.req_to_token).ok()) r.req_to_token = {-2};
    if (with_data) {
      absl::StatusOr<std::vector<float>> data = ReadRequest(cache, id);
      r.data = data.ok() ? *std::move(data) : std::vector<float>{-2.f};
    }
    snap.requests[id] = std::move(r);
  }
  return snap;
}

inline std::vector<RequestId> SnapshotIds(const CacheModel& model,
                                          std::vector<RequestId> extra = {}) {
  std::vector<RequestId> ids = model.ids();
  ids.insert(ids.end(), extra.begin(), extra.end());
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

// "" when equal; otherwise what differs (a before, b after). With
// `fences_may_complete`, fences completed before the call may have been noticed during
// it: pages may move from quarantine to free, never back.
inline std::string SnapshotDiff(const Snapshot& a, const Snapshot& b,
                                bool fences_may_complete = false) {
  std::string out;
  for (size_t i = 0; i < a.numbers.size() && i < b.numbers.size(); ++i) {
    const std::string& name = a.numbers[i].first;
    if (fences_may_complete && name == "pages_quarantined" &&
        b.numbers[i].second <= a.numbers[i].second) {
      continue;
    }
    if (fences_may_complete && name == "pages_free" && b.numbers[i].second >= a.numbers[i].second) {
      continue;
    }
    if (a.numbers[i].second != b.numbers[i].second) {
      absl::StrAppend(&out, a.numbers[i].first, ": ", a.numbers[i].second, " -> ",
                      b.numbers[i].second, "; ");
    }
  }
  for (const auto& [id, ra] : a.requests) {
    auto it = b.requests.find(id);
    if (it == b.requests.end()) continue;
    const std::optional<RequestSnapshot>& rb = it->second;
    if (ra.has_value() != rb.has_value()) {
      absl::StrAppend(&out, "request ", id, (ra ? " disappeared" : " appeared"), "; ");
      continue;
    }
    if (!ra) continue;
    if (ra->row != rb->row)
      absl::StrAppend(&out, "request ", id, " row ", ra->row, " -> ", rb->row, "; ");
    if (ra->length != rb->length) {
      absl::StrAppend(&out, "request ", id, " length ", ra->length, " -> ", rb->length, "; ");
    }
    if (ra->req_to_token != rb->req_to_token) absl::StrAppend(&out, "request ", id, " index; ");
    if (ra->data != rb->data) absl::StrAppend(&out, "request ", id, " K/V data; ");
  }
  return out;
}

// A host fence: complete once *done is true (vmm.h).
inline Fence HostFence(std::atomic<bool>* done) { return Fence{done}; }

}  // namespace kvmem::test

#endif  // KVMEM_TESTS_CACHE_TEST_UTIL_H_
