// MakeVirtualCacheBatch (virtual_cache.h): the cache, its requests and the fill.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "tools/kvbench/bench_util.h"
#include "tools/kvbench/sizing.h"
#include "tools/kvbench/status_macros.h"
#include "tools/kvbench/virtual_cache.h"

namespace kvbench {

absl::StatusOr<VirtualCacheBatch> MakeVirtualCacheBatch(kvmem::Arrangement arrangement, int layers,
                                                        int chunk_tokens, int kv_heads,
                                                        int head_dim,
                                                        const std::vector<int32_t>& lens,
                                                        int64_t max_context) {
  if (layers < 1)
    return absl::InvalidArgumentError(absl::StrCat("virtual cache batch: ", layers, " layers"));
  kvmem::KvCacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.dtype = kvmem::DType::kBFloat16;
  c.layout = kvmem::Layout::kVirtual;
  c.arrangement = arrangement;
  c.chunk_tokens = chunk_tokens;
  c.max_requests = static_cast<int>(lens.size());
  c.max_context = max_context;
  c.device = kvmem::DeviceKind::kCuda;
  // Exactly the pages the batch maps: per request and segment (the all-layer row, or
  // each layer's K and V), its whole chunks' bytes rounded up to the driver's pages.
  const bool all = arrangement == kvmem::Arrangement::kAllLayers;
  KVBENCH_ASSIGN_OR_RETURN(const kvmem::MemoryPlan plan, kvmem::PlanMinimalMemory(c));
  int64_t pages = 0;
  for (int32_t len : lens) {
    KVBENCH_ASSIGN_OR_RETURN(const int64_t request, RequestPages(c, plan, len));
    pages += request;
  }
  c.memory_budget_bytes = std::max(pages * plan.page_bytes, plan.min_budget_bytes);

  VirtualCacheBatch out;
  KVBENCH_ASSIGN_OR_RETURN(out.cache, kvmem::KvCache::Create(c));
  std::vector<kvmem::RequestId> ids;
  for (size_t i = 0; i < lens.size(); ++i) {
    KVBENCH_RETURN_IF_ERROR(out.cache->AddRequest(i).status());
    KVBENCH_RETURN_IF_ERROR(out.cache->Extend(i, lens[i]).status());
    ids.push_back(i);
  }
  KVBENCH_RETURN_IF_ERROR(out.cache->CheckInvariants());
  KVBENCH_RETURN_IF_ERROR(out.cache->BuildBatchMetadata(ids, &out.meta));
  for (int l = 0; l < layers; ++l) {
    KVBENCH_ASSIGN_OR_RETURN(kvmem::VirtualKv v, out.cache->VirtualView(l, out.meta));
    out.views.push_back(v);
  }
  // Fill what each row holds. All-layer: one tensor, the row's whole chunks from layer
  // 0's K on cover every layer's K and V. Per-layer: each layer's K and V tensors.
  std::vector<void*> tensors;
  for (const kvmem::VirtualKv& v : out.views) {
    tensors.push_back(v.k);
    if (all) break;
    tensors.push_back(v.v);
  }
  const kvmem::VirtualKv& shape = out.views[0];  // strides are the same for every tensor
  constexpr int64_t kElem = 2;                   // bf16
  for (size_t t = 0; t < tensors.size(); ++t) {
    for (size_t i = 0; i < lens.size(); ++i) {
      const int64_t chunk = int64_t{1} << shape.chunk_shift;
      const int64_t bytes = shape.InRow((lens[i] + chunk - 1) / chunk * chunk) * kElem;
      if (bytes == 0) continue;
      void* p = static_cast<char*>(tensors[t]) + out.meta.row_ids[i] * shape.row_stride * kElem;
      if (!FillRandom(p, bytes, static_cast<uint32_t>(7 + t + i), "virtual cache batch")) {
        return absl::InternalError(absl::StrCat("cannot fill row ", out.meta.row_ids[i]));
      }
    }
  }
  return out;
}

}  // namespace kvbench
