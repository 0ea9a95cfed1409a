// A paged pool as serving leaves it, for kvbench decode: the page tables come from
// kvmem's own paged KvCache (host backend, bookkeeping only) driven through request
// churn, so they show the placement an engine would get (PagePlacement), not a
// benchmark's choice of in-order or fully shuffled pages.
#ifndef KVMEM_TOOLS_KVBENCH_GROWN_POOL_H_
#define KVMEM_TOOLS_KVBENCH_GROWN_POOL_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kvmem/config.h"

namespace kvbench {

struct GrownPool {
  std::vector<int32_t> table;  // batch rows of `stride` page ids
  int64_t stride = 0;          // pages per request: ceil(ctx / page_tokens)
  int64_t num_pages = 0;       // pool size: every id in table is below it
};

// A pool of 1.25x the batch's pages, rounded up to 64: mapped whole (elastic = false, as
// engines preallocate theirs) or elastic (kvmem's default: mapped 2 MiB chunk by chunk
// as pages are needed, the requests growing at the top of the mapped pages sharing the
// chunks mapped for them). Decode steps grow every live
// request by one token; a request ends at its target length and a new one arrives
// (prompt written at once) while fewer than `batch` are live. First 3 x batch
// background requests (prompt 1..ctx/2 tokens, target up to ctx) churn the pool; then
// the arrivals are the batch's requests (prompt ctx/4..ctx/2, target ctx) and the
// steps go on until all `batch` of them hold ctx tokens. Deterministic for a seed.
absl::StatusOr<GrownPool> GrowPool(int batch, int64_t ctx, int page_tokens,
                                   kvmem::PagePlacement placement, bool elastic, uint32_t seed);

// Share of consecutive page pairs (i, i + 1) within the rows of `table` (rows of
// `stride` ids) whose ids are adjacent: 1 for pages in order, ~0 for shuffled ones.
// row_pages, when given, is the number of pages in use in each row (the rest are not
// counted); otherwise whole rows.
double AdjacentShare(const std::vector<int32_t>& table, int64_t stride,
                     const std::vector<int64_t>& row_pages = {});

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_GROWN_POOL_H_
