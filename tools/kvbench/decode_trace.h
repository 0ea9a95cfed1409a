// kvbench decode --trace, a diagnostic: per-CTA start and end times of more launches of a
// shape, from the decode kernel's trace hook (include/kvmem/debug/decode_trace.h; a build
// with -DKVMEM_DECODE_TRACE=ON), and summaries of the fastest and the slowest launch:
// whether a slow launch has late-starting CTAs, slow ones, or uniformly slower ones.
#ifndef KVMEM_TOOLS_KVBENCH_DECODE_TRACE_H_
#define KVMEM_TOOLS_KVBENCH_DECODE_TRACE_H_

#include <functional>

#include "tools/kvbench/settings.h"

namespace kvbench {

// Traced launches kept per shape, after s.warmup traced ones that are dropped.
inline constexpr int kTraceLaunches = 50;

// s.warmup + kTraceLaunches launches of launch(first + i), each after before(first + i),
// all traced; prints their spread and the summaries of the fastest and the slowest, and
// writes their records to s.trace_csv when it is set. `ctas`: the grid of one launch;
// `sms`: the device's SMs. False on a CUDA or kvmem error (printed).
bool TraceShape(const DecodeSettings& s, int ctas, int sms, int first,
                const std::function<void(int)>& launch, const std::function<void(int)>& before);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_DECODE_TRACE_H_
