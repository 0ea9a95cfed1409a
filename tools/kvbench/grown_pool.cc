#include "tools/kvbench/grown_pool.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "tools/kvbench/status_macros.h"

namespace kvbench {
namespace {

using kvmem::RequestId;

struct LiveRequest {
  RequestId id;
  int64_t len;
  int64_t target;
  bool measured;
};

}  // namespace

absl::StatusOr<GrownPool> GrowPool(int batch, int64_t ctx, int page_tokens,
                                   kvmem::PagePlacement placement, bool elastic, uint32_t seed) {
  if (batch < 1 || ctx < 1 || page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("grown pool: batch ", batch, ", ctx ", ctx, ", page_tokens ", page_tokens));
  }
  GrownPool out;
  out.stride = (ctx + page_tokens - 1) / page_tokens;
  const int64_t pages = (out.stride * batch * 5 / 4 + 63) / 64 * 64;

  // Page ids depend on page counts only, so a tiny token (one layer, one KV head of 8
  // bf16, 16 bytes per pool) stands for the model's. A 16 KiB granule then holds as many
  // pages as a 2 MiB GPU granule of the model shape (2 KiB per token and pool), so an
  // elastic pool grows in the same steps as on the GPU.
  kvmem::KvCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.head_dim = 8;
  c.dtype = kvmem::DType::kBFloat16;
  c.layout = kvmem::Layout::kPaged;
  c.page_tokens = page_tokens;
  c.page_placement = placement;
  c.max_requests = batch;
  c.max_context = ctx;
  c.device = kvmem::DeviceKind::kHost;
  c.host_granularity = 16384;
  c.elastic_pool = elastic;
  const int64_t pool_bytes = pages * page_tokens * c.TokenLayerBytes();
  const int64_t granules = (pool_bytes + c.host_granularity - 1) / c.host_granularity;
  c.memory_budget_bytes = 2 * granules * c.host_granularity;  // a K and a V pool
  KVBENCH_ASSIGN_OR_RETURN(std::unique_ptr<kvmem::KvCache> cache, kvmem::KvCache::Create(c));

  std::mt19937 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, std::max(lo, hi))(rng);
  };
  std::vector<LiveRequest> live;
  std::vector<RequestId> measured_ids;
  RequestId next_id = 0;
  const int background = 3 * batch;
  auto admit = [&](bool measured) -> absl::Status {
    const int64_t prompt =
        measured ? uniform(std::max<int64_t>(1, ctx / 4), ctx / 2) : uniform(1, ctx / 2);
    const int64_t target = measured ? ctx : uniform(prompt, ctx);
    const RequestId id = next_id++;
    KVBENCH_RETURN_IF_ERROR(cache->AddRequest(id).status());
    KVBENCH_RETURN_IF_ERROR(cache->Extend(id, prompt).status());
    live.push_back({id, prompt, target, measured});
    if (measured) measured_ids.push_back(id);
    return absl::OkStatus();
  };
  for (;;) {
    while (static_cast<int>(live.size()) < batch) {
      if (static_cast<int64_t>(next_id) < background) {
        KVBENCH_RETURN_IF_ERROR(admit(false));
      } else if (static_cast<int>(measured_ids.size()) < batch) {
        KVBENCH_RETURN_IF_ERROR(admit(true));
      } else {
        break;
      }
    }
    bool grew = false;
    for (LiveRequest& r : live) {
      if (r.len == r.target) continue;
      KVBENCH_RETURN_IF_ERROR(cache->Extend(r.id, 1).status());
      ++r.len;
      grew = true;
    }
    // Background requests that reached their target end; measured ones stay at ctx.
    for (size_t i = 0; i < live.size();) {
      if (!live[i].measured && live[i].len == live[i].target) {
        KVBENCH_RETURN_IF_ERROR(cache->Free(live[i].id));
        live[i] = live.back();
        live.pop_back();
      } else {
        ++i;
      }
    }
    if (!grew && static_cast<int>(measured_ids.size()) == batch &&
        static_cast<int>(live.size()) == batch) {
      break;  // every live request is a measured one at ctx
    }
  }
  KVBENCH_RETURN_IF_ERROR(cache->CheckInvariants());
  out.table.reserve(out.stride * batch);
  for (RequestId id : measured_ids) {
    KVBENCH_ASSIGN_OR_RETURN(std::vector<int32_t> row, cache->BlockTable(id));
    if (static_cast<int64_t>(row.size()) != out.stride) {
      return absl::InternalError(absl::StrCat("grown pool: request ", id, " holds ", row.size(),
                                              " pages, not ", out.stride));
    }
    out.table.insert(out.table.end(), row.begin(), row.end());
  }
  out.num_pages = cache->GetStats().pages_total;
  return out;
}

double AdjacentShare(const std::vector<int32_t>& table, int64_t stride,
                     const std::vector<int64_t>& row_pages) {
  int64_t pairs = 0;
  int64_t adjacent = 0;
  for (size_t i = 1; i < table.size(); ++i) {
    const int64_t in_row = static_cast<int64_t>(i) % stride;
    if (in_row == 0) continue;  // a row's first page
    const size_t row = i / stride;
    if (!row_pages.empty() && (row >= row_pages.size() || in_row >= row_pages[row])) continue;
    ++pairs;
    adjacent += table[i] == table[i - 1] + 1;
  }
  return pairs == 0 ? 1.0 : static_cast<double>(adjacent) / static_cast<double>(pairs);
}

}  // namespace kvbench
