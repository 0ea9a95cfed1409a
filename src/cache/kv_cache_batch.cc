// KvCache's batch calls (ExtendBatch, TruncateBatch, FreeBatch: the single-request
// calls are these with one id) and the running batch. Every call checks all of its
// arguments before the layout changes anything, then hands the layout one batch, which
// is all or nothing, then commits the lengths and the running batch's entries.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "allocators/layout/kv_layout.h"
#include "kvmem/kv_cache.h"
#include "src/cache/kv_cache_impl.h"
#include "src/cache/running_batch_table.h"
#include "src/core/status_macros.h"

namespace kvmem {

absl::Status KvCache::Impl::FindBatch(absl::Span<const RequestId> ids, const char* call) {
  const uint64_t stamp = ++next_stamp;
  scratch_reqs.clear();
  // An engine passes the running batch's ids in the batch's order: the request of id i
  // is then the one of entry i, found by its row without hashing the id (a lookup in a
  // table of every request, a cache miss per request at large batches).
  const size_t members = batch.has_value() ? batch_ids.size() : 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    const RequestId id = ids[i];
    Request* req = nullptr;
    if (i < members && batch_ids[i] == id) {
      req = &by_row[batch->row(static_cast<int32_t>(i))];
    } else {
      KVMEM_ASSIGN_OR_RETURN(req, Find(id));
    }
    if (req->stamp == stamp) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: request %d appears twice in the batch", call, id));
    }
    req->stamp = stamp;
    scratch_reqs.push_back(req);
  }
  return absl::OkStatus();
}

absl::Status KvCache::Impl::ExtendLocked(absl::Span<const RequestId> ids,
                                         absl::Span<const int64_t> counts,
                                         absl::Span<int64_t> out) {
  if (ids.size() != counts.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ExtendBatch: %d ids but %d counts", ids.size(), counts.size()));
  }
  KVMEM_RETURN_IF_ERROR(FindBatch(ids, "ExtendBatch"));
  int64_t total = 0;
  grow_steps.clear();
  for (size_t i = 0; i < ids.size(); ++i) {
    const Request& req = *scratch_reqs[i];
    const int64_t n = counts[i];
    if (n < 0) return absl::InvalidArgumentError(absl::StrFormat("Extend by %d tokens", n));
    if (n > config.max_context - req.length) {
      return absl::OutOfRangeError(
          absl::StrFormat("request %d: %d + %d tokens exceeds max_context %d", ids[i],
                          req.length, n, config.max_context));
    }
    total += n;  // at most max_requests x max_context: no overflow
    if (n > 0) grow_steps.push_back({req.row, req.length, n});
  }
  if (static_cast<int64_t>(out.size()) < total) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ExtendBatch: out_cache_loc has %d entries, the batch adds %d tokens", out.size(), total));
  }
  if (grow_steps.empty()) return absl::OkStatus();
  KVMEM_RETURN_IF_ERROR(layout->GrowBatch(grow_steps, out.data()));
  for (size_t i = 0; i < ids.size(); ++i) {
    Request& req = *scratch_reqs[i];
    const int64_t n = counts[i];
    if (n == 0) continue;
    const int64_t old = req.length;
    req.length += n;
    logical_tokens += n;
    ++extends;
    if (req.slot >= 0) batch->Grew(req.slot, old, req.length, layout->Pages(req.row));
  }
  EnforcePrefixCap();  // a copy on write may have left a cached page to the cache alone
  return absl::OkStatus();
}

absl::Status KvCache::Impl::TruncateLocked(absl::Span<const RequestId> ids,
                                           absl::Span<const int64_t> new_lengths) {
  if (ids.size() != new_lengths.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "TruncateBatch: %d ids but %d lengths", ids.size(), new_lengths.size()));
  }
  KVMEM_RETURN_IF_ERROR(FindBatch(ids, "TruncateBatch"));
  shrink_steps.clear();
  for (size_t i = 0; i < ids.size(); ++i) {
    const Request& req = *scratch_reqs[i];
    const int64_t len = new_lengths[i];
    if (len < 0 || len > req.length) {
      return absl::OutOfRangeError(absl::StrFormat(
          "request %d: Truncate to %d tokens, but it has %d", ids[i], len, req.length));
    }
    if (len < req.length) shrink_steps.push_back({req.row, req.length, len});
  }
  if (shrink_steps.empty()) return absl::OkStatus();
  KVMEM_RETURN_IF_ERROR(layout->ShrinkBatch(shrink_steps));
  for (size_t i = 0; i < ids.size(); ++i) {
    Request& req = *scratch_reqs[i];
    if (new_lengths[i] == req.length) continue;
    logical_tokens -= req.length - new_lengths[i];
    req.length = new_lengths[i];
    if (req.slot >= 0) batch->Shrank(req.slot, req.length);
    PrefixTruncated(ids[i], req.length);
  }
  EnforcePrefixCap();
  return absl::OkStatus();
}

absl::Status KvCache::Impl::FreeLocked(absl::Span<const RequestId> ids, Fence fence) {
  KVMEM_RETURN_IF_ERROR(FindBatch(ids, "FreeBatch"));
  release_steps.clear();
  for (const Request* req : scratch_reqs) release_steps.push_back({req->row, req->length});
  KVMEM_RETURN_IF_ERROR(layout->ReleaseBatch(release_steps, fence));
  for (size_t i = 0; i < ids.size(); ++i) {
    const Request& req = *scratch_reqs[i];
    logical_tokens -= req.length;
    if (req.slot >= 0) {
      batch->Clear(req.slot);
      batch_ids[req.slot].reset();
    }
    PrefixFreed(ids[i]);
    requests.erase(ids[i]);  // scratch_reqs[j > i] stay valid: they point into by_row
  }
  EnforcePrefixCap();  // the freed requests' published pages stay cached, up to the cap
  return absl::OkStatus();
}

absl::Status KvCache::ExtendBatch(absl::Span<const RequestId> ids,
                                  absl::Span<const int64_t> counts,
                                  absl::Span<int64_t> out_cache_loc) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->ExtendLocked(ids, counts, out_cache_loc);
}

absl::Status KvCache::TruncateBatch(absl::Span<const RequestId> ids,
                                    absl::Span<const int64_t> new_lengths) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->TruncateLocked(ids, new_lengths);
}

absl::Status KvCache::FreeBatch(absl::Span<const RequestId> ids, Fence fence) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->FreeLocked(ids, fence);
}

// ---- the running batch ------------------------------------------------------------

absl::Status KvCache::SetRunningBatch(absl::Span<const RequestId> ids) {
  absl::MutexLock lock(&impl_->mu);
  Impl& m = *impl_;
  if (static_cast<int64_t>(ids.size()) > m.config.max_requests) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SetRunningBatch: %d requests, but the cache holds at most %d",
                        ids.size(), m.config.max_requests));
  }
  KVMEM_RETURN_IF_ERROR(m.FindBatch(ids, "SetRunningBatch"));
  if (!m.batch.has_value()) {
    const bool paged = m.config.layout == Layout::kPaged;
    const int64_t pt = m.config.page_tokens;
    const int64_t stride = paged ? (m.config.max_context + pt - 1) / pt : 0;
    KVMEM_ASSIGN_OR_RETURN(internal::RunningBatchTable table,
                           internal::RunningBatchTable::Make(m.config.max_requests, stride, pt));
    m.batch.emplace(std::move(table));
    m.batch_ids.reserve(m.config.max_requests);
  }
  // Members that leave lose their entry; FindBatch stamped the ones that stay.
  const uint64_t stamp = m.next_stamp;
  for (const std::optional<RequestId>& id : m.batch_ids) {
    if (!id.has_value()) continue;
    Impl::Request& req = m.by_row[m.requests.find(*id)->second];
    if (req.stamp != stamp) req.slot = -1;
  }
  m.batch->Resize(static_cast<int32_t>(ids.size()));
  m.batch_ids.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    Impl::Request& req = *m.scratch_reqs[i];
    const auto slot = static_cast<int32_t>(i);
    // An entry already holding this request is current: members keep it up to date.
    if (req.slot == slot && m.batch_ids[i] == ids[i]) continue;
    req.slot = slot;
    m.batch_ids[i] = ids[i];
    m.batch->Set(slot, req.row, req.length, m.layout->Pages(req.row));
  }
  return absl::OkStatus();
}

RunningBatchView KvCache::RunningBatch() const {
  absl::MutexLock lock(&impl_->mu);  // exclusive: Refresh writes
  if (!impl_->batch.has_value()) return RunningBatchView{};
  impl_->batch->Refresh();
  return impl_->batch->View();
}

absl::StatusOr<RunningBatchCsr> KvCache::PackRunningBatch() {
  absl::MutexLock lock(&impl_->mu);
  if (impl_->config.layout != Layout::kPaged) {
    return absl::FailedPreconditionError(
        "PackRunningBatch: the virtual layout has no pages; kernels read row_ids");
  }
  if (!impl_->batch.has_value()) return RunningBatchCsr{};
  return impl_->batch->Csr();
}

absl::Status KvCache::TakeRunningBatchChanges(RunningBatchChanges* out) {
  if (out == nullptr) return absl::InvalidArgumentError("TakeRunningBatchChanges: out is null");
  absl::MutexLock lock(&impl_->mu);
  if (!impl_->batch.has_value()) {
    out->all = true;
    out->page_table_entries.clear();
    return absl::OkStatus();
  }
  impl_->batch->TakeChanges(out);
  return absl::OkStatus();
}

absl::Status KvCache::Impl::CheckRunningBatch() const {
  if (!batch.has_value()) return absl::OkStatus();
  const RunningBatchView v = batch->View();
  if (v.size != static_cast<int32_t>(batch_ids.size())) {
    return absl::InternalError(absl::StrFormat("running batch of %d entries has %d ids", v.size,
                                               batch_ids.size()));
  }
  int32_t longest = 0;
  for (int32_t b = 0; b < v.max_batch; ++b) {
    const bool member = b < v.size && batch_ids[b].has_value();
    int32_t want_row = -1;
    int64_t want_len = 0;
    if (member) {
      auto it = requests.find(*batch_ids[b]);
      if (it == requests.end() || by_row[it->second].slot != b) {
        return absl::InternalError(absl::StrFormat(
            "running batch entry %d names request %d, which does not hold it", b, *batch_ids[b]));
      }
      want_row = it->second;
      want_len = by_row[it->second].length;
    }
    if (v.seq_lens[b] != want_len || v.row_ids[b] != want_row) {
      return absl::InternalError(absl::StrFormat(
          "running batch entry %d: seq_len %d row %d, but the request has %d tokens in row %d", b,
          v.seq_lens[b], v.row_ids[b], want_len, want_row));
    }
    longest = std::max<int32_t>(longest, v.seq_lens[b]);
    if (!member || v.page_table == nullptr) continue;
    const int64_t pt = config.page_tokens;
    const absl::Span<const int32_t> pages = layout->Pages(want_row);
    const int64_t n = (want_len + pt - 1) / pt;
    if (static_cast<int64_t>(pages.size()) < n ||
        !std::equal(pages.begin(), pages.begin() + n, v.page_table + b * v.page_table_stride)) {
      return absl::InternalError(
          absl::StrFormat("running batch entry %d: its page table differs from row %d's", b,
                          want_row));
    }
    const int32_t last = want_len == 0 ? 0 : static_cast<int32_t>((want_len - 1) % pt + 1);
    if (v.last_page_len[b] != last) {
      return absl::InternalError(absl::StrFormat(
          "running batch entry %d: last_page_len %d, want %d", b, v.last_page_len[b], last));
    }
  }
  if (batch->max_seq_len_current() && v.max_seq_len != longest) {
    return absl::InternalError(
        absl::StrFormat("running batch: max_seq_len %d, longest entry %d", v.max_seq_len, longest));
  }
  for (const auto& [id, row] : requests) {
    const Request& req = by_row[row];
    if (req.slot >= 0 && (req.slot >= v.size || batch_ids[req.slot] != id)) {
      return absl::InternalError(
          absl::StrFormat("request %d has running batch entry %d, which is not its", id, req.slot));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvmem
