// Uses kvmem's C++ API and its C ABI from an installed package.
#include <cstdio>
#include <memory>

#include "kvmem/c_api.h"
#include "kvmem/kvmem.h"

int main() {
  kvmem::KvCacheConfig config;
  config.num_layers = 2;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  config.max_requests = 4;
  config.max_context = 128;
  config.memory_budget_bytes = 16 << 20;
  auto cache = kvmem::KvCache::Create(config);
  if (!cache.ok()) {
    std::fprintf(stderr, "Create: %s\n", cache.status().ToString().c_str());
    return 1;
  }
  if (!(*cache)->AddRequest(1).ok()) return 2;
  auto slots = (*cache)->Extend(1, 20);
  if (!slots.ok() || slots->size() != 20) return 3;
  if (!(*cache)->CheckInvariants().ok()) return 4;
  // The C ABI from the same library.
  kvmem_config c;
  kvmem_config_init(&c);
  c.num_layers = -1;
  kvmem_cache* handle = nullptr;
  if (kvmem_cache_create(&c, &handle) != KVMEM_INVALID_ARGUMENT) return 5;
  std::printf("kvmem %s: C++ API and C ABI ok (%zu slots; C error: %s)\n", kvmem_version(),
              slots->size(), kvmem_last_error());
  return 0;
}
