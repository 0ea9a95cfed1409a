// PagePool: the bookkeeping of a paged KV cache's pages, with no memory behind it.
// Which page ids are free, how many requests hold each used page (ref counts for
// shared prefixes), and which freed pages wait in quarantine for a fence (the GPU may
// still read them). The layout that owns a PagePool maps memory for the ids; the pool
// itself makes no backend call, so it is testable in plain C++.
//
// Every page id in [0, num_pages) is in exactly one state:
//   free         refcount 0, in the free set;
//   used         refcount >= 1 (shared when two or more requests own it);
//   quarantined  refcount 0, waiting for the fence it was freed under.
// A used page may also be pinned: the prefix cache holds one reference on it (counted in
// refcount, so a writer copies it first), and keeps it while no request owns it
// (owners() == 0: "cached only").
// Allocate() hands out the LOWEST free id, so used pages pack at the bottom of the pool
// and an elastic pool can give its free tail back (docs/layouts.md). AllocateNear()
// keeps a request's pages next to each other instead (PagePlacement::kContiguous).
//
// Not thread-safe: the owning layout calls it under KvCache's mutex.
#ifndef KVMEM_SRC_CORE_PAGE_POOL_H_
#define KVMEM_SRC_CORE_PAGE_POOL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "kvmem/vmm.h"

namespace kvmem::internal {

// A set of ids in [0, size) as a two-level bitmap: a bit per id and a summary bit per
// 64-id word, so the lowest member is found in O(size / 4096) word reads at worst and
// O(1) in the common case (a hint remembers where the lowest member may be).
class IdBitmap {
 public:
  // REQUIRES: size >= 0.
  explicit IdBitmap(int64_t size = 0);

  int64_t size() const { return size_; }
  int64_t count() const { return count_; }
  bool Contains(int64_t id) const { return (bits_[id >> 6] >> (id & 63)) & 1; }
  // REQUIRES: 0 <= id < size. Return whether the set changed.
  bool Insert(int64_t id);
  bool Erase(int64_t id);
  // Lowest member, or -1 when empty.
  int64_t Lowest() const;
  // Highest id in [0, size) that is NOT a member, or -1 when every id is a member.
  int64_t HighestAbsent() const;
  // Membership bits of ids [64 w, 64 w + 64). REQUIRES: 0 <= w < ceil(size / 64).
  uint64_t word(int64_t w) const { return bits_[w]; }
  const uint64_t& word_ref(int64_t w) const { return bits_[w]; }

 private:
  int64_t size_ = 0;
  int64_t count_ = 0;
  std::vector<uint64_t> bits_;     // bit i of word w: id w * 64 + i is a member
  std::vector<uint64_t> summary_;  // bit i of word s: bits_[s * 64 + i] != 0
  // Every summary word below this index is zero.
  mutable int64_t low_hint_ = 0;
};

class PagePool {
 public:
  // All pages start free. REQUIRES: 0 <= num_pages <= INT32_MAX.
  explicit PagePool(int32_t num_pages);

  int32_t num_pages() const { return num_pages_; }
  int64_t free_count() const { return free_.count(); }
  int64_t used_count() const { return used_; }
  int64_t shared_count() const { return shared_; }
  int64_t quarantined_count() const { return quarantined_; }
  int32_t refcount(int32_t page) const { return refcount_[page]; }
  // References of requests: refcount less the prefix cache's pin.
  int32_t owners(int32_t page) const { return refcount_[page] - pinned_[page]; }
  bool pinned(int32_t page) const { return pinned_[page] != 0; }
  int64_t pinned_count() const { return pinned_count_; }
  // Pinned pages that no request owns: the prefix cache's own memory.
  int64_t cached_only_count() const { return cached_only_; }
  // Start loading what a write into `page` reads (its refcount) and what taking the page
  // after it reads (the free bits around it): a batch that grows requests one after the
  // other otherwise waits for each of these cache misses in turn.
  // REQUIRES: 0 <= page < num_pages().
  void PrefetchRefcount(int32_t page) const { __builtin_prefetch(&refcount_[page]); }
  void PrefetchFreeBits(int32_t page) const { __builtin_prefetch(&free_.word_ref(page >> 6)); }
  bool is_free(int32_t page) const { return free_.Contains(page); }
  // Lowest free page, or -1.
  int32_t LowestFree() const { return static_cast<int32_t>(free_.Lowest()); }
  // Highest page that is used or quarantined, or -1 when every page is free.
  int32_t HighestNonFree() const { return static_cast<int32_t>(free_.HighestAbsent()); }

  // Takes the lowest free page with refcount 1; -1 when none is free.
  int32_t Allocate();
  // Takes a free page with refcount 1 for a request whose last page is `near` (-1: it
  // has none), keeping each request's pages in runs of adjacent ids:
  //   1. near + 1, when free and below `limit`;
  //   2. else a new run: in near's 64-page group when it has a free page below `limit`,
  //      else in the group with the most free pages below `limit` (the lowest of equals:
  //      the lowest wholly free group when there is one); within the group, in its
  //      longest free run (the first page of a run that opens the group, else the
  //      run's middle, leaving the first half to the request that owns the page before
  //      the run);
  //   3. the lowest free page when none is free below `limit`.
  // Why: a decode kernel reads a request's pages in order; pages adjacent in memory
  // share the GPU's 2 MiB translation entries (64 pages of 32 KiB at page 16 of the
  // model shape), where lowest-first interleaves the pages of requests that grow
  // together. `limit` is the count of mapped pages (an elastic pool): steps 1-2 never
  // make a pool grow that lowest-first would not. -1 when none is free.
  // REQUIRES: -1 <= near < num_pages. O(1) (a scan of 64 counts at worst).
  int32_t AllocateNear(int32_t near, int64_t limit);
  // REQUIRES: page is used.
  void AddRef(int32_t page);
  // Drops one reference. A non-null `fence` is remembered even while other references
  // remain (a shared page freed by one request under a fence must not be reused before
  // that fence, whoever drops the last reference). When the count reaches 0 the page is
  // freed at once if no fence was given for it, else quarantined until every fence
  // given for it completes. Pages dropped with the same single fence in a row share one
  // quarantine entry. Returns whether the count reached 0. REQUIRES: page is used.
  bool Unref(int32_t page, const Fence& fence = {});
  // The prefix cache's reference. Pin: REQUIRES owners(page) >= 1 and not pinned.
  // Unpin: REQUIRES pinned; drops that reference as Unref does (no fence: whoever dropped
  // the page under a fence left it pending) and returns whether the count reached 0.
  void Pin(int32_t page);
  bool Unpin(int32_t page);
  // Whether a write into `page` in place could change what someone else reads: another
  // request holds it, or a request that dropped it under a fence that `complete` does
  // not report finished yet (its kernel may still be reading the page). Such a page
  // counts as shared until that fence completes, so a writer must copy it first.
  // `copies_before`: writers of one batch that already chose to copy this page (each
  // will drop its reference), so the last of several sharing writers writes in place.
  // REQUIRES: page is used; 0 <= copies_before < refcount(page).
  bool WriteNeedsCopy(int32_t page, const std::function<bool(const Fence&)>& complete,
                      int32_t copies_before = 0) const {
    if (refcount_[page] - copies_before > 1) return true;
    // The common case, inline: no dropped reference waits on a fence.
    return !pending_fences_.empty() && FencePending(page, complete);
  }

  // Whether `page`, once its count reaches 0, would wait in quarantine: a request dropped
  // it under a fence that `complete` does not report finished. REQUIRES: page is used.
  bool FencePending(int32_t page, const std::function<bool(const Fence&)>& complete) const;

  // Quarantined pages that Reclaim(complete, true) would leave in quarantine: those with
  // a fence `complete` does not report finished. Stats count the others as free, so
  // that what they report does not depend on whether a call has reclaimed them yet.
  int64_t PendingCount(const std::function<bool(const Fence&)>& complete) const;

  // Frees quarantined pages whose fence `complete` reports finished. With
  // scan_all = false stops at the first entry still pending (fences of one stream
  // complete in order, so that is the cheap check); true looks at every entry.
  // Returns the pages freed.
  int64_t Reclaim(const std::function<bool(const Fence&)>& complete, bool scan_all);

  // OK when the counters agree with a recount and every page is in exactly one state;
  // Internal naming the first page or counter that is wrong.
  absl::Status CheckConsistency() const;

 private:
  struct QuarantineEntry {
    std::vector<Fence> fences;  // the pages are free once all of them completed
    std::vector<int32_t> pages;
  };

  // Moves free `page` to used with refcount 1 and returns it; -1 for page -1.
  int32_t Take(int64_t page);
  // The free pages of 64-page group `group` that are below `limit`, as bits.
  uint64_t FreeBitsBelow(int64_t group, int64_t limit) const;
  // Moves `page` into (free) or out of the free set, keeping the group counts.
  void MarkFree(int64_t page, bool free);
  // A page whose count reached 0: free, or quarantined under its pending fences and
  // `fence`. Returns true.
  bool Drop(int32_t page, const Fence& fence);

  int32_t num_pages_;
  IdBitmap free_;
  // Free pages per 64-page group, and the groups by that count (by_free_[n]: the groups
  // with n free pages), so the group with the most free pages is found in O(64).
  std::vector<uint8_t> group_free_;
  std::vector<IdBitmap> by_free_;
  // Bit n - 1 set: by_free_[n] is not empty (n in 1..64), so that AllocateNear finds the
  // fullest groups without looking at the empty buckets: in a nearly full pool it starts
  // a new run for most pages it hands out.
  uint64_t nonempty_buckets_ = 0;
  std::vector<int32_t> refcount_;
  std::vector<uint8_t> pinned_;             // [page] 1 while the prefix cache holds a reference
  std::deque<QuarantineEntry> quarantine_;  // oldest first
  // Fences given for used pages by owners that dropped their reference (sparse).
  absl::flat_hash_map<int32_t, std::vector<Fence>> pending_fences_;
  int64_t used_ = 0;
  int64_t shared_ = 0;
  int64_t quarantined_ = 0;
  int64_t pinned_count_ = 0;
  int64_t cached_only_ = 0;  // pinned with no owner
};

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CORE_PAGE_POOL_H_
