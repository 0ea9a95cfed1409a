// TokenIndex: SGLang's req_to_token, int32 [max_requests][max_context]: the slot of
// every token of every request row, -1 where a row holds no token.
//
// The array is an anonymous private mapping, so rows never touched cost no memory
// (256 rows x 131072 tokens x 4 B = 128 MiB of address space, a few KiB resident per
// short request). Anonymous memory reads 0, not -1, so each row keeps a high-water
// mark: entries below it have been written (a slot or -1), entries at or above it have
// never been written and Get() reports them as -1. A reader of the raw array (data())
// must stay below the row's length, as kernels do.
//
// Ownership: owns its mapping (RAII, move-only). Not thread-safe.
#ifndef KVMEM_SRC_CORE_TOKEN_INDEX_H_
#define KVMEM_SRC_CORE_TOKEN_INDEX_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace kvmem::internal {

class TokenIndex {
 public:
  // InvalidArgument for rows < 1 or max_context < 1; ResourceExhausted when the
  // address space cannot be mapped.
  static absl::StatusOr<TokenIndex> Make(int32_t rows, int64_t max_context);

  TokenIndex() = default;
  ~TokenIndex();
  TokenIndex(TokenIndex&& o) noexcept { *this = std::move(o); }
  TokenIndex& operator=(TokenIndex&& o) noexcept;
  TokenIndex(const TokenIndex&) = delete;
  TokenIndex& operator=(const TokenIndex&) = delete;

  int32_t rows() const { return rows_; }
  int64_t max_context() const { return max_context_; }

  // REQUIRES (all calls): 0 <= row < rows(), 0 <= pos <= end <= max_context().
  int32_t Get(int32_t row, int64_t pos) const {
    return pos < high_water_[row] ? data_[Index(row, pos)] : -1;
  }
  void Set(int32_t row, int64_t pos, int32_t slot) {
    int64_t& mark = high_water_[row];
    if (pos >= mark) {
      if (pos > mark) Touch(row, pos);
      mark = pos + 1;  // a request growing token by token: no -1 to write first
    }
    data_[Index(row, pos)] = slot;
  }
  // Starts loading the entry of token `pos` of `row` (a batch writes one per request).
  void Prefetch(int32_t row, int64_t pos) const {
    __builtin_prefetch(&high_water_[row]);
    __builtin_prefetch(data_ + Index(row, pos), 1);
  }
  // Entries [begin, end) of `row` become `value`.
  void Fill(int32_t row, int64_t begin, int64_t end, int32_t value);
  // Entries [0, len) of `dst` become those of `src`.
  void CopyPrefix(int32_t src, int32_t dst, int64_t len);
  // Entries below this mark have been written; the rest read -1 through Get().
  int64_t high_water(int32_t row) const { return high_water_[row]; }

  // req_to_token[row * max_context + pos]. See the class comment on unwritten entries.
  const int32_t* data() const { return data_; }

 private:
  int64_t Index(int32_t row, int64_t pos) const { return int64_t{row} * max_context_ + pos; }
  // Writes -1 over [high_water, end) of `row` and raises the mark to `end`.
  void Touch(int32_t row, int64_t end);
  void Unmap();

  int32_t* data_ = nullptr;
  int64_t bytes_ = 0;
  int32_t rows_ = 0;
  int64_t max_context_ = 0;
  std::vector<int64_t> high_water_;
};

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CORE_TOKEN_INDEX_H_
