// KvCache's prefix cache (docs/prefix_cache.md): the calls of kvmem/kv_cache.h's
// "Automatic prefix caching" section and the hooks that the other calls run (fork,
// rewind, end, allocation). The index (prefix_index.h) decides which blocks exist and
// which to evict; the layout holds the pages (a pin per cached page).
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "allocators/layout/kv_layout.h"
#include "kvmem/kv_cache.h"
#include "src/cache/kv_cache_impl.h"
#include "src/cache/prefix_index.h"
#include "src/core/status_macros.h"

namespace kvmem {

using internal::PrefixIndex;

absl::Status KvCache::Impl::InitPrefixCache() {
  if (!config.enable_prefix_cache) return absl::OkStatus();
  const int64_t unit = layout->PrefixUnitTokens();
  if (unit < 1) {
    return absl::UnimplementedError(
        "enable_prefix_cache: the virtual layout has no prefix cache yet; use the paged "
        "layout (docs/prefix_cache.md)");
  }
  prefix = std::make_unique<PrefixIndex>(unit);
  // Runs inside an allocation of the layout, under mu (held by the calling KvCache call).
  layout->set_page_reclaimer([this](int64_t need)
                                 ABSL_NO_THREAD_SAFETY_ANALYSIS { ReclaimPages(need); });
  return absl::OkStatus();
}

absl::Status KvCache::Impl::CheckPrefixOn(const char* call) const {
  if (prefix == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(call, ": the prefix cache is off (KvCacheConfig::enable_prefix_cache)"));
  }
  return absl::OkStatus();
}

bool KvCache::Impl::EvictOnePage(bool to_free) {
  const int32_t page = prefix->EvictOne([this, to_free](int32_t p) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return to_free ? layout->PageFreeOnUnpin(p) : layout->PageOwners(p) == 0;
  });
  if (page < 0) return false;
  layout->UnpinPage(page);
  return true;
}

void KvCache::Impl::ReclaimPages(int64_t need) {
  if (prefix == nullptr) return;
  const int64_t free = layout->FreePages();
  if (free >= need || free + layout->CachedOnlyPages() < need) return;
  // Only pages that become free at once count (one freed under a pending fence would wait
  // in quarantine), and an allocation that would fail anyway keeps the cache: the failed
  // call changes nothing.
  const int64_t evictable = prefix->EvictablePages(
      [this](int32_t p) ABSL_NO_THREAD_SAFETY_ANALYSIS { return layout->PageFreeOnUnpin(p); });
  if (free + evictable < need) return;
  while (layout->FreePages() < need && EvictOnePage(/*to_free=*/true)) {
  }
}

void KvCache::Impl::EnforcePrefixCap() {
  if (prefix == nullptr) return;
  const int64_t page_bytes = layout->PrefixUnitTokens() * config.TokenBytes();
  const int64_t cap_pages = config.prefix_cache_max_bytes / page_bytes;
  while (layout->CachedOnlyPages() > cap_pages && EvictOnePage()) {
  }
}

void KvCache::Impl::PrefixForked(RequestId parent, RequestId child) {
  if (prefix == nullptr) return;
  auto it = holders.find(parent);
  if (it == holders.end()) return;
  PrefixIndex::Holder copy;
  prefix->Copy(it->second, &copy);
  holders.emplace(child, std::move(copy));
}

void KvCache::Impl::PrefixTruncated(RequestId id, int64_t new_len) {
  if (prefix == nullptr) return;
  if (auto it = holders.find(id); it != holders.end()) prefix->Clip(&it->second, new_len);
}

void KvCache::Impl::PrefixFreed(RequestId id) {
  if (prefix == nullptr) return;
  auto it = holders.find(id);
  if (it == holders.end()) return;
  prefix->Detach(&it->second);
  holders.erase(it);
}

void KvCache::Impl::FillPrefixStats(Stats* s) const {
  if (prefix == nullptr) return;
  const PrefixIndex::Counters& c = prefix->counters();
  const int64_t page_bytes = layout->PrefixUnitTokens() * config.TokenBytes();
  s->prefix_lookups = c.lookups;
  s->prefix_lookup_tokens = c.lookup_tokens;
  s->prefix_hit_tokens = c.hit_tokens;
  s->prefix_stored_blocks = c.stored_blocks;
  s->prefix_evictions = c.evicted_blocks;
  s->prefix_events_dropped = c.events_dropped;
  s->prefix_cached_bytes = layout->PinnedPages() * page_bytes;
  s->prefix_evictable_bytes = layout->CachedOnlyPages() * page_bytes;
}

absl::Status KvCache::Impl::CheckPrefix() const {
  if (prefix == nullptr) {
    if (!holders.empty() || layout->PinnedPages() != 0) {
      return absl::InternalError("prefix cache off, but pages are pinned or requests hold some");
    }
    return absl::OkStatus();
  }
  std::vector<const PrefixIndex::Holder*> list;
  list.reserve(holders.size());
  for (const auto& [id, h] : holders) {
    auto req = requests.find(id);
    if (req == requests.end()) {
      return absl::InternalError(
          absl::StrFormat("prefix cache: request %d ended but holds blocks", id));
    }
    const int64_t length = by_row[req->second].length;
    if (static_cast<int64_t>(h.tokens.size()) > length) {
      return absl::InternalError(
          absl::StrFormat("prefix cache: request %d published %d tokens but has %d", id,
                          h.tokens.size(), length));
    }
    list.push_back(&h);
  }
  KVMEM_RETURN_IF_ERROR(prefix->CheckConsistency(
      list, [this](int32_t p) ABSL_NO_THREAD_SAFETY_ANALYSIS { return layout->PagePinned(p); },
      layout->PinnedPages()));
  return absl::OkStatus();
}

absl::StatusOr<int64_t> KvCache::MatchPrefix(absl::Span<const int32_t> tokens,
                                             absl::string_view salt) const {
  absl::ReaderMutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->CheckPrefixOn("MatchPrefix"));
  std::vector<PrefixIndex::NodeId> nodes;
  impl_->prefix->Match(tokens, salt, &nodes);
  return static_cast<int64_t>(nodes.size()) * impl_->prefix->block_tokens();
}

absl::StatusOr<int64_t> KvCache::AddRequestWithPrefix(RequestId id,
                                                      absl::Span<const int32_t> tokens,
                                                      const PrefixRequestOptions& options) {
  absl::MutexLock lock(&impl_->mu);
  Impl& m = *impl_;
  KVMEM_RETURN_IF_ERROR(m.CheckPrefixOn("AddRequestWithPrefix"));
  KVMEM_RETURN_IF_ERROR(m.CheckNew(id));
  if (static_cast<int64_t>(tokens.size()) > m.config.max_context) {
    return absl::OutOfRangeError(
        absl::StrFormat("AddRequestWithPrefix: %d tokens exceed max_context %d", tokens.size(),
                        m.config.max_context));
  }
  std::vector<PrefixIndex::NodeId> nodes;
  m.prefix->Match(tokens, options.salt, &nodes);
  std::vector<int32_t> pages;
  pages.reserve(nodes.size());
  for (PrefixIndex::NodeId n : nodes) pages.push_back(m.prefix->page(n));
  KVMEM_ASSIGN_OR_RETURN(int32_t row, m.layout->AcquireRow());
  if (absl::Status s = m.layout->ShareCached(row, pages); !s.ok()) {
    absl::Status r = m.layout->ReturnRow(row);
    if (!r.ok()) return absl::InternalError(absl::StrCat(s.message(), "; ", r.message()));
    return s;
  }
  const int64_t len = static_cast<int64_t>(pages.size()) * m.prefix->block_tokens();
  m.Insert(id, row, len);
  m.logical_tokens += len;
  m.Admitted();
  PrefixIndex::Holder& h = m.holders[id];
  h.bound = true;
  h.salt = options.salt;
  h.priority = options.priority;
  m.prefix->Attach(&h, nodes, tokens);
  PrefixIndex::Counters& c = m.prefix->counters();
  ++c.lookups;
  c.lookup_tokens += static_cast<int64_t>(tokens.size());
  c.hit_tokens += len;
  return len;
}

absl::Status KvCache::PublishTokens(RequestId id, absl::Span<const int32_t> tokens,
                                    absl::string_view salt) {
  absl::MutexLock lock(&impl_->mu);
  Impl& m = *impl_;
  KVMEM_RETURN_IF_ERROR(m.CheckPrefixOn("PublishTokens"));
  KVMEM_ASSIGN_OR_RETURN(const Impl::Request* req, m.Find(id));
  const PrefixIndex::Holder empty;
  auto it = m.holders.find(id);
  const PrefixIndex::Holder& h = it == m.holders.end() ? empty : it->second;
  const absl::Span<const int32_t> pages = m.layout->Pages(req->row);
  PrefixIndex::PublishPlan plan;
  if (absl::Status s = m.prefix->PlanPublish(h, salt, tokens, req->length, pages, &plan); !s.ok()) {
    return absl::Status(s.code(),
                        absl::StrFormat("PublishTokens of request %d: %s", id, s.message()));
  }
  if (it == m.holders.end()) it = m.holders.emplace(id, PrefixIndex::Holder{}).first;
  std::vector<int32_t> pin;
  m.prefix->CommitPublish(&it->second, salt, tokens, pages, plan, &pin);
  for (int32_t page : pin) m.layout->PinPage(page);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> KvCache::ResetPrefixCache() {
  absl::MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->CheckPrefixOn("ResetPrefixCache"));
  int64_t evicted = 0;
  while (impl_->EvictOnePage()) ++evicted;
  return evicted;
}

absl::Status KvCache::TakePrefixEvents(std::vector<PrefixEvent>* out) {
  if (out == nullptr) return absl::InvalidArgumentError("TakePrefixEvents: out is null");
  absl::MutexLock lock(&impl_->mu);
  KVMEM_RETURN_IF_ERROR(impl_->CheckPrefixOn("TakePrefixEvents"));
  impl_->prefix->TakeEvents(out);
  return absl::OkStatus();
}

}  // namespace kvmem
