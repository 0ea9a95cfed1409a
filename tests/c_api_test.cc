// The C ABI (include/kvmem/c_api.h) called as a C program would: status codes and the
// per-thread last error for NULL handles and arguments, bad configs, unknown ids, ranges
// and exhaustion; the cache unchanged (stats, lengths, invariants) after every error; the
// batch calls, views and the running batch against the C++ API; and a C99 translation
// unit (tests/c/c_api_smoke.c) that creates and uses a cache.
#include "kvmem/c_api.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvmem/config.h"

extern "C" int kvmem_c_smoke(void);

namespace {

kvmem_config SmallConfig(int32_t layout) {
  kvmem_config c;
  EXPECT_EQ(kvmem_config_init(&c), KVMEM_OK);
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.dtype = KVMEM_DTYPE_BFLOAT16;
  c.layout = layout;
  c.page_tokens = 16;
  c.max_requests = 8;
  c.max_context = 256;
  c.host_granularity = 4096;
  c.memory_budget_bytes = int64_t{1} << 20;
  return c;
}

kvmem_stats Stats(const kvmem_cache* cache) {
  kvmem_stats s;
  std::memset(&s, 0, sizeof(s));
  s.struct_size = sizeof(s);
  EXPECT_EQ(kvmem_get_stats(cache, &s), KVMEM_OK) << kvmem_last_error();
  return s;
}

// The numbers an error must not move.
void ExpectSameStats(const kvmem_stats& a, const kvmem_stats& b) {
  EXPECT_EQ(a.num_requests, b.num_requests);
  EXPECT_EQ(a.logical_tokens, b.logical_tokens);
  EXPECT_EQ(a.stored_tokens, b.stored_tokens);
  EXPECT_EQ(a.held_bytes, b.held_bytes);
  EXPECT_EQ(a.pages_used, b.pages_used);
  EXPECT_EQ(a.pages_free, b.pages_free);
  EXPECT_EQ(a.mapped_bytes, b.mapped_bytes);
}

std::string LastError() { return kvmem_last_error(); }

TEST(CApiTest, StatusNamesAndVersion) {
  EXPECT_STREQ(kvmem_status_name(KVMEM_OK), "OK");
  EXPECT_STREQ(kvmem_status_name(KVMEM_RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
  EXPECT_STREQ(kvmem_status_name(KVMEM_UNAUTHENTICATED), "UNAUTHENTICATED");
  EXPECT_STREQ(kvmem_status_name(-1), "UNKNOWN");
  EXPECT_STREQ(kvmem_status_name(17), "UNKNOWN");
  EXPECT_STREQ(kvmem_version(), "0.2.0");
}

TEST(CApiTest, ConfigInitMatchesKvCacheConfig) {
  kvmem_config c;
  ASSERT_EQ(kvmem_config_init(&c), KVMEM_OK);
  const kvmem::KvCacheConfig d;
  EXPECT_EQ(c.struct_size, sizeof(kvmem_config));
  EXPECT_EQ(c.num_layers, d.num_layers);
  EXPECT_EQ(c.num_kv_heads, d.num_kv_heads);
  EXPECT_EQ(c.head_dim, d.head_dim);
  EXPECT_EQ(c.dtype, static_cast<int32_t>(d.dtype));
  EXPECT_EQ(c.page_tokens, d.page_tokens);
  EXPECT_EQ(c.max_requests, d.max_requests);
  EXPECT_EQ(c.max_context, d.max_context);
  EXPECT_EQ(c.memory_budget_bytes, d.memory_budget_bytes);
  EXPECT_EQ(c.host_granularity, d.host_granularity);
  EXPECT_EQ(c.elastic_pool, d.elastic_pool ? 1 : 0);
  EXPECT_EQ(kvmem_config_init(nullptr), KVMEM_INVALID_ARGUMENT);
}

TEST(CApiTest, BadConfigs) {
  kvmem_cache* cache = nullptr;
  kvmem_config c = SmallConfig(KVMEM_LAYOUT_PAGED);
  EXPECT_EQ(kvmem_cache_create(nullptr, &cache), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_cache_create(&c, nullptr), KVMEM_INVALID_ARGUMENT);
  kvmem_config small = c;
  small.struct_size = 40;
  EXPECT_EQ(kvmem_cache_create(&small, &cache), KVMEM_INVALID_ARGUMENT);
  EXPECT_NE(LastError().find("struct_size"), std::string::npos) << LastError();
  struct Bad {
    const char* field;
    void (*apply)(kvmem_config*);
  };
  const Bad bad[] = {
      {"dtype", [](kvmem_config* c) { c->dtype = 7; }},
      {"layout", [](kvmem_config* c) { c->layout = -1; }},
      {"arrangement", [](kvmem_config* c) { c->arrangement = 2; }},
      {"device", [](kvmem_config* c) { c->device = 300; }},
      {"page_placement", [](kvmem_config* c) { c->page_placement = 9; }},
      {"elastic_pool", [](kvmem_config* c) { c->elastic_pool = 2; }},
      {"num_layers", [](kvmem_config* c) { c->num_layers = 0; }},
      {"head_dim", [](kvmem_config* c) { c->head_dim = -4; }},
      {"page_tokens", [](kvmem_config* c) { c->page_tokens = 0; }},
      {"host_granularity", [](kvmem_config* c) { c->host_granularity = 12345; }},
      {"memory_budget", [](kvmem_config* c) { c->memory_budget_bytes = 1; }},
  };
  for (const Bad& b : bad) {
    kvmem_config x = c;
    b.apply(&x);
    EXPECT_EQ(kvmem_cache_create(&x, &cache), KVMEM_INVALID_ARGUMENT) << b.field;
    EXPECT_FALSE(LastError().empty()) << b.field;
    EXPECT_EQ(cache, nullptr) << b.field;
  }
}

TEST(CApiTest, NullHandlesAndArguments) {
  int64_t n = 0;
  int32_t row = 0;
  uint64_t id = 1;
  int64_t count = 1;
  int64_t loc[4];
  kvmem_stats s;
  s.struct_size = sizeof(s);
  EXPECT_EQ(kvmem_add_request(nullptr, 1, &row), KVMEM_INVALID_ARGUMENT);
  EXPECT_NE(LastError().find("cache is NULL"), std::string::npos) << LastError();
  EXPECT_EQ(kvmem_extend(nullptr, 1, 1, loc, 4), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_truncate(nullptr, 1, 0), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_fork(nullptr, 1, 2, nullptr), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_free(nullptr, 1, nullptr), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend_batch(nullptr, &id, &count, 1, loc, 4), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_truncate_batch(nullptr, &id, &count, 1), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_free_batch(nullptr, &id, 1, nullptr), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_length(nullptr, 1, &n), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_get_stats(nullptr, &s), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_check_invariants(nullptr), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_set_running_batch(nullptr, &id, 1), KVMEM_INVALID_ARGUMENT);
  kvmem_cache_destroy(nullptr);  // a no-op

  kvmem_config c = SmallConfig(KVMEM_LAYOUT_PAGED);
  kvmem_cache* cache = nullptr;
  ASSERT_EQ(kvmem_cache_create(&c, &cache), KVMEM_OK) << LastError();
  ASSERT_EQ(kvmem_add_request(cache, 1, nullptr), KVMEM_OK);
  const kvmem_stats before = Stats(cache);
  EXPECT_EQ(kvmem_length(cache, 1, nullptr), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend(cache, 1, 2, nullptr, 2), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend_batch(cache, nullptr, &count, 1, loc, 4), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend_batch(cache, &id, nullptr, 1, loc, 4), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend_batch(cache, &id, &count, -1, loc, 4), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend_batch(cache, &id, &count, 1, nullptr, 4), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_truncate_batch(cache, &id, nullptr, 1), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_free_batch(cache, nullptr, 1, nullptr), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_get_stats(cache, nullptr), KVMEM_INVALID_ARGUMENT);
  kvmem_stats tiny;
  tiny.struct_size = 4;
  EXPECT_EQ(kvmem_get_stats(cache, &tiny), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_layer_view_get(cache, 0, nullptr), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_running_batch_get(cache, nullptr), KVMEM_INVALID_ARGUMENT);
  // Empty batches with NULL arrays are fine.
  EXPECT_EQ(kvmem_extend_batch(cache, nullptr, nullptr, 0, nullptr, 0), KVMEM_OK) << LastError();
  ExpectSameStats(before, Stats(cache));
  EXPECT_EQ(kvmem_check_invariants(cache), KVMEM_OK) << LastError();
  kvmem_cache_destroy(cache);
}

class CApiLayoutTest : public ::testing::TestWithParam<int32_t> {
 protected:
  void SetUp() override {
    kvmem_config c = SmallConfig(GetParam());
    ASSERT_EQ(kvmem_cache_create(&c, &cache_), KVMEM_OK) << LastError();
  }
  void TearDown() override { kvmem_cache_destroy(cache_); }
  int64_t Length(uint64_t id) {
    int64_t n = -1;
    EXPECT_EQ(kvmem_length(cache_, id, &n), KVMEM_OK) << LastError();
    return n;
  }
  kvmem_cache* cache_ = nullptr;
};

TEST_P(CApiLayoutTest, UnknownIdsAndRanges) {
  int64_t loc[512];
  ASSERT_EQ(kvmem_add_request(cache_, 1, nullptr), KVMEM_OK);
  ASSERT_EQ(kvmem_extend(cache_, 1, 10, loc, 512), KVMEM_OK) << LastError();
  const kvmem_stats before = Stats(cache_);
  int64_t n = 0;
  int32_t row = 0;
  EXPECT_EQ(kvmem_extend(cache_, 2, 1, loc, 512), KVMEM_NOT_FOUND);
  EXPECT_NE(LastError().find("2"), std::string::npos) << LastError();
  EXPECT_EQ(kvmem_truncate(cache_, 2, 0), KVMEM_NOT_FOUND);
  EXPECT_EQ(kvmem_free(cache_, 2, nullptr), KVMEM_NOT_FOUND);
  EXPECT_EQ(kvmem_length(cache_, 2, &n), KVMEM_NOT_FOUND);
  EXPECT_EQ(kvmem_row(cache_, 2, &row), KVMEM_NOT_FOUND);
  EXPECT_EQ(kvmem_fork(cache_, 2, 3, nullptr), KVMEM_NOT_FOUND);
  EXPECT_EQ(kvmem_add_request(cache_, 1, nullptr), KVMEM_ALREADY_EXISTS);
  ASSERT_EQ(kvmem_add_request(cache_, 5, nullptr), KVMEM_OK);
  EXPECT_EQ(kvmem_fork(cache_, 1, 5, nullptr), KVMEM_ALREADY_EXISTS);
  ASSERT_EQ(kvmem_free(cache_, 5, nullptr), KVMEM_OK);
  EXPECT_EQ(kvmem_free(cache_, 5, nullptr), KVMEM_NOT_FOUND);  // a second free
  EXPECT_EQ(kvmem_extend(cache_, 1, 247, loc, 512), KVMEM_OUT_OF_RANGE);  // 257 > 256
  EXPECT_EQ(kvmem_extend(cache_, 1, -1, loc, 512), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend(cache_, 1, 5, loc, 4), KVMEM_INVALID_ARGUMENT);  // out too small
  EXPECT_EQ(kvmem_truncate(cache_, 1, 11), KVMEM_OUT_OF_RANGE);
  EXPECT_EQ(kvmem_truncate(cache_, 1, -1), KVMEM_OUT_OF_RANGE);
  kvmem_layer_view view;
  view.struct_size = sizeof(view);
  EXPECT_EQ(kvmem_layer_view_get(cache_, 2, &view), KVMEM_OUT_OF_RANGE);
  EXPECT_EQ(kvmem_layer_view_get(cache_, -1, &view), KVMEM_OUT_OF_RANGE);
  int32_t tokens[4];
  EXPECT_EQ(kvmem_req_to_token(cache_, 1, tokens, 4, &n), KVMEM_OUT_OF_RANGE);
  EXPECT_EQ(n, 10);  // the size needed
  // A batch with one unknown id changes none of its requests.
  const uint64_t ids[] = {1, 9};
  const int64_t counts[] = {3, 3};
  EXPECT_EQ(kvmem_extend_batch(cache_, ids, counts, 2, loc, 512), KVMEM_NOT_FOUND);
  const uint64_t twice[] = {1, 1};
  EXPECT_EQ(kvmem_extend_batch(cache_, twice, counts, 2, loc, 512), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_extend_batch(cache_, ids, counts, 1, loc, 2), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(Length(1), 10);
  ExpectSameStats(before, Stats(cache_));
  EXPECT_EQ(kvmem_check_invariants(cache_), KVMEM_OK) << LastError();
}

TEST_P(CApiLayoutTest, ExhaustionLeavesTheCacheAsItWas) {
  // A budget of two requests at max_context (256 tokens of 256 bytes).
  kvmem_cache_destroy(cache_);
  cache_ = nullptr;
  kvmem_config c = SmallConfig(GetParam());
  c.memory_budget_bytes = 128 << 10;
  ASSERT_EQ(kvmem_cache_create(&c, &cache_), KVMEM_OK) << LastError();
  // Rows: max_requests = 8.
  for (uint64_t id = 0; id < 8; ++id) ASSERT_EQ(kvmem_add_request(cache_, id, nullptr), KVMEM_OK);
  EXPECT_EQ(kvmem_add_request(cache_, 100, nullptr), KVMEM_RESOURCE_EXHAUSTED);
  EXPECT_FALSE(LastError().empty());
  // Memory: grow requests until the 1 MiB budget runs out.
  std::vector<int64_t> loc(256);
  bool exhausted = false;
  for (uint64_t id = 0; id < 8 && !exhausted; ++id) {
    const kvmem_stats before = Stats(cache_);
    const kvmem_status s = kvmem_extend(cache_, id, 256, loc.data(), 256);
    if (s == KVMEM_RESOURCE_EXHAUSTED) {
      exhausted = true;
      EXPECT_EQ(Length(id), 0);
      ExpectSameStats(before, Stats(cache_));
    } else {
      ASSERT_EQ(s, KVMEM_OK) << LastError();
    }
    ASSERT_EQ(kvmem_check_invariants(cache_), KVMEM_OK) << LastError();
  }
  ASSERT_TRUE(exhausted) << "8 x 256 tokens fit a 128 KiB budget";
  // Freeing gives the memory back.
  ASSERT_EQ(kvmem_free(cache_, 0, nullptr), KVMEM_OK);
  EXPECT_EQ(kvmem_check_invariants(cache_), KVMEM_OK) << LastError();
}

TEST_P(CApiLayoutTest, BatchCallsForkAndIndex) {
  const uint64_t ids[] = {10, 11, 12};
  for (uint64_t id : ids) ASSERT_EQ(kvmem_add_request(cache_, id, nullptr), KVMEM_OK);
  const int64_t counts[] = {5, 0, 17};
  std::vector<int64_t> loc(30, -7);
  ASSERT_EQ(kvmem_extend_batch(cache_, ids, counts, 3, loc.data(), 30), KVMEM_OK) << LastError();
  EXPECT_EQ(loc[22], -7);  // past sum(counts): untouched
  EXPECT_EQ(Length(10), 5);
  EXPECT_EQ(Length(12), 17);
  int32_t row = -1;
  ASSERT_EQ(kvmem_fork(cache_, 12, 13, &row), KVMEM_OK) << LastError();
  EXPECT_GE(row, 0);
  EXPECT_EQ(Length(13), 17);
  std::vector<int32_t> tokens(256);
  int64_t n = 0;
  ASSERT_EQ(kvmem_req_to_token(cache_, 10, tokens.data(), 256, &n), KVMEM_OK) << LastError();
  ASSERT_EQ(n, 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(tokens[i], loc[i]) << i;
  std::vector<int32_t> pages(16);
  const kvmem_status bt = kvmem_block_table(cache_, 12, pages.data(), 16, &n);
  if (GetParam() == KVMEM_LAYOUT_PAGED) {
    EXPECT_EQ(bt, KVMEM_OK) << LastError();
    EXPECT_EQ(n, 2);
  } else {
    EXPECT_EQ(bt, KVMEM_FAILED_PRECONDITION);
  }
  const int64_t lens[] = {2, 0, 9};
  ASSERT_EQ(kvmem_truncate_batch(cache_, ids, lens, 3), KVMEM_OK) << LastError();
  EXPECT_EQ(Length(10), 2);
  EXPECT_EQ(Length(12), 9);
  int32_t yes = 0;
  ASSERT_EQ(kvmem_free_batch(cache_, ids, 3, nullptr), KVMEM_OK) << LastError();
  ASSERT_EQ(kvmem_contains(cache_, 13, &yes), KVMEM_OK);
  EXPECT_EQ(yes, 1);
  ASSERT_EQ(kvmem_contains(cache_, 10, &yes), KVMEM_OK);
  EXPECT_EQ(yes, 0);
  EXPECT_EQ(Stats(cache_).num_requests, 1);
  int64_t trimmed = -1;
  EXPECT_EQ(kvmem_trim(cache_, &trimmed), KVMEM_OK) << LastError();
  EXPECT_GE(trimmed, 0);
  EXPECT_EQ(kvmem_check_invariants(cache_), KVMEM_OK) << LastError();
}

TEST_P(CApiLayoutTest, LayerViewAddressesTheLocations) {
  kvmem_config c;
  c.struct_size = sizeof(c);
  ASSERT_EQ(kvmem_cache_config(cache_, &c), KVMEM_OK);
  EXPECT_EQ(c.layout, GetParam());
  EXPECT_EQ(c.max_context, 256);
  ASSERT_EQ(kvmem_add_request(cache_, 1, nullptr), KVMEM_OK);
  int64_t loc[40];
  ASSERT_EQ(kvmem_extend(cache_, 1, 40, loc, 40), KVMEM_OK) << LastError();
  kvmem_layer_view v;
  std::memset(&v, 0, sizeof(v));
  v.struct_size = sizeof(v);
  ASSERT_EQ(kvmem_layer_view_get(cache_, 1, &v), KVMEM_OK) << LastError();
  EXPECT_EQ(v.layout, GetParam());
  EXPECT_EQ(v.device, KVMEM_DEVICE_HOST);
  EXPECT_EQ(v.shape[v.ndim - 1], 16);
  EXPECT_EQ(v.shape[v.ndim - 2], 2);
  EXPECT_EQ(v.strides[v.ndim - 1], 1);
  // Token i of the request, through the strided shape, is where the accessor puts
  // location loc[i]: write it there, read it back through the view's strides.
  auto* k = static_cast<uint16_t*>(v.k);
  for (int i = 0; i < 40; ++i) {
    int64_t index[6] = {};
    if (GetParam() == KVMEM_LAYOUT_PAGED) {
      index[0] = loc[i] / v.page_tokens;
      index[1] = loc[i] % v.page_tokens;
    } else {
      int32_t row = 0;
      ASSERT_EQ(kvmem_row(cache_, 1, &row), KVMEM_OK);
      const int64_t pos = loc[i] % v.max_context;
      EXPECT_EQ(loc[i] / v.max_context, row);
      index[0] = row;
      if (v.ndim == 5) {
        index[1] = pos >> v.chunk_shift;
        index[2] = pos & ((int64_t{1} << v.chunk_shift) - 1);
      } else {
        index[1] = pos;
      }
    }
    int64_t offset = 0;
    for (int d = 0; d < v.ndim; ++d) offset += index[d] * v.strides[d];
    const int64_t accessor =
        GetParam() == KVMEM_LAYOUT_PAGED
            ? (loc[i] / v.page_tokens) * v.page_stride + (loc[i] % v.page_tokens) * v.token_stride
            : (loc[i] / v.max_context) * v.row_stride +
                  (loc[i] % v.max_context) * v.token_stride +
                  ((loc[i] % v.max_context) >> v.chunk_shift) * v.chunk_gap;
    EXPECT_EQ(offset, accessor) << "token " << i;
    k[offset + 17] = static_cast<uint16_t>(i + 1);  // head 1, dim 1
  }
  for (int i = 0; i < 40; ++i) {
    int64_t offset = GetParam() == KVMEM_LAYOUT_PAGED
                         ? (loc[i] / v.page_tokens) * v.page_stride +
                               (loc[i] % v.page_tokens) * v.token_stride
                         : (loc[i] / v.max_context) * v.row_stride +
                               (loc[i] % v.max_context) * v.token_stride +
                               ((loc[i] % v.max_context) >> v.chunk_shift) * v.chunk_gap;
    EXPECT_EQ(k[offset + 17], i + 1);
  }
}

TEST_P(CApiLayoutTest, RunningBatch) {
  kvmem_running_batch b;
  std::memset(&b, 0, sizeof(b));
  b.struct_size = sizeof(b);
  ASSERT_EQ(kvmem_running_batch_get(cache_, &b), KVMEM_OK);
  EXPECT_EQ(b.seq_lens, nullptr);  // none set yet
  const uint64_t ids[] = {3, 1, 2};
  for (uint64_t id : ids) ASSERT_EQ(kvmem_add_request(cache_, id, nullptr), KVMEM_OK);
  ASSERT_EQ(kvmem_set_running_batch(cache_, ids, 3), KVMEM_OK) << LastError();
  const int64_t counts[] = {20, 1, 33};
  int64_t loc[54];
  ASSERT_EQ(kvmem_extend_batch(cache_, ids, counts, 3, loc, 54), KVMEM_OK) << LastError();
  ASSERT_EQ(kvmem_running_batch_get(cache_, &b), KVMEM_OK);
  ASSERT_EQ(b.size, 3);
  EXPECT_EQ(b.max_batch, 8);
  EXPECT_EQ(b.seq_lens[0], 20);
  EXPECT_EQ(b.seq_lens[1], 1);
  EXPECT_EQ(b.seq_lens[2], 33);
  EXPECT_EQ(b.max_seq_len, 33);
  const int32_t* lens = b.seq_lens;
  kvmem_running_batch_changes ch;
  ch.struct_size = sizeof(ch);
  ASSERT_EQ(kvmem_take_running_batch_changes(cache_, &ch), KVMEM_OK) << LastError();
  EXPECT_EQ(ch.all, 1);
  kvmem_running_batch_csr csr;
  csr.struct_size = sizeof(csr);
  if (GetParam() == KVMEM_LAYOUT_PAGED) {
    ASSERT_NE(b.page_table, nullptr);
    EXPECT_EQ(b.page_table[0], loc[0] / 16);
    EXPECT_EQ(b.last_page_len[0], 4);
    ASSERT_EQ(kvmem_pack_running_batch(cache_, &csr), KVMEM_OK) << LastError();
    EXPECT_EQ(csr.size, 3);
    EXPECT_EQ(csr.indptr[3], 2 + 1 + 3);
  } else {
    EXPECT_EQ(b.page_table, nullptr);
    EXPECT_EQ(kvmem_pack_running_batch(cache_, &csr), KVMEM_FAILED_PRECONDITION);
  }
  // One more token for 1: the change list names what moved, the arrays stay put.
  const uint64_t one[] = {1};
  const int64_t add[] = {16};
  ASSERT_EQ(kvmem_extend_batch(cache_, one, add, 1, loc, 54), KVMEM_OK) << LastError();
  ASSERT_EQ(kvmem_take_running_batch_changes(cache_, &ch), KVMEM_OK) << LastError();
  EXPECT_EQ(ch.all, 0);
  if (GetParam() == KVMEM_LAYOUT_PAGED) {
    EXPECT_GE(ch.num_entries, 1);
  }
  ASSERT_EQ(kvmem_running_batch_get(cache_, &b), KVMEM_OK);
  EXPECT_EQ(b.seq_lens, lens);
  EXPECT_EQ(b.seq_lens[1], 17);
  // Too many ids.
  std::vector<uint64_t> many(9);
  for (int i = 0; i < 9; ++i) many[i] = 100 + i;
  EXPECT_EQ(kvmem_set_running_batch(cache_, many.data(), 9), KVMEM_INVALID_ARGUMENT);
  EXPECT_EQ(kvmem_check_invariants(cache_), KVMEM_OK) << LastError();
}

TEST_P(CApiLayoutTest, KernelsNeedCudaAndADeviceCache) {
  kvmem_attention_options o;
  ASSERT_EQ(kvmem_attention_options_init(&o), KVMEM_OK);
  kvmem_decode_workspace* ws = nullptr;
  kvmem_extend_workspace* ews = nullptr;
  kvmem_device_running_batch* mirror = nullptr;
  const kvmem_status want = kvmem_has_cuda() ? KVMEM_FAILED_PRECONDITION : KVMEM_UNIMPLEMENTED;
  EXPECT_EQ(kvmem_decode_workspace_create(cache_, &o, &ws), want);
  EXPECT_NE(LastError().find(kvmem_has_cuda() ? "host" : "without CUDA"), std::string::npos)
      << LastError();
  EXPECT_EQ(kvmem_extend_workspace_create(cache_, &o, &ews), want);
  EXPECT_EQ(kvmem_device_running_batch_create(cache_, &mirror), want);
  EXPECT_EQ(kvmem_append_kv(cache_, 0, 1, nullptr, nullptr, 0, 0, nullptr, 0, nullptr), want);
  EXPECT_EQ(ws, nullptr);
  kvmem_decode_workspace_destroy(nullptr);
  kvmem_extend_workspace_destroy(nullptr);
  kvmem_device_running_batch_destroy(nullptr);
}

INSTANTIATE_TEST_SUITE_P(Layouts, CApiLayoutTest,
                         ::testing::Values(KVMEM_LAYOUT_PAGED, KVMEM_LAYOUT_VIRTUAL),
                         [](const ::testing::TestParamInfo<int32_t>& info) {
                           return info.param == KVMEM_LAYOUT_PAGED ? "paged" : "virtual";
                         });

TEST(CApiTest, LastErrorIsPerThread) {
  int64_t n = 0;
  ASSERT_EQ(kvmem_length(nullptr, 1, &n), KVMEM_INVALID_ARGUMENT);
  const std::string mine = LastError();
  std::string theirs = "unset";
  std::thread t([&] {
    theirs = kvmem_last_error();  // nothing failed on this thread
    kvmem_config c;
    kvmem_config_init(&c);
    c.num_layers = -1;
    kvmem_cache* cache = nullptr;
    EXPECT_EQ(kvmem_cache_create(&c, &cache), KVMEM_INVALID_ARGUMENT);
  });
  t.join();
  EXPECT_EQ(theirs, "");
  EXPECT_EQ(LastError(), mine);
  // A successful call leaves it.
  kvmem_config c;
  ASSERT_EQ(kvmem_config_init(&c), KVMEM_OK);
  EXPECT_EQ(LastError(), mine);
}

TEST(CApiTest, CProgram) { EXPECT_EQ(kvmem_c_smoke(), 0) << kvmem_last_error(); }

}  // namespace
