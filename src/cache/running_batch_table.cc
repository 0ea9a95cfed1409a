#include "src/cache/running_batch_table.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_format.h"

namespace kvmem::internal {

absl::StatusOr<RunningBatchTable> RunningBatchTable::Make(int32_t max_batch, int64_t stride,
                                                          int64_t page_tokens) {
  if (max_batch < 1 || stride < 0 || (stride > 0 && page_tokens < 1)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "running batch of %d entries x %d pages of %d tokens", max_batch, stride, page_tokens));
  }
  // seq_lens, row_ids, last_page_len, indptr (+1), then the padded table and the CSR
  // indices; int32 each.
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max() / 16;
  if (stride > kMax / max_batch) {
    return absl::InvalidArgumentError(
        absl::StrFormat("running batch of %d entries x %d pages overflows", max_batch, stride));
  }
  const int64_t small = 4 * int64_t{max_batch} + 1;
  const int64_t table = int64_t{max_batch} * stride;
  const int64_t bytes = (small + 2 * table) * static_cast<int64_t>(sizeof(int32_t));
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return absl::ResourceExhaustedError(absl::StrFormat(
        "running batch: mapping %d entries x %d pages (%d bytes): %s", max_batch, stride, bytes,
        std::strerror(err)));
  }
  RunningBatchTable t;
  t.base_ = p;
  t.bytes_ = bytes;
  t.max_batch_ = max_batch;
  t.stride_ = stride;
  t.page_tokens_ = page_tokens;
  t.page_div_ = Divider(page_tokens > 0 ? page_tokens : 1);
  auto* a = static_cast<int32_t*>(p);
  t.seq_lens_ = a;
  t.row_ids_ = a + max_batch;
  t.last_page_len_ = a + 2 * int64_t{max_batch};
  t.indptr_ = a + 3 * int64_t{max_batch};
  t.page_table_ = a + small;
  t.indices_ = t.page_table_ + table;
  std::fill(t.row_ids_, t.row_ids_ + max_batch, -1);  // the rest reads 0 already
  return t;
}

RunningBatchTable::~RunningBatchTable() { Unmap(); }

RunningBatchTable& RunningBatchTable::operator=(RunningBatchTable&& o) noexcept {
  if (this != &o) {
    Unmap();
    base_ = std::exchange(o.base_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    max_batch_ = std::exchange(o.max_batch_, 0);
    size_ = std::exchange(o.size_, 0);
    stride_ = o.stride_;
    page_tokens_ = o.page_tokens_;
    page_div_ = o.page_div_;
    seq_lens_ = o.seq_lens_;
    row_ids_ = o.row_ids_;
    last_page_len_ = o.last_page_len_;
    page_table_ = o.page_table_;
    indptr_ = o.indptr_;
    indices_ = o.indices_;
    max_len_ = o.max_len_;
    max_stale_ = o.max_stale_;
    csr_valid_ = o.csr_valid_;
    changed_ = std::move(o.changed_);
    all_changed_ = o.all_changed_;
  }
  return *this;
}

void RunningBatchTable::Unmap() {
  if (base_ != nullptr) munmap(base_, bytes_);
  base_ = nullptr;
}

void RunningBatchTable::Resize(int32_t size) {
  for (int32_t b = size; b < size_; ++b) Clear(b);
  size_ = size;
  csr_valid_ = std::min(csr_valid_, size);
}

void RunningBatchTable::SetLen(int32_t slot, int64_t len) {
  const int32_t old = seq_lens_[slot];
  seq_lens_[slot] = static_cast<int32_t>(len);
  if (len >= max_len_) {
    max_len_ = static_cast<int32_t>(len);
  } else if (old == max_len_) {
    max_stale_ = true;  // the longest may have shrunk: recount when read
  }
  if (page_tokens_ > 0) {
    last_page_len_[slot] = len == 0 ? 0 : static_cast<int32_t>(page_div_.Rem(len - 1) + 1);
  }
}

void RunningBatchTable::Set(int32_t slot, int32_t row, int64_t len,
                            absl::Span<const int32_t> pages) {
  row_ids_[slot] = row;
  SetLen(slot, len);
  const int64_t n = std::min<int64_t>(PagesFor(len), static_cast<int64_t>(pages.size()));
  const int32_t* entry = page_table_ + slot * stride_;
  for (int64_t k = 0; k < n; ++k) {
    if (entry[k] != pages[k]) Write(slot, k, pages[k]);
  }
  csr_valid_ = std::min(csr_valid_, slot);
}

void RunningBatchTable::Grew(int32_t slot, int64_t old_len, int64_t len,
                             absl::Span<const int32_t> pages) {
  SetLen(slot, len);
  if (stride_ == 0) return;
  const int64_t old_pages = PagesFor(old_len);
  const int64_t new_pages = PagesFor(len);
  const int64_t from = old_len == 0 ? 0 : old_pages - 1;  // the page of token old_len - 1
  const int64_t to = std::min<int64_t>(new_pages, static_cast<int64_t>(pages.size()));
  int32_t* row = page_table_ + slot * stride_;
  const bool packed = slot < csr_valid_;
  for (int64_t k = from; k < to; ++k) {
    if (row[k] == pages[k]) continue;
    Write(slot, k, pages[k]);
    // A replaced page (copy on write) is patched in the packed form where it stands.
    if (packed && k < old_pages) indices_[indptr_[slot] + k] = pages[k];
  }
  // A page more moves every later entry's pages in the packed form.
  if (new_pages != old_pages) csr_valid_ = std::min(csr_valid_, slot);
}

void RunningBatchTable::Write(int32_t slot, int64_t k, int32_t page) {
  page_table_[slot * stride_ + k] = page;
  if (all_changed_) return;
  if (changed_.size() >= kLogPerEntry * static_cast<size_t>(max_batch_)) {
    all_changed_ = true;  // a whole upload is cheaper than a list this long
    changed_.clear();
    return;
  }
  changed_.push_back(slot * stride_ + k);
}

void RunningBatchTable::TakeChanges(RunningBatchChanges* out) {
  out->all = all_changed_;
  out->page_table_entries.swap(changed_);
  changed_.clear();
  all_changed_ = false;
}

void RunningBatchTable::Shrank(int32_t slot, int64_t len) {
  const int64_t old = seq_lens_[slot];
  SetLen(slot, len);
  if (stride_ > 0 && PagesFor(len) != PagesFor(old)) csr_valid_ = std::min(csr_valid_, slot);
}

void RunningBatchTable::Clear(int32_t slot) {
  row_ids_[slot] = -1;
  SetLen(slot, 0);
  csr_valid_ = std::min(csr_valid_, slot);
}

void RunningBatchTable::Refresh() {
  if (!max_stale_) return;
  max_len_ = size_ == 0 ? 0 : *std::max_element(seq_lens_, seq_lens_ + size_);
  max_stale_ = false;
}

RunningBatchView RunningBatchTable::View() const {
  RunningBatchView v;
  v.size = size_;
  v.max_batch = max_batch_;
  v.max_seq_len = max_len_;
  v.seq_lens = seq_lens_;
  v.row_ids = row_ids_;
  if (stride_ > 0) {
    v.page_table = page_table_;
    v.page_table_stride = stride_;
    v.last_page_len = last_page_len_;
  }
  return v;
}

RunningBatchCsr RunningBatchTable::Csr() {
  RunningBatchCsr c;
  if (stride_ == 0) return c;
  // indptr[b] is final for b <= csr_valid_; entries from csr_valid_ on are repacked.
  int32_t at = indptr_[csr_valid_];
  for (int32_t b = csr_valid_; b < max_batch_; ++b) {
    indptr_[b] = at;
    if (b >= size_) continue;
    const int64_t n = PagesFor(seq_lens_[b]);
    std::copy(page_table_ + b * stride_, page_table_ + b * stride_ + n, indices_ + at);
    at += static_cast<int32_t>(n);
  }
  indptr_[max_batch_] = at;
  csr_valid_ = size_;
  c.size = size_;
  c.indptr = indptr_;
  c.indices = indices_;
  c.last_page_len = last_page_len_;
  return c;
}

}  // namespace kvmem::internal
