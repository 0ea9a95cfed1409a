// The kernel of DeviceRunningBatch::Upload (internal): applies one staged update to the
// device arrays of a running batch.
#ifndef KVMEM_ATTENTION_RUNNING_BATCH_APPLY_H_
#define KVMEM_ATTENTION_RUNNING_BATCH_APPLY_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kvmem/attention.h"

namespace kvmem::internal {

// One change of the page table: table[index] = value.
struct RunningBatchChange {
  int64_t index;
  int32_t value;
  int32_t pad;
};

// One staged update, as uploaded: `size` entries of each small array, then `changes`
// changes of the page table. Device pointers.
struct RunningBatchUpdate {
  int32_t max_batch = 0;
  int32_t size = 0;
  int64_t changes = 0;
  const int32_t* seq_lens = nullptr;       // [size]
  const int32_t* row_ids = nullptr;        // [size]
  const int32_t* last_page_len = nullptr;  // [size]
  const RunningBatchChange* changes_list = nullptr;  // [changes]
};

struct RunningBatchArrays {
  int32_t* seq_lens = nullptr;       // [max_batch]
  int32_t* row_ids = nullptr;        // [max_batch]
  int32_t* last_page_len = nullptr;  // [max_batch]
  int32_t* page_table = nullptr;     // [max_batch][stride]
};

// Writes the small arrays (entries past `size` become 0, and -1 for row ids) and
// scatters the page-table changes. One launch on `stream`.
absl::Status LaunchRunningBatchApply(const RunningBatchUpdate& update,
                                     const RunningBatchArrays& arrays, CudaStream stream);

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_RUNNING_BATCH_APPLY_H_
