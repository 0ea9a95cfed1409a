// KvCache: kvmem's entry point. One object owns the K/V memory of one model on one
// device, in either layout (config.layout), and the request-to-token index over it.
//
//   auto cache = KvCache::Create(config);          // InvalidArgument if it cannot fit
//   cache->AddRequest(id);                         // a row in the index
//   auto locs = cache->Extend(id, n);              // memory for n more tokens
//   ... write K/V at locs (AppendKv), run attention over cache->*View(layer, meta) ...
//   cache->Fork(parent, child); cache->Truncate(id, len); cache->Free(id, fence);
//
// Error model (docs/errors.md): every fallible call returns absl::Status(Or). On any
// error the cache is exactly as before the call: nothing allocated, mapped or counted
// (unless the backend fails the undo too: the status then says what state the cache is
// in, and later calls retry what is left).
// NotFound: unknown request. AlreadyExists: id in use. OutOfRange: a length over
// max_context or under 0. InvalidArgument: a bad config, a negative count, a null output
// pointer. ResourceExhausted: no memory or no free row. Errors of the backend are
// passed through with context.
//
// Thread safety: every method may be called from several threads at once; each call
// is atomic with respect to the others (one internal mutex). Views and index pointers
// stay valid for the cache's lifetime, but their contents change with later calls:
// synchronise with your own calls before reading them.
//
// Ownership: the cache owns its memory backend's reservations and handles and releases
// them in its destructor; a backend passed in config.vmm must outlive nothing else.
#ifndef KVMEM_KV_CACHE_H_
#define KVMEM_KV_CACHE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/batch_metadata.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/platform.h"
#include "kvmem/prefix_cache.h"
#include "kvmem/running_batch.h"
#include "kvmem/stats.h"
#include "kvmem/vmm.h"

namespace kvmem {

using RequestId = uint64_t;

namespace internal {
class KvLayout;
}

class KVMEM_EXPORT KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const KvCacheConfig& config);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  // Starts request `id` with 0 tokens; returns its row in [0, max_requests).
  absl::StatusOr<int32_t> AddRequest(RequestId id);

  // Memory for `n` more tokens (n >= 0). Returns their locations (slots), in order:
  // paged: page * page_tokens + offset; virtual: row * max_context + position.
  absl::StatusOr<std::vector<int64_t>> Extend(RequestId id, int64_t n);
  // As above, appending the locations to *out (out_cache_loc of a whole batch).
  absl::Status ExtendInto(RequestId id, int64_t n, std::vector<int64_t>* out);

  // Rewinds `id` to `new_length` tokens (speculative decoding). REQUIRES nothing:
  // new_length > length or < 0 is OutOfRange.
  absl::Status Truncate(RequestId id, int64_t new_length);

  // Starts `child` with the whole current context of `parent`, shared (not copied):
  // paged: same pages, ref-counted; virtual: same physical pages mapped under the
  // child's row. A shared, partly filled last page is copied when either side writes
  // into it (copy on write). Returns the child's row.
  absl::StatusOr<int32_t> Fork(RequestId parent, RequestId child);

  // Ends `id`. Its memory is reused only after `fence` completes (also memory it shares
  // with requests that end later without a fence). kvmem queries the fence lazily, so its
  // event must stay valid until the memory is reused or the cache is destroyed: recycle
  // events through a pool rather than destroying them after the step.
  absl::Status Free(RequestId id, Fence fence = {});

  // ---- Automatic prefix caching (config.enable_prefix_cache; docs/prefix_cache.md) ----
  // Cached prefixes are whole pages (page_tokens tokens) keyed by their exact token ids,
  // the token ids before them and a salt. Each call below is FailedPrecondition when the
  // prefix cache is off. Bad input is InvalidArgument and changes nothing.
  //
  // The tokens of `tokens` found cached under `salt`: a multiple of page_tokens, the
  // longest run of whole pages from the start. Changes nothing (not even the statistics
  // or the eviction order).
  absl::StatusOr<int64_t> MatchPrefix(absl::Span<const int32_t> tokens,
                                      absl::string_view salt = "") const;
  // Starts request `id` (as AddRequest) on the longest cached prefix of `tokens`, shared
  // with the cache and any other request on it (ref-counted pages, as Fork shares), and
  // returns its length, the tokens matched: the caller extends it by the others only.
  // The matched tokens count as published by `id`. A caller that needs the logits of the
  // last prompt token passes the prompt without it, so that token is computed.
  // OutOfRange for more tokens than max_context; AlreadyExists / ResourceExhausted (no
  // free row) as AddRequest.
  absl::StatusOr<int64_t> AddRequestWithPrefix(RequestId id, absl::Span<const int32_t> tokens,
                                               const PrefixRequestOptions& options = {});
  // Makes the full pages of `id` that `tokens` covers matchable: `tokens` are the ids of
  // its first tokens.size() tokens (its length or fewer; fewer than it published before
  // changes nothing). Call it as pages fill, not only at the end. A page whose tokens are
  // cached already (another request computed them too) stays the request's own and is
  // not cached twice. InvalidArgument for more ids than the request's length, ids that
  // differ from those it published or matched before, a salt other than the one it
  // started or first published with, or a page of it that already caches other tokens.
  absl::Status PublishTokens(RequestId id, absl::Span<const int32_t> tokens,
                             absl::string_view salt = "");
  // Evicts every cached page that no live request holds; returns the pages evicted.
  // Pages still held stay cached (matchable) until evicted later.
  absl::StatusOr<int64_t> ResetPrefixCache();
  // Moves the stored / removed events since the last call into *out (appended), oldest
  // first. Sequence numbers have no gap unless more than kMaxPrefixEvents piled up.
  absl::Status TakePrefixEvents(std::vector<PrefixEvent>* out);
  // With the prefix cache on, Free leaves the request's published pages cached: they
  // are evicted (least recently used first, lower priority first, leaves of the prefix
  // tree first) by the allocation that needs their memory, by the byte cap
  // (config.prefix_cache_max_bytes) or by ResetPrefixCache. A page a live request holds
  // is never evicted. An allocation evicts only pages that become free at once (not ones
  // a request freed under a fence still pending), and nothing when they would not be
  // enough: its ResourceExhausted changes nothing. One that fails on the backend after
  // evicting (a copy on write) does not bring the evicted pages back; what requests hold
  // is unchanged.

  // ---- One call per step for a whole batch ----------------------------------------
  // Each takes the lock once and is all or nothing for the batch: on any error no
  // request changed. Bad input (InvalidArgument): spans of different sizes, an id given
  // twice, a negative count, an output too small; NotFound / OutOfRange as the
  // single-request calls, naming the request.
  //
  // Extends ids[i] by counts[i] tokens and writes the new tokens' locations to
  // out_cache_loc, request after request (ids[0]'s first); out_cache_loc needs at least
  // sum(counts) entries, and the rest is left as it was.
  absl::Status ExtendBatch(absl::Span<const RequestId> ids, absl::Span<const int64_t> counts,
                           absl::Span<int64_t> out_cache_loc);
  // Rewinds ids[i] to new_lengths[i] tokens (speculative decoding's rejected drafts).
  absl::Status TruncateBatch(absl::Span<const RequestId> ids,
                             absl::Span<const int64_t> new_lengths);
  // Ends every request of `ids` under one fence (see Free).
  absl::Status FreeBatch(absl::Span<const RequestId> ids, Fence fence = {});

  // ---- The running batch: kernel metadata kept up to date (kvmem/running_batch.h) ----
  // Makes `ids` the running batch, in this order (at most max_requests of them).
  // Costs the pages of the requests that are new to it or moved; members keep their
  // entries up to date through every later Extend, Truncate, Free and batch call. A
  // member that is freed leaves an empty entry (seq_len 0) until the next call.
  absl::Status SetRunningBatch(absl::Span<const RequestId> ids);
  // The running batch's arrays (fixed addresses; see RunningBatchView for when to read).
  RunningBatchView RunningBatch() const;
  // Its CSR form (FlashInfer), packed again from the first entry whose page count
  // changed. Paged only: FailedPrecondition for the virtual layout.
  absl::StatusOr<RunningBatchCsr> PackRunningBatch();
  // Moves into *out what changed in the running batch's page table since the last call
  // (the first call says "all"), for a device mirror (DeviceRunningBatch::Upload).
  absl::Status TakeRunningBatchChanges(RunningBatchChanges* out);

  // Gives back memory that no request holds. Paged: unmaps and releases the free chunks
  // at the end of an elastic pool (the device gets the memory back). Virtual: unmaps the
  // pages that idle rows keep (deferred reclamation) into the free pool; the physical
  // handles stay created for reuse, since creating them is the slow driver call.
  // Returns the bytes unmapped.
  absl::StatusOr<int64_t> Trim();

  absl::StatusOr<int64_t> Length(RequestId id) const;
  absl::StatusOr<int32_t> Row(RequestId id) const;
  bool Contains(RequestId id) const;

  // The request-to-token index: req_to_token[row * max_context + pos] = slot (int32),
  // -1 where no token. Maintained for paged; for virtual computed on request.
  // Copies the row of `id` (its Length() entries) into *out.
  absl::Status ReqToToken(RequestId id, std::vector<int32_t>* out) const;

  // Paged: the page ids of `id` in order. FailedPrecondition for virtual.
  absl::StatusOr<std::vector<int32_t>> BlockTable(RequestId id) const;

  // Metadata of an ad-hoc batch, built afresh: O(batch x longest request) for paged.
  // For the batch an engine runs step after step, keep a running batch instead.
  absl::Status BuildBatchMetadata(absl::Span<const RequestId> ids, BatchMetadata* out) const;

  // Views of one layer for kernels. The batch pointers (page_table / row_ids) point into
  // `meta`, which must outlive the view. FailedPrecondition on the wrong layout.
  absl::StatusOr<PagedKv> PagedView(int layer, const BatchMetadata& meta) const;
  absl::StatusOr<VirtualKv> VirtualView(int layer, const BatchMetadata& meta) const;
  // The same over the running batch's host arrays (for the CPU reference; on a GPU bind
  // the view to a DeviceRunningBatch instead).
  absl::StatusOr<PagedKv> PagedView(int layer, const RunningBatchView& batch) const;
  absl::StatusOr<VirtualKv> VirtualView(int layer, const RunningBatchView& batch) const;

  Stats GetStats() const;
  // Checks every internal invariant (pages owned once, ref counts match owners, mapped
  // bytes match handles, free + used == total, index matches tables). Internal on failure.
  absl::Status CheckInvariants() const;

  const KvCacheConfig& config() const;

 private:
  struct Impl;
  explicit KvCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvmem

#endif  // KVMEM_KV_CACHE_H_
