#include "src/page_pool.h"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "src/logging.h"

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
    : num_pages_(num_pages), free_(num_pages), refcount_(num_pages, 0) {
  for (int32_t p = 0; p < num_pages; ++p) free_.Insert(p);
}

int32_t PagePool::Allocate() {
  const int64_t page = free_.Lowest();
  if (page < 0) return -1;
  free_.Erase(page);
  refcount_[page] = 1;
  ++used_;
  return static_cast<int32_t>(page);
}

void PagePool::AddRef(int32_t page) {
  if (refcount_[page] < 1) Broken(absl::StrFormat("AddRef of page %d that is not used", page));
  if (++refcount_[page] == 2) ++shared_;
}

bool PagePool::Unref(int32_t page, const Fence& fence) {
  if (refcount_[page] < 1) Broken(absl::StrFormat("Unref of page %d that is not used", page));
  const int32_t rc = --refcount_[page];
  if (rc == 1) --shared_;
  if (rc > 0) {
    if (fence.event != nullptr) {
      std::vector<Fence>& pending = pending_fences_[page];
      const bool known = std::any_of(pending.begin(), pending.end(),
                                     [&](const Fence& f) { return f.event == fence.event; });
      if (!known) pending.push_back(fence);
    }
    return false;
  }
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
    free_.Insert(page);
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

int64_t PagePool::Reclaim(const std::function<bool(const Fence&)>& complete, bool scan_all) {
  int64_t freed = 0;
  for (auto it = quarantine_.begin(); it != quarantine_.end();) {
    if (!std::all_of(it->fences.begin(), it->fences.end(), complete)) {
      if (!scan_all) break;
      ++it;
      continue;
    }
    for (int32_t page : it->pages) free_.Insert(page);
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
  int64_t used = 0, shared = 0, free = 0;
  for (int32_t p = 0; p < num_pages_; ++p) {
    const int32_t rc = refcount_[p];
    const bool is_free = free_.Contains(p);
    const int states = (rc > 0) + is_free + (in_quarantine[p] != 0);
    if (rc < 0 || states != 1) {
      return absl::InternalError(
          absl::StrFormat("page pool: page %d has refcount %d, free %d, quarantined %d", p, rc,
                          is_free, in_quarantine[p] != 0));
    }
    used += rc > 0;
    shared += rc > 1;
    free += is_free;
  }
  if (used != used_ || shared != shared_ || quarantined != quarantined_ || free != free_.count()) {
    return absl::InternalError(absl::StrFormat(
        "page pool: counters used %d shared %d quarantined %d free %d; recount %d %d %d %d", used_,
        shared_, quarantined_, free_.count(), used, shared, quarantined, free));
  }
  if (used + quarantined + free != num_pages_) {
    return absl::InternalError(
        absl::StrFormat("page pool: used %d + quarantined %d + free %d != %d pages", used,
                        quarantined, free, num_pages_));
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
