// PlanMemory: what a KvCacheConfig holds before any memory is taken. The numbers are the
// ones KvCache::Create computes (the same layout geometry), so an engine, a tool or a test
// can size a budget, or check that a configuration fits, without creating a cache:
//
//   kvmem::KvCacheConfig config = ...;
//   absl::StatusOr<kvmem::MemoryPlan> plan = kvmem::PlanMemory(config);
//   if (!plan.ok()) ...                 // the InvalidArgument Create would return
//   plan->max_full_requests             // requests at max_context the budget holds
//
//   // The budget one request at max_context needs, whatever the config's budget is:
//   kvmem::PlanMinimalMemory(config)->min_budget_bytes
//
// docs/layouts.md has the arithmetic behind each field.
#ifndef KVMEM_MEMORY_PLAN_H_
#define KVMEM_MEMORY_PLAN_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "kvmem/config.h"
#include "kvmem/platform.h"

namespace kvmem {

struct MemoryPlan {
  Layout layout = Layout::kPaged;
  Arrangement arrangement = Arrangement::kAllLayers;  // kVirtual only

  // Bytes of one physical page of the backend: config.host_granularity on the host, the
  // driver's granularity on CUDA, config.vmm's when one is given.
  int64_t granularity = 0;
  // The budget planned for: config.memory_budget_bytes (PlanMemory) or min_budget_bytes
  // (PlanMinimalMemory).
  int64_t budget_bytes = 0;

  int64_t token_bytes = 0;        // one token over all layers, K and V (TokenBytes)
  int64_t token_layer_bytes = 0;  // one token's K (or V) in one layer (TokenLayerBytes)

  // Tokens a request grows by per unit of memory: paged, page_tokens; virtual rows in
  // chunks, chunk_tokens; otherwise the tokens one physical page holds in a row
  // (granularity / a token's bytes in the row, at least 1: tokens may straddle pages).
  int64_t unit_tokens = 0;
  // Virtual all-layer rows: KvCacheConfig::chunk_tokens resolved (0 picks it); 1 where
  // rows have no chunks (chunk_tokens = 1, per layer) and for paged.
  int64_t chunk_tokens = 1;

  // The layout's pages, as Stats counts them. Paged: a page of page_tokens tokens over all
  // layers. Virtual: one physical page of `granularity` bytes.
  int64_t page_bytes = 0;
  // Pages the budget holds (Stats::pages_total), at most what the rows can use: paged,
  // max_requests full requests' pages (and what int32 slots address); virtual, every row
  // at max_context and one page that copy on write stages.
  int64_t pages_total = 0;
  // Pages one request at max_context holds (virtual: over all its segments, in whole
  // chunks).
  int64_t pages_per_request = 0;
  // Requests at max_context the budget holds at once without sharing (<= max_requests).
  int64_t max_full_requests = 0;
  // The smallest memory_budget_bytes that Create accepts for this shape: one request at
  // max_context (paged: each of the 2 x layers pools rounded up to whole granules).
  int64_t min_budget_bytes = 0;

  // Address space Create reserves (paged: every pool's region; virtual: every row at
  // max_context, and one granule that copy on write stages a page in).
  int64_t reservation_bytes = 0;
  // Physical memory of the full pool. Paged: every pool mapped (a pool that is not
  // elastic maps it in Create, an elastic one as pages are needed). Virtual: its physical
  // pages, all created in Create.
  int64_t physical_bytes = 0;
};

// The plan of `config` at config.memory_budget_bytes. InvalidArgument, with the same
// message as KvCache::Create, for a config that Create rejects before it takes memory: a
// bad shape, a budget that cannot hold one request at max_context (the message gives the
// smallest that can), a shape that overflows the layout's offsets, a pool whose
// bookkeeping or host-backend mappings this host can never hold. (Create's
// ResourceExhausted for a pool that only does not fit beside the process's mappings of
// the moment is no error here.) On CUDA the backend is opened to read the driver's
// granularity: its error (Unavailable without a driver or GPU) is returned as is.
// Nothing is reserved, created or mapped.
KVMEM_EXPORT absl::StatusOr<MemoryPlan> PlanMemory(const KvCacheConfig& config);

// The plan of `config` at the smallest budget that fits (config.memory_budget_bytes is
// ignored): a shape's sizes before a budget is chosen. Errors as PlanMemory's.
KVMEM_EXPORT absl::StatusOr<MemoryPlan> PlanMinimalMemory(const KvCacheConfig& config);

}  // namespace kvmem

#endif  // KVMEM_MEMORY_PLAN_H_
