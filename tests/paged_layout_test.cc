// Tests of the paged layout (allocators/paged_kv_cache.h) through the public KvCache
// with layout = kPaged on the host backend: page sizes 1, 3, 16 and 64; K/V contents
// written and read back through the PagedView; elastic growth and Trim; copy on write;
// Truncate; all-or-nothing failures (out of pages and injected backend faults); fenced
// frees. CheckInvariants runs after every operation.
#include "allocators/paged/paged_layout.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"

namespace kvmem {
namespace {

constexpr int64_t kGran = 4096;

#define ASSERT_OK(expr)                       \
  do {                                        \
    const absl::Status s_ = (expr);           \
    ASSERT_TRUE(s_.ok()) << #expr ": " << s_; \
  } while (0)
#define EXPECT_OK(expr)                       \
  do {                                        \
    const absl::Status s_ = (expr);           \
    EXPECT_TRUE(s_.ok()) << #expr ": " << s_; \
  } while (0)

// 2 layers, 2 KV heads, head_dim 8, fp32: 64 bytes per token and layer (K or V), 256
// bytes per token over all layers. 4 pools.
KvCacheConfig SmallConfig(int page_tokens, int64_t budget = 256 << 10, int64_t max_context = 64,
                          int max_requests = 8) {
  KvCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.dtype = DType::kFloat32;
  c.layout = Layout::kPaged;
  c.page_tokens = page_tokens;
  c.max_requests = max_requests;
  c.max_context = max_context;
  c.memory_budget_bytes = budget;
  c.device = DeviceKind::kHost;
  c.host_granularity = kGran;
  return c;
}

std::shared_ptr<Vmm> HostVmm() {
  absl::StatusOr<std::unique_ptr<Vmm>> vmm = MakeHostVmm(kGran);
  EXPECT_TRUE(vmm.ok()) << vmm.status();
  return std::shared_ptr<Vmm>(std::move(*vmm));
}

std::unique_ptr<KvCache> MakeCache(const KvCacheConfig& config) {
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? std::move(*cache) : nullptr;
}

// The value element e of K (kv 0) or V (kv 1) of layer l holds for a token tagged `tag`.
// Exact in fp32 for tag < 2^15.
float Value(int tag, int layer, int kv, int e) {
  return static_cast<float>(((tag * 4 + layer) * 2 + kv) * 32 + e);
}

float* Elem(const PagedKv& view, int kv, int64_t offset) {
  return static_cast<float*>(kv == 0 ? view.k : view.v) + offset;
}

// Writes the K/V of every layer at `slot` (host memory is addressable).
void WriteToken(const KvCache& cache, int64_t slot, int tag) {
  const BatchMetadata none;
  for (int l = 0; l < cache.config().num_layers; ++l) {
    absl::StatusOr<PagedKv> view = cache.PagedView(l, none);
    ASSERT_TRUE(view.ok()) << view.status();
    for (int kv = 0; kv < 2; ++kv) {
      float* p = Elem(*view, kv, view->SlotOffset(slot));
      for (int e = 0; e < view->token_stride; ++e) p[e] = Value(tag, l, kv, e);
    }
  }
}

// The model of what each request holds: a tag per token.
using Model = std::map<RequestId, std::vector<int>>;

// Reads every token of every request back through the batch page table (Offset) and
// through its slot (SlotOffset), and checks the index against the block table.
void VerifyContents(const KvCache& cache, const Model& model) {
  std::vector<RequestId> ids;
  for (const auto& [id, tags] : model) ids.push_back(id);
  BatchMetadata meta;
  ASSERT_OK(cache.BuildBatchMetadata(ids, &meta));
  const int pt = cache.config().page_tokens;
  int64_t stride = 1;
  for (const auto& [id, tags] : model) {
    stride = std::max<int64_t>(stride, (static_cast<int64_t>(tags.size()) + pt - 1) / pt);
  }
  ASSERT_EQ(meta.page_table_stride, stride);
  ASSERT_EQ(meta.page_table.size(), ids.size() * stride);
  for (size_t b = 0; b < ids.size(); ++b) {
    const std::vector<int>& tags = model.at(ids[b]);
    ASSERT_EQ(meta.seq_lens[b], static_cast<int32_t>(tags.size()));
    absl::StatusOr<std::vector<int32_t>> table = cache.BlockTable(ids[b]);
    ASSERT_TRUE(table.ok()) << table.status();
    ASSERT_EQ(static_cast<int64_t>(table->size()),
              (static_cast<int64_t>(tags.size()) + pt - 1) / pt);
    for (int64_t i = 0; i < stride; ++i) {
      const int32_t want = i < static_cast<int64_t>(table->size()) ? (*table)[i] : 0;
      ASSERT_EQ(meta.page_table[b * stride + i], want) << "entry " << b << " page " << i;
    }
    std::vector<int32_t> slots;
    ASSERT_OK(cache.ReqToToken(ids[b], &slots));
    ASSERT_EQ(slots.size(), tags.size());
    for (int l = 0; l < cache.config().num_layers; ++l) {
      absl::StatusOr<PagedKv> view = cache.PagedView(l, meta);
      ASSERT_TRUE(view.ok());
      for (size_t pos = 0; pos < tags.size(); ++pos) {
        ASSERT_EQ(slots[pos], (*table)[pos / pt] * pt + static_cast<int64_t>(pos % pt));
        ASSERT_EQ(view->Offset(static_cast<int32_t>(b), pos), view->SlotOffset(slots[pos]));
        for (int kv = 0; kv < 2; ++kv) {
          const float* p = Elem(*view, kv, view->Offset(static_cast<int32_t>(b), pos));
          for (int e = 0; e < view->token_stride; ++e) {
            ASSERT_EQ(p[e], Value(tags[pos], l, kv, e))
                << "request " << ids[b] << " pos " << pos << " layer " << l << " kv " << kv;
          }
        }
      }
    }
  }
}

// Extends `id` by n tokens, writes their K/V with fresh tags and records them.
void ExtendAndWrite(KvCache& cache, Model& model, RequestId id, int64_t n, int& next_tag) {
  absl::StatusOr<std::vector<int64_t>> locs = cache.Extend(id, n);
  ASSERT_TRUE(locs.ok()) << locs.status();
  ASSERT_EQ(static_cast<int64_t>(locs->size()), n);
  for (int64_t slot : *locs) {
    WriteToken(cache, slot, next_tag);
    model[id].push_back(next_tag++);
  }
}

// Everything a caller can observe, to prove that a failed call changed nothing.
struct Snapshot {
  Stats stats;
  std::map<RequestId, std::vector<int32_t>> tables;
  std::map<RequestId, std::vector<int32_t>> index;

  static Snapshot Of(const KvCache& cache, const Model& model) {
    Snapshot s;
    s.stats = cache.GetStats();
    for (const auto& [id, tags] : model) {
      s.tables[id] = *cache.BlockTable(id);
      (void)cache.ReqToToken(id, &s.index[id]);
    }
    return s;
  }
};

void ExpectSameState(const Snapshot& a, const Snapshot& b) {
  EXPECT_EQ(a.tables, b.tables);
  EXPECT_EQ(a.index, b.index);
  EXPECT_EQ(a.stats.num_requests, b.stats.num_requests);
  EXPECT_EQ(a.stats.logical_tokens, b.stats.logical_tokens);
  EXPECT_EQ(a.stats.stored_tokens, b.stats.stored_tokens);
  EXPECT_EQ(a.stats.held_bytes, b.stats.held_bytes);
  EXPECT_EQ(a.stats.live_bytes, b.stats.live_bytes);
  EXPECT_EQ(a.stats.idle_bytes, b.stats.idle_bytes);
  EXPECT_EQ(a.stats.mapped_bytes, b.stats.mapped_bytes);
  EXPECT_EQ(a.stats.physical_bytes, b.stats.physical_bytes);
  EXPECT_EQ(a.stats.pages_free, b.stats.pages_free);
  EXPECT_EQ(a.stats.pages_used, b.stats.pages_used);
  EXPECT_EQ(a.stats.pages_shared, b.stats.pages_shared);
  EXPECT_EQ(a.stats.pages_quarantined, b.stats.pages_quarantined);
  EXPECT_EQ(a.stats.cow_copies, b.stats.cow_copies);
  EXPECT_EQ(a.stats.vmm.live_handles, b.stats.vmm.live_handles);
  EXPECT_EQ(a.stats.vmm.mapped_granules, b.stats.vmm.mapped_granules);
  EXPECT_EQ(a.stats.vmm.live_reservations, b.stats.vmm.live_reservations);
}

// ---- page sizes 1, 3, 16, 64 ---------------------------------------------------

class PagedSizesTest : public ::testing::TestWithParam<int> {};

INSTANTIATE_TEST_SUITE_P(PageTokens, PagedSizesTest, ::testing::Values(1, 3, 16, 64),
                         [](const auto& info) { return "pt" + std::to_string(info.param); });

// Four requests grown in interleaved steps under `placement`: contents, stats, where the
// pages are, and the mapped memory.
void GrowAndCheckStats(int pt, PagePlacement placement);

TEST_P(PagedSizesTest, GrowWritesDistinctSlotsAndStatsAddUp) {
  const int pt = GetParam();
  for (PagePlacement placement : {PagePlacement::kLowestFirst, PagePlacement::kContiguous}) {
    SCOPED_TRACE(placement == PagePlacement::kLowestFirst ? "lowest-first" : "contiguous");
    GrowAndCheckStats(pt, placement);
  }
}

void GrowAndCheckStats(int pt, PagePlacement placement) {
  KvCacheConfig config = SmallConfig(pt, /*budget=*/512 << 10, /*max_context=*/200);
  config.page_placement = placement;
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  Model model;
  int tag = 0;
  const int64_t steps[] = {1, 2, 5, 1, 17, 3, 64, 1};
  for (RequestId id = 0; id < 4; ++id) {
    ASSERT_TRUE(cache->AddRequest(id).ok());
    model[id];
    ASSERT_OK(cache->CheckInvariants());
  }
  for (int64_t n : steps) {
    for (RequestId id = 0; id < 4; ++id) {
      ExtendAndWrite(*cache, model, id, n + static_cast<int64_t>(id), tag);
      ASSERT_OK(cache->CheckInvariants());
    }
  }
  VerifyContents(*cache, model);
  const Stats s = cache->GetStats();
  int64_t pages = 0, tokens = 0;
  for (const auto& [id, tags] : model) {
    pages += (static_cast<int64_t>(tags.size()) + pt - 1) / pt;
    tokens += static_cast<int64_t>(tags.size());
  }
  EXPECT_EQ(s.page_bytes, pt * config.TokenBytes());
  EXPECT_EQ(s.pages_used, pages);
  EXPECT_EQ(s.pages_shared, 0);
  EXPECT_EQ(s.stored_tokens, tokens);
  EXPECT_EQ(s.logical_tokens, tokens);
  EXPECT_EQ(s.live_bytes, tokens * config.TokenBytes());
  EXPECT_EQ(s.held_bytes, pages * s.page_bytes);
  EXPECT_EQ(s.pages_free + s.pages_used + s.pages_quarantined, s.pages_total);
  EXPECT_EQ(s.peak_held_bytes, s.held_bytes);
  EXPECT_EQ(s.peak_live_bytes, s.live_bytes);
  std::vector<int32_t> all;
  for (const auto& [id, tags] : model) {
    std::vector<int32_t> t = *cache->BlockTable(id);
    all.insert(all.end(), t.begin(), t.end());
  }
  std::sort(all.begin(), all.end());
  ASSERT_EQ(std::unique(all.begin(), all.end()), all.end()) << "a page owned twice";
  const int64_t pool_page = pt * config.TokenLayerBytes();
  const int64_t chunks = (pages * pool_page + kGran - 1) / kGran;
  if (placement == PagePlacement::kLowestFirst) {
    // Lowest-first allocation: the used pages are exactly [0, pages).
    for (int64_t i = 0; i < static_cast<int64_t>(all.size()); ++i) ASSERT_EQ(all[i], i);
  } else {
    // Contiguous placement: anywhere in the mapped pages, never beyond them.
    ASSERT_FALSE(all.empty());
    EXPECT_LE((int64_t{all.back()} + 1) * pool_page, chunks * kGran);
  }
  // Mapped memory covers the used pages and no more than a chunk beyond them (the same
  // for either placement: placement never grows the pool).
  EXPECT_EQ(s.mapped_bytes, chunks * 4 * kGran);
  EXPECT_EQ(s.physical_bytes, s.mapped_bytes);
  EXPECT_EQ(s.idle_bytes,
            (std::min(s.pages_total, chunks * kGran / pool_page) - pages) * s.page_bytes);
}

TEST_P(PagedSizesTest, RandomOpsKeepContentsAndInvariants) {
  const int pt = GetParam();
  KvCacheConfig config = SmallConfig(pt, /*budget=*/256 << 10, /*max_context=*/96);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  Model model;
  int tag = 0;
  RequestId next_id = 0;
  std::mt19937 rng(1234 + pt);
  std::vector<std::unique_ptr<std::atomic<bool>>> fences;
  int64_t cow_seen = 0;
  for (int step = 0; step < 600; ++step) {
    const int op = rng() % 10;
    auto pick = [&]() {
      auto it = model.begin();
      std::advance(it, rng() % model.size());
      return it->first;
    };
    if (op == 0 || model.empty()) {
      const RequestId id = next_id++;
      absl::StatusOr<int32_t> row = cache->AddRequest(id);
      if (row.ok()) {
        model[id];
      } else {
        ASSERT_EQ(row.status().code(), absl::StatusCode::kResourceExhausted) << row.status();
      }
    } else if (op <= 4) {
      const RequestId id = pick();
      const int64_t room = config.max_context - static_cast<int64_t>(model[id].size());
      const int64_t n = std::min<int64_t>(room, rng() % 3 == 0 ? rng() % 20 : 1);
      const Snapshot before = Snapshot::Of(*cache, model);
      absl::StatusOr<std::vector<int64_t>> locs = cache->Extend(id, n);
      if (locs.ok()) {
        for (int64_t slot : *locs) {
          WriteToken(*cache, slot, tag);
          model[id].push_back(tag++);
        }
      } else {
        ASSERT_EQ(locs.status().code(), absl::StatusCode::kResourceExhausted) << locs.status();
        ExpectSameState(before, Snapshot::Of(*cache, model));
      }
    } else if (op == 5) {
      const RequestId id = pick();
      const int64_t len = static_cast<int64_t>(model[id].size());
      const int64_t to = len == 0 ? 0 : static_cast<int64_t>(rng() % (len + 1));
      ASSERT_OK(cache->Truncate(id, to));
      model[id].resize(to);
    } else if (op <= 7) {
      const RequestId parent = pick();
      const RequestId child = next_id++;
      absl::StatusOr<int32_t> row = cache->Fork(parent, child);
      if (row.ok()) {
        model[child] = model[parent];
      } else {
        ASSERT_EQ(row.status().code(), absl::StatusCode::kResourceExhausted) << row.status();
      }
    } else if (op == 8) {
      const RequestId id = pick();
      Fence fence;
      if (rng() % 2) {
        fences.push_back(std::make_unique<std::atomic<bool>>(false));
        fence.event = fences.back().get();
      }
      ASSERT_OK(cache->Free(id, fence));
      model.erase(id);
    } else {
      for (auto& f : fences) {
        if (rng() % 2) *f = true;
      }
      absl::StatusOr<int64_t> trimmed = cache->Trim();
      ASSERT_TRUE(trimmed.ok()) << trimmed.status();
      ASSERT_GE(*trimmed, 0);
    }
    ASSERT_OK(cache->CheckInvariants());
    VerifyContents(*cache, model);
    if (HasFatalFailure()) return;
    const Stats s = cache->GetStats();
    cow_seen = s.cow_copies;
    ASSERT_EQ(s.pages_free + s.pages_used + s.pages_quarantined, s.pages_total);
    ASSERT_GE(s.peak_held_bytes, s.held_bytes);
    ASSERT_GE(s.peak_live_bytes, s.live_bytes);
    ASSERT_LE(s.live_bytes, s.held_bytes);
  }
  if (pt > 1) {
    EXPECT_GT(cow_seen, 0) << "the random walk never copied on write";
  }
}

// ---- elastic pool ----------------------------------------------------------------

TEST(PagedLayoutTest, ElasticPoolMapsOnDemandAndTrimGivesTheTailBack) {
  KvCacheConfig config = SmallConfig(3, /*budget=*/256 << 10, /*max_context=*/192);
  std::shared_ptr<Vmm> vmm = HostVmm();
  config.vmm = vmm;
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  // pool page: 3 tokens x 64 B = 192 B; one 4 KiB granule holds 21 whole pages.
  EXPECT_EQ(cache->GetStats().mapped_bytes, 0);
  EXPECT_EQ(vmm->counters().live_handles, 0);
  ASSERT_TRUE(cache->AddRequest(1).ok());
  ASSERT_TRUE(cache->Extend(1, 1).ok());
  EXPECT_EQ(cache->GetStats().mapped_bytes, 4 * kGran);
  EXPECT_EQ(vmm->counters().live_handles, 4);
  EXPECT_EQ(vmm->counters().mapped_granules, 4);
  ASSERT_TRUE(cache->Extend(1, 21 * 3 - 1).ok());  // pages 0..20: still one chunk
  EXPECT_EQ(cache->GetStats().mapped_bytes, 4 * kGran);
  const int64_t set_access_before = vmm->counters().calls[static_cast<int>(VmmOp::kSetAccess)];
  ASSERT_TRUE(cache->Extend(1, 1).ok());  // page 21 straddles granules 0 and 1
  EXPECT_EQ(cache->GetStats().mapped_bytes, 2 * 4 * kGran);
  // One SetAccess per pool for the new range.
  EXPECT_EQ(vmm->counters().calls[static_cast<int>(VmmOp::kSetAccess)] - set_access_before, 4);
  ASSERT_OK(cache->CheckInvariants());
  // A second request takes pages above; freeing it leaves a free tail to trim.
  ASSERT_TRUE(cache->AddRequest(2).ok());
  ASSERT_TRUE(cache->Extend(2, 150).ok());  // 50 pages: 22..71 -> 4 chunks (85 pages)
  EXPECT_EQ(cache->GetStats().mapped_bytes, 4 * 4 * kGran);
  ASSERT_OK(cache->CheckInvariants());
  // Nothing to trim while every chunk holds a used page.
  absl::StatusOr<int64_t> trimmed = cache->Trim();
  ASSERT_TRUE(trimmed.ok());
  EXPECT_EQ(*trimmed, 0);
  ASSERT_OK(cache->Free(2));
  trimmed = cache->Trim();
  ASSERT_TRUE(trimmed.ok()) << trimmed.status();
  // Request 1 keeps pages 0..21, i.e. chunks 0 and 1.
  EXPECT_EQ(*trimmed, 2 * 4 * kGran);
  EXPECT_EQ(cache->GetStats().mapped_bytes, 2 * 4 * kGran);
  EXPECT_EQ(vmm->counters().live_handles, 8);
  EXPECT_EQ(vmm->counters().mapped_granules, 8);
  ASSERT_OK(cache->CheckInvariants());
  // Request 1's data survived the trim (write then read its tokens).
  Model model;
  int tag = 0;
  std::vector<int32_t> slots;
  ASSERT_OK(cache->ReqToToken(1, &slots));
  for (int32_t slot : slots) {
    WriteToken(*cache, slot, tag);
    model[1].push_back(tag++);
  }
  VerifyContents(*cache, model);
  ASSERT_OK(cache->Free(1));
  trimmed = cache->Trim();
  ASSERT_TRUE(trimmed.ok());
  EXPECT_EQ(*trimmed, 2 * 4 * kGran);
  EXPECT_EQ(vmm->counters().live_handles, 0);
  EXPECT_EQ(vmm->counters().mapped_granules, 0);
  EXPECT_EQ(cache->GetStats().mapped_bytes, 0);
  ASSERT_OK(cache->CheckInvariants());
  // The pool grows again after a full trim.
  ASSERT_TRUE(cache->AddRequest(3).ok());
  ASSERT_TRUE(cache->Extend(3, 10).ok());
  EXPECT_EQ(cache->GetStats().mapped_bytes, 4 * kGran);
  ASSERT_OK(cache->CheckInvariants());
  cache.reset();
  EXPECT_EQ(vmm->counters().live_handles, 0);
  EXPECT_EQ(vmm->counters().mapped_granules, 0);
  EXPECT_EQ(vmm->counters().live_reservations, 0);
}

TEST(PagedLayoutTest, FixedPoolMapsTheBudgetUpFront) {
  KvCacheConfig config = SmallConfig(16, /*budget=*/64 << 10);
  config.elastic_pool = false;
  std::shared_ptr<Vmm> vmm = HostVmm();
  config.vmm = vmm;
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  // 64 KiB over 4 pools: 4 granules each, 16 pages of 1 KiB per pool.
  const Stats s = cache->GetStats();
  EXPECT_EQ(s.pages_total, 16);
  EXPECT_EQ(s.mapped_bytes, 64 << 10);
  EXPECT_EQ(s.idle_bytes, 16 * s.page_bytes);
  EXPECT_EQ(vmm->counters().live_handles, 16);
  ASSERT_OK(cache->CheckInvariants());
  ASSERT_TRUE(cache->AddRequest(1).ok());
  ASSERT_TRUE(cache->Extend(1, 64).ok());
  ASSERT_OK(cache->Free(1));
  absl::StatusOr<int64_t> trimmed = cache->Trim();
  ASSERT_TRUE(trimmed.ok());
  EXPECT_EQ(*trimmed, 0);
  EXPECT_EQ(cache->GetStats().mapped_bytes, 64 << 10);
  ASSERT_OK(cache->CheckInvariants());
}

// ---- sharing -----------------------------------------------------------------------

TEST(PagedLayoutTest, ForkMidPageCopiesOnWrite) {
  KvCacheConfig config = SmallConfig(16, 256 << 10, 128);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  Model model;
  int tag = 0;
  ASSERT_TRUE(cache->AddRequest(1).ok());
  ExtendAndWrite(*cache, model, 1, 26, tag);  // pages: one full, one with 10 tokens
  ASSERT_TRUE(cache->Fork(1, 2).ok());
  model[2] = model[1];
  ASSERT_OK(cache->CheckInvariants());
  std::vector<int32_t> parent_before = *cache->BlockTable(1);
  EXPECT_EQ(*cache->BlockTable(2), parent_before);
  Stats s = cache->GetStats();
  EXPECT_EQ(s.pages_used, 2);
  EXPECT_EQ(s.pages_shared, 2);
  EXPECT_EQ(s.stored_tokens, 26);  // shared slots count once
  EXPECT_EQ(s.logical_tokens, 52);
  EXPECT_EQ(s.cow_copies, 0);
  VerifyContents(*cache, model);

  // The parent writes into the shared, partly filled page: it gets a copy.
  ExtendAndWrite(*cache, model, 1, 1, tag);
  ASSERT_OK(cache->CheckInvariants());
  std::vector<int32_t> parent_after = *cache->BlockTable(1);
  ASSERT_EQ(parent_after.size(), 2u);
  EXPECT_EQ(parent_after[0], parent_before[0]);  // the full page stays shared
  EXPECT_NE(parent_after[1], parent_before[1]);
  EXPECT_EQ(*cache->BlockTable(2), parent_before);
  s = cache->GetStats();
  EXPECT_EQ(s.cow_copies, 1);
  EXPECT_EQ(s.pages_used, 3);
  EXPECT_EQ(s.pages_shared, 1);
  EXPECT_EQ(s.stored_tokens, 16 + 11 + 10);
  // The copied slots hold the same K/V as the originals (VerifyContents reads the parent
  // through its new page and the child through the old one).
  VerifyContents(*cache, model);
  std::vector<int32_t> parent_slots, child_slots;
  ASSERT_OK(cache->ReqToToken(1, &parent_slots));
  ASSERT_OK(cache->ReqToToken(2, &child_slots));
  for (int pos = 16; pos < 26; ++pos) EXPECT_NE(parent_slots[pos], child_slots[pos]);
  for (int pos = 0; pos < 16; ++pos) EXPECT_EQ(parent_slots[pos], child_slots[pos]);

  // The child's page is now its own: no second copy.
  ExtendAndWrite(*cache, model, 2, 3, tag);
  EXPECT_EQ(cache->GetStats().cow_copies, 1);
  EXPECT_EQ(*cache->BlockTable(2), parent_before);
  ASSERT_OK(cache->CheckInvariants());
  VerifyContents(*cache, model);

  // A fork at a page boundary shares only full pages: extending needs no copy.
  ASSERT_TRUE(cache->AddRequest(3).ok());
  ExtendAndWrite(*cache, model, 3, 32, tag);
  ASSERT_TRUE(cache->Fork(3, 4).ok());
  model[4] = model[3];
  ExtendAndWrite(*cache, model, 3, 5, tag);
  ExtendAndWrite(*cache, model, 4, 5, tag);
  EXPECT_EQ(cache->GetStats().cow_copies, 1);
  ASSERT_OK(cache->CheckInvariants());
  VerifyContents(*cache, model);

  // Freeing the parent leaves the child's pages intact.
  ASSERT_OK(cache->Free(1));
  model.erase(1);
  ASSERT_OK(cache->CheckInvariants());
  VerifyContents(*cache, model);
}

TEST(PagedLayoutTest, TruncateAcrossPagesAndIntoSharedPages) {
  KvCacheConfig config = SmallConfig(4, 256 << 10, 64);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  Model model;
  int tag = 0;
  ASSERT_TRUE(cache->AddRequest(1).ok());
  ExtendAndWrite(*cache, model, 1, 10, tag);  // pages 0, 1, 2 (2 tokens)
  ASSERT_TRUE(cache->Fork(1, 2).ok());
  model[2] = model[1];
  // Rewind the parent into page 1, which the child holds whole.
  ASSERT_OK(cache->Truncate(1, 5));
  model[1].resize(5);
  ASSERT_OK(cache->CheckInvariants());
  Stats s = cache->GetStats();
  EXPECT_EQ(s.pages_used, 3);
  EXPECT_EQ(s.pages_shared, 2);
  EXPECT_EQ(s.stored_tokens, 10);  // page 1 counts the child's 4 tokens
  EXPECT_EQ(cache->BlockTable(1)->size(), 2u);
  std::vector<int32_t> slots;
  ASSERT_OK(cache->ReqToToken(1, &slots));
  EXPECT_EQ(slots.size(), 5u);
  // Writing at position 5 would overwrite the child's token: copy first.
  ExtendAndWrite(*cache, model, 1, 3, tag);
  ASSERT_OK(cache->CheckInvariants());
  s = cache->GetStats();
  EXPECT_EQ(s.cow_copies, 1);
  EXPECT_EQ(s.stored_tokens, 10 + 4);  // child 10; parent's own copy holds 4
  VerifyContents(*cache, model);
  // Truncate the child across two page boundaries, then to zero.
  ASSERT_OK(cache->Truncate(2, 3));
  model[2].resize(3);
  ASSERT_OK(cache->CheckInvariants());
  EXPECT_EQ(cache->BlockTable(2)->size(), 1u);
  VerifyContents(*cache, model);
  ASSERT_OK(cache->Truncate(2, 0));
  model[2].clear();
  ASSERT_OK(cache->CheckInvariants());
  EXPECT_TRUE(cache->BlockTable(2)->empty());
  s = cache->GetStats();
  EXPECT_EQ(s.pages_shared, 0);
  EXPECT_EQ(s.stored_tokens, 8);
  // Truncate to an exact page boundary, then grow again: the next token opens a page.
  ASSERT_OK(cache->Truncate(1, 4));
  model[1].resize(4);
  ASSERT_OK(cache->CheckInvariants());
  EXPECT_EQ(cache->BlockTable(1)->size(), 1u);
  ExtendAndWrite(*cache, model, 1, 1, tag);
  EXPECT_EQ(cache->BlockTable(1)->size(), 2u);
  EXPECT_EQ(cache->GetStats().cow_copies, 1);
  ASSERT_OK(cache->CheckInvariants());
  VerifyContents(*cache, model);
}

// ---- failures ------------------------------------------------------------------------

TEST(PagedLayoutTest, OutOfPagesLeavesEverythingUnchanged) {
  // 64 KiB: 16 pages of 16 tokens; one request at max_context needs 4.
  KvCacheConfig config = SmallConfig(16, 64 << 10, 64);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  Model model;
  int tag = 0;
  for (RequestId id = 0; id < 4; ++id) {
    ASSERT_TRUE(cache->AddRequest(id).ok());
    ExtendAndWrite(*cache, model, id, 50, tag);  // 4 pages each, the last one partly filled
  }
  ASSERT_TRUE(cache->Fork(0, 10).ok());
  model[10] = model[0];
  ASSERT_TRUE(cache->AddRequest(11).ok());
  model[11];
  EXPECT_EQ(cache->GetStats().pages_free, 0);
  const Snapshot before = Snapshot::Of(*cache, model);
  // A new page for request 11; a copy on write for request 0 (its last page is shared).
  std::vector<int64_t> out = {7, 8, 9};
  for (RequestId id : {RequestId{11}, RequestId{0}}) {
    absl::Status s = cache->ExtendInto(id, 1, &out);
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    EXPECT_NE(s.message().find("need 1 pages"), std::string::npos) << s;
    EXPECT_NE(s.message().find("0 are free"), std::string::npos) << s;
    EXPECT_EQ(out, (std::vector<int64_t>{7, 8, 9}));
    ExpectSameState(before, Snapshot::Of(*cache, model));
    ASSERT_OK(cache->CheckInvariants());
  }
  // Growing within a page that is not shared still works.
  ExtendAndWrite(*cache, model, 1, 14, tag);
  ASSERT_OK(cache->CheckInvariants());
  VerifyContents(*cache, model);
}

TEST(PagedLayoutTest, BackendFailuresRollBack) {
  // Every backend call of a growth or a copy on write fails in turn; each failure leaves
  // the cache as it was and the same call then succeeds.
  for (VmmOp op : {VmmOp::kCreate, VmmOp::kMap, VmmOp::kSetAccess, VmmOp::kCopy}) {
    for (int64_t nth = 1; nth <= 12; ++nth) {
      SCOPED_TRACE(std::string(VmmOpName(op)) + " #" + std::to_string(nth));
      KvCacheConfig config = SmallConfig(3, 256 << 10, 192);
      auto faulty = std::make_shared<FaultInjectingVmm>(HostVmm());
      config.vmm = faulty;
      std::unique_ptr<KvCache> cache = MakeCache(config);
      ASSERT_NE(cache, nullptr);
      Model model;
      int tag = 0;
      ASSERT_TRUE(cache->AddRequest(1).ok());
      ExtendAndWrite(*cache, model, 1, 62, tag);  // pages 0..20: chunk 0, last page partial
      ASSERT_TRUE(cache->Fork(1, 2).ok());
      model[2] = model[1];
      const Snapshot before = Snapshot::Of(*cache, model);
      faulty->FailNth(op, nth);
      // Copies page 20 and grows into chunk 1 (pages 21..41).
      std::vector<int64_t> out;
      absl::Status s = cache->ExtendInto(1, 60, &out);
      const bool fired = faulty->injected_failures() > 0;
      faulty->DisarmAll();
      if (fired) {
        EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
        EXPECT_TRUE(out.empty());
        ExpectSameState(before, Snapshot::Of(*cache, model));
        ASSERT_OK(cache->CheckInvariants());
        VerifyContents(*cache, model);
        ASSERT_OK(cache->ExtendInto(1, 60, &out));
      } else {
        ASSERT_OK(s);
      }
      for (int64_t slot : out) {
        WriteToken(*cache, slot, tag);
        model[1].push_back(tag++);
      }
      EXPECT_EQ(cache->GetStats().cow_copies, 1);
      ASSERT_OK(cache->CheckInvariants());
      VerifyContents(*cache, model);
      if (!fired) break;  // later calls of this op do not exist
    }
  }
}

TEST(PagedLayoutTest, TrimFailureKeepsEverythingMapped) {
  KvCacheConfig config = SmallConfig(16, 256 << 10, 128);
  auto faulty = std::make_shared<FaultInjectingVmm>(HostVmm());
  config.vmm = faulty;
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->AddRequest(1).ok());
  ASSERT_TRUE(cache->Extend(1, 128).ok());  // 8 pages of 1 KiB per pool: 2 chunks
  ASSERT_OK(cache->Truncate(1, 16));
  const Stats before = cache->GetStats();
  EXPECT_EQ(before.mapped_bytes, 2 * 4 * kGran);
  faulty->FailNth(VmmOp::kUnmap, 3);  // the third pool's unmap
  absl::StatusOr<int64_t> trimmed = cache->Trim();
  EXPECT_EQ(trimmed.status().code(), absl::StatusCode::kResourceExhausted) << trimmed.status();
  faulty->DisarmAll();
  EXPECT_EQ(cache->GetStats().mapped_bytes, before.mapped_bytes);
  EXPECT_EQ(faulty->counters().mapped_granules, 8);
  ASSERT_OK(cache->CheckInvariants());
  // The pools remapped by the rollback are accessible (writing there would fault).
  Model model;
  int tag = 0;
  ExtendAndWrite(*cache, model, 1, 100, tag);
  trimmed = cache->Trim();
  ASSERT_TRUE(trimmed.ok());
  EXPECT_EQ(*trimmed, 0);
}

TEST(PagedLayoutTest, CreateFailuresLeakNothing) {
  for (VmmOp op : {VmmOp::kReserve, VmmOp::kCreate, VmmOp::kMap, VmmOp::kSetAccess}) {
    for (int64_t nth : {1, 5, 16}) {
      SCOPED_TRACE(std::string(VmmOpName(op)) + " #" + std::to_string(nth));
      std::shared_ptr<Vmm> host = HostVmm();
      auto faulty = std::make_shared<FaultInjectingVmm>(host);
      KvCacheConfig config = SmallConfig(16, 64 << 10);
      config.elastic_pool = false;  // maps 4 chunks x 4 pools at creation
      config.vmm = faulty;
      faulty->FailNth(op, nth, absl::StatusCode::kUnavailable);
      absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
      if (faulty->injected_failures() == 0) {
        EXPECT_TRUE(cache.ok()) << cache.status();
        continue;
      }
      EXPECT_EQ(cache.status().code(), absl::StatusCode::kUnavailable) << cache.status();
      EXPECT_EQ(host->counters().live_handles, 0);
      EXPECT_EQ(host->counters().mapped_granules, 0);
      EXPECT_EQ(host->counters().live_reservations, 0);
    }
  }
}

// ---- fences -----------------------------------------------------------------------

TEST(PagedLayoutTest, FencedFreeQuarantinesPagesUntilTheFenceCompletes) {
  // 16 pages of 16 tokens; max_context 256 = all of them.
  KvCacheConfig config = SmallConfig(16, 64 << 10, 256);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  std::atomic<bool> done{false};
  ASSERT_TRUE(cache->AddRequest(1).ok());
  ASSERT_TRUE(cache->Extend(1, 8 * 16).ok());  // pages 0..7
  ASSERT_OK(cache->Free(1, Fence{&done}));
  ASSERT_OK(cache->CheckInvariants());
  Stats s = cache->GetStats();
  EXPECT_EQ(s.pages_quarantined, 8);
  EXPECT_EQ(s.pages_used, 0);
  EXPECT_EQ(s.pages_free, 8);
  EXPECT_EQ(s.held_bytes, 0);
  EXPECT_EQ(s.idle_bytes, 8 * s.page_bytes);  // quarantined pages are mapped, unused
  // A new request gets pages above the quarantined ones.
  ASSERT_TRUE(cache->AddRequest(2).ok());
  ASSERT_TRUE(cache->Extend(2, 16).ok());
  EXPECT_EQ(*cache->BlockTable(2), std::vector<int32_t>{8});
  // Trim must not unmap quarantined pages (they may still be read).
  ASSERT_TRUE(cache->Trim().ok());
  EXPECT_EQ(cache->GetStats().pages_quarantined, 8);
  ASSERT_OK(cache->CheckInvariants());
  // Run out: the quarantined pages are not handed out while the fence is pending.
  ASSERT_TRUE(cache->Extend(2, 7 * 16).ok());  // pages 9..15
  absl::Status full = cache->Extend(2, 1).status();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_NE(full.message().find("8 quarantined"), std::string::npos) << full;
  ASSERT_OK(cache->CheckInvariants());
  // Once the fence completes, they are reused (lowest first).
  done = true;
  ASSERT_TRUE(cache->Extend(2, 1).ok());
  EXPECT_EQ(cache->BlockTable(2)->back(), 0);
  s = cache->GetStats();
  EXPECT_EQ(s.pages_quarantined, 0);
  EXPECT_EQ(s.pages_used, 9);
  ASSERT_OK(cache->CheckInvariants());
}

// ---- configuration and queries ---------------------------------------------------

TEST(PagedLayoutTest, BudgetThatCannotHoldOneRequestIsInvalidArgument) {
  // 4 pools x 4 KiB granules: 16 KiB buys 4 pages of 16 tokens; 512 tokens need 32.
  KvCacheConfig config = SmallConfig(16, 16 << 10, 512);
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  ASSERT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument) << cache.status();
  const std::string msg(cache.status().message());
  EXPECT_NE(msg.find("16384"), std::string::npos) << msg;  // the budget
  EXPECT_NE(msg.find("holds 4 pages"), std::string::npos) << msg;
  EXPECT_NE(msg.find("4096 bytes"), std::string::npos) << msg;  // bytes per page
  EXPECT_NE(msg.find("needs 32 pages"), std::string::npos) << msg;
  // Less than one granule per pool holds nothing.
  config = SmallConfig(1, 12 << 10, 4);
  cache = KvCache::Create(config);
  ASSERT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument) << cache.status();
  EXPECT_NE(cache.status().message().find("holds 0 pages"), std::string::npos) << cache.status();
  // Exactly enough works.
  config = SmallConfig(16, 16 << 10, 64);
  EXPECT_TRUE(KvCache::Create(config).ok());
}

TEST(PagedLayoutTest, PagesStraddlingGranulesAreUsableOnlyWhenWhollyMapped) {
  KvCacheConfig config = SmallConfig(3, 256 << 10, 192);
  std::shared_ptr<Vmm> vmm = HostVmm();
  absl::StatusOr<std::unique_ptr<internal::PagedLayout>> layout =
      internal::PagedLayout::Create(config, vmm);
  ASSERT_TRUE(layout.ok()) << layout.status();
  internal::PagedLayout& l = **layout;
  // 64 KiB per pool of 192-byte pages: 341 pages; 4096 / 192 = 21.33 pages per granule.
  EXPECT_EQ(l.geometry().num_pages, std::min<int64_t>(341, 8 * 64));
  EXPECT_EQ(l.geometry().pool_page_bytes, 192);
  EXPECT_EQ(l.usable_pages(), 0);
  absl::StatusOr<int32_t> row = l.AcquireRow();
  ASSERT_TRUE(row.ok());
  std::vector<int64_t> locs;
  ASSERT_OK(l.Grow(*row, 0, 63, &locs));  // 21 pages
  EXPECT_EQ(l.mapped_chunks(), 1);
  EXPECT_EQ(l.usable_pages(), 21);
  ASSERT_OK(l.Grow(*row, 63, 1, &locs));  // page 21 ends in granule 1
  EXPECT_EQ(l.mapped_chunks(), 2);
  EXPECT_EQ(l.usable_pages(), 42);
  EXPECT_EQ(locs.back(), 21 * 3);
  ASSERT_OK(l.CheckInvariants({{*row, 64}}));
  // The layout's own checks catch a caller's wrong view of the rows.
  EXPECT_EQ(l.CheckInvariants({}).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(l.CheckInvariants({{*row, 63}}).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(l.Grow(*row, 10, 1, &locs).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(l.VirtualView(0).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_OK(l.Release(*row, 64, Fence{}));
  ASSERT_OK(l.CheckInvariants({}));
}

TEST(PagedLayoutTest, BatchMetadataAndViews) {
  KvCacheConfig config = SmallConfig(16, 256 << 10, 128);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  Model model;
  int tag = 0;
  for (RequestId id = 0; id < 3; ++id) ASSERT_TRUE(cache->AddRequest(id).ok());
  ExtendAndWrite(*cache, model, 0, 40, tag);
  ExtendAndWrite(*cache, model, 1, 16, tag);
  model[2];
  BatchMetadata meta;
  ASSERT_OK(cache->BuildBatchMetadata({2}, &meta));
  EXPECT_EQ(meta.page_table_stride, 1);  // at least one entry per row
  EXPECT_EQ(meta.page_table, std::vector<int32_t>{0});
  ASSERT_OK(cache->BuildBatchMetadata({1, 2, 0}, &meta));
  EXPECT_EQ(meta.page_table_stride, 3);
  EXPECT_EQ(meta.seq_lens, (std::vector<int32_t>{16, 0, 40}));
  const std::vector<int32_t> t0 = *cache->BlockTable(0);
  const std::vector<int32_t> t1 = *cache->BlockTable(1);
  EXPECT_EQ(meta.page_table, (std::vector<int32_t>{t1[0], 0, 0, 0, 0, 0, t0[0], t0[1], t0[2]}));
  absl::StatusOr<PagedKv> view = cache->PagedView(1, meta);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->page_tokens, 16);
  EXPECT_EQ(view->token_stride, 16);
  EXPECT_EQ(view->page_stride, 256);
  EXPECT_NE(view->k, view->v);
  EXPECT_EQ(cache->PagedView(2, meta).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->VirtualView(0, meta).status().code(), absl::StatusCode::kFailedPrecondition);
  VerifyContents(*cache, model);
}

TEST(PagedLayoutTest, RowsAreHandedOutLowestFirst) {
  KvCacheConfig config = SmallConfig(16, 256 << 10, 64, /*max_requests=*/3);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(*cache->AddRequest(10), 0);
  EXPECT_EQ(*cache->AddRequest(11), 1);
  EXPECT_EQ(*cache->AddRequest(12), 2);
  EXPECT_EQ(cache->AddRequest(13).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache->Fork(10, 13).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_OK(cache->Free(11));
  EXPECT_EQ(*cache->AddRequest(13), 1);
  ASSERT_OK(cache->CheckInvariants());
}

TEST(PagedLayoutTest, PeaksSurviveFrees) {
  KvCacheConfig config = SmallConfig(16, 256 << 10, 128);
  std::unique_ptr<KvCache> cache = MakeCache(config);
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->AddRequest(1).ok());
  ASSERT_TRUE(cache->Extend(1, 40).ok());
  const Stats busy = cache->GetStats();
  ASSERT_OK(cache->Free(1));
  const Stats idle = cache->GetStats();
  EXPECT_EQ(idle.held_bytes, 0);
  EXPECT_EQ(idle.live_bytes, 0);
  EXPECT_EQ(idle.peak_held_bytes, busy.held_bytes);
  EXPECT_EQ(idle.peak_live_bytes, 40 * config.TokenBytes());
  EXPECT_EQ(idle.peak_held_bytes, 3 * 16 * config.TokenBytes());
}

}  // namespace
}  // namespace kvmem
