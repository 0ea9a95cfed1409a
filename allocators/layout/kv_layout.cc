// The default batch calls of KvLayout: the single-row calls in a loop, undone in reverse
// order where a later row fails. A layout whose single-row undo cannot restore
// everything (chunks it mapped, copies it made) overrides them.
#include "allocators/layout/kv_layout.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "src/core/status_macros.h"

namespace kvmem::internal {
namespace {

// The status of a failed batch whose undo failed as well: the cause first, then the
// undo's failure; Internal, since the layout no longer matches what the caller sees.
absl::Status UndoFailed(const absl::Status& cause, const absl::Status& undo) {
  return absl::InternalError(
      absl::StrCat(cause.message(), "; undoing the earlier rows of the batch failed: ",
                   undo.ToString()));
}

}  // namespace

absl::Status KvLayout::GrowBatch(absl::Span<const GrowStep> steps, int64_t* out) {
  std::vector<int64_t> locs;
  size_t done = 0;
  absl::Status status;
  for (; done < steps.size(); ++done) {
    const GrowStep& s = steps[done];
    status = Grow(s.row, s.len, s.n, &locs);
    if (!status.ok()) break;
  }
  if (status.ok()) {
    std::copy(locs.begin(), locs.end(), out);
    return status;
  }
  while (done-- > 0) {
    const GrowStep& s = steps[done];
    if (absl::Status undo = Shrink(s.row, s.len + s.n, s.len); !undo.ok()) {
      return UndoFailed(status, undo);
    }
  }
  return status;
}

absl::Status KvLayout::ShrinkBatch(absl::Span<const ShrinkStep> steps) {
  for (const ShrinkStep& s : steps) {
    // A shrink cannot be undone (its tokens are gone): this default is all or nothing
    // only for a layout whose Shrink cannot fail on rows KvCache has checked (paged);
    // any other overrides it.
    KVMEM_RETURN_IF_ERROR(Shrink(s.row, s.len, s.new_len));
  }
  return absl::OkStatus();
}

absl::Status KvLayout::ReleaseBatch(absl::Span<const ReleaseStep> steps, Fence fence) {
  // As ShrinkBatch: for layouts whose Release cannot fail on checked rows.
  for (const ReleaseStep& s : steps) {
    KVMEM_RETURN_IF_ERROR(Release(s.row, s.len, fence));
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal
