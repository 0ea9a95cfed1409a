// Transaction (allocators/virtual/transaction.h): the steps of one call of the virtual
// layout, their undo, and the retry of what a failed undo left behind.
#include "allocators/virtual/transaction.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "allocators/virtual/virtual_mapping.h"
#include "src/core/logging.h"
#include "src/core/status_macros.h"

namespace kvmem::internal {

Transaction::~Transaction() {
  if (done_) return;
  Undo();
  if (!exact()) {
    Logger()->error("virtual layout: undoing an abandoned call left it not as before ({}): {}",
                    undo_error_.ToString(), StateNotes());
  }
}

void Transaction::Touch(int32_t row) {
  const Row& r = rows_->row(row);
  private_.try_emplace(row, r.private_lo, r.private_hi);
}

void Transaction::UndoFailed(const absl::Status& s) {
  if (undo_error_.ok()) undo_error_ = s;
}

bool Transaction::InLength(const RowMapping& m) const {
  const Row& r = rows_->row(m.row);
  return r.live && m.page < geo_.PagesFor(r.len);
}

// ---- steps -----------------------------------------------------------------------

absl::Status Transaction::Unmap(absl::Span<const RowMapping> items) {
  if (items.empty()) return absl::OkStatus();
  const int batch = ++batches_;
  const int64_t g = geo_.granularity;
  // A damaged kUnmapped entry has nothing in the backend: it only leaves the records.
  std::vector<Granule> granules;
  for (const RowMapping& m : items) {
    if (rows_->DamageAt(m) != Damage::kUnmapped) {
      granules.push_back({rows_->Addr(m), pool_->phys(m.handle)});
    }
  }
  SortGranules(&granules);
  absl::flat_hash_set<uintptr_t> unmapped;
  absl::Status status;
  for (const auto& [addr, bytes] : GranuleRuns(granules, g)) {
    status = vmm_->Unmap(addr, bytes);
    if (!status.ok()) break;
    for (uintptr_t a = addr; a < addr + static_cast<uintptr_t>(bytes); a += g) unmapped.insert(a);
  }
  std::map<int32_t, int64_t> lowest;  // row -> lowest page it lost
  for (const RowMapping& m : items) {
    const Damage d = rows_->DamageAt(m);
    if (d != Damage::kUnmapped && !unmapped.contains(rows_->Addr(m))) continue;
    Touch(m.row);
    rows_->Detach(m);
    const bool had_owners = !pool_->Unused(m.handle);
    if (!had_owners) freed_.push_back(m.handle);
    Step st{.kind = Kind::kUnmapped, .batch = batch, .m = m};
    st.had_owners = had_owners;
    st.damage = d;
    steps_.push_back(st);
    auto [it, inserted] = lowest.try_emplace(m.row, m.page);
    if (!inserted) it->second = std::min(it->second, m.page);
  }
  for (const auto& [row, page] : lowest) rows_->CutPrivate(row, page);
  return status;
}

int32_t Transaction::Take() {
  if (freed_taken_ < freed_.size()) return freed_[freed_taken_++];
  const int32_t h = pool_->Pop();
  popped_.push_back(h);
  return h;
}

absl::Status Transaction::UnmapStray(uintptr_t addr, absl::string_view what) {
  if (absl::Status u = vmm_->Unmap(addr, geo_.granularity); !u.ok()) {
    return absl::Status(u.code(), absl::StrCat(what,
                                               " is still mapped (an earlier unmap of it failed) "
                                               "and unmapping it failed again: ",
                                               u.message()));
  }
  const int32_t old = pool_->RemoveStray(addr);
  if (pool_->Unused(old)) pool_->Push(old);
  return absl::OkStatus();
}

absl::Status Transaction::Map(absl::Span<const RowMapping> items, bool fresh) {
  if (items.empty()) return absl::OkStatus();
  const int batch = ++batches_;
  for (const RowMapping& m : items) {
    const uintptr_t addr = rows_->Addr(m);
    bool adopted = false;
    if (const HandlePool::Stray* stray = pool_->FindStray(addr); stray != nullptr) {
      // The backend refuses to map over a mapping, and RetryQuarantine could not unmap
      // this one at the start of the call.
      if (stray->handle == m.handle) {
        if (stray->accessible) accessible_.insert(addr);
        pool_->RemoveStray(addr);
        adopted = true;
      } else {
        KVMEM_RETURN_IF_ERROR(UnmapStray(
            addr, absl::StrFormat("page %d (segment %d) of row %d", m.page, m.seg, m.row)));
      }
    }
    if (!adopted) {
      if (absl::Status s = vmm_->Map(addr, pool_->phys(m.handle)); !s.ok()) return s;
    }
    Touch(m.row);
    rows_->Attach(m);
    Step st{.kind = Kind::kMapped, .batch = batch, .m = m};
    st.fresh = fresh;
    st.adopted = adopted;
    steps_.push_back(st);
  }
  return absl::OkStatus();
}

absl::Status Transaction::SetAccess(absl::Span<const uintptr_t> addrs) {
  std::vector<Granule> granules;
  granules.reserve(addrs.size());
  for (uintptr_t a : addrs) granules.push_back({a, 0});
  const int64_t g = geo_.granularity;
  for (const auto& [addr, bytes] : GranuleRuns(granules, g)) {
    if (absl::Status s = vmm_->SetAccess(addr, bytes); !s.ok()) return s;
    for (uintptr_t a = addr; a < addr + static_cast<uintptr_t>(bytes); a += g) {
      accessible_.insert(a);
    }
  }
  return absl::OkStatus();
}

absl::Status Transaction::CopyViaScratch(uintptr_t src, int32_t h) {
  const int64_t g = geo_.granularity;
  if (pool_->FindStray(scratch_) != nullptr) {
    // An earlier call could not unmap it (RetryQuarantine failed too this call): try
    // once more rather than fail on a mapping we know about.
    KVMEM_RETURN_IF_ERROR(UnmapStray(scratch_, "copy on write: the scratch granule"));
  }
  KVMEM_RETURN_IF_ERROR(vmm_->Map(scratch_, pool_->phys(h)));
  bool accessible = false;
  absl::Status s = vmm_->SetAccess(scratch_, g);
  if (s.ok()) {
    accessible = true;
    s = vmm_->Copy(scratch_, src, g);
  }
  // The scratch mapping must go, or the handle would stay mapped where no row records
  // it: one retry covers a transient failure.
  absl::Status u = vmm_->Unmap(scratch_, g);
  if (!u.ok()) u = vmm_->Unmap(scratch_, g);
  if (u.ok()) return s;
  // Recorded as a stray: the handle is quarantined and later calls retry the unmap.
  pool_->AddStray(scratch_, h, accessible);
  return absl::Status(
      u.code(),
      absl::StrCat("copy on write: unmapping the scratch granule failed: ", u.message(),
                   s.ok() ? "" : absl::StrCat(" (after ", s.ToString(), ")"),
                   "; so the cache is not as before: the scratch granule stays mapped until a "
                   "later call unmaps it"));
}

absl::Status Transaction::Remap(const RowMapping& m, int32_t h) {
  const uintptr_t addr = rows_->Addr(m);
  KVMEM_RETURN_IF_ERROR(vmm_->Unmap(addr, geo_.granularity));
  Touch(m.row);
  rows_->Detach(m);  // m.handle stays mapped under its other owners
  Step st{.kind = Kind::kRemapped, .batch = ++batches_, .m = {m.row, m.page, m.seg, h}};
  st.old = m.handle;
  steps_.push_back(st);
  KVMEM_RETURN_IF_ERROR(vmm_->Map(addr, pool_->phys(h)));
  rows_->Attach(h, m.row, m.page, m.seg);
  steps_.back().mapped = true;
  return absl::OkStatus();
}

// ---- commit and undo ---------------------------------------------------------------

void Transaction::Commit() {
  for (size_t i = freed_taken_; i < freed_.size(); ++i) {
    if (pool_->Unused(freed_[i])) pool_->Push(freed_[i]);
  }
  steps_.clear();
  done_ = true;
}

absl::Status Transaction::Rollback(const absl::Status& cause) {
  Undo();
  if (exact()) return cause;
  return absl::Status(
      cause.code(), absl::StrCat(cause.message(),
                                 undo_error_.ok() ? std::string("; it could not be undone entirely")
                                                  : absl::StrCat("; undoing it failed too (",
                                                                 undo_error_.ToString(), ")"),
                                 ", so the cache is not as before: ", StateNotes()));
}

void Transaction::Undo() {
  done_ = true;
  size_t end = steps_.size();
  while (end > 0) {
    size_t begin = end - 1;
    while (begin > 0 && steps_[begin - 1].batch == steps_[end - 1].batch) --begin;
    const absl::Span<const Step> group(steps_.data() + begin, end - begin);
    switch (group.front().kind) {
      case Kind::kUnmapped:
        UndoUnmapped(group);
        break;
      case Kind::kMapped:
        UndoMapped(group);
        break;
      case Kind::kRemapped:
        UndoRemapped(group.front());
        break;
    }
    end = begin;
  }
  steps_.clear();
  // Handles taken from the pool go back in reverse order, those Unmap freed in order,
  // unless a failed undo left them mapped somewhere.
  absl::flat_hash_set<int32_t> pushed;
  for (auto it = popped_.rbegin(); it != popped_.rend(); ++it) {
    if (pool_->Unused(*it) && pushed.insert(*it).second) pool_->Push(*it);
  }
  for (int32_t h : freed_) {
    if (pool_->Unused(h) && pushed.insert(h).second) pool_->Push(h);
  }
  // Private ranges as they were, as far as their pages are still private.
  for (const auto& [row, range] : private_) {
    rows_->SetPrivate(row, range.first, range.second);
    rows_->RepairPrivate(row);
  }
  // Every mapping is back as it was: no mapping changed.
  if (exact()) rows_->set_mapping_epoch(epoch_);
}

void Transaction::UndoUnmapped(absl::Span<const Step> steps) {
  const int64_t g = geo_.granularity;
  auto lose = [&](const Step& st) {
    ++lost_[st.m.row];
    if (!st.had_owners) ++lost_pages_;
  };
  std::vector<const Step*> remap;
  // One Unmap may take a handle from several rows (a batch shrinking a parent and its
  // child, Trim): the last one left it without owners, the earlier ones kept it mapped.
  // Decided from the last back, so that the earlier ones count it as coming back too.
  absl::flat_hash_set<int32_t> returning;
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    const Step& st = *it;
    const Handle& hd = pool_->get(st.m.handle);
    // Map back only where nothing else took the handle or the position meanwhile (a
    // failed undo of a later step may have kept it elsewhere).
    const bool can = rows_->Entry(st.m.row, st.m.page, st.m.seg) == kNoHandle &&
                     (returning.contains(st.m.handle) ||
                      (st.had_owners ? hd.state == HandleState::kMapped && hd.seg == st.m.seg &&
                                           hd.index == st.m.page
                                     : pool_->Unused(st.m.handle)));
    if (!can) {
      lose(st);
      continue;
    }
    returning.insert(st.m.handle);
    if (st.damage == Damage::kUnmapped) {  // nothing was unmapped: restore the record
      rows_->Attach(st.m);
      rows_->SetDamage(st.m.row, st.m.page, st.m.seg, Damage::kUnmapped);
      continue;
    }
    remap.push_back(&st);
  }
  std::sort(remap.begin(), remap.end(),
            [&](const Step* a, const Step* b) { return rows_->Addr(a->m) < rows_->Addr(b->m); });
  std::vector<char> mapped(remap.size(), 0);
  std::vector<Granule> granules;
  for (size_t i = 0; i < remap.size(); ++i) {
    const uintptr_t addr = rows_->Addr(remap[i]->m);
    absl::Status s = vmm_->Map(addr, pool_->phys(remap[i]->m.handle));
    if (!s.ok()) {
      UndoFailed(s);
      continue;
    }
    mapped[i] = 1;
    granules.push_back({addr, 0});
  }
  absl::flat_hash_set<uintptr_t> accessible;
  for (const auto& [addr, bytes] : GranuleRuns(granules, g)) {
    if (absl::Status s = vmm_->SetAccess(addr, bytes); !s.ok()) {
      UndoFailed(s);
      continue;
    }
    for (uintptr_t a = addr; a < addr + static_cast<uintptr_t>(bytes); a += g) accessible.insert(a);
  }
  for (size_t i = 0; i < remap.size(); ++i) {
    const Step& st = *remap[i];
    const uintptr_t addr = rows_->Addr(st.m);
    if (mapped[i] && accessible.contains(addr)) {
      rows_->Attach(st.m);
      continue;
    }
    if (mapped[i]) {
      // Mapped without access: a page holding tokens stays with its row, damaged; one
      // without is unmapped again, or, if that fails too, recorded damaged as well.
      if (!InLength(st.m)) {
        if (absl::Status u = vmm_->Unmap(addr, g); u.ok()) {
          lose(st);
          continue;
        } else {
          UndoFailed(u);
        }
      }
      rows_->Attach(st.m);
      rows_->SetDamage(st.m.row, st.m.page, st.m.seg, Damage::kNoAccess);
      ++damaged_[st.m.row];
      continue;
    }
    if (InLength(st.m)) {  // its tokens are in the handle: the row keeps it, to be remapped
      rows_->Attach(st.m);
      rows_->SetDamage(st.m.row, st.m.page, st.m.seg, Damage::kUnmapped);
      ++damaged_[st.m.row];
      continue;
    }
    lose(st);
  }
}

void Transaction::UndoMapped(absl::Span<const Step> steps) {
  const int64_t g = geo_.granularity;
  std::vector<Granule> granules;
  for (const Step& st : steps) {
    if (!st.adopted) granules.push_back({rows_->Addr(st.m), 0});
  }
  SortGranules(&granules);
  absl::flat_hash_set<uintptr_t> unmapped;
  for (const auto& [addr, bytes] : GranuleRuns(granules, g)) {
    if (absl::Status u = vmm_->Unmap(addr, bytes); !u.ok()) {
      UndoFailed(u);
      continue;
    }
    for (uintptr_t a = addr; a < addr + static_cast<uintptr_t>(bytes); a += g) unmapped.insert(a);
  }
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    const Step& st = *it;
    const uintptr_t addr = rows_->Addr(st.m);
    if (st.adopted) {
      // A stray before this call: one again, as the backend holds it (RetryQuarantine
      // unmaps it once the backend lets it), with no backend call that could fail.
      rows_->Detach(st.m);
      pool_->AddStray(addr, st.m.handle, accessible_.contains(addr));
      continue;
    }
    if (unmapped.contains(addr)) {
      rows_->Detach(st.m);
      continue;
    }
    bool accessible = accessible_.contains(addr);
    if (st.fresh && !InLength(st.m)) {
      // A fresh page beyond the row's tokens may stay as its surplus once accessible.
      if (!accessible) {
        absl::Status a = vmm_->SetAccess(addr, g);
        accessible = a.ok();
        if (!accessible) UndoFailed(a);
      }
      if (accessible) {
        ++kept_surplus_[st.m.row];
        continue;
      }
    }
    rows_->Detach(st.m);
    pool_->AddStray(addr, st.m.handle, accessible);
    ++strays_;
  }
}

void Transaction::UndoRemapped(const Step& st) {
  const int64_t g = geo_.granularity;
  const uintptr_t addr = rows_->Addr(st.m);
  if (st.mapped) {
    if (absl::Status u = vmm_->Unmap(addr, g); !u.ok()) {
      // The row keeps its copy (copy on write happened for this page after all).
      UndoFailed(u);
      bool accessible = accessible_.contains(addr);
      if (!accessible) {
        absl::Status a = vmm_->SetAccess(addr, g);
        accessible = a.ok();
        if (!accessible) UndoFailed(a);
      }
      if (accessible) {
        ++kept_copy_[st.m.row];
      } else {
        rows_->SetDamage(st.m.row, st.m.page, st.m.seg, Damage::kNoAccess);
        ++damaged_[st.m.row];
      }
      ++kept_copies_;
      return;
    }
    rows_->Detach(st.m);
  }
  const RowMapping orig{st.m.row, st.m.page, st.m.seg, st.old};
  Damage damage = Damage::kNone;
  if (absl::Status s = vmm_->Map(addr, pool_->phys(st.old)); !s.ok()) {
    UndoFailed(s);
    damage = Damage::kUnmapped;
  } else if (absl::Status a = vmm_->SetAccess(addr, g); !a.ok()) {
    UndoFailed(a);
    damage = Damage::kNoAccess;
  }
  rows_->Attach(orig);
  if (damage != Damage::kNone) {
    rows_->SetDamage(orig.row, orig.page, orig.seg, damage);
    ++damaged_[orig.row];
  }
}

std::string Transaction::StateNotes() const {
  std::vector<std::string> notes;
  for (const auto& [row, n] : damaged_) {
    notes.push_back(absl::StrFormat(
        "row %d has %d page(s) holding its tokens that are not mapped or not accessible until a "
        "later call restores them (those tokens cannot be read meanwhile)",
        row, n));
  }
  for (const auto& [row, n] : kept_copy_) {
    notes.push_back(absl::StrFormat("row %d keeps its own copy of %d page(s) it shared", row, n));
  }
  for (const auto& [row, n] : kept_surplus_) {
    notes.push_back(absl::StrFormat(
        "row %d keeps %d new page(s) mapped beyond its length (reclaimable)", row, n));
  }
  for (const auto& [row, n] : lost_) {
    notes.push_back(absl::StrFormat("row %d lost %d page(s) that held none of its tokens", row, n));
  }
  if (strays_ > 0) {
    notes.push_back(absl::StrFormat(
        "%d page(s) stay mapped where no row uses them until a later call unmaps them", strays_));
  }
  if (notes.empty()) notes.push_back("nothing the call changed is left behind");
  return absl::StrJoin(notes, "; ");
}

// ---- the quarantine ----------------------------------------------------------------

absl::Status RetryQuarantine(Vmm* vmm, int64_t granularity, HandlePool* pool, RowTable* rows) {
  absl::Status first;
  std::vector<uintptr_t> strays;
  for (const auto& [addr, stray] : pool->strays()) strays.push_back(addr);
  for (uintptr_t addr : strays) {
    if (absl::Status u = vmm->Unmap(addr, granularity); !u.ok()) {
      first.Update(u);
      continue;
    }
    const int32_t h = pool->RemoveStray(addr);
    if (pool->Unused(h)) pool->Push(h);
  }
  for (auto [m, damage] : rows->Damaged()) {
    const uintptr_t addr = rows->Addr(m);
    if (damage == Damage::kUnmapped) {
      if (absl::Status s = vmm->Map(addr, pool->phys(m.handle)); !s.ok()) {
        first.Update(s);
        continue;
      }
      rows->SetDamage(m.row, m.page, m.seg, Damage::kNoAccess);
    }
    if (absl::Status a = vmm->SetAccess(addr, granularity); !a.ok()) {
      first.Update(a);
      continue;
    }
    rows->SetDamage(m.row, m.page, m.seg, Damage::kNone);
    if (rows->row(m.row).live) rows->ExtendPrivate(m.row);
  }
  return first;
}

}  // namespace kvmem::internal
