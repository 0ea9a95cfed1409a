/* kvmem's C ABI: the KvCache facade, its running batch and the attention kernels for C,
 * ctypes / cffi, Rust and any language with a C FFI. Plain C (C99), no C++ types; the
 * Python package (docs/python.md) is written over it.
 *
 *   kvmem_config c;
 *   kvmem_config_init(&c);                      // defaults, c.struct_size set
 *   c.num_layers = 32; ...
 *   kvmem_cache* cache;
 *   if (kvmem_cache_create(&c, &cache) != KVMEM_OK) puts(kvmem_last_error());
 *   kvmem_add_request(cache, 7, NULL);
 *   kvmem_extend_batch(cache, ids, counts, n, out_loc, out_capacity);
 *   ...
 *   kvmem_cache_destroy(cache);
 *
 * The contract of every function:
 *  - It returns a kvmem_status: KVMEM_OK (0) or one of absl's status codes, same numbers
 *    (docs/errors.md says which call returns which). Nothing throws across the ABI,
 *    nothing aborts: a NULL handle or pointer where one is required, a count < 0 or an
 *    index out of range is KVMEM_INVALID_ARGUMENT or KVMEM_OUT_OF_RANGE, and C++
 *    exceptions (std::bad_alloc) come back as KVMEM_RESOURCE_EXHAUSTED / KVMEM_INTERNAL.
 *  - On an error, kvmem_last_error() returns its message on the calling thread (one buffer
 *    per thread, valid until that thread's next failing call); a successful call leaves it
 *    as it was. Outputs are written only on success. The cache is as before the failed
 *    call (the C++ API's all-or-nothing rule, docs/errors.md).
 *  - Handles are opaque. A cache handle may be used from several threads at once (each
 *    call is atomic, as KvCache's methods are), except kvmem_take_running_batch_changes
 *    and kvmem_device_running_batch_upload (one thread at a time per cache). Workspaces
 *    and device mirrors are for one thread and one stream at a time.
 *  - Structs that may grow carry struct_size: set it to sizeof(the struct) as your header
 *    knows it (the *_init functions do). The library reads and writes only the first
 *    struct_size bytes; fields past them keep their defaults. Fields are only appended.
 *  - Memory returned through pointers (views, running batch arrays, change lists) belongs
 *    to the cache (or the mirror) and stays valid until it is destroyed; contents change
 *    with later calls.
 *  - Kernels (kvmem_append_kv, kvmem_decode, kvmem_extend, the device running batch) need
 *    a library built with CUDA: elsewhere they return KVMEM_UNIMPLEMENTED ("kvmem was
 *    built without CUDA"); kvmem_has_cuda() says which build this is. They take device
 *    pointers and a cudaStream_t (kvmem_stream; NULL is the legacy default stream), are
 *    asynchronous on that stream and check their arguments before launching anything.
 */
#ifndef KVMEM_C_API_H_
#define KVMEM_C_API_H_

#include <stddef.h>
#include <stdint.h>

#include "kvmem/platform.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Status ------------------------------------------------------------------------- */

typedef int32_t kvmem_status;
enum {
  KVMEM_OK = 0,
  KVMEM_CANCELLED = 1,
  KVMEM_UNKNOWN = 2,
  KVMEM_INVALID_ARGUMENT = 3,
  KVMEM_DEADLINE_EXCEEDED = 4,
  KVMEM_NOT_FOUND = 5,
  KVMEM_ALREADY_EXISTS = 6,
  KVMEM_PERMISSION_DENIED = 7,
  KVMEM_RESOURCE_EXHAUSTED = 8, /* out of memory or of request rows */
  KVMEM_FAILED_PRECONDITION = 9,
  KVMEM_ABORTED = 10,
  KVMEM_OUT_OF_RANGE = 11,
  KVMEM_UNIMPLEMENTED = 12, /* also: a kernel in a build without CUDA */
  KVMEM_INTERNAL = 13,
  KVMEM_UNAVAILABLE = 14,
  KVMEM_DATA_LOSS = 15,
  KVMEM_UNAUTHENTICATED = 16
};

/* The message of this thread's last failed call ("" if none). */
KVMEM_EXPORT const char* kvmem_last_error(void);
/* "OK", "INVALID_ARGUMENT", ... ("UNKNOWN" for a number that is no code). */
KVMEM_EXPORT const char* kvmem_status_name(kvmem_status code);
/* "0.2.0": the library's version; the ABI changes only with major.minor (the SONAME). */
KVMEM_EXPORT const char* kvmem_version(void);
/* 1 when the library was built with its CUDA parts (kernels, CUDA backend), else 0. */
KVMEM_EXPORT int32_t kvmem_has_cuda(void);

/* ---- Configuration (kvmem/config.h's KvCacheConfig) ---------------------------------- */

enum { KVMEM_DTYPE_FLOAT32 = 0, KVMEM_DTYPE_BFLOAT16 = 1, KVMEM_DTYPE_FLOAT16 = 2 };
enum { KVMEM_LAYOUT_PAGED = 0, KVMEM_LAYOUT_VIRTUAL = 1 };
enum { KVMEM_ARRANGEMENT_ALL_LAYERS = 0, KVMEM_ARRANGEMENT_PER_LAYER = 1 };
enum { KVMEM_DEVICE_HOST = 0, KVMEM_DEVICE_CUDA = 1 };
enum { KVMEM_PLACEMENT_CONTIGUOUS = 0, KVMEM_PLACEMENT_LOWEST_FIRST = 1 };

/* Every field as KvCacheConfig documents it (same defaults). Version 1: 88 bytes. */
typedef struct kvmem_config {
  uint32_t struct_size; /* sizeof(kvmem_config) of the caller's header */
  int32_t num_layers;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t dtype;          /* KVMEM_DTYPE_* */
  int32_t layout;         /* KVMEM_LAYOUT_* */
  int32_t arrangement;    /* KVMEM_ARRANGEMENT_*, virtual only */
  int32_t chunk_tokens;   /* virtual all-layer rows; 0 picks */
  int32_t page_tokens;    /* paged only */
  int32_t page_placement; /* KVMEM_PLACEMENT_*, paged only */
  int32_t max_requests;
  int32_t device; /* KVMEM_DEVICE_* */
  int64_t max_context;
  int64_t memory_budget_bytes;
  int32_t device_ordinal;
  int32_t elastic_pool; /* 0 or 1, paged only */
  int64_t host_granularity;
  int64_t map_ahead_tokens; /* virtual only */
} kvmem_config;

/* Fills *config with KvCacheConfig's defaults and struct_size = sizeof(kvmem_config). */
KVMEM_EXPORT kvmem_status kvmem_config_init(kvmem_config* config);

/* ---- The cache ------------------------------------------------------------------------ */

typedef struct kvmem_cache kvmem_cache;

/* Creates a cache (KvCache::Create). INVALID_ARGUMENT for a bad config (a field out of
 * range, an enum value that is none of its values, struct_size smaller than version 1),
 * RESOURCE_EXHAUSTED / UNAVAILABLE as Create. *out is set only on success. */
KVMEM_EXPORT kvmem_status kvmem_cache_create(const kvmem_config* config, kvmem_cache** out);
/* Destroys the cache and everything it owns; NULL is a no-op. REQUIRES: no kernel still
 * reads its memory, and nothing uses views or arrays taken from it afterwards. */
KVMEM_EXPORT void kvmem_cache_destroy(kvmem_cache* cache);
/* The cache's configuration (up to out->struct_size bytes; set it first). */
KVMEM_EXPORT kvmem_status kvmem_cache_config(const kvmem_cache* cache, kvmem_config* out);

/* Request ids are any uint64. row_out may be NULL. */
KVMEM_EXPORT kvmem_status kvmem_add_request(kvmem_cache* cache, uint64_t id, int32_t* row_out);
/* Memory for n more tokens of id; their locations go to out_loc[0..n) (capacity entries
 * available: INVALID_ARGUMENT when capacity < n). */
KVMEM_EXPORT kvmem_status kvmem_extend(kvmem_cache* cache, uint64_t id, int64_t n,
                                       int64_t* out_loc, int64_t capacity);
KVMEM_EXPORT kvmem_status kvmem_truncate(kvmem_cache* cache, uint64_t id, int64_t new_length);
KVMEM_EXPORT kvmem_status kvmem_fork(kvmem_cache* cache, uint64_t parent, uint64_t child,
                                     int32_t* row_out);
/* Ends id; its memory is reused after `fence` completes: a CUevent / cudaEvent_t on the
 * CUDA backend, a pointer to a C++ std::atomic<bool> on the host backend, NULL for now.
 * The cache queries the fence until it completes, so it must stay valid that long (not
 * destroyed): an engine records one event again before each free. */
KVMEM_EXPORT kvmem_status kvmem_free(kvmem_cache* cache, uint64_t id, void* fence);

/* The step's batch calls (KvCache::ExtendBatch / TruncateBatch / FreeBatch): one lock,
 * all or nothing. ids and counts / new_lengths have n entries (n >= 0; NULL allowed when
 * n == 0); out_loc has out_capacity entries, at least sum(counts). */
KVMEM_EXPORT kvmem_status kvmem_extend_batch(kvmem_cache* cache, const uint64_t* ids,
                                             const int64_t* counts, int64_t n, int64_t* out_loc,
                                             int64_t out_capacity);
KVMEM_EXPORT kvmem_status kvmem_truncate_batch(kvmem_cache* cache, const uint64_t* ids,
                                               const int64_t* new_lengths, int64_t n);
KVMEM_EXPORT kvmem_status kvmem_free_batch(kvmem_cache* cache, const uint64_t* ids, int64_t n,
                                           void* fence);

KVMEM_EXPORT kvmem_status kvmem_length(const kvmem_cache* cache, uint64_t id, int64_t* out);
KVMEM_EXPORT kvmem_status kvmem_row(const kvmem_cache* cache, uint64_t id, int32_t* out);
/* *out = 1 if id is a live request, else 0. */
KVMEM_EXPORT kvmem_status kvmem_contains(const kvmem_cache* cache, uint64_t id, int32_t* out);
/* The request's index row (its Length() slots) into out[0..capacity); *length_out gets
 * the length. OUT_OF_RANGE when capacity is too small (*length_out then says how much
 * is needed; nothing else is written). */
KVMEM_EXPORT kvmem_status kvmem_req_to_token(const kvmem_cache* cache, uint64_t id, int32_t* out,
                                             int64_t capacity, int64_t* length_out);
/* Paged: the request's page ids, as kvmem_req_to_token. FAILED_PRECONDITION for virtual. */
KVMEM_EXPORT kvmem_status kvmem_block_table(const kvmem_cache* cache, uint64_t id, int32_t* out,
                                            int64_t capacity, int64_t* count_out);
/* Gives back memory no request holds (KvCache::Trim); *bytes_out (may be NULL): bytes. */
KVMEM_EXPORT kvmem_status kvmem_trim(kvmem_cache* cache, int64_t* bytes_out);
/* INTERNAL with the violated invariant's description (a kvmem bug). */
KVMEM_EXPORT kvmem_status kvmem_check_invariants(const kvmem_cache* cache);

/* kvmem/stats.h's Stats (the scalar fields and the backend's live counts). */
typedef struct kvmem_stats {
  uint32_t struct_size;
  uint32_t reserved;
  int64_t num_requests;
  int64_t logical_tokens;
  int64_t stored_tokens;
  int64_t live_bytes;
  int64_t held_bytes;
  int64_t idle_bytes;
  int64_t mapped_bytes;
  int64_t physical_bytes;
  int64_t budget_bytes;
  int64_t page_bytes;
  int64_t pages_total;
  int64_t pages_free;
  int64_t pages_used;
  int64_t pages_shared;
  int64_t pages_quarantined;
  int64_t peak_requests;
  int64_t peak_held_bytes;
  int64_t peak_live_bytes;
  int64_t extends;
  int64_t forks;
  int64_t cow_copies;
  int64_t pages_reclaimed;
  int64_t map_stalls;
  int64_t pool_create_nanos;
  int64_t vmm_calls;
  int64_t vmm_nanos;
  int64_t vmm_live_reservations;
  int64_t vmm_live_handles;
  int64_t vmm_mapped_granules;
} kvmem_stats;

/* Fills up to out->struct_size bytes (set it to sizeof(kvmem_stats) first). */
KVMEM_EXPORT kvmem_status kvmem_get_stats(const kvmem_cache* cache, kvmem_stats* out);

/* ---- Views of a layer: everything a kernel needs (kvmem/kv_accessor.h) ----------------- */

/* One layer's K and V. The accessor fields are PagedKv's or VirtualKv's (by layout); the
 * batch index (page table / row ids) is not part of a layer: a kernel takes it from the
 * running batch, its device mirror or a workspace. ndim / shape / strides describe K (V
 * is the same at v) as a strided array in elements, the form DLPack wants:
 *   paged:                 [num_pages, page_tokens, kv_heads, head_dim]
 *   virtual without chunks [max_requests, max_context, kv_heads, head_dim]
 *   virtual in chunks      [max_requests, chunks, chunk_tokens, kv_heads, head_dim]
 * (chunks = ceil(max_context / chunk_tokens)). Only the pages and rows that hold tokens
 * are mapped: reading elsewhere faults (host) or is an illegal address (CUDA). */
typedef struct kvmem_layer_view {
  uint32_t struct_size;
  int32_t layout; /* KVMEM_LAYOUT_* */
  int32_t dtype;  /* KVMEM_DTYPE_* */
  int32_t device; /* KVMEM_DEVICE_*: where k and v point */
  int32_t device_ordinal;
  int32_t ndim;
  void* k;
  void* v;
  int64_t shape[6];
  int64_t strides[6];
  /* PagedKv */
  int64_t page_stride;
  int64_t token_stride; /* both layouts */
  int32_t page_tokens;
  int32_t chunk_shift; /* VirtualKv */
  int64_t num_pages;
  /* VirtualKv */
  int64_t row_stride;
  int64_t max_context;
  int64_t chunk_gap;
} kvmem_layer_view;

/* OUT_OF_RANGE for a layer outside [0, num_layers). */
KVMEM_EXPORT kvmem_status kvmem_layer_view_get(const kvmem_cache* cache, int32_t layer,
                                               kvmem_layer_view* out);

/* ---- The running batch (kvmem/running_batch.h) ------------------------------------------- */

/* RunningBatchView: host arrays at fixed addresses, owned by the cache. For a device
 * mirror (kvmem_device_running_batch_view) the same fields hold device pointers. */
typedef struct kvmem_running_batch {
  uint32_t struct_size;
  int32_t size;
  int32_t max_batch;
  int32_t max_seq_len;
  const int32_t* seq_lens;      /* [max_batch] */
  const int32_t* row_ids;       /* [max_batch] */
  const int32_t* page_table;    /* paged: [max_batch][page_table_stride]; else NULL */
  int64_t page_table_stride;
  const int32_t* last_page_len; /* paged: [max_batch]; else NULL */
} kvmem_running_batch;

/* RunningBatchCsr (FlashInfer's form); paged only. */
typedef struct kvmem_running_batch_csr {
  uint32_t struct_size;
  int32_t size;
  const int32_t* indptr;        /* [max_batch + 1] */
  const int32_t* indices;       /* [max_batch * page_table_stride] */
  const int32_t* last_page_len; /* [max_batch] */
} kvmem_running_batch_csr;

/* RunningBatchChanges: entries points into a buffer of the cache handle, valid until the
 * next kvmem_take_running_batch_changes or kvmem_device_running_batch_upload. */
typedef struct kvmem_running_batch_changes {
  uint32_t struct_size;
  int32_t all;
  int64_t num_entries;
  const int64_t* entries;
} kvmem_running_batch_changes;

/* Makes ids[0..n) the running batch (KvCache::SetRunningBatch). */
KVMEM_EXPORT kvmem_status kvmem_set_running_batch(kvmem_cache* cache, const uint64_t* ids,
                                                  int64_t n);
/* Its arrays. Before the first kvmem_set_running_batch every pointer is NULL, size 0. */
KVMEM_EXPORT kvmem_status kvmem_running_batch_get(const kvmem_cache* cache,
                                                  kvmem_running_batch* out);
/* Packs its CSR form (FAILED_PRECONDITION for virtual). */
KVMEM_EXPORT kvmem_status kvmem_pack_running_batch(kvmem_cache* cache,
                                                   kvmem_running_batch_csr* out);
KVMEM_EXPORT kvmem_status kvmem_take_running_batch_changes(kvmem_cache* cache,
                                                           kvmem_running_batch_changes* out);

/* ---- Kernels (CUDA builds; KVMEM_UNIMPLEMENTED elsewhere) --------------------------------- */

typedef struct CUstream_st* kvmem_stream; /* cudaStream_t */

/* kvmem/reference_attention.h's AttentionShape; the K/V dtype and heads come from the
 * cache. scale 0: 1 / sqrt(head_dim); window_left < 0: no window. */
typedef struct kvmem_attention_options {
  uint32_t struct_size;
  int32_t num_q_heads;
  float scale;
  int32_t window_left;
  int32_t max_batch;      /* 0: the cache's max_requests */
  int32_t fixed_grid;     /* 1 when launches are captured in a CUDA graph */
  int64_t max_new_tokens; /* extend only: most new tokens of a step (0: 16384) */
  int32_t pipeline_stages; /* decode only: 0 picks */
  int32_t max_ctas;        /* extend only: 0 = all SMs */
} kvmem_attention_options;

KVMEM_EXPORT kvmem_status kvmem_attention_options_init(kvmem_attention_options* options);

/* Writes num_tokens new tokens' K and V to their slots in layers
 * [first_layer, first_layer + num_layers) (AppendKv): token t of layer l at
 * k + (l * layer_stride + t * token_stride) elements (0 strides: packed
 * [num_layers][num_tokens][kv_heads][head_dim]). slots: device int64 [num_tokens]
 * (negative: skipped). k, v, slots are device pointers. */
KVMEM_EXPORT kvmem_status kvmem_append_kv(kvmem_cache* cache, int32_t first_layer,
                                          int32_t num_layers, const void* k, const void* v,
                                          int64_t token_stride, int64_t layer_stride,
                                          const int64_t* slots, int64_t num_tokens,
                                          kvmem_stream stream);

/* A device copy of the running batch (DeviceRunningBatch), sized for the cache's. */
typedef struct kvmem_device_running_batch kvmem_device_running_batch;
KVMEM_EXPORT kvmem_status kvmem_device_running_batch_create(const kvmem_cache* cache,
                                                            kvmem_device_running_batch** out);
KVMEM_EXPORT void kvmem_device_running_batch_destroy(kvmem_device_running_batch* mirror);
/* Takes the cache's running-batch changes and enqueues their upload on stream. */
KVMEM_EXPORT kvmem_status kvmem_device_running_batch_upload(kvmem_device_running_batch* mirror,
                                                            kvmem_cache* cache,
                                                            kvmem_stream stream);
/* Device pointers of the mirror's arrays (size, max_seq_len of the last upload). */
KVMEM_EXPORT kvmem_status kvmem_device_running_batch_view(
    const kvmem_device_running_batch* mirror, kvmem_running_batch* out);

/* Decode (DecodeWorkspace + DecodeAttention): one query token per request. */
typedef struct kvmem_decode_workspace kvmem_decode_workspace;
KVMEM_EXPORT kvmem_status kvmem_decode_workspace_create(const kvmem_cache* cache,
                                                        const kvmem_attention_options* options,
                                                        kvmem_decode_workspace** out);
KVMEM_EXPORT void kvmem_decode_workspace_destroy(kvmem_decode_workspace* ws);
/* Plans a step from host arrays: seq_lens[batch]; paged: table[batch][table_stride] page
 * ids; virtual: table[batch] row ids (table_stride ignored). */
KVMEM_EXPORT kvmem_status kvmem_decode_plan(kvmem_decode_workspace* ws, const int32_t* seq_lens,
                                            int32_t batch, const int32_t* table,
                                            int64_t table_stride, kvmem_stream stream);
/* Plans a step of the cache's running batch. Paged: the decode must then read the page
 * table of a device mirror (kvmem_decode's mirror argument). */
KVMEM_EXPORT kvmem_status kvmem_decode_plan_running_batch(kvmem_decode_workspace* ws,
                                                          const kvmem_cache* cache,
                                                          kvmem_stream stream);
/* q, out: device [batch][num_q_heads][head_dim] in the cache's dtype (bf16 / fp16), 16-byte
 * aligned. mirror: NULL to read the workspace's own table (kvmem_decode_plan), or the
 * device running batch to read its table. FAILED_PRECONDITION for a paged plan of the
 * running batch without a mirror. */
KVMEM_EXPORT kvmem_status kvmem_decode(const kvmem_decode_workspace* ws, const kvmem_cache* cache,
                                       int32_t layer, const kvmem_device_running_batch* mirror,
                                       const void* q, void* out, kvmem_stream stream);

/* Extend / prefill (ExtendWorkspace + ExtendAttention): a ragged batch whose request b has
 * prefix_lens[b] cached tokens and new_lens[b] new ones (already appended). */
typedef struct kvmem_extend_workspace kvmem_extend_workspace;
KVMEM_EXPORT kvmem_status kvmem_extend_workspace_create(const kvmem_cache* cache,
                                                        const kvmem_attention_options* options,
                                                        kvmem_extend_workspace** out);
KVMEM_EXPORT void kvmem_extend_workspace_destroy(kvmem_extend_workspace* ws);
/* table as kvmem_decode_plan's (paged: rows of table_stride page ids; virtual: row ids). */
KVMEM_EXPORT kvmem_status kvmem_extend_plan(kvmem_extend_workspace* ws,
                                            const int32_t* prefix_lens, const int32_t* new_lens,
                                            int32_t batch, const int32_t* table,
                                            int64_t table_stride, kvmem_stream stream);
/* q, out: device [total_new][num_q_heads][head_dim], the cache's dtype. */
KVMEM_EXPORT kvmem_status kvmem_extend_attention(const kvmem_extend_workspace* ws,
                                                 const kvmem_cache* cache, int32_t layer,
                                                 const void* q, void* out, kvmem_stream stream);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* KVMEM_C_API_H_ */
