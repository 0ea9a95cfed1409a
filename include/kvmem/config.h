// KvCacheConfig: the one struct that describes a KV cache (model shape, layout,
// capacity, memory budget, device). See docs/layouts.md for the arithmetic.
#ifndef KVMEM_CONFIG_H_
#define KVMEM_CONFIG_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "kvmem/dtype.h"
#include "kvmem/platform.h"

namespace kvmem {

class Vmm;

// Where K/V live. kPaged: fixed pages and block tables (vLLM / SGLang / FlashInfer).
// kVirtual: one virtual reservation, physical pages mapped on demand (vAttention).
enum class Layout : uint8_t { kPaged = 0, kVirtual = 1 };

// Arrangement of the virtual layout.
//  kAllLayers: one tensor per row, in chunks of chunk_tokens tokens:
//              [row][chunk][layer][k|v][chunk token][kv_head][head_dim]. A row maps whole
//              chunks, so a request wastes at most one chunk (chunk_tokens tokens of every
//              layer). With chunk_tokens = 1 this is [row][token][layer][k|v][...]: a page
//              covers a few tokens of every layer and a request wastes at most one page,
//              but decode, which reads one layer, then touches many pages per byte; on an
//              H100 with 32 layers (16 tokens per 2 MiB page) it ran 3-5 % slower than
//              kPerLayer and paged-16 (docs/kernels.md). The default chunk
//              gives one layer's K and V of a chunk a whole page: decode then runs as fast
//              as kPerLayer and paged-16 (docs/benchmarks.md), but a request wastes
//              up to 64 MiB for Llama-3-8B, and on kvstress's chat mix 80.5 % of held bytes
//              are live against 99.3 % with chunk_tokens = 1 (docs/kvstress.md).
//  kPerLayer:  2 * layers tensors [row][token][kv_head][head_dim] (the vAttention paper);
//              a request wastes up to one page per layer and per K/V.
enum class Arrangement : uint8_t { kAllLayers = 0, kPerLayer = 1 };

enum class DeviceKind : uint8_t { kHost = 0, kCuda = 1 };

// Which free page the paged layout gives a request that needs one.
//  kContiguous:  the page after the request's last one when free, else the start of a
//                new run in the same 64-page group, a wholly free group or the group
//                with the most free pages (PagePool::AllocateNear). A request's pages
//                stay adjacent, so a decode kernel's reads share 2 MiB address-
//                translation entries: on an H100, a pool mapped whole after serving
//                churn decodes 0.5-1.7 % faster than with kLowestFirst (docs/kernels.md).
//                An elastic pool still interleaves the requests that grow while it
//                grows (they share each chunk it maps for them) until churn frees groups.
//  kLowestFirst: the lowest free page: requests growing together interleave their
//                pages; the used pages pack tightest at the bottom of the pool.
// Neither changes how many pages are held, or when an elastic pool grows; Trim() may
// give back less under kContiguous (the used pages are not packed at the bottom).
enum class PagePlacement : uint8_t { kContiguous = 0, kLowestFirst = 1 };

struct KvCacheConfig {
  // Model shape.
  int num_layers = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  DType dtype = DType::kBFloat16;

  Layout layout = Layout::kPaged;
  Arrangement arrangement = Arrangement::kAllLayers;  // kVirtual only
  // kVirtual + kAllLayers: tokens per chunk, a power of two (1: no chunks). 0 picks the
  // smallest power of two whose one layer's K and V fill a backend page (512 tokens for 8
  // KV heads x 128 bf16 on 2 MiB pages), capped at max_context rounded up to a power of two.
  int chunk_tokens = 0;
  int page_tokens = 16;                                       // kPaged only; any value >= 1
  PagePlacement page_placement = PagePlacement::kContiguous;  // kPaged only

  // Capacity. Request rows are [0, max_requests); contexts are [0, max_context] with
  // max_context <= 2^30. kvmem's host bookkeeping grows with both (the paged layout's
  // token index is int32 [max_requests][max_context]): Create rejects a configuration
  // whose bookkeeping could exceed min(8 GiB, a quarter of physical memory).
  int max_requests = 256;
  int64_t max_context = 32768;

  // Physical KV bytes the cache may hold at once (all layers, K and V). Only what
  // max_requests rows at max_context can use is ever taken, so a larger budget is no
  // error (INT64_MAX: "no limit"). On the host backend a full budget must fit the
  // process's mapping limit (vm.max_map_count): one mapping per granule.
  int64_t memory_budget_bytes = int64_t{8} << 30;

  DeviceKind device = DeviceKind::kHost;
  int device_ordinal = 0;
  // Page granularity of the host backend (4 KiB or 2 MiB, the latter mirrors GPUs): a
  // power of two in [4 KiB, 1 GiB] (a copy on write copies one granule).
  int64_t host_granularity = int64_t{2} << 20;

  // Optional backend to use instead of the one `device` selects (fault injection,
  // instrumentation). Shared so the caller can keep a handle to inspect it.
  std::shared_ptr<Vmm> vmm;

  // kPaged: map the pools lazily in granularity chunks as pages are needed
  // (an elastic pool that Trim() shrinks) instead of mapping the budget up front.
  bool elastic_pool = true;

  // kVirtual: number of tokens a growing row is kept mapped ahead of its length by the
  // background mapper (0 disables the mapper; growth maps synchronously). At most
  // max_context.
  int64_t map_ahead_tokens = 0;

  // Automatic prefix caching (docs/prefix_cache.md): full pages whose token ids a request
  // published stay cached after it ends, and later requests with the same prefix start
  // on them (KvCache::AddRequestWithPrefix). Paged layout only: Create returns
  // Unimplemented for the virtual layout with it on.
  bool enable_prefix_cache = false;
  // The most bytes of cached pages that no live request holds; pages beyond it are
  // evicted (least recently used first) as requests end. Memory the cache keeps is also
  // evicted whenever an allocation needs it, so the budget bounds it anyway. >= 0.
  int64_t prefix_cache_max_bytes = INT64_MAX;

  // Bytes of K (or V) of one token in one layer: kv_heads * head_dim * dtype. Defined for
  // every config, checked or not: 0 when a factor is < 1, INT64_MAX when the product
  // overflows 64 bits (ValidateShape rejects both, so a valid config gets the product).
  int64_t TokenLayerBytes() const {
    return SaturatingProduct(SaturatingProduct(num_kv_heads, head_dim), DTypeBytes(dtype));
  }
  // Bytes of one token over all layers, K and V; 0 or INT64_MAX as above.
  int64_t TokenBytes() const {
    return SaturatingProduct(2 * int64_t{num_layers}, TokenLayerBytes());
  }

 private:
  // a * b for a, b >= 1; 0 when either is < 1; INT64_MAX when it overflows.
  static constexpr int64_t SaturatingProduct(int64_t a, int64_t b) {
    if (a < 1 || b < 1) return 0;
    constexpr int64_t kMax = 0x7fffffffffffffff;
    return a > kMax / b ? kMax : a * b;
  }
};

// Checks every field but the budget (which depends on the backend's granularity):
// each enum is one of its values, each number in its range, every product of fields
// (bytes per token, per page, per request at max_context) fits 64 bits, and the host
// bookkeeping that grows with max_requests and max_context is plausible (see
// max_requests). Allocates nothing. InvalidArgument names the offending field, its value
// and what it must be.
KVMEM_EXPORT absl::Status ValidateShape(const KvCacheConfig& config);

KVMEM_EXPORT std::string DescribeConfig(const KvCacheConfig& config);

}  // namespace kvmem

#endif  // KVMEM_CONFIG_H_
