// KvCache's state, shared by the files that implement it (kv_cache.cc: the
// single-request calls and queries; kv_cache_batch.cc: the batch calls and the running
// batch). Internal.
#ifndef KVMEM_SRC_CACHE_KV_CACHE_IMPL_H_
#define KVMEM_SRC_CACHE_KV_CACHE_IMPL_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "allocators/layout/kv_layout.h"
#include "kvmem/kv_cache.h"
#include "src/cache/prefix_index.h"
#include "src/cache/running_batch_table.h"

namespace kvmem {

struct KvCache::Impl {
  // A live request's state, 32 bytes, kept by row (see by_row).
  struct Request {
    RequestId id = 0;
    int32_t row = -1;
    int32_t slot = -1;  // entry in the running batch, -1 when not a member
    int64_t length = 0;
    uint64_t stamp = 0;  // the batch call that last saw it (repeated ids)
  };

  KvCacheConfig config;
  std::shared_ptr<Vmm> vmm;
  mutable absl::Mutex mu;
  std::unique_ptr<internal::KvLayout> layout ABSL_GUARDED_BY(mu);
  // Live requests: id -> row, and each one's state in a dense array by row (rows are
  // below max_requests), where the running batch finds its members without hashing
  // their ids (docs/architecture.md, Facade).
  absl::flat_hash_map<RequestId, int32_t> requests ABSL_GUARDED_BY(mu);
  std::vector<Request> by_row ABSL_GUARDED_BY(mu);
  int64_t logical_tokens ABSL_GUARDED_BY(mu) = 0;
  int64_t peak_requests ABSL_GUARDED_BY(mu) = 0;
  int64_t extends ABSL_GUARDED_BY(mu) = 0;
  int64_t forks ABSL_GUARDED_BY(mu) = 0;

  // The running batch: its arrays (made by the first SetRunningBatch) and the id of each
  // entry (nullopt: its request ended).
  std::optional<internal::RunningBatchTable> batch ABSL_GUARDED_BY(mu);
  std::vector<std::optional<RequestId>> batch_ids ABSL_GUARDED_BY(mu);

  // The prefix cache (config.enable_prefix_cache): the index, and what each request
  // published or matched (only requests that did have an entry).
  std::unique_ptr<internal::PrefixIndex> prefix ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<RequestId, internal::PrefixIndex::Holder> holders ABSL_GUARDED_BY(mu);

  // Scratch of the batch calls, kept so that a step allocates nothing.
  uint64_t next_stamp ABSL_GUARDED_BY(mu) = 0;
  std::vector<Request*> scratch_reqs ABSL_GUARDED_BY(mu);
  std::vector<internal::KvLayout::GrowStep> grow_steps ABSL_GUARDED_BY(mu);
  std::vector<internal::KvLayout::ShrinkStep> shrink_steps ABSL_GUARDED_BY(mu);
  std::vector<internal::KvLayout::ReleaseStep> release_steps ABSL_GUARDED_BY(mu);

  absl::StatusOr<Request*> Find(RequestId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = requests.find(id);
    if (it == requests.end()) return absl::NotFoundError(absl::StrFormat("unknown request %d", id));
    return &by_row[it->second];
  }
  absl::StatusOr<const Request*> Find(RequestId id) const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    auto it = requests.find(id);
    if (it == requests.end()) return absl::NotFoundError(absl::StrFormat("unknown request %d", id));
    return &by_row[it->second];
  }
  // A new request `id` (CheckNew passed) in `row`, a row the layout just handed out.
  void Insert(RequestId id, int32_t row, int64_t length) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (row >= static_cast<int32_t>(by_row.size())) by_row.resize(row + 1);
    by_row[row] = Request{.id = id, .row = row, .length = length};
    requests.emplace(id, row);
  }
  absl::Status CheckNew(RequestId id) const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    if (requests.contains(id)) {
      return absl::AlreadyExistsError(absl::StrFormat("request %d already exists", id));
    }
    return absl::OkStatus();
  }
  void Admitted() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    peak_requests = std::max<int64_t>(peak_requests, requests.size());
  }

  // Looks up every id of a batch call into scratch_reqs: NotFound for an unknown one,
  // InvalidArgument for one given twice. Changes nothing the caller can observe.
  absl::Status FindBatch(absl::Span<const RequestId> ids, const char* call)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // The batch calls, under the lock; the single-request calls run them with one id.
  absl::Status ExtendLocked(absl::Span<const RequestId> ids, absl::Span<const int64_t> counts,
                            absl::Span<int64_t> out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::Status TruncateLocked(absl::Span<const RequestId> ids,
                              absl::Span<const int64_t> new_lengths)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::Status FreeLocked(absl::Span<const RequestId> ids, Fence fence)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // ---- The prefix cache (kv_cache_prefix.cc); each is a no-op with it off ----------
  // Sets up the index and the layout's page reclaimer. Unimplemented for a layout that
  // cannot share cached pages.
  absl::Status InitPrefixCache() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // FailedPrecondition when the prefix cache is off.
  absl::Status CheckPrefixOn(const char* call) const ABSL_SHARED_LOCKS_REQUIRED(mu);
  // Evicts one cached page that no request holds (with `to_free`: only one that becomes
  // free at once, not one waiting on a fence); false when none is left.
  bool EvictOnePage(bool to_free = false) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // The layout's page reclaimer: evicts until `need` pages are free, or nothing when the
  // pages no request holds would not be enough.
  void ReclaimPages(int64_t need) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Evicts until the pages no request holds fit config.prefix_cache_max_bytes.
  void EnforcePrefixCap() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // What a fork, a rewind and an end do to the requests' holders.
  void PrefixForked(RequestId parent, RequestId child) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void PrefixTruncated(RequestId id, int64_t new_len) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void PrefixFreed(RequestId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void FillPrefixStats(Stats* s) const ABSL_SHARED_LOCKS_REQUIRED(mu);
  absl::Status CheckPrefix() const ABSL_SHARED_LOCKS_REQUIRED(mu);

  // Internal unless the running batch's entries match the requests and the layout.
  absl::Status CheckRunningBatch() const ABSL_SHARED_LOCKS_REQUIRED(mu);
};

}  // namespace kvmem

#endif  // KVMEM_SRC_CACHE_KV_CACHE_IMPL_H_
