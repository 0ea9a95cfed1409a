// RunningBatchTable: the arrays behind kvmem::RunningBatchView, updated entry by entry
// as the cache changes a member, so that a step costs the entries and pages it changes.
//
// Memory: one anonymous private mapping (MAP_NORESERVE) holds every array at full
// capacity, so the addresses never change and pages never written cost nothing (the page
// table is max_batch x the pages of max_context: sized for the worst case, resident for
// what requests use). The CSR form is packed, so it is materialised on request from the
// first entry whose page count changed.
//
// Not thread-safe: KvCache calls it under its mutex.
#ifndef KVMEM_SRC_CACHE_RUNNING_BATCH_TABLE_H_
#define KVMEM_SRC_CACHE_RUNNING_BATCH_TABLE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/running_batch.h"
#include "src/core/int_math.h"

namespace kvmem::internal {

class RunningBatchTable {
 public:
  // `stride`: pages per entry of the padded table (0: no pages, the virtual layout);
  // `page_tokens`: tokens per page (paged). InvalidArgument for max_batch < 1 or a
  // negative stride; ResourceExhausted when the address space cannot be mapped.
  static absl::StatusOr<RunningBatchTable> Make(int32_t max_batch, int64_t stride,
                                                int64_t page_tokens);
  RunningBatchTable() = default;
  ~RunningBatchTable();
  RunningBatchTable(RunningBatchTable&& o) noexcept { *this = static_cast<RunningBatchTable&&>(o); }
  RunningBatchTable& operator=(RunningBatchTable&& o) noexcept;
  RunningBatchTable(const RunningBatchTable&) = delete;
  RunningBatchTable& operator=(const RunningBatchTable&) = delete;

  int32_t max_batch() const { return max_batch_; }
  int32_t size() const { return size_; }
  // The row of entry `slot` (-1: empty). REQUIRES: 0 <= slot < max_batch().
  int32_t row(int32_t slot) const { return row_ids_[slot]; }

  // Entries [size, old size) become empty; entries below keep their values until Set.
  void Resize(int32_t size);
  // Entry `slot` describes a request in `row` with `len` tokens on `pages` (its first
  // ceil(len / page_tokens) pages, paged). REQUIRES: slot < size(), pages fit the stride.
  void Set(int32_t slot, int32_t row, int64_t len, absl::Span<const int32_t> pages);
  // The request of entry `slot` went from `old_len` to `len` tokens; `pages` are all its
  // pages now. Only its pages from the one holding token old_len - 1 (which a copy on
  // write may have replaced) on are written.
  void Grew(int32_t slot, int64_t old_len, int64_t len, absl::Span<const int32_t> pages);
  // The request of entry `slot` now has `len` tokens, fewer than before.
  void Shrank(int32_t slot, int64_t len);
  // The request of entry `slot` ended: the entry is empty (seq_len 0, row -1).
  void Clear(int32_t slot);

  // Recounts max_seq_len when the longest entry shrank or ended since (O(size) then).
  void Refresh();
  // The arrays; max_seq_len is current only after Refresh (max_seq_len_current()).
  RunningBatchView View() const;
  // Moves the page-table entries changed since the last call into *out (its vector's
  // capacity is reused).
  void TakeChanges(RunningBatchChanges* out);
  bool max_seq_len_current() const { return !max_stale_; }
  // Materialises the CSR form from the first entry changed since the last call.
  RunningBatchCsr Csr();

 private:
  int64_t PagesFor(int64_t len) const { return page_tokens_ > 0 ? page_div_.CeilQuot(len) : 0; }
  void SetLen(int32_t slot, int64_t len);
  // Writes page_table[slot][k] = page and logs the change.
  void Write(int32_t slot, int64_t k, int32_t page);
  void Unmap();

  void* base_ = nullptr;
  int64_t bytes_ = 0;
  int32_t max_batch_ = 0;
  int32_t size_ = 0;
  int64_t stride_ = 0;
  int64_t page_tokens_ = 0;
  Divider page_div_;  // by page_tokens_ (1 without pages)
  int32_t* seq_lens_ = nullptr;
  int32_t* row_ids_ = nullptr;
  int32_t* last_page_len_ = nullptr;
  int32_t* page_table_ = nullptr;
  int32_t* indptr_ = nullptr;
  int32_t* indices_ = nullptr;
  // The longest entry, and whether it must be recounted (the longest shrank or ended).
  int32_t max_len_ = 0;
  bool max_stale_ = false;
  // Page-table entries written since the last TakeChanges; past kLogPerEntry per entry the
  // log gives up and says "all".
  static constexpr size_t kLogPerEntry = 4;
  std::vector<int64_t> changed_;
  bool all_changed_ = true;
  // The CSR form is current for entries below this one.
  int32_t csr_valid_ = 0;
};

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CACHE_RUNNING_BATCH_TABLE_H_
