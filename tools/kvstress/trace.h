// Trace files for kvstress: a CSV of requests to replay instead of a built-in mix.
//
//   arrival_step,prompt_len,output_len[,prefix_group]
//   0,812,240
//   0,1300,96,2
//
// Blank lines and lines starting with '#' are skipped. prefix_group is optional per
// line when the header names it (empty or -1: no shared prefix); requests of one group
// share their first `prefix_len` tokens. Lines may come in any arrival order; the
// workload is sorted by arrival, stably.
#ifndef KVMEM_TOOLS_KVSTRESS_TRACE_H_
#define KVMEM_TOOLS_KVSTRESS_TRACE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "tools/kvstress/workload.h"

namespace kvstress {

// Parses trace text. `source` names it in errors ("FILE:LINE: ..."). Every request must
// fit max_context and, with a prefix group, be longer than prefix_len.
absl::StatusOr<Workload> ParseTrace(absl::string_view text, absl::string_view source,
                                    int64_t max_context, int64_t prefix_len);

// Reads and parses the file at `path` (NotFound / InvalidArgument with the path).
absl::StatusOr<Workload> LoadTrace(const std::string& path, int64_t max_context,
                                   int64_t prefix_len);

// `text` made safe to print inside an error message: bytes outside printable ASCII and
// backslashes are escaped (\xNN, \\) and text past `max_bytes` input bytes is cut,
// saying how long it was. A binary file would otherwise write control sequences to the
// user's terminal.
std::string Printable(absl::string_view text, size_t max_bytes = 60);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_TRACE_H_
