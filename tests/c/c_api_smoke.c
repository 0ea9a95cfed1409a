/* A C program over kvmem's C ABI: the header compiles as C99 (-pedantic-errors) and a
 * cache works through it. Built twice: into c_api_test (kvmem_c_smoke, static library) and
 * as c_api_shared_smoke, a C executable linked with libkvmem.so. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kvmem/c_api.h"

#define CHECK_OK(call)                                                              \
  do {                                                                              \
    kvmem_status s_ = (call);                                                       \
    if (s_ != KVMEM_OK) {                                                           \
      fprintf(stderr, "%s: %s: %s\n", #call, kvmem_status_name(s_), kvmem_last_error()); \
      return 1;                                                                     \
    }                                                                               \
  } while (0)

int kvmem_c_smoke(void) {
  kvmem_config config;
  kvmem_cache* cache = NULL;
  uint64_t ids[2] = {7, 8};
  int64_t counts[2] = {5, 3};
  int64_t loc[8];
  int64_t length = 0;
  kvmem_stats stats;
  kvmem_layer_view view;
  kvmem_running_batch batch;

  CHECK_OK(kvmem_config_init(&config));
  config.num_layers = 2;
  config.num_kv_heads = 2;
  config.head_dim = 16;
  config.max_requests = 4;
  config.max_context = 64;
  config.memory_budget_bytes = 1 << 20;
  config.host_granularity = 4096;
  CHECK_OK(kvmem_cache_create(&config, &cache));
  CHECK_OK(kvmem_add_request(cache, 7, NULL));
  CHECK_OK(kvmem_add_request(cache, 8, NULL));
  CHECK_OK(kvmem_set_running_batch(cache, ids, 2));
  CHECK_OK(kvmem_extend_batch(cache, ids, counts, 2, loc, 8));
  CHECK_OK(kvmem_length(cache, 7, &length));
  if (length != 5) return 2;
  memset(&batch, 0, sizeof(batch));
  batch.struct_size = sizeof(batch);
  CHECK_OK(kvmem_running_batch_get(cache, &batch));
  if (batch.size != 2 || batch.seq_lens[0] != 5 || batch.seq_lens[1] != 3) return 3;
  memset(&view, 0, sizeof(view));
  view.struct_size = sizeof(view);
  CHECK_OK(kvmem_layer_view_get(cache, 1, &view));
  if (view.k == NULL || view.ndim != 4 || view.shape[1] != config.page_tokens) return 4;
  if (kvmem_length(cache, 99, &length) != KVMEM_NOT_FOUND) return 5;
  CHECK_OK(kvmem_free_batch(cache, ids, 2, NULL));
  memset(&stats, 0, sizeof(stats));
  stats.struct_size = sizeof(stats);
  CHECK_OK(kvmem_get_stats(cache, &stats));
  if (stats.num_requests != 0) return 6;
  CHECK_OK(kvmem_check_invariants(cache));
  kvmem_cache_destroy(cache);
  return 0;
}

#ifdef KVMEM_C_SMOKE_MAIN
int main(void) {
  int rc = kvmem_c_smoke();
  printf("kvmem %s (CUDA %d) from C: %s\n", kvmem_version(), kvmem_has_cuda(),
         rc == 0 ? "ok" : "FAILED");
  return rc;
}
#endif
