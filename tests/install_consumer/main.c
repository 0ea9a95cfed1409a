/* A C program on the installed libkvmem.so. */
#include <stdio.h>

#include "kvmem/c_api.h"

int main(void) {
  kvmem_config c;
  kvmem_cache* cache = NULL;
  int64_t loc[8];
  kvmem_config_init(&c);
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.max_requests = 4;
  c.max_context = 128;
  c.memory_budget_bytes = 16 << 20;
  if (kvmem_cache_create(&c, &cache) != KVMEM_OK ||
      kvmem_add_request(cache, 1, NULL) != KVMEM_OK ||
      kvmem_extend(cache, 1, 8, loc, 8) != KVMEM_OK) {
    fprintf(stderr, "kvmem: %s\n", kvmem_last_error());
    return 1;
  }
  kvmem_cache_destroy(cache);
  printf("kvmem %s: C ok\n", kvmem_version());
  return 0;
}
