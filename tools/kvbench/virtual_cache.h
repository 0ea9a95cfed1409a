// A batch held by kvmem's own virtual KvCache on the GPU, for kvbench decode (CUDA
// builds only): the K/V memory is the cache's (2 MiB physical handles from cuMemCreate mapped into
// one reservation, in the cache's arrangement), not a cudaMalloc'd tensor shaped like it. Address
// translation is what separates the two: which 2 MiB pages back a request, and how the driver maps
// them, decides how many translation entries a decode step needs.
#ifndef KVMEM_TOOLS_KVBENCH_VIRTUAL_CACHE_H_
#define KVMEM_TOOLS_KVBENCH_VIRTUAL_CACHE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"

namespace kvbench {

struct VirtualCacheBatch {
  std::unique_ptr<kvmem::KvCache> cache;
  kvmem::BatchMetadata meta;            // the batch's rows and lengths
  std::vector<kvmem::VirtualKv> views;  // one per layer (row_ids point into meta)
};

// A CUDA virtual cache of `layers` layers of the given shape and arrangement (all
// layers: in chunks of `chunk_tokens`, KvCacheConfig's meaning), holding one request per
// entry of `lens` at that length (rows mapped synchronously, no mapper), every mapped K/V
// byte filled with random bf16 bits.
absl::StatusOr<VirtualCacheBatch> MakeVirtualCacheBatch(kvmem::Arrangement arrangement, int layers,
                                                        int chunk_tokens, int kv_heads,
                                                        int head_dim,
                                                        const std::vector<int32_t>& lens,
                                                        int64_t max_context);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_VIRTUAL_CACHE_H_
