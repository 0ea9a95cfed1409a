// Sets of request rows that the virtual layout's row table keeps up to date as rows
// change state, so that no call has to scan every row to find one (AcquireRow, the
// reclamation donors, the rows waiting for a fence): an intrusive list and an indexed
// heap. Both are sized once (Init) and never allocate afterwards: they sit on paths
// such as Release and AcquireRow that must cost the same at 64 rows as at 4096.
//
// Not thread-safe: the row table uses them under the layout's mutex.
#ifndef KVMEM_ALLOCATORS_VIRTUAL_ROW_SETS_H_
#define KVMEM_ALLOCATORS_VIRTUAL_ROW_SETS_H_

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace kvmem::internal {

// A doubly linked list of distinct rows threaded through per-row links: O(1) insertion
// at the back and removal anywhere. Iteration is in insertion order (FIFO).
class RowList {
 public:
  void Init(int32_t rows) { links_.assign(static_cast<size_t>(rows), Link{}); }
  bool Contains(int32_t r) const { return links_[r].in; }
  int64_t size() const { return size_; }
  // -1 when empty / at the end.
  int32_t front() const { return head_; }
  int32_t next(int32_t r) const { return links_[r].next; }

  // REQUIRES: !Contains(r).
  void PushBack(int32_t r) {
    Link& l = links_[r];
    l = Link{.prev = tail_, .next = -1, .in = true};
    if (tail_ >= 0) {
      links_[tail_].next = r;
    } else {
      head_ = r;
    }
    tail_ = r;
    ++size_;
  }
  // No-op unless Contains(r).
  void Remove(int32_t r) {
    Link& l = links_[r];
    if (!l.in) return;
    if (l.prev >= 0) {
      links_[l.prev].next = l.next;
    } else {
      head_ = l.next;
    }
    if (l.next >= 0) {
      links_[l.next].prev = l.prev;
    } else {
      tail_ = l.prev;
    }
    l = Link{};
    --size_;
  }

 private:
  struct Link {
    int32_t prev = -1;
    int32_t next = -1;
    bool in = false;
  };
  std::vector<Link> links_;
  int32_t head_ = -1;
  int32_t tail_ = -1;
  int64_t size_ = 0;
};

// A max-heap of distinct rows by an integer key, ties to the lowest row, with each row's
// place recorded so that a key can change and a row can leave in O(log rows).
class RowHeap {
 public:
  void Init(int32_t rows) {
    heap_.clear();
    heap_.reserve(static_cast<size_t>(rows));
    pos_.assign(static_cast<size_t>(rows), -1);
    key_.assign(static_cast<size_t>(rows), 0);
  }
  bool Contains(int32_t r) const { return pos_[r] >= 0; }
  bool empty() const { return heap_.empty(); }
  int64_t size() const { return static_cast<int64_t>(heap_.size()); }
  // REQUIRES: !empty().
  int32_t top() const { return heap_.front(); }

  // REQUIRES: !Contains(r).
  void Insert(int32_t r, int64_t key) {
    key_[r] = key;
    pos_[r] = static_cast<int32_t>(heap_.size());
    heap_.push_back(r);  // within the capacity reserved by Init: no allocation
    SiftUp(heap_.size() - 1);
  }
  // REQUIRES: Contains(r).
  void Update(int32_t r, int64_t key) {
    const int64_t old = key_[r];
    key_[r] = key;
    if (key > old) {
      SiftUp(static_cast<size_t>(pos_[r]));
    } else if (key < old) {
      SiftDown(static_cast<size_t>(pos_[r]));
    }
  }
  // No-op unless Contains(r).
  void Remove(int32_t r) {
    if (pos_[r] < 0) return;
    const size_t i = static_cast<size_t>(pos_[r]);
    const int32_t last = heap_.back();
    heap_.pop_back();
    pos_[r] = -1;
    if (last == r) return;
    heap_[i] = last;
    pos_[last] = static_cast<int32_t>(i);
    SiftUp(i);
    SiftDown(static_cast<size_t>(pos_[last]));
  }

  // For invariant checks: the heap order holds and every place is recorded.
  bool Valid() const {
    for (size_t i = 0; i < heap_.size(); ++i) {
      if (pos_[heap_[i]] != static_cast<int32_t>(i)) return false;
      if (i > 0 && Before(heap_[i], heap_[(i - 1) / 2])) return false;
    }
    return true;
  }
  int64_t key(int32_t r) const { return key_[r]; }

 private:
  bool Before(int32_t a, int32_t b) const { return key_[a] != key_[b] ? key_[a] > key_[b] : a < b; }
  void Swap(size_t i, size_t j) {
    std::swap(heap_[i], heap_[j]);
    pos_[heap_[i]] = static_cast<int32_t>(i);
    pos_[heap_[j]] = static_cast<int32_t>(j);
  }
  void SiftUp(size_t i) {
    while (i > 0 && Before(heap_[i], heap_[(i - 1) / 2])) {
      Swap(i, (i - 1) / 2);
      i = (i - 1) / 2;
    }
  }
  void SiftDown(size_t i) {
    for (;;) {
      size_t best = i;
      const size_t l = 2 * i + 1;
      const size_t r = l + 1;
      if (l < heap_.size() && Before(heap_[l], heap_[best])) best = l;
      if (r < heap_.size() && Before(heap_[r], heap_[best])) best = r;
      if (best == i) return;
      Swap(i, best);
      i = best;
    }
  }

  std::vector<int32_t> heap_;
  std::vector<int32_t> pos_;  // row -> index in heap_, -1 if absent
  std::vector<int64_t> key_;
};

}  // namespace kvmem::internal

#endif  // KVMEM_ALLOCATORS_VIRTUAL_ROW_SETS_H_
