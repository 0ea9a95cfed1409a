// Test harness of the virtual layout (tests/virtual_layout_test.cc and
// tests/background_mapper_test.cc): a VirtualLayout on the host backend driven as
// KvCache would drive it, with a model of every live row's tokens, a K/V pattern written
// through VirtualView and read back, and small configs.
#ifndef KVMEM_TESTS_VIRTUAL_LAYOUT_HARNESS_H_
#define KVMEM_TESTS_VIRTUAL_LAYOUT_HARNESS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocators/virtual/virtual_layout.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/dtype.h"
#include "kvmem/stats.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/test_printers.h"

namespace kvmem::internal::testing_virtual {

#define ASSERT_OK(expr)                    \
  do {                                     \
    const absl::Status s_ = (expr);        \
    ASSERT_TRUE(s_.ok()) << s_.ToString(); \
  } while (0)
#define EXPECT_OK(expr)                    \
  do {                                     \
    const absl::Status s_ = (expr);        \
    EXPECT_TRUE(s_.ok()) << s_.ToString(); \
  } while (0)

constexpr int64_t k4K = 4096;
constexpr int64_t k2M = int64_t{2} << 20;

inline int64_t Calls(const Vmm& vmm, VmmOp op) {
  return vmm.counters().calls[static_cast<int>(op)];
}

// Small integers, exact in bf16 / fp16 / fp32, different for each (tag, token, element).
inline float Pattern(int tag, int64_t pos, int layer, int kv, int head, int d) {
  return static_cast<float>((tag * 131 + pos * 31 + layer * 7 + kv * 3 + head * 5 + d) % 251 - 125);
}

// A layout plus the model of what the cache above it would know: each live row's length
// and, per token, the tag of the request that wrote it.
class Harness {
 public:
  static absl::StatusOr<std::unique_ptr<Harness>> Make(const KvCacheConfig& config,
                                                       std::shared_ptr<Vmm> vmm = nullptr) {
    auto h = std::unique_ptr<Harness>(new Harness());
    h->config_ = config;
    if (vmm == nullptr) {
      absl::StatusOr<std::unique_ptr<Vmm>> host = MakeHostVmm(config.host_granularity);
      if (!host.ok()) return host.status();
      vmm = std::move(*host);
    }
    h->vmm_ = vmm;
    absl::StatusOr<std::unique_ptr<VirtualLayout>> layout = VirtualLayout::Create(config, vmm);
    if (!layout.ok()) return layout.status();
    h->layout_ = std::move(*layout);
    return h;
  }

  VirtualLayout& layout() { return *layout_; }
  Vmm& vmm() { return *vmm_; }
  const KvCacheConfig& config() const { return config_; }
  int64_t len(int32_t row) const { return tags_.at(row).size(); }
  bool live(int32_t row) const { return tags_.contains(row); }

  absl::Status Check() const {
    std::vector<std::pair<int32_t, int64_t>> live;
    for (const auto& [row, tags] : tags_) live.emplace_back(row, tags.size());
    return layout_->CheckInvariants(live);
  }
  Stats GetStats() const {
    Stats s;
    layout_->FillStats(&s);
    return s;
  }

  absl::StatusOr<int32_t> Add() {
    absl::StatusOr<int32_t> row = layout_->AcquireRow();
    if (row.ok()) tags_[*row] = {};
    return row;
  }
  // Grows `row` by n tokens and writes them with `tag`.
  absl::Status Grow(int32_t row, int64_t n, int tag) {
    std::vector<int64_t> locs = {-7};
    const int64_t len = tags_.at(row).size();
    absl::Status s = layout_->Grow(row, len, n, &locs);
    if (!s.ok()) {
      if (locs.size() != 1 || locs[0] != -7) return absl::InternalError("locs changed on error");
      return s;
    }
    if (static_cast<int64_t>(locs.size()) != n + 1) return absl::InternalError("wrong locs");
    for (int64_t i = 0; i < n; ++i) {
      if (locs[i + 1] != row * config_.max_context + len + i) {
        return absl::InternalError("wrong slot");
      }
      Write(row, len + i, tag);
      tags_[row].push_back(tag);
    }
    return absl::OkStatus();
  }
  absl::Status Shrink(int32_t row, int64_t new_len) {
    absl::Status s = layout_->Shrink(row, tags_.at(row).size(), new_len);
    if (s.ok()) tags_[row].resize(new_len);
    return s;
  }
  // As KvCache::Fork: a new row sharing the parent's tokens.
  absl::StatusOr<int32_t> Fork(int32_t parent) {
    absl::StatusOr<int32_t> child = layout_->AcquireRow();
    if (!child.ok()) return child;
    absl::Status s = layout_->Share(parent, tags_.at(parent).size(), *child);
    if (!s.ok()) {
      absl::Status r = layout_->Release(*child, 0, Fence{});
      if (!r.ok()) return r;
      return s;
    }
    tags_[*child] = tags_.at(parent);
    return child;
  }
  absl::Status Free(int32_t row, Fence fence = {}) {
    absl::Status s = layout_->Release(row, tags_.at(row).size(), fence);
    if (s.ok()) tags_.erase(row);
    return s;
  }

  // The batch calls, as KvCache's ExtendBatch / TruncateBatch / FreeBatch drive them. On
  // error the model is unchanged. GrowBatch checks the slots (in step order, nothing
  // written past them) and writes every new token with `tag`.
  absl::Status GrowBatch(const std::vector<std::pair<int32_t, int64_t>>& rows_n, int tag) {
    std::vector<KvLayout::GrowStep> steps;
    int64_t total = 0;
    for (const auto& [row, n] : rows_n) {
      steps.push_back({.row = row, .len = static_cast<int64_t>(tags_.at(row).size()), .n = n});
      total += n;
    }
    std::vector<int64_t> out(static_cast<size_t>(total) + 1, -7);
    absl::Status s = layout_->GrowBatch(steps, out.data());
    if (!s.ok()) return s;
    if (out.back() != -7) return absl::InternalError("GrowBatch wrote past its slots");
    size_t i = 0;
    for (const KvLayout::GrowStep& st : steps) {
      for (int64_t j = 0; j < st.n; ++j, ++i) {
        if (out[i] != st.row * config_.max_context + st.len + j) {
          return absl::InternalError("GrowBatch: wrong slot");
        }
        Write(st.row, st.len + j, tag);
        tags_[st.row].push_back(tag);
      }
    }
    return absl::OkStatus();
  }
  absl::Status ShrinkBatch(const std::vector<std::pair<int32_t, int64_t>>& rows_len) {
    std::vector<KvLayout::ShrinkStep> steps;
    for (const auto& [row, new_len] : rows_len) {
      steps.push_back(
          {.row = row, .len = static_cast<int64_t>(tags_.at(row).size()), .new_len = new_len});
    }
    absl::Status s = layout_->ShrinkBatch(steps);
    if (!s.ok()) return s;
    for (const auto& [row, new_len] : rows_len) tags_[row].resize(new_len);
    return absl::OkStatus();
  }
  absl::Status FreeBatch(const std::vector<int32_t>& rows, Fence fence = {}) {
    std::vector<KvLayout::ReleaseStep> steps;
    for (int32_t row : rows) {
      steps.push_back({.row = row, .len = static_cast<int64_t>(tags_.at(row).size())});
    }
    absl::Status s = layout_->ReleaseBatch(steps, fence);
    if (!s.ok()) return s;
    for (int32_t row : rows) tags_.erase(row);
    return absl::OkStatus();
  }
  // Live rows of the model, in row order.
  std::vector<int32_t> LiveRows() const {
    std::vector<int32_t> out;
    for (const auto& [row, tags] : tags_) out.push_back(row);
    return out;
  }
  // Every live token of `row` holds what was written there.
  int64_t RowMismatches(int32_t row) const {
    int64_t bad = 0;
    const std::vector<int>& tags = tags_.at(row);
    for (size_t pos = 0; pos < tags.size(); ++pos) bad += Mismatches(row, pos, tags[pos]);
    return bad;
  }

  // Element offset of (row, pos, head 0, dim 0) in layer `layer`'s K or V.
  void Write(int32_t row, int64_t pos, int tag) {
    for (int l = 0; l < config_.num_layers; ++l) {
      VirtualKv view = *layout_->VirtualView(l);
      for (int kv = 0; kv < 2; ++kv) {
        void* base = kv == 0 ? view.k : view.v;
        const int64_t off = row * view.row_stride + view.InRow(pos);
        for (int h = 0; h < config_.num_kv_heads; ++h) {
          for (int d = 0; d < config_.head_dim; ++d) {
            StoreFromFloat(base, off + h * config_.head_dim + d, config_.dtype,
                           Pattern(tag, pos, l, kv, h, d));
          }
        }
      }
    }
  }
  // Elements of token `pos` of `row` that differ from the pattern of `tag`.
  int64_t Mismatches(int32_t row, int64_t pos, int tag) const {
    int64_t bad = 0;
    for (int l = 0; l < config_.num_layers; ++l) {
      VirtualKv view = *layout_->VirtualView(l);
      for (int kv = 0; kv < 2; ++kv) {
        const void* base = kv == 0 ? view.k : view.v;
        const int64_t off = row * view.row_stride + view.InRow(pos);
        for (int h = 0; h < config_.num_kv_heads; ++h) {
          for (int d = 0; d < config_.head_dim; ++d) {
            bad += LoadAsFloat(base, off + h * config_.head_dim + d, config_.dtype) !=
                   Pattern(tag, pos, l, kv, h, d);
          }
        }
      }
    }
    return bad;
  }
  // Every live token of every live row holds what was written there.
  int64_t AllMismatches() const {
    int64_t bad = 0;
    for (const auto& [row, tags] : tags_) {
      for (size_t pos = 0; pos < tags.size(); ++pos) bad += Mismatches(row, pos, tags[pos]);
    }
    return bad;
  }
  // Pages a live row of `len` tokens must have mapped (all segments).
  int64_t PagesFor(int64_t len) const {
    const VirtualGeometry& g = layout_->geometry();
    return g.segments * g.PagesFor(len);
  }

 private:
  Harness() = default;
  KvCacheConfig config_;
  std::shared_ptr<Vmm> vmm_;
  std::unique_ptr<VirtualLayout> layout_;
  std::map<int32_t, std::vector<int>> tags_;
};

inline KvCacheConfig SmallConfig(Arrangement arrangement, int64_t granularity) {
  KvCacheConfig c;
  c.layout = Layout::kVirtual;
  c.arrangement = arrangement;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.dtype = DType::kBFloat16;  // 256 B per token and layer, 1 KiB per token
  c.max_requests = 4;
  c.max_context = 64;
  c.host_granularity = granularity;
  c.memory_budget_bytes = 0;  // set by the tests
  return c;
}

// Budget for `requests` requests at max_context.
inline int64_t BudgetFor(const KvCacheConfig& c, int64_t granularity, int64_t requests) {
  absl::StatusOr<VirtualGeometry> g = VirtualGeometry::Make(c, granularity);
  return requests * g->pages_per_request() * granularity;
}

// A model shape over an arrangement and a granularity, for parameterized tests.
struct ShapeCase {
  std::string name;
  Arrangement arrangement;
  int64_t granularity;
  int layers, heads, dim;
  DType dtype;
  int64_t max_context;
  int chunk = 0;  // KvCacheConfig::chunk_tokens (all layers)
};

inline void PrintTo(const ShapeCase& c, std::ostream* os) { *os << c.name; }

// SmallConfig in `p`'s shape, `rows` rows, a budget of `budget_requests` requests.
inline KvCacheConfig ShapeConfig(const ShapeCase& p, int rows, int64_t budget_requests) {
  KvCacheConfig c = SmallConfig(p.arrangement, p.granularity);
  c.num_layers = p.layers;
  c.num_kv_heads = p.heads;
  c.head_dim = p.dim;
  c.dtype = p.dtype;
  c.max_context = p.max_context;
  c.chunk_tokens = p.chunk;
  c.max_requests = rows;
  c.memory_budget_bytes = BudgetFor(c, p.granularity, budget_requests);
  return c;
}

}  // namespace kvmem::internal::testing_virtual

#endif  // KVMEM_TESTS_VIRTUAL_LAYOUT_HARNESS_H_
