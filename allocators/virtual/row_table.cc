// RowTable (allocators/virtual/row_table.h): rows, their page entries, lengths, private
// ranges and damage, and the rows' half of the invariants.
#include "allocators/virtual/row_table.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvmem::internal {

void RowTable::Init(uintptr_t base) {
  base_ = base;
  rows_.resize(static_cast<size_t>(geo_.rows));
  cov_.resize(static_cast<size_t>(pool_->size()));
  waiting_.Init(geo_.rows);
  surplus_rows_.Init(geo_.rows);
  ready_.Init(geo_.rows);
  for (int32_t row = 0; row < geo_.rows; ++row) ready_.Insert(row, 0);
}

int32_t& RowTable::MutableEntry(Row& r, int64_t page, int32_t seg) {
  const size_t i = static_cast<size_t>(page * geo_.segments + seg);
  if (i >= r.entries.size()) {
    size_t n = std::max<size_t>(r.entries.size() * 2, static_cast<size_t>(geo_.segments) * 4);
    n = std::max(n, (i / geo_.segments + 1) * geo_.segments);
    n = std::min(n, static_cast<size_t>(geo_.pages_per_request()));
    r.entries.resize(n, kNoHandle);
  }
  return r.entries[i];
}

// ---- entries -------------------------------------------------------------------

void RowTable::Attach(int32_t h, int32_t row, int64_t page, int32_t seg) {
  ++mapping_epoch_;
  Row& r = rows_[row];
  if (pool_->get(h).state == HandleState::kInFlight) --r.in_flight;
  pool_->AddOwner(h, row, r.live, waiting_.Contains(row), page, seg);
  MutableEntry(r, page, seg) = h;
  ++r.mapped;
  const Handle& hd = pool_->get(h);
  if (hd.owners.size() >= 2) {
    if (hd.owners.size() == 2) {
      // Shared from now on: the first owner's coverage starts to be tracked.
      const int32_t first = hd.owners[0];
      ++rows_[first].shared;
      if (rows_[first].live) CovAdd(h, Covered(first, page));
    }
    ++r.shared;
    if (r.live) CovAdd(h, Covered(row, page));
  }
  if (r.live) {
    if (page >= geo_.PagesFor(r.len)) AddSurplus(row, 1);
  } else {
    IdleMappedChanged(row, r.mapped - 1);
  }
}

void RowTable::Detach(int32_t h, int32_t row, int64_t page, int32_t seg) {
  ++mapping_epoch_;
  Row& r = rows_[row];
  const Handle& hd = pool_->get(h);
  if (hd.owners.size() >= 2) {
    if (r.live) CovRemove(h, Covered(row, page));
    --r.shared;
    if (hd.owners.size() == 2) {
      const int32_t other = hd.owners[0] == row ? hd.owners[1] : hd.owners[0];
      --rows_[other].shared;
      CovClear(h);
    }
  }
  pool_->RemoveOwner(h, row, r.live, waiting_.Contains(row));
  MutableEntry(r, page, seg) = kNoHandle;
  --r.mapped;
  if (r.live) {
    if (page >= geo_.PagesFor(r.len)) AddSurplus(row, -1);
  } else {
    IdleMappedChanged(row, r.mapped + 1);
  }
  if (!damage_.empty()) damage_.erase(EntryKey(row, page, seg));
}

void RowTable::BeginInFlight(int32_t h, int32_t row, int64_t page, int32_t seg) {
  Row& r = rows_[row];
  pool_->MarkInFlight(h, page, seg);
  MutableEntry(r, page, seg) = h;
  ++r.in_flight;
}

void RowTable::EndInFlight(int32_t h, int32_t row, int64_t page, int32_t seg) {
  Row& r = rows_[row];
  pool_->EndInFlight(h);
  MutableEntry(r, page, seg) = kNoHandle;
  --r.in_flight;
}

Damage RowTable::DamageAt(int32_t row, int64_t page, int32_t seg) const {
  if (damage_.empty()) return Damage::kNone;
  auto it = damage_.find(EntryKey(row, page, seg));
  return it == damage_.end() ? Damage::kNone : it->second;
}

void RowTable::SetDamage(int32_t row, int64_t page, int32_t seg, Damage d) {
  if (d == Damage::kNone) {
    damage_.erase(EntryKey(row, page, seg));
    return;
  }
  KVMEM_VIRTUAL_CHECK(Entry(row, page, seg) != kNoHandle, "damage of an empty entry of row {}",
                      row);
  damage_[EntryKey(row, page, seg)] = d;
  Row& r = rows_[row];
  if (page >= r.private_lo && page < r.private_hi) CutPrivate(row, page);
}

std::vector<std::pair<RowMapping, Damage>> RowTable::Damaged() const {
  std::vector<std::pair<RowMapping, Damage>> out;
  const uint64_t per_row = static_cast<uint64_t>(geo_.pages_per_request());
  for (const auto& [key, d] : damage_) {
    const int32_t row = static_cast<int32_t>(key / per_row);
    const int64_t i = static_cast<int64_t>(key % per_row);
    const int64_t page = i / geo_.segments;
    const int32_t seg = static_cast<int32_t>(i % geo_.segments);
    out.push_back({RowMapping{row, page, seg, Entry(row, page, seg)}, d});
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return std::tie(a.first.row, a.first.page, a.first.seg) <
           std::tie(b.first.row, b.first.page, b.first.seg);
  });
  return out;
}

bool RowTable::DamagedIn(int32_t row, int64_t p0, int64_t p1) const {
  if (damage_.empty()) return false;
  for (int64_t k = p0; k < p1; ++k) {
    for (int32_t s = 0; s < geo_.segments; ++s) {
      if (damage_.contains(EntryKey(row, k, s))) return true;
    }
  }
  return false;
}

std::vector<RowMapping> RowTable::Mappings(int32_t row, int64_t min_page, bool only_shared,
                                           int64_t max_page) const {
  std::vector<RowMapping> out;
  const Row& r = rows_[row];
  int64_t end = PageLimit(row);
  if (max_page >= 0) end = std::min(end, max_page);
  if (only_shared) {
    if (r.shared == 0) return out;
    if (r.live) end = std::min(end, geo_.PagesFor(r.len));
  }
  for (int64_t k = min_page; k < end; ++k) {
    if (only_shared && r.live && k >= r.private_lo && k < r.private_hi) {
      k = r.private_hi - 1;  // exclusive pages
      continue;
    }
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t h = Entry(row, k, s);
      if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped) continue;
      if (only_shared && pool_->ref_count(h) < 2) continue;
      out.push_back({row, k, s, h});
    }
  }
  return out;
}

// ---- lifecycle -----------------------------------------------------------------

void RowTable::SetLen(int32_t row, int64_t len) {
  Row& r = rows_[row];
  const int64_t old = r.len;
  if (!r.live || old == len) {
    r.len = len;
    return;
  }
  // Mapped pages between the two page counts change sides (surplus or not).
  const int64_t old_need = geo_.PagesFor(old);
  const int64_t new_need = geo_.PagesFor(len);
  int64_t moved = 0;
  for (int64_t k = std::min(old_need, new_need); k < std::max(old_need, new_need); ++k) {
    if (k >= r.private_lo && k < r.private_hi) {
      moved += geo_.segments;  // private: mapped in every segment
      continue;
    }
    for (int32_t s = 0; s < geo_.segments; ++s) {
      const int32_t h = Entry(row, k, s);
      moved += h != kNoHandle && pool_->get(h).state == HandleState::kMapped;
    }
  }
  AddSurplus(row, new_need > old_need ? -moved : moved);
  // Only pages from the shorter length's last chunk up to the longer one's end cover a
  // different number of bytes; of those, only shared ones are tracked, and pages of the
  // private range are exclusive.
  if (r.shared > 0) {
    const int64_t lo = geo_.PageOf(std::min(old, len));
    const int64_t hi = geo_.PagesFor(std::max(old, len));
    for (int64_t k = lo; k < hi; ++k) {
      if (k >= r.private_lo && k < r.private_hi) {
        k = r.private_hi - 1;
        continue;
      }
      for (int32_t s = 0; s < geo_.segments; ++s) {
        const int32_t h = Entry(row, k, s);
        if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped ||
            pool_->ref_count(h) < 2) {
          continue;
        }
        CovUpdate(h, geo_.CoveredBytes(old, k), geo_.CoveredBytes(len, k));
      }
    }
  }
  r.len = len;
}

void RowTable::GrowPrivate(int32_t row, int64_t len) {
  Row& r = rows_[row];
  const int64_t crossed = geo_.PagesFor(len) - geo_.PagesFor(r.len);
  if (crossed > 0) AddSurplus(row, -crossed * geo_.segments);
  r.len = len;
}

void RowTable::MakeLive(int32_t row) {
  Row& r = rows_[row];
  KVMEM_VIRTUAL_CHECK(!r.live && !waiting_.Contains(row), "row {} taken while live or waiting",
                      row);
  ready_.Remove(row);
  if (r.mapped > 0) idle_donors_.erase({r.idle_since, row});
  // Idle rows have length 0: every page it holds counts as its surplus, covering nothing.
  for (int32_t h : r.entries) {
    if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped) continue;
    pool_->OwnerTurned(h, +1, 0);
    if (pool_->ref_count(h) > 1) CovAdd(h, 0);
  }
  r.live = true;
  ++live_rows_;
  r.len = 0;
  AddSurplus(row, r.mapped);
  SetPrivate(row, 0, 0);
  ExtendPrivate(row);
}

void RowTable::MakeIdle(int32_t row, Fence fence, std::optional<uint64_t> idle_since) {
  Row& r = rows_[row];
  KVMEM_VIRTUAL_CHECK(r.live, "row {} released while idle", row);
  const bool waiting = fence.event != nullptr;
  for (size_t i = 0; i < r.entries.size(); ++i) {
    const int32_t h = r.entries[i];
    if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped) continue;
    if (pool_->ref_count(h) > 1) {
      CovRemove(h, geo_.CoveredBytes(r.len, static_cast<int64_t>(i) / geo_.segments));
    }
    pool_->OwnerTurned(h, -1, waiting ? 1 : 0);
  }
  AddSurplus(row, -r.surplus);
  r.live = false;
  --live_rows_;
  live_tokens_ -= r.len;
  r.len = 0;
  r.fence = fence;
  r.idle_since = idle_since.has_value() ? *idle_since : ++release_seq_;
  SetPrivate(row, 0, 0);
  if (waiting) {
    waiting_.PushBack(row);
  } else {
    EnterReady(row);
  }
}

bool RowTable::FenceDone(int32_t row) {
  if (!waiting_.Contains(row)) return true;
  if (!vmm_->FenceComplete(rows_[row].fence)) return false;
  MarkReady(row);
  return true;
}

bool RowTable::FenceDoneConst(int32_t row) const {
  const Row& r = rows_[row];
  return r.fence.event == nullptr || vmm_->FenceComplete(r.fence);
}

void RowTable::PollFences(bool all) {
  for (int32_t row = waiting_.front(); row >= 0;) {
    const int32_t next = waiting_.next(row);
    if (vmm_->FenceComplete(rows_[row].fence)) {
      MarkReady(row);
    } else if (!all) {
      return;
    }
    row = next;
  }
}

// ---- row sets ------------------------------------------------------------------

void RowTable::EnterReady(int32_t row) {
  const Row& r = rows_[row];
  ready_.Insert(row, r.mapped);
  if (r.mapped > 0) idle_donors_.insert({r.idle_since, row});
}

void RowTable::MarkReady(int32_t row) {
  Row& r = rows_[row];
  waiting_.Remove(row);
  r.fence = Fence{};
  for (int32_t h : r.entries) {
    if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped) continue;
    pool_->OwnerTurned(h, 0, -1);
  }
  EnterReady(row);
}

void RowTable::IdleMappedChanged(int32_t row, int64_t before) {
  if (!ready_.Contains(row)) return;  // waiting: it joins the sets once ready
  const Row& r = rows_[row];
  ready_.Update(row, r.mapped);
  if (before == 0 && r.mapped > 0) idle_donors_.insert({r.idle_since, row});
  if (before > 0 && r.mapped == 0) idle_donors_.erase({r.idle_since, row});
}

void RowTable::AddSurplus(int32_t row, int64_t n) {
  rows_[row].surplus += n;
  surplus_handles_ += n;
  SurplusChanged(row);
}

void RowTable::SurplusChanged(int32_t row) {
  const Row& r = rows_[row];
  const bool want = r.live && r.surplus > 0;
  if (want && !surplus_rows_.Contains(row)) surplus_rows_.PushBack(row);
  if (!want) surplus_rows_.Remove(row);
}

// ---- shared pages' coverage ------------------------------------------------------

void RowTable::CovAdd(int32_t h, int64_t c) {
  Coverage& v = cov_[h];
  shared_excess_ -= v.sum - v.max;
  v.sum += c;
  if (v.count == 0) {
    v.max = c;
    v.at_max = 1;
  } else if (c == v.max) {
    ++v.at_max;
  } else {
    if (v.below == nullptr) v.below = std::make_unique<std::map<int64_t, int32_t>>();
    if (c > v.max) {
      (*v.below)[v.max] += v.at_max;
      v.max = c;
      v.at_max = 1;
    } else {
      ++(*v.below)[c];
    }
  }
  ++v.count;
  shared_excess_ += v.sum - v.max;
}

void RowTable::CovRemove(int32_t h, int64_t c) {
  Coverage& v = cov_[h];
  shared_excess_ -= v.sum - v.max;
  v.sum -= c;
  --v.count;
  if (c == v.max) {
    KVMEM_VIRTUAL_CHECK(v.at_max > 0, "handle {}: no live owner covers {} bytes", h, c);
    if (--v.at_max == 0) {
      if (v.below != nullptr && !v.below->empty()) {
        auto top = std::prev(v.below->end());
        v.max = top->first;
        v.at_max = top->second;
        v.below->erase(top);
      } else {
        v.max = 0;
      }
    }
  } else {
    KVMEM_VIRTUAL_CHECK(v.below != nullptr, "handle {}: no live owner covers {} bytes", h, c);
    auto it = v.below->find(c);
    KVMEM_VIRTUAL_CHECK(it != v.below->end(), "handle {}: no live owner covers {} bytes", h, c);
    if (--it->second == 0) v.below->erase(it);
  }
  if (v.below != nullptr && v.below->empty()) v.below.reset();
  shared_excess_ += v.sum - v.max;
}

void RowTable::CovClear(int32_t h) {
  Coverage& v = cov_[h];
  shared_excess_ -= v.sum - v.max;
  v = Coverage{};
}

// ---- private ranges ------------------------------------------------------------

bool RowTable::PagePrivate(int32_t row, int64_t page) const {
  for (int32_t s = 0; s < geo_.segments; ++s) {
    const int32_t h = Entry(row, page, s);
    if (h == kNoHandle) return false;
    const Handle& hd = pool_->get(h);
    if (hd.state != HandleState::kMapped || hd.owners.size() != 1) return false;
    if (!damage_.empty() && damage_.contains(EntryKey(row, page, s))) return false;
  }
  return true;
}

void RowTable::ExtendPrivate(int32_t row) {
  Row& r = rows_[row];
  if (r.private_hi < r.private_lo) r.private_hi = r.private_lo;
  while (r.private_hi < PageLimit(row) && PagePrivate(row, r.private_hi)) ++r.private_hi;
}

void RowTable::SetPrivate(int32_t row, int64_t lo, int64_t hi) {
  rows_[row].private_lo = lo;
  rows_[row].private_hi = hi;
}

void RowTable::CutPrivate(int32_t row, int64_t page) {
  Row& r = rows_[row];
  r.private_hi = std::max(r.private_lo, std::min(r.private_hi, page));
}

void RowTable::RepairPrivate(int32_t row) {
  Row& r = rows_[row];
  for (int64_t k = r.private_lo; k < r.private_hi; ++k) {
    if (!PagePrivate(row, k)) {
      r.private_hi = k;
      break;
    }
  }
  if (r.live) ExtendPrivate(row);
}

// ---- live bytes ----------------------------------------------------------------

int64_t RowTable::LiveBytesSlow() const {
  // Every live row's tokens, minus what shared pages count more than once: a shared
  // page holds max(covered bytes) over its live owners, not their sum.
  int64_t bytes = live_tokens_ * token_bytes_;
  for (int32_t h : pool_->shared()) {
    const Handle& hd = pool_->get(h);
    if (hd.live_owners < 2) continue;
    int64_t sum = 0;
    int64_t max = 0;
    for (int32_t o : hd.owners) {
      if (!rows_[o].live) continue;
      const int64_t c = geo_.CoveredBytes(rows_[o].len, hd.index);
      sum += c;
      max = std::max(max, c);
    }
    bytes -= sum - max;
  }
  return bytes;
}

int64_t RowTable::LiveBytesRecount() const {
  int64_t live_bytes = 0;
  for (int32_t h = 0; h < static_cast<int32_t>(pool_->size()); ++h) {
    const Handle& hd = pool_->get(h);
    if (hd.state != HandleState::kMapped || hd.live_owners == 0) continue;
    int64_t covered = 0;
    for (int32_t o : hd.owners) {
      if (rows_[o].live) covered = std::max(covered, geo_.CoveredBytes(rows_[o].len, hd.index));
    }
    live_bytes += covered;
  }
  return live_bytes;
}

// ---- checks --------------------------------------------------------------------

absl::Status RowTable::CheckLiveRow(int32_t row, int64_t len, const char* op) const {
  if (row < 0 || row >= geo_.rows) {
    return absl::InternalError(
        absl::StrFormat("virtual layout %s: row %d out of [0, %d)", op, row, geo_.rows));
  }
  const Row& r = rows_[row];
  if (!r.live || r.len != len) {
    return absl::InternalError(absl::StrFormat(
        "virtual layout %s: row %d is %s with %d tokens, the cache says live with %d", op, row,
        r.live ? "live" : "idle", r.len, len));
  }
  return absl::OkStatus();
}

absl::Status RowTable::CheckInvariants(const std::vector<std::pair<int32_t, int64_t>>& live,
                                       int32_t job_row, std::vector<int32_t>* refs,
                                       std::vector<int32_t>* live_refs,
                                       std::vector<int32_t>* waiting_refs,
                                       std::vector<int32_t>* in_flight) const {
  auto fail = [](const std::string& what) {
    return absl::InternalError(absl::StrCat("virtual layout invariant: ", what));
  };
  const size_t num_handles = static_cast<size_t>(pool_->size());
  const int32_t S = geo_.segments;
  refs->assign(num_handles, 0);
  live_refs->assign(num_handles, 0);
  waiting_refs->assign(num_handles, 0);
  in_flight->assign(num_handles, 0);

  // Live rows agree with the cache.
  std::vector<int64_t> live_len(rows_.size(), -1);
  for (const auto& [row, len] : live) {
    if (row < 0 || row >= geo_.rows) return fail(absl::StrFormat("live row %d out of range", row));
    if (live_len[row] >= 0) return fail(absl::StrFormat("row %d listed live twice", row));
    if (len < 0 || len > geo_.max_context) {
      return fail(absl::StrFormat("row %d has length %d", row, len));
    }
    live_len[row] = len;
  }
  int64_t num_live = 0;
  int64_t tokens = 0;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_[row];
    if (r.live != (live_len[row] >= 0)) {
      return fail(absl::StrFormat("row %d is %s here but %s for the cache", row,
                                  r.live ? "live" : "idle", r.live ? "not live" : "live"));
    }
    if (r.live && r.len != live_len[row]) {
      return fail(absl::StrFormat("row %d has %d tokens here, %d for the cache", row, r.len,
                                  live_len[row]));
    }
    if (!r.live && r.len != 0) {
      return fail(absl::StrFormat("idle row %d still has length %d", row, r.len));
    }
    if (r.live) {
      ++num_live;
      tokens += r.len;
    }
  }
  if (num_live != live_rows_ || tokens != live_tokens_) {
    return fail(absl::StrFormat("%d live rows with %d tokens, counters say %d and %d", num_live,
                                tokens, live_rows_, live_tokens_));
  }

  // Recount every mapping from the rows.
  int64_t n_surplus = 0;
  for (int32_t row = 0; row < geo_.rows; ++row) {
    const Row& r = rows_[row];
    int64_t mapped = 0;
    int64_t flying = 0;
    int64_t shared = 0;
    int64_t surplus = 0;
    const bool waiting = waiting_.Contains(row);
    const int64_t need = r.live ? geo_.PagesFor(r.len) : 0;
    if (r.entries.size() % S != 0 ||
        static_cast<int64_t>(r.entries.size()) > geo_.pages_per_request()) {
      return fail(absl::StrFormat("row %d has %d page entries", row, r.entries.size()));
    }
    for (size_t i = 0; i < r.entries.size(); ++i) {
      const int32_t h = r.entries[i];
      if (h == kNoHandle) continue;
      const int64_t k = static_cast<int64_t>(i) / S;
      const int32_t s = static_cast<int32_t>(i % S);
      if (h < 0 || static_cast<size_t>(h) >= num_handles) {
        return fail(absl::StrFormat("row %d page %d segment %d holds handle %d", row, k, s, h));
      }
      const Handle& hd = pool_->get(h);
      if (hd.seg != s || hd.index != k) {
        return fail(absl::StrFormat(
            "handle %d is under row %d at (segment %d, page %d) but recorded at (%d, %d)", h, row,
            s, k, hd.seg, hd.index));
      }
      switch (hd.state) {
        case HandleState::kFree:
        case HandleState::kQuarantined:
          return fail(absl::StrFormat("row %d page %d segment %d maps %s handle %d", row, k, s,
                                      hd.state == HandleState::kFree ? "free" : "quarantined", h));
        case HandleState::kInFlight:
          if (job_row != row) {
            return fail(absl::StrFormat("handle %d is in flight under row %d, not the job's %d", h,
                                        row, job_row));
          }
          ++(*in_flight)[h];
          ++flying;
          break;
        case HandleState::kMapped:
          if (std::count(hd.owners.begin(), hd.owners.end(), row) != 1) {
            return fail(
                absl::StrFormat("row %d maps handle %d but is not once among its owners", row, h));
          }
          ++(*refs)[h];
          if (r.live) ++(*live_refs)[h];
          if (waiting) ++(*waiting_refs)[h];
          ++mapped;
          shared += hd.owners.size() > 1;
          // Pages of live rows beyond their length: counted, and never shared (Stats
          // subtracts them from held bytes one handle each).
          if (r.live && k >= need) {
            if (hd.owners.size() > 1) {
              return fail(absl::StrFormat(
                  "live row %d of %d tokens maps shared handle %d at page %d beyond its %d pages",
                  row, r.len, h, k, need));
            }
            ++n_surplus;
            ++surplus;
          }
          break;
      }
    }
    if (mapped != r.mapped || flying != r.in_flight || shared != r.shared || surplus != r.surplus) {
      return fail(absl::StrFormat(
          "row %d maps %d pages (%d in flight, %d shared, %d beyond its length), its counters "
          "say %d (%d, %d, %d)",
          row, mapped, flying, shared, surplus, r.mapped, r.in_flight, r.shared, r.surplus));
    }
    // The row sets: waiting rows behind their fence, ready ones in the heap by pages held
    // and among the donors while they hold any, live ones with surplus listed.
    const bool ready = !r.live && !waiting;
    const bool donor = ready && r.mapped > 0;
    if (waiting != (!r.live && r.fence.event != nullptr) || ready != ready_.Contains(row) ||
        (ready && ready_.key(row) != r.mapped) ||
        donor != idle_donors_.contains({r.idle_since, row}) ||
        (r.live && r.surplus > 0) != surplus_rows_.Contains(row)) {
      return fail(absl::StrFormat(
          "row %d (%s, fence %s, %d pages, %d beyond its length) is misfiled: waiting %d, ready "
          "%d (key %d), donor %d, surplus list %d",
          row, r.live ? "live" : "idle", r.fence.event == nullptr ? "none" : "set", r.mapped,
          r.surplus, waiting, ready_.Contains(row), ready ? ready_.key(row) : -1,
          idle_donors_.contains({r.idle_since, row}), surplus_rows_.Contains(row)));
    }
    if (r.live) {
      for (int64_t k = 0; k < need; ++k) {
        for (int32_t s = 0; s < S; ++s) {
          const int32_t h = Entry(row, k, s);
          if (h == kNoHandle || pool_->get(h).state != HandleState::kMapped) {
            return fail(absl::StrFormat(
                "live row %d of %d tokens: page %d of segment %d is not mapped", row, r.len, k, s));
          }
        }
      }
      if (r.private_lo > r.private_hi) {
        return fail(
            absl::StrFormat("row %d private range [%d, %d)", row, r.private_lo, r.private_hi));
      }
      for (int64_t k = r.private_lo; k < r.private_hi; ++k) {
        if (!PagePrivate(row, k)) {
          return fail(
              absl::StrFormat("row %d page %d is in its private range [%d, %d) but is not "
                              "mapped exclusively and undamaged in every segment",
                              row, k, r.private_lo, r.private_hi));
        }
      }
    }
  }
  if (n_surplus != surplus_handles_) {
    return fail(absl::StrFormat("%d pages mapped beyond live rows' lengths, counter says %d",
                                n_surplus, surplus_handles_));
  }
  if (!ready_.Valid() || waiting_.size() + ready_.size() != geo_.rows - live_rows_ ||
      static_cast<int64_t>(idle_donors_.size()) > ready_.size()) {
    return fail(absl::StrFormat("row sets: %d waiting + %d ready for %d idle rows, %d donors",
                                waiting_.size(), ready_.size(), geo_.rows - live_rows_,
                                idle_donors_.size()));
  }
  for (const auto& [since, row] : idle_donors_) {
    const Row& r = rows_[row];
    if (r.live || waiting_.Contains(row) || r.mapped == 0 || r.idle_since != since) {
      return fail(
          absl::StrFormat("row %d is a donor of pages (idle since %d) but is %s with %d "
                          "pages, idle since %d",
                          row, since, r.live ? "live" : "idle", r.mapped, r.idle_since));
    }
  }
  // Shared pages' coverage against a recount over their live owners.
  int64_t excess = 0;
  for (int32_t h = 0; h < static_cast<int32_t>(num_handles); ++h) {
    const Handle& hd = pool_->get(h);
    const Coverage& v = cov_[h];
    if (hd.state != HandleState::kMapped || hd.owners.size() < 2) {
      if (v.count != 0 || v.sum != 0 || v.max != 0 || v.below != nullptr) {
        return fail(
            absl::StrFormat("handle %d is not shared but tracks %d live owners", h, v.count));
      }
      continue;
    }
    std::map<int64_t, int32_t> counts;
    int64_t sum = 0;
    int32_t n = 0;
    for (int32_t o : hd.owners) {
      if (!rows_[o].live) continue;
      const int64_t c = Covered(o, hd.index);
      ++counts[c];
      sum += c;
      ++n;
    }
    std::map<int64_t, int32_t> below;
    if (v.below != nullptr) below = *v.below;
    if (n > 0) below[v.max] += v.at_max;
    if (n != v.count || sum != v.sum || below != counts ||
        (n > 0 && (counts.rbegin()->first != v.max || v.at_max == 0)) ||
        (v.below != nullptr && v.below->empty())) {
      return fail(absl::StrFormat(
          "shared handle %d: %d live owners cover %d bytes in all, %d at most; recorded: %d, %d, "
          "%d (%d at the max)",
          h, n, sum, n > 0 ? counts.rbegin()->first : 0, v.count, v.sum, v.max, v.at_max));
    }
    excess += sum - (n > 0 ? v.max : 0);
  }
  if (excess != shared_excess_) {
    return fail(absl::StrFormat("shared pages count %d live bytes twice, the counter says %d",
                                excess, shared_excess_));
  }
  // Damage is recorded only on mapped entries.
  for (const auto& [m, d] : Damaged()) {
    if (m.handle == kNoHandle || pool_->get(m.handle).state != HandleState::kMapped) {
      return fail(absl::StrFormat("row %d page %d segment %d is recorded damaged but maps nothing",
                                  m.row, m.page, m.seg));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
