#include "src/core/page_pool.h"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "src/core/logging.h"

namespace kvmem::internal {
namespace {

// Broken internal invariant (a caller broke a REQUIRES): log and abort.
[[noreturn]] void Broken(const std::string& what) {
  Logger()->critical("page pool invariant broken: {}", what);
  Logger()->flush();
  std::abort();
}

}  // namespace

IdBitmap::IdBitmap(int64_t size)
    : size_(size), bits_((size + 63) / 64, 0), summary_((bits_.size() + 63) / 64, 0) {}

bool IdBitmap::Insert(int64_t id) {
  uint64_t& word = bits_[id >> 6];
  const uint64_t bit = uint64_t{1} << (id & 63);
  if (word & bit) return false;
  word |= bit;
  const int64_t w = id >> 6;
  summary_[w >> 6] |= uint64_t{1} << (w & 63);
  if ((w >> 6) < low_hint_) low_hint_ = w >> 6;
  ++count_;
  return true;
}

bool IdBitmap::Erase(int64_t id) {
  uint64_t& word = bits_[id >> 6];
  const uint64_t bit = uint64_t{1} << (id & 63);
  if (!(word & bit)) return false;
  word &= ~bit;
  if (word == 0) {
    const int64_t w = id >> 6;
    summary_[w >> 6] &= ~(uint64_t{1} << (w & 63));
  }
  --count_;
  return true;
}

int64_t IdBitmap::Lowest() const {
  if (count_ == 0) return -1;
  for (int64_t s = low_hint_; s < static_cast<int64_t>(summary_.size()); ++s) {
    if (summary_[s] == 0) continue;
    low_hint_ = s;
    const int64_t w = s * 64 + std::countr_zero(summary_[s]);
    return w * 64 + std::countr_zero(bits_[w]);
  }
  Broken(absl::StrFormat("IdBitmap: count %d but no member found", count_));
}

int64_t IdBitmap::HighestAbsent() const {
  for (int64_t w = static_cast<int64_t>(bits_.size()) - 1; w >= 0; --w) {
    const int64_t valid = std::min<int64_t>(64, size_ - w * 64);
    const uint64_t mask = valid == 64 ? ~uint64_t{0} : (uint64_t{1} << valid) - 1;
    const uint64_t absent = ~bits_[w] & mask;
    if (absent != 0) return w * 64 + 63 - std::countl_zero(absent);
  }
  return -1;
}

PagePool::PagePool(int32_t num_pages)
    : num_pages_(num_pages), free_(num_pages), refcount_(num_pages, 0), pinned_(num_pages, 0) {
  for (int32_t p = 0; p < num_pages; ++p) free_.Insert(p);
  const int64_t groups = (int64_t{num_pages} + 63) / 64;
  group_free_.assign(groups, 0);
  by_free_.assign(65, IdBitmap(groups));
  for (int64_t g = 0; g < groups; ++g) {
    group_free_[g] = static_cast<uint8_t>(std::min<int64_t>(64, num_pages - g * 64));
    by_free_[group_free_[g]].Insert(g);
    if (group_free_[g] > 0) nonempty_buckets_ |= uint64_t{1} << (group_free_[g] - 1);
  }
}

void PagePool::MarkFree(int64_t page, bool free) {
  if (free) {
    free_.Insert(page);
  } else {
    free_.Erase(page);
  }
  const int64_t g = page >> 6;
  const int before = group_free_[g];
  const int after = before + (free ? 1 : -1);
  by_free_[before].Erase(g);
  if (before > 0 && by_free_[before].count() == 0) {
    nonempty_buckets_ &= ~(uint64_t{1} << (before - 1));
  }
  group_free_[g] = static_cast<uint8_t>(after);
  by_free_[after].Insert(g);
  if (after > 0) nonempty_buckets_ |= uint64_t{1} << (after - 1);
}

int32_t PagePool::Take(int64_t page) {
  if (page < 0) return -1;
  MarkFree(page, false);
  refcount_[page] = 1;
  ++used_;
  return static_cast<int32_t>(page);
}

int32_t PagePool::Allocate() { return Take(free_.Lowest()); }

namespace {

// Offset in a 64-page group of the page to start a new run at, given the group's free
// pages `free_bits` (non-zero): in the longest free run (the lowest of equals), its
// first page when the run opens the group, else its middle, so that the request owning
// the page before the run can still grow into the first half.
int RunStart(uint64_t free_bits) {
  if (free_bits == ~uint64_t{0}) return 0;
  // After k rounds of x &= x >> 1, bit i is set where a run of at least k + 1 free pages
  // starts; the last non-zero x marks the starts of the longest runs. As many rounds as
  // the longest run is long: in a nearly full pool (where most pages start a new run:
  // the neighbours of a request's last page belong to the requests that grew beside it)
  // the runs are short and many, and a walk over them costs more.
  uint64_t starts = free_bits;
  int best_len = 1;
  for (uint64_t x = free_bits & (free_bits >> 1); x != 0; x &= x >> 1) {
    starts = x;
    ++best_len;
  }
  const int best_start = std::countr_zero(starts);
  return best_start == 0 ? 0 : best_start + best_len / 2;
}

}  // namespace

uint64_t PagePool::FreeBitsBelow(int64_t group, int64_t limit) const {
  const int64_t first = group * 64;
  if (first >= limit) return 0;
  const uint64_t bits = free_.word(group);
  return limit - first >= 64 ? bits : bits & ((uint64_t{1} << (limit - first)) - 1);
}

int32_t PagePool::AllocateNear(int32_t near, int64_t limit) {
  limit = std::min<int64_t>(limit, num_pages_);
  if (near >= 0 && near + 1 < limit && free_.Contains(near + 1)) return Take(near + 1);
  // A new run: in near's group while it has room, else in the group with the most free
  // pages (the lowest of equals; a wholly free one when there is one).
  int64_t group = near >= 0 && FreeBitsBelow(near >> 6, limit) != 0 ? near >> 6 : -1;
  if (group < 0) {
    // The lowest of the whole groups below the limit with the most free pages (buckets
    // by free count), against the group the limit cuts, if any (counted below it).
    const int64_t whole = limit / 64;
    int best = 0;
    for (uint64_t left = nonempty_buckets_; left != 0 && group < 0;) {
      const int n = 64 - std::countl_zero(left);  // the fullest bucket not yet looked at
      left &= ~(uint64_t{1} << (n - 1));
      const int64_t g = by_free_[n].Lowest();
      if (g < whole) {
        group = g;
        best = n;
      }
    }
    if (whole * 64 < limit) {
      const int cut = std::popcount(FreeBitsBelow(whole, limit));
      if (cut > best) group = whole;
    }
  }
  if (group < 0) return Take(free_.Lowest());  // nothing free below the limit
  return Take(group * 64 + RunStart(FreeBitsBelow(group, limit)));
}

void PagePool::AddRef(int32_t page) {
  if (refcount_[page] < 1) Broken(absl::StrFormat("AddRef of page %d that is not used", page));
  const int32_t owners = ++refcount_[page] - pinned_[page];
  if (owners == 2) ++shared_;
  if (owners == 1 && pinned_[page]) --cached_only_;  // a request takes a cached page
}

void PagePool::Pin(int32_t page) {
  if (owners(page) < 1 || pinned_[page]) {
    Broken(absl::StrFormat("Pin of page %d with %d owners, pinned %d", page, owners(page),
                           pinned_[page]));
  }
  ++refcount_[page];
  pinned_[page] = 1;
  ++pinned_count_;
}

bool PagePool::Unpin(int32_t page) {
  if (!pinned_[page]) Broken(absl::StrFormat("Unpin of page %d that is not pinned", page));
  pinned_[page] = 0;
  --pinned_count_;
  if (--refcount_[page] > 0) return false;  // owners keep it; their count is unchanged
  --cached_only_;
  return Drop(page, Fence{});
}

bool PagePool::Unref(int32_t page, const Fence& fence) {
  if (refcount_[page] - pinned_[page] < 1) {
    Broken(absl::StrFormat("Unref of page %d that no request owns", page));
  }
  const int32_t rc = --refcount_[page];
  const int32_t owners = rc - pinned_[page];
  if (owners == 1) --shared_;
  if (owners == 0 && pinned_[page]) ++cached_only_;  // the prefix cache keeps it
  if (rc > 0) {
    if (fence.event != nullptr) {
      std::vector<Fence>& pending = pending_fences_[page];
      const bool known = std::any_of(pending.begin(), pending.end(),
                                     [&](const Fence& f) { return f.event == fence.event; });
      if (!known) pending.push_back(fence);
    }
    return false;
  }
  return Drop(page, fence);
}

bool PagePool::Drop(int32_t page, const Fence& fence) {
  --used_;
  std::vector<Fence> fences;
  if (auto it = pending_fences_.find(page); it != pending_fences_.end()) {
    fences = std::move(it->second);
    pending_fences_.erase(it);
  }
  if (fence.event != nullptr && std::none_of(fences.begin(), fences.end(), [&](const Fence& f) {
        return f.event == fence.event;
      })) {
    fences.push_back(fence);
  }
  if (fences.empty()) {
    MarkFree(page, true);
    return true;
  }
  const bool coalesce = fences.size() == 1 && !quarantine_.empty() &&
                        quarantine_.back().fences.size() == 1 &&
                        quarantine_.back().fences[0].event == fences[0].event;
  if (!coalesce) quarantine_.push_back(QuarantineEntry{std::move(fences), {}});
  quarantine_.back().pages.push_back(page);
  ++quarantined_;
  return true;
}

bool PagePool::FencePending(int32_t page, const std::function<bool(const Fence&)>& complete) const {
  if (pending_fences_.empty()) return false;
  const auto it = pending_fences_.find(page);
  return it != pending_fences_.end() &&
         !std::all_of(it->second.begin(), it->second.end(), complete);
}

int64_t PagePool::PendingCount(const std::function<bool(const Fence&)>& complete) const {
  int64_t pending = 0;
  for (const QuarantineEntry& e : quarantine_) {
    if (!std::all_of(e.fences.begin(), e.fences.end(), complete)) {
      pending += static_cast<int64_t>(e.pages.size());
    }
  }
  return pending;
}

int64_t PagePool::Reclaim(const std::function<bool(const Fence&)>& complete, bool scan_all) {
  int64_t freed = 0;
  for (auto it = quarantine_.begin(); it != quarantine_.end();) {
    if (!std::all_of(it->fences.begin(), it->fences.end(), complete)) {
      if (!scan_all) break;
      ++it;
      continue;
    }
    for (int32_t page : it->pages) MarkFree(page, true);
    freed += static_cast<int64_t>(it->pages.size());
    it = quarantine_.erase(it);
  }
  quarantined_ -= freed;
  return freed;
}

absl::Status PagePool::CheckConsistency() const {
  std::vector<char> in_quarantine(num_pages_, 0);
  int64_t quarantined = 0;
  for (const QuarantineEntry& e : quarantine_) {
    if (e.fences.empty() || std::any_of(e.fences.begin(), e.fences.end(),
                                        [](const Fence& f) { return f.event == nullptr; })) {
      return absl::InternalError("page pool: quarantine entry without fences or with a null one");
    }
    for (int32_t page : e.pages) {
      if (page < 0 || page >= num_pages_) {
        return absl::InternalError(
            absl::StrFormat("page pool: quarantined page %d out of range", page));
      }
      if (in_quarantine[page]++) {
        return absl::InternalError(absl::StrFormat("page pool: page %d quarantined twice", page));
      }
      ++quarantined;
    }
  }
  for (const auto& [page, fences] : pending_fences_) {
    if (page < 0 || page >= num_pages_ || refcount_[page] < 1 || fences.empty()) {
      return absl::InternalError(
          absl::StrFormat("page pool: fences pending for page %d, which is not in use", page));
    }
  }
  int64_t used = 0, shared = 0, free = 0, pinned = 0, cached_only = 0;
  for (int32_t p = 0; p < num_pages_; ++p) {
    const int32_t rc = refcount_[p];
    if (pinned_[p] && rc < 1) {
      return absl::InternalError(absl::StrFormat("page pool: page %d is pinned but not used", p));
    }
    pinned += pinned_[p];
    cached_only += pinned_[p] && rc == 1;
    const bool is_free = free_.Contains(p);
    const int states = (rc > 0) + is_free + (in_quarantine[p] != 0);
    if (rc < 0 || states != 1) {
      return absl::InternalError(
          absl::StrFormat("page pool: page %d has refcount %d, free %d, quarantined %d", p, rc,
                          is_free, in_quarantine[p] != 0));
    }
    used += rc > 0;
    shared += rc - pinned_[p] > 1;
    free += is_free;
  }
  if (pinned != pinned_count_ || cached_only != cached_only_) {
    return absl::InternalError(
        absl::StrFormat("page pool: counters pinned %d cached only %d; recount %d %d",
                        pinned_count_, cached_only_, pinned, cached_only));
  }
  if (used != used_ || shared != shared_ || quarantined != quarantined_ || free != free_.count()) {
    return absl::InternalError(absl::StrFormat(
        "page pool: counters used %d shared %d quarantined %d free %d; recount %d %d %d %d", used_,
        shared_, quarantined_, free_.count(), used, shared, quarantined, free));
  }
  int64_t bucketed = 0;
  for (const IdBitmap& bucket : by_free_) bucketed += bucket.count();
  for (int64_t g = 0; g < static_cast<int64_t>(group_free_.size()); ++g) {
    const int n = std::popcount(free_.word(g));
    if (group_free_[g] != n || !by_free_[n].Contains(g)) {
      return absl::InternalError(absl::StrFormat(
          "page pool: group %d has %d free pages but is counted with %d", g, n, group_free_[g]));
    }
  }
  for (int n = 1; n <= 64; ++n) {
    if (((nonempty_buckets_ >> (n - 1)) & 1) != (by_free_[n].count() > 0)) {
      return absl::InternalError(absl::StrFormat(
          "page pool: bucket of groups with %d free pages is marked %s but holds %d groups", n,
          (nonempty_buckets_ >> (n - 1)) & 1 ? "non-empty" : "empty", by_free_[n].count()));
    }
  }
  if (bucketed != static_cast<int64_t>(group_free_.size())) {
    return absl::InternalError(absl::StrFormat(
        "page pool: %d groups in the free-count buckets, not %d", bucketed, group_free_.size()));
  }
  if (used + quarantined + free != num_pages_) {
    return absl::InternalError(
        absl::StrFormat("page pool: used %d + quarantined %d + free %d != %d pages", used,
                        quarantined, free, num_pages_));
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
