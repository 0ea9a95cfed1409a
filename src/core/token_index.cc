#include "src/core/token_index.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_format.h"
#include "src/core/logging.h"

namespace kvmem::internal {

absl::StatusOr<TokenIndex> TokenIndex::Make(int32_t rows, int64_t max_context) {
  if (rows < 1 || max_context < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("token index of %d rows x %d tokens", rows, max_context));
  }
  if (max_context > std::numeric_limits<int64_t>::max() / 4 / rows) {
    return absl::InvalidArgumentError(
        absl::StrFormat("token index of %d rows x %d tokens overflows", rows, max_context));
  }
  const int64_t bytes = int64_t{rows} * max_context * static_cast<int64_t>(sizeof(int32_t));
  // MAP_NORESERVE: the index is sized for every row at max_context but only the
  // entries written ever become resident.
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return absl::ResourceExhaustedError(
        absl::StrFormat("token index: mapping %d rows x %d tokens (%d bytes): %s", rows,
                        max_context, bytes, std::strerror(err)));
  }
  TokenIndex index;
  index.data_ = static_cast<int32_t*>(p);
  index.bytes_ = bytes;
  index.rows_ = rows;
  index.max_context_ = max_context;
  index.high_water_.assign(rows, 0);
  return index;
}

TokenIndex::~TokenIndex() { Unmap(); }

TokenIndex& TokenIndex::operator=(TokenIndex&& o) noexcept {
  if (this != &o) {
    Unmap();
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    rows_ = std::exchange(o.rows_, 0);
    max_context_ = std::exchange(o.max_context_, 0);
    high_water_ = std::move(o.high_water_);
    o.high_water_.clear();
  }
  return *this;
}

void TokenIndex::Unmap() {
  if (data_ == nullptr) return;
  if (munmap(data_, bytes_) != 0) {
    Logger()->error("token index: munmap of {} bytes failed: {}", bytes_, std::strerror(errno));
  }
  data_ = nullptr;
  bytes_ = 0;
}

void TokenIndex::Touch(int32_t row, int64_t end) {
  int64_t& mark = high_water_[row];
  if (end <= mark) return;
  std::fill(data_ + Index(row, mark), data_ + Index(row, end), -1);
  mark = end;
}

void TokenIndex::Fill(int32_t row, int64_t begin, int64_t end, int32_t value) {
  if (begin >= end) return;
  // -1 past the mark is what Get() reports already: nothing to write there.
  if (value == -1) end = std::min(end, high_water_[row]);
  if (begin >= end) return;
  Touch(row, end);
  std::fill(data_ + Index(row, begin), data_ + Index(row, end), value);
}

void TokenIndex::CopyPrefix(int32_t src, int32_t dst, int64_t len) {
  if (len <= 0 || src == dst) return;
  Touch(dst, len);
  const int64_t written = std::min(len, high_water_[src]);
  std::memcpy(data_ + Index(dst, 0), data_ + Index(src, 0), written * sizeof(int32_t));
  std::fill(data_ + Index(dst, written), data_ + Index(dst, len), -1);
}

}  // namespace kvmem::internal
