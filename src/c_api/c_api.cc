// The C ABI over KvCache (include/kvmem/c_api.h): status codes, configuration, requests,
// the step's batch calls, stats, views of a layer and the running batch.
#include "kvmem/c_api.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "src/c_api/c_api_internal.h"

namespace kvmem::c_api {
namespace {

thread_local std::string last_error;

constexpr size_t kConfigV1Size = offsetof(kvmem_config, map_ahead_tokens) + sizeof(int64_t);
static_assert(kConfigV1Size == 88 && sizeof(kvmem_config) == 88, "kvmem_config v1 is 88 bytes");

// A C enum field: one of [0, count).
absl::Status CheckEnum(int32_t value, int32_t count, absl::string_view field) {
  if (value < 0 || value >= count) {
    return absl::InvalidArgumentError(absl::StrCat("config.", field, " = ", value,
                                                   ": must be in [0, ", count, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<KvCacheConfig> FromC(const kvmem_config* in) {
  if (absl::Status s = CheckStructSize(in, "config", kConfigV1Size); !s.ok()) return s;
  kvmem_config c;
  kvmem_config_init(&c);
  std::memcpy(&c, in, std::min<size_t>(in->struct_size, sizeof(c)));
  if (absl::Status s = CheckEnum(c.dtype, 3, "dtype"); !s.ok()) return s;
  if (absl::Status s = CheckEnum(c.layout, 2, "layout"); !s.ok()) return s;
  if (absl::Status s = CheckEnum(c.arrangement, 2, "arrangement"); !s.ok()) return s;
  if (absl::Status s = CheckEnum(c.page_placement, 2, "page_placement"); !s.ok()) return s;
  if (absl::Status s = CheckEnum(c.device, 2, "device"); !s.ok()) return s;
  if (absl::Status s = CheckEnum(c.elastic_pool, 2, "elastic_pool"); !s.ok()) return s;
  KvCacheConfig k;
  k.num_layers = c.num_layers;
  k.num_kv_heads = c.num_kv_heads;
  k.head_dim = c.head_dim;
  k.dtype = static_cast<DType>(c.dtype);
  k.layout = static_cast<Layout>(c.layout);
  k.arrangement = static_cast<Arrangement>(c.arrangement);
  k.chunk_tokens = c.chunk_tokens;
  k.page_tokens = c.page_tokens;
  k.page_placement = static_cast<PagePlacement>(c.page_placement);
  k.max_requests = c.max_requests;
  k.max_context = c.max_context;
  k.memory_budget_bytes = c.memory_budget_bytes;
  k.device = static_cast<DeviceKind>(c.device);
  k.device_ordinal = c.device_ordinal;
  k.host_granularity = c.host_granularity;
  k.elastic_pool = c.elastic_pool != 0;
  k.map_ahead_tokens = c.map_ahead_tokens;
  return k;
}

kvmem_config ToC(const KvCacheConfig& k) {
  kvmem_config c;
  kvmem_config_init(&c);
  c.num_layers = k.num_layers;
  c.num_kv_heads = k.num_kv_heads;
  c.head_dim = k.head_dim;
  c.dtype = static_cast<int32_t>(k.dtype);
  c.layout = static_cast<int32_t>(k.layout);
  c.arrangement = static_cast<int32_t>(k.arrangement);
  c.chunk_tokens = k.chunk_tokens;
  c.page_tokens = k.page_tokens;
  c.page_placement = static_cast<int32_t>(k.page_placement);
  c.max_requests = k.max_requests;
  c.max_context = k.max_context;
  c.memory_budget_bytes = k.memory_budget_bytes;
  c.device = static_cast<int32_t>(k.device);
  c.device_ordinal = k.device_ordinal;
  c.host_granularity = k.host_granularity;
  c.elastic_pool = k.elastic_pool ? 1 : 0;
  c.map_ahead_tokens = k.map_ahead_tokens;
  return c;
}

absl::Status LayerView(const KvCache& cache, int32_t layer, kvmem_layer_view* out) {
  const KvCacheConfig& config = cache.config();
  if (layer < 0 || layer >= config.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("layer ", layer, " out of range [0, ", config.num_layers, ")"));
  }
  kvmem_layer_view v;
  std::memset(&v, 0, sizeof(v));
  v.struct_size = sizeof(v);
  v.layout = static_cast<int32_t>(config.layout);
  v.dtype = static_cast<int32_t>(config.dtype);
  v.device = static_cast<int32_t>(config.device);
  v.device_ordinal = config.device == DeviceKind::kCuda ? config.device_ordinal : 0;
  const int64_t heads = config.num_kv_heads;
  const int64_t dim = config.head_dim;
  const BatchMetadata none;
  if (config.layout == Layout::kPaged) {
    absl::StatusOr<PagedKv> p = cache.PagedView(layer, none);
    if (!p.ok()) return p.status();
    v.k = p->k;
    v.v = p->v;
    v.page_stride = p->page_stride;
    v.token_stride = p->token_stride;
    v.page_tokens = p->page_tokens;
    v.num_pages = cache.GetStats().pages_total;
    v.ndim = 4;
    const int64_t shape[] = {v.num_pages, p->page_tokens, heads, dim};
    const int64_t strides[] = {p->page_stride, p->token_stride, dim, 1};
    std::memcpy(v.shape, shape, sizeof(shape));
    std::memcpy(v.strides, strides, sizeof(strides));
  } else {
    absl::StatusOr<VirtualKv> p = cache.VirtualView(layer, none);
    if (!p.ok()) return p.status();
    v.k = p->k;
    v.v = p->v;
    v.row_stride = p->row_stride;
    v.token_stride = p->token_stride;
    v.max_context = p->max_context;
    v.chunk_shift = p->chunk_shift;
    v.chunk_gap = p->chunk_gap;
    v.page_tokens = 1;
    if (p->chunk_shift == 0 && p->chunk_gap == 0) {
      v.ndim = 4;
      const int64_t shape[] = {config.max_requests, p->max_context, heads, dim};
      const int64_t strides[] = {p->row_stride, p->token_stride, dim, 1};
      std::memcpy(v.shape, shape, sizeof(shape));
      std::memcpy(v.strides, strides, sizeof(strides));
    } else {
      const int64_t chunk = int64_t{1} << p->chunk_shift;
      v.ndim = 5;
      const int64_t shape[] = {config.max_requests, (p->max_context + chunk - 1) / chunk, chunk,
                               heads, dim};
      const int64_t strides[] = {p->row_stride, chunk * p->token_stride + p->chunk_gap,
                                 p->token_stride, dim, 1};
      std::memcpy(v.shape, shape, sizeof(shape));
      std::memcpy(v.strides, strides, sizeof(strides));
    }
  }
  return CopyOut(v, out, "view");
}

kvmem_running_batch ToC(const RunningBatchView& b) {
  kvmem_running_batch c;
  std::memset(&c, 0, sizeof(c));
  c.struct_size = sizeof(c);
  c.size = b.size;
  c.max_batch = b.max_batch;
  c.max_seq_len = b.max_seq_len;
  c.seq_lens = b.seq_lens;
  c.row_ids = b.row_ids;
  c.page_table = b.page_table;
  c.page_table_stride = b.page_table_stride;
  c.last_page_len = b.last_page_len;
  return c;
}

}  // namespace

kvmem_status Report(const absl::Status& status) {
  if (status.ok()) return KVMEM_OK;
  last_error.assign(status.message().data(), status.message().size());
  return static_cast<kvmem_status>(status.code());
}

}  // namespace kvmem::c_api

using kvmem::c_api::CheckArray;
using kvmem::c_api::CheckCache;
using kvmem::c_api::CopyOut;
using kvmem::c_api::Guard;
using kvmem::c_api::Null;

extern "C" {

const char* kvmem_last_error(void) { return kvmem::c_api::last_error.c_str(); }

const char* kvmem_status_name(kvmem_status code) {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",          "UNKNOWN",          "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",   "ALREADY_EXISTS",   "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",       "UNAVAILABLE",      "DATA_LOSS",
      "UNAUTHENTICATED"};
  if (code < 0 || code > KVMEM_UNAUTHENTICATED) return "UNKNOWN";
  return kNames[code];
}

const char* kvmem_version(void) { return KVMEM_VERSION_STRING; }

int32_t kvmem_has_cuda(void) {
#ifdef KVMEM_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

kvmem_status kvmem_config_init(kvmem_config* config) {
  return Guard([&] {
    if (config == nullptr) return Null("config");
    const kvmem::KvCacheConfig d;
    std::memset(config, 0, sizeof(*config));
    config->struct_size = sizeof(*config);
    config->num_layers = d.num_layers;
    config->num_kv_heads = d.num_kv_heads;
    config->head_dim = d.head_dim;
    config->dtype = static_cast<int32_t>(d.dtype);
    config->layout = static_cast<int32_t>(d.layout);
    config->arrangement = static_cast<int32_t>(d.arrangement);
    config->chunk_tokens = d.chunk_tokens;
    config->page_tokens = d.page_tokens;
    config->page_placement = static_cast<int32_t>(d.page_placement);
    config->max_requests = d.max_requests;
    config->device = static_cast<int32_t>(d.device);
    config->max_context = d.max_context;
    config->memory_budget_bytes = d.memory_budget_bytes;
    config->device_ordinal = d.device_ordinal;
    config->elastic_pool = d.elastic_pool ? 1 : 0;
    config->host_granularity = d.host_granularity;
    config->map_ahead_tokens = d.map_ahead_tokens;
    return absl::OkStatus();
  });
}

kvmem_status kvmem_cache_create(const kvmem_config* config, kvmem_cache** out) {
  return Guard([&]() -> absl::Status {
    if (out == nullptr) return Null("out");
    absl::StatusOr<kvmem::KvCacheConfig> c = kvmem::c_api::FromC(config);
    if (!c.ok()) return c.status();
    absl::StatusOr<std::unique_ptr<kvmem::KvCache>> cache = kvmem::KvCache::Create(*c);
    if (!cache.ok()) return cache.status();
    auto handle = std::make_unique<kvmem_cache>();
    handle->cache = *std::move(cache);
    *out = handle.release();
    return absl::OkStatus();
  });
}

void kvmem_cache_destroy(kvmem_cache* cache) {
  try {
    delete cache;
  } catch (...) {  // destructors log their failures; nothing may cross the ABI
  }
}

kvmem_status kvmem_cache_config(const kvmem_cache* cache, kvmem_config* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    return CopyOut(kvmem::c_api::ToC(cache->cache->config()), out, "config");
  });
}

kvmem_status kvmem_add_request(kvmem_cache* cache, uint64_t id, int32_t* row_out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    absl::StatusOr<int32_t> row = cache->cache->AddRequest(id);
    if (!row.ok()) return row.status();
    if (row_out != nullptr) *row_out = *row;
    return absl::OkStatus();
  });
}

kvmem_status kvmem_extend(kvmem_cache* cache, uint64_t id, int64_t n, int64_t* out_loc,
                          int64_t capacity) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = CheckArray(out_loc, capacity, "out_loc"); !s.ok()) return s;
    const uint64_t ids[] = {id};
    const int64_t counts[] = {n};
    return cache->cache->ExtendBatch(ids, counts,
                                     absl::MakeSpan(out_loc, static_cast<size_t>(capacity)));
  });
}

kvmem_status kvmem_truncate(kvmem_cache* cache, uint64_t id, int64_t new_length) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    return cache->cache->Truncate(id, new_length);
  });
}

kvmem_status kvmem_fork(kvmem_cache* cache, uint64_t parent, uint64_t child, int32_t* row_out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    absl::StatusOr<int32_t> row = cache->cache->Fork(parent, child);
    if (!row.ok()) return row.status();
    if (row_out != nullptr) *row_out = *row;
    return absl::OkStatus();
  });
}

kvmem_status kvmem_free(kvmem_cache* cache, uint64_t id, void* fence) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    return cache->cache->Free(id, kvmem::Fence{fence});
  });
}

kvmem_status kvmem_extend_batch(kvmem_cache* cache, const uint64_t* ids, const int64_t* counts,
                                int64_t n, int64_t* out_loc, int64_t out_capacity) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = CheckArray(ids, n, "ids"); !s.ok()) return s;
    if (absl::Status s = CheckArray(counts, n, "counts"); !s.ok()) return s;
    if (absl::Status s = CheckArray(out_loc, out_capacity, "out_loc"); !s.ok()) return s;
    return cache->cache->ExtendBatch(absl::MakeConstSpan(ids, static_cast<size_t>(n)),
                                     absl::MakeConstSpan(counts, static_cast<size_t>(n)),
                                     absl::MakeSpan(out_loc, static_cast<size_t>(out_capacity)));
  });
}

kvmem_status kvmem_truncate_batch(kvmem_cache* cache, const uint64_t* ids,
                                  const int64_t* new_lengths, int64_t n) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = CheckArray(ids, n, "ids"); !s.ok()) return s;
    if (absl::Status s = CheckArray(new_lengths, n, "new_lengths"); !s.ok()) return s;
    return cache->cache->TruncateBatch(absl::MakeConstSpan(ids, static_cast<size_t>(n)),
                                       absl::MakeConstSpan(new_lengths, static_cast<size_t>(n)));
  });
}

kvmem_status kvmem_free_batch(kvmem_cache* cache, const uint64_t* ids, int64_t n, void* fence) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = CheckArray(ids, n, "ids"); !s.ok()) return s;
    return cache->cache->FreeBatch(absl::MakeConstSpan(ids, static_cast<size_t>(n)),
                                   kvmem::Fence{fence});
  });
}

kvmem_status kvmem_length(const kvmem_cache* cache, uint64_t id, int64_t* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (out == nullptr) return Null("out");
    absl::StatusOr<int64_t> len = cache->cache->Length(id);
    if (!len.ok()) return len.status();
    *out = *len;
    return absl::OkStatus();
  });
}

kvmem_status kvmem_row(const kvmem_cache* cache, uint64_t id, int32_t* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (out == nullptr) return Null("out");
    absl::StatusOr<int32_t> row = cache->cache->Row(id);
    if (!row.ok()) return row.status();
    *out = *row;
    return absl::OkStatus();
  });
}

kvmem_status kvmem_contains(const kvmem_cache* cache, uint64_t id, int32_t* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (out == nullptr) return Null("out");
    *out = cache->cache->Contains(id) ? 1 : 0;
    return absl::OkStatus();
  });
}

namespace {

// Copies `v` to out[0..capacity) with its size in *size_out (set on OUT_OF_RANGE too).
absl::Status CopyVector(const std::vector<int32_t>& v, int32_t* out, int64_t capacity,
                        int64_t* size_out, absl::string_view what) {
  if (absl::Status s = CheckArray(out, capacity, "out"); !s.ok()) return s;
  const int64_t n = static_cast<int64_t>(v.size());
  *size_out = n;
  if (n > capacity) {
    return absl::OutOfRangeError(
        absl::StrCat(what, " has ", n, " entries; out holds ", capacity));
  }
  if (n > 0) std::memcpy(out, v.data(), v.size() * sizeof(int32_t));
  return absl::OkStatus();
}

}  // namespace

kvmem_status kvmem_req_to_token(const kvmem_cache* cache, uint64_t id, int32_t* out,
                                int64_t capacity, int64_t* length_out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (length_out == nullptr) return Null("length_out");
    std::vector<int32_t> row;
    if (absl::Status s = cache->cache->ReqToToken(id, &row); !s.ok()) return s;
    return CopyVector(row, out, capacity, length_out, "the request's index row");
  });
}

kvmem_status kvmem_block_table(const kvmem_cache* cache, uint64_t id, int32_t* out,
                               int64_t capacity, int64_t* count_out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (count_out == nullptr) return Null("count_out");
    absl::StatusOr<std::vector<int32_t>> table = cache->cache->BlockTable(id);
    if (!table.ok()) return table.status();
    return CopyVector(*table, out, capacity, count_out, "the request's block table");
  });
}

kvmem_status kvmem_trim(kvmem_cache* cache, int64_t* bytes_out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    absl::StatusOr<int64_t> bytes = cache->cache->Trim();
    if (!bytes.ok()) return bytes.status();
    if (bytes_out != nullptr) *bytes_out = *bytes;
    return absl::OkStatus();
  });
}

kvmem_status kvmem_check_invariants(const kvmem_cache* cache) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    return cache->cache->CheckInvariants();
  });
}

kvmem_status kvmem_get_stats(const kvmem_cache* cache, kvmem_stats* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    const kvmem::Stats s = cache->cache->GetStats();
    kvmem_stats c;
    std::memset(&c, 0, sizeof(c));
    c.num_requests = s.num_requests;
    c.logical_tokens = s.logical_tokens;
    c.stored_tokens = s.stored_tokens;
    c.live_bytes = s.live_bytes;
    c.held_bytes = s.held_bytes;
    c.idle_bytes = s.idle_bytes;
    c.mapped_bytes = s.mapped_bytes;
    c.physical_bytes = s.physical_bytes;
    c.budget_bytes = s.budget_bytes;
    c.page_bytes = s.page_bytes;
    c.pages_total = s.pages_total;
    c.pages_free = s.pages_free;
    c.pages_used = s.pages_used;
    c.pages_shared = s.pages_shared;
    c.pages_quarantined = s.pages_quarantined;
    c.peak_requests = s.peak_requests;
    c.peak_held_bytes = s.peak_held_bytes;
    c.peak_live_bytes = s.peak_live_bytes;
    c.extends = s.extends;
    c.forks = s.forks;
    c.cow_copies = s.cow_copies;
    c.pages_reclaimed = s.pages_reclaimed;
    c.map_stalls = s.map_stalls;
    c.pool_create_nanos = s.pool_create_nanos;
    c.vmm_calls = s.vmm_calls();
    c.vmm_nanos = s.vmm_nanos();
    c.vmm_live_reservations = s.vmm.live_reservations;
    c.vmm_live_handles = s.vmm.live_handles;
    c.vmm_mapped_granules = s.vmm.mapped_granules;
    return CopyOut(c, out, "stats");
  });
}

kvmem_status kvmem_layer_view_get(const kvmem_cache* cache, int32_t layer,
                                  kvmem_layer_view* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = kvmem::c_api::CheckStructSize(out, "view"); !s.ok()) return s;
    return kvmem::c_api::LayerView(*cache->cache, layer, out);
  });
}

kvmem_status kvmem_set_running_batch(kvmem_cache* cache, const uint64_t* ids, int64_t n) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = CheckArray(ids, n, "ids"); !s.ok()) return s;
    return cache->cache->SetRunningBatch(absl::MakeConstSpan(ids, static_cast<size_t>(n)));
  });
}

kvmem_status kvmem_running_batch_get(const kvmem_cache* cache, kvmem_running_batch* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = kvmem::c_api::CheckStructSize(out, "out"); !s.ok()) return s;
    return CopyOut(kvmem::c_api::ToC(cache->cache->RunningBatch()), out, "out");
  });
}

kvmem_status kvmem_pack_running_batch(kvmem_cache* cache, kvmem_running_batch_csr* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = kvmem::c_api::CheckStructSize(out, "out"); !s.ok()) return s;
    absl::StatusOr<kvmem::RunningBatchCsr> csr = cache->cache->PackRunningBatch();
    if (!csr.ok()) return csr.status();
    kvmem_running_batch_csr c;
    std::memset(&c, 0, sizeof(c));
    c.size = csr->size;
    c.indptr = csr->indptr;
    c.indices = csr->indices;
    c.last_page_len = csr->last_page_len;
    return CopyOut(c, out, "out");
  });
}

kvmem_status kvmem_take_running_batch_changes(kvmem_cache* cache,
                                              kvmem_running_batch_changes* out) {
  return Guard([&]() -> absl::Status {
    if (absl::Status s = CheckCache(cache); !s.ok()) return s;
    if (absl::Status s = kvmem::c_api::CheckStructSize(out, "out"); !s.ok()) return s;
    if (absl::Status s = cache->cache->TakeRunningBatchChanges(&cache->changes); !s.ok()) {
      return s;
    }
    kvmem_running_batch_changes c;
    std::memset(&c, 0, sizeof(c));
    c.all = cache->changes.all ? 1 : 0;
    c.num_entries = static_cast<int64_t>(cache->changes.page_table_entries.size());
    c.entries = cache->changes.page_table_entries.data();
    return CopyOut(c, out, "out");
  });
}

}  // extern "C"
