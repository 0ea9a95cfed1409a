// Budgets sized to what a benchmark maps, from kvmem's public memory plan
// (kvmem/memory_plan.h), so that a cache holds exactly the pages its requests need.
#ifndef KVMEM_TOOLS_KVBENCH_SIZING_H_
#define KVMEM_TOOLS_KVBENCH_SIZING_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "kvmem/memory_plan.h"

namespace kvbench {

// The layout's pages (MemoryPlan::page_bytes each) that one request of `tokens` tokens
// holds in a cache of `config`'s shape, whose plan is `plan`: every segment's pages of
// the request's whole chunks. It is the plan of the same shape with max_context = tokens
// and the chunk that `plan` resolved (a shorter max_context could resolve a smaller one),
// on the host at the plan's granularity, so no device is opened. 0 for 0 tokens.
absl::StatusOr<int64_t> RequestPages(const kvmem::KvCacheConfig& config,
                                     const kvmem::MemoryPlan& plan, int64_t tokens);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_SIZING_H_
