// KvCache: request ids, lengths, argument checks and locking over a KvLayout. The
// batch calls and the running batch are in kv_cache_batch.cc.
#include "kvmem/kv_cache.h"

#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "allocators/layout/kv_layout.h"
#include "src/cache/kv_cache_impl.h"
#include "src/core/status_macros.h"

namespace kvmem {

namespace {

absl::StatusOr<std::shared_ptr<Vmm>> SelectBackend(const KvCacheConfig& config) {
  if (config.vmm != nullptr) return config.vmm;
  if (config.device == DeviceKind::kHost) {
    KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Vmm> vmm, MakeHostVmm(config.host_granularity));
    return std::shared_ptr<Vmm>(std::move(vmm));
  }
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Vmm> vmm, MakeCudaVmm(config.device_ordinal));
  return std::shared_ptr<Vmm>(std::move(vmm));
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvCacheConfig& config) {
  KVMEM_RETURN_IF_ERROR(ValidateShape(config));
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  KVMEM_ASSIGN_OR_RETURN(impl->vmm, SelectBackend(config));
  impl->config.vmm = impl->vmm;
  absl::StatusOr<std::unique_ptr<internal::KvLayout>> layout =
      config.layout == Layout::kPaged ? internal::MakePagedLayout(impl->config, impl->vmm)
                                      : internal::MakeVirtualLayout(impl->config, impl->vmm);
  if (!layout.ok()) return layout.status();
  {
    absl::MutexLock lock(&impl->mu);
    impl->layout = std::move(*layout);
    impl->by_row.resize(config.max_requests);
    KVMEM_RETURN_IF_ERROR(impl->InitPrefixCache());
  }
  return std::unique_ptr<KvCache>(new KvCache(std::move(impl)));
}

KvCache::KvCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

KvCache::~KvCache() {
  if (impl_ == nullptr) return;
  absl::MutexLock lock(&impl_->mu);
  // Live requests' memory goes back before the layout (and its reservations) is destroyed.
  for (const auto& [id, row] : impl_->requests) {
    (void)impl_->layout->Release(row, impl_->by_row[row].length, Fence{});
  }
  impl_->requests.clear();
  impl_->layout.reset();
}

const KvCacheConfig& KvCache::config() const { return impl_->config; }

absl::StatusOr<int32_t> KvCache::AddRequest(RequestId id) {
  absl::MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->CheckNew(id));
  KVMEM_ASSIGN_OR_RETURN(int32_t row, impl_->layout->AcquireRow());
  impl_->Insert(id, row, 0);
  impl_->Admitted();
  return row;
}

absl::Status KvCache::ExtendInto(RequestId id, int64_t n, std::vector<int64_t>* out) {
  if (out == nullptr) return absl::InvalidArgumentError("ExtendInto: out is null");
  absl::MutexLock lock(&impl_->mu);
  const size_t before = out->size();
  // Resized only once the arguments are known good: a huge n must not allocate.
  KVMEM_ASSIGN_OR_RETURN(Impl::Request * req, impl_->Find(id));
  if (n > 0 && n <= impl_->config.max_context - req->length) out->resize(before + n);
  absl::Status s = impl_->ExtendLocked({&id, 1}, {&n, 1}, absl::MakeSpan(*out).subspan(before));
  if (!s.ok()) out->resize(before);
  return s;
}

absl::StatusOr<std::vector<int64_t>> KvCache::Extend(RequestId id, int64_t n) {
  std::vector<int64_t> locs;
  KVMEM_RETURN_IF_ERROR(ExtendInto(id, n, &locs));
  return locs;
}

absl::Status KvCache::Truncate(RequestId id, int64_t new_length) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->TruncateLocked({&id, 1}, {&new_length, 1});
}

absl::StatusOr<int32_t> KvCache::Fork(RequestId parent, RequestId child) {
  absl::MutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(const Impl::Request* p, impl_->Find(parent));
  KVMEM_RETURN_IF_ERROR(impl_->CheckNew(child));
  const Impl::Request parent_req = *p;
  KVMEM_ASSIGN_OR_RETURN(int32_t row, impl_->layout->AcquireRow());
  absl::Status s = impl_->layout->Share(parent_req.row, parent_req.length, row);
  if (!s.ok()) {
    absl::Status r = impl_->layout->ReturnRow(row);
    if (r.code() == absl::StatusCode::kInternal) {
      return absl::InternalError("Fork rollback failed: " + r.ToString());
    }
    // The row is back; what the backend kept it from restoring is said after the cause.
    if (!r.ok()) return absl::Status(s.code(), absl::StrCat(s.message(), "; ", r.message()));
    return s;
  }
  impl_->Insert(child, row, parent_req.length);
  impl_->PrefixForked(parent, child);
  impl_->logical_tokens += parent_req.length;
  ++impl_->forks;
  impl_->Admitted();
  return row;
}

absl::Status KvCache::Free(RequestId id, Fence fence) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->FreeLocked({&id, 1}, fence);
}

absl::StatusOr<int64_t> KvCache::Trim() {
  absl::MutexLock lock(&impl_->mu);
  return impl_->layout->Trim();
}

absl::StatusOr<int64_t> KvCache::Length(RequestId id) const {
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(const Impl::Request* req, impl_->Find(id));
  return req->length;
}

absl::StatusOr<int32_t> KvCache::Row(RequestId id) const {
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(const Impl::Request* req, impl_->Find(id));
  return req->row;
}

bool KvCache::Contains(RequestId id) const {
  absl::ReaderMutexLock lock(&impl_->mu);
  return impl_->requests.contains(id);
}

absl::Status KvCache::ReqToToken(RequestId id, std::vector<int32_t>* out) const {
  if (out == nullptr) return absl::InvalidArgumentError("ReqToToken: out is null");
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(const Impl::Request* req, impl_->Find(id));
  // Slots are int32 in the index (SGLang's req_to_token); a slot that does not fit
  // (virtual: row * max_context + pos past 2^31) is an error, never a truncated value.
  std::vector<int32_t> slots(req->length);
  for (int64_t pos = 0; pos < req->length; ++pos) {
    const int64_t slot = impl_->layout->SlotOf(req->row, pos);
    if (slot < 0 || slot > std::numeric_limits<int32_t>::max()) {
      return absl::OutOfRangeError(absl::StrFormat(
          "request %d: slot %d of token %d (row %d) does not fit the int32 token index; "
          "use the int64 locations from Extend",
          id, slot, pos, req->row));
    }
    slots[pos] = static_cast<int32_t>(slot);
  }
  *out = std::move(slots);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> KvCache::BlockTable(RequestId id) const {
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(const Impl::Request* req, impl_->Find(id));
  return impl_->layout->BlockTable(req->row, req->length);
}

absl::Status KvCache::BuildBatchMetadata(absl::Span<const RequestId> ids,
                                         BatchMetadata* out) const {
  if (out == nullptr) return absl::InvalidArgumentError("BuildBatchMetadata: out is null");
  absl::ReaderMutexLock lock(&impl_->mu);
  BatchMetadata meta;
  meta.seq_lens.reserve(ids.size());
  meta.row_ids.reserve(ids.size());
  for (RequestId id : ids) {
    KVMEM_ASSIGN_OR_RETURN(const Impl::Request* req, impl_->Find(id));
    meta.seq_lens.push_back(static_cast<int32_t>(req->length));
    meta.row_ids.push_back(req->row);
    meta.max_seq_len = std::max<int32_t>(meta.max_seq_len, static_cast<int32_t>(req->length));
  }
  impl_->layout->FillBatch(&meta);
  *out = std::move(meta);
  return absl::OkStatus();
}

namespace {
absl::Status CheckLayer(const KvCacheConfig& config, int layer) {
  if (layer < 0 || layer >= config.num_layers) {
    return absl::OutOfRangeError(
        absl::StrFormat("layer %d out of range [0, %d)", layer, config.num_layers));
  }
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<PagedKv> KvCache::PagedView(int layer, const BatchMetadata& meta) const {
  KVMEM_RETURN_IF_ERROR(CheckLayer(impl_->config, layer));
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(PagedKv view, impl_->layout->PagedView(layer));
  view.page_table = meta.page_table.empty() ? nullptr : meta.page_table.data();
  view.page_table_stride = meta.page_table_stride;
  return view;
}

absl::StatusOr<VirtualKv> KvCache::VirtualView(int layer, const BatchMetadata& meta) const {
  KVMEM_RETURN_IF_ERROR(CheckLayer(impl_->config, layer));
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(VirtualKv view, impl_->layout->VirtualView(layer));
  view.row_ids = meta.row_ids.empty() ? nullptr : meta.row_ids.data();
  return view;
}

absl::StatusOr<PagedKv> KvCache::PagedView(int layer, const RunningBatchView& batch) const {
  KVMEM_RETURN_IF_ERROR(CheckLayer(impl_->config, layer));
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(PagedKv view, impl_->layout->PagedView(layer));
  view.page_table = batch.page_table;
  view.page_table_stride = batch.page_table_stride;
  return view;
}

absl::StatusOr<VirtualKv> KvCache::VirtualView(int layer, const RunningBatchView& batch) const {
  KVMEM_RETURN_IF_ERROR(CheckLayer(impl_->config, layer));
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_ASSIGN_OR_RETURN(VirtualKv view, impl_->layout->VirtualView(layer));
  view.row_ids = batch.row_ids;
  return view;
}

Stats KvCache::GetStats() const {
  absl::ReaderMutexLock lock(&impl_->mu);
  Stats s;
  impl_->layout->FillStats(&s);
  s.num_requests = static_cast<int64_t>(impl_->requests.size());
  s.logical_tokens = impl_->logical_tokens;
  s.peak_requests = impl_->peak_requests;
  s.extends = impl_->extends;
  s.forks = impl_->forks;
  s.budget_bytes = impl_->config.memory_budget_bytes;
  impl_->FillPrefixStats(&s);
  return s;
}

absl::Status KvCache::CheckInvariants() const {
  absl::ReaderMutexLock lock(&impl_->mu);
  std::vector<std::pair<int32_t, int64_t>> live;
  live.reserve(impl_->requests.size());
  absl::flat_hash_map<int32_t, RequestId> rows;
  int64_t tokens = 0;
  for (const auto& [id, row] : impl_->requests) {
    const Impl::Request& req = impl_->by_row[row];
    if (req.row != row || req.id != id) {
      return absl::InternalError(
          absl::StrFormat("request %d in row %d: the row's entry says request %d in row %d", id,
                          row, req.id, req.row));
    }
    if (req.row < 0 || req.row >= impl_->config.max_requests) {
      return absl::InternalError(absl::StrFormat("request %d has row %d", id, req.row));
    }
    if (req.length < 0 || req.length > impl_->config.max_context) {
      return absl::InternalError(absl::StrFormat("request %d has length %d", id, req.length));
    }
    if (auto [it, inserted] = rows.emplace(req.row, id); !inserted) {
      return absl::InternalError(
          absl::StrFormat("row %d held by requests %d and %d", req.row, it->second, id));
    }
    tokens += req.length;
    live.emplace_back(req.row, req.length);
  }
  if (tokens != impl_->logical_tokens) {
    return absl::InternalError(absl::StrFormat("logical tokens %d, but requests sum to %d",
                                               impl_->logical_tokens, tokens));
  }
  KVMEM_RETURN_IF_ERROR(impl_->layout->CheckInvariants(live));
  KVMEM_RETURN_IF_ERROR(impl_->CheckPrefix());
  return impl_->CheckRunningBatch();
}

}  // namespace kvmem
