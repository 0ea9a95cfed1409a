#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvmem/kv_cache.h"
#include "src/status_macros.h"
#include "tools/kvbench/bench_util.h"
#include "tools/kvbench/virtual_cache.h"

namespace kvbench {

absl::StatusOr<VirtualCacheBatch> MakeVirtualCacheBatch(kvmem::Arrangement arrangement, int layers,
                                                        int kv_heads, int head_dim,
                                                        const std::vector<int32_t>& lens,
                                                        int64_t max_context) {
  kvmem::KvCacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.dtype = kvmem::DType::kBFloat16;
  c.layout = kvmem::Layout::kVirtual;
  c.arrangement = arrangement;
  c.max_requests = static_cast<int>(lens.size());
  c.max_context = max_context;
  c.device = kvmem::DeviceKind::kCuda;
  // Exactly the pages the batch maps: per request, its bytes rounded up to 2 MiB pages,
  // once for the all-layer row, once per layer and K/V for the per-layer tensors.
  constexpr int64_t kPage = int64_t{2} << 20;
  const bool all = arrangement == kvmem::Arrangement::kAllLayers;
  const int64_t per_token = all ? c.TokenBytes() : c.TokenLayerBytes();
  const int64_t tensors = all ? 1 : 2 * int64_t{layers};
  c.memory_budget_bytes = 0;
  for (int32_t len : lens) c.memory_budget_bytes += (len * per_token + kPage - 1) / kPage * kPage;
  c.memory_budget_bytes = std::max(kPage, c.memory_budget_bytes * tensors);

  VirtualCacheBatch out;
  KVMEM_ASSIGN_OR_RETURN(out.cache, kvmem::KvCache::Create(c));
  std::vector<kvmem::RequestId> ids;
  for (size_t i = 0; i < lens.size(); ++i) {
    KVMEM_RETURN_IF_ERROR(out.cache->AddRequest(i).status());
    KVMEM_RETURN_IF_ERROR(out.cache->Extend(i, lens[i]).status());
    ids.push_back(i);
  }
  KVMEM_RETURN_IF_ERROR(out.cache->CheckInvariants());
  KVMEM_RETURN_IF_ERROR(out.cache->BuildBatchMetadata(ids, &out.meta));
  for (int l = 0; l < layers; ++l) {
    KVMEM_ASSIGN_OR_RETURN(kvmem::VirtualKv v, out.cache->VirtualView(l, out.meta));
    out.views.push_back(v);
  }
  // Fill what each row holds: all-layer, the row's tokens from layer 0's K on cover every
  // layer; per-layer, each layer's K and V rows.
  const int64_t elem = 2;
  for (int l = 0; l < (arrangement == kvmem::Arrangement::kAllLayers ? 1 : layers); ++l) {
    const kvmem::VirtualKv& v = out.views[l];
    for (size_t i = 0; i < lens.size(); ++i) {
      const int64_t row = out.meta.row_ids[i];
      const int64_t bytes = int64_t{lens[i]} * v.token_stride * elem;
      if (bytes == 0) continue;
      for (void* base : {v.k, v.v}) {
        if (arrangement == kvmem::Arrangement::kAllLayers && base == v.v) continue;
        void* p = static_cast<char*>(base) + row * v.row_stride * elem;
        if (!FillRandom(p, bytes, static_cast<uint32_t>(7 + l + i), "virtual cache batch")) {
          return absl::InternalError(absl::StrCat("cannot fill row ", row, " of layer ", l));
        }
      }
    }
  }
  return out;
}

}  // namespace kvbench
