// A profiling hook of the decode kernel, for kernel work only: while a trace buffer is
// set, thread 0 of every decode CTA records its SM, the global timer and its SM's cycle
// counter at entry and at exit, so a slow launch shows whether some CTAs start late, some
// run slowly or all run slower, and at what SM clock. `kvbench decode --trace` reads it.
//
// Compiled in only when kvmem is configured with -DKVMEM_DECODE_TRACE=ON (then thread 0
// of a CTA pays one global load and a branch at entry and at exit while no trace is set).
// Otherwise the kernels carry no trace code and SetDecodeTrace with a buffer returns
// FailedPrecondition. Plain C++ (no CUDA headers), so host tools read the records.
#ifndef KVMEM_DEBUG_DECODE_TRACE_H_
#define KVMEM_DEBUG_DECODE_TRACE_H_

#include <cstdint>

#include "absl/status/status.h"

namespace kvmem {

// One CTA of one traced launch. Times are %globaltimer: nanoseconds on one clock for all
// SMs, advancing in steps of the device's own period (tens of ns to 1 us).
// The clock fields are the SM's %clock64 read next to each timer stamp: cycles over
// nanoseconds between them is the SM clock the CTA ran at.
struct DecodeTraceRecord {
  uint32_t smid;         // %smid: not necessarily dense nor below the SM count
  uint32_t block;        // blockIdx.x
  uint64_t start_ns;     // at entry, once thread 0 has loaded the trace target
  uint64_t end_ns;       // as thread 0 returns; a CTA with no work (capacity grid) returns at once
  uint64_t start_clock;  // SM cycles at start_ns
  uint64_t end_clock;    // SM cycles at end_ns
};
static_assert(sizeof(DecodeTraceRecord) == 40);

// Makes the DecodeKernel launches issued after it write block i's record to
// device_buffer[i] for i < capacity (blocks past it record nothing; slots of blocks that do
// not run keep what they held); nullptr turns tracing off. A synchronous copy to a
// __device__ variable, ordered after the work already on the legacy default stream.
// REQUIRES: device_buffer null or device memory for `capacity` records; no decode launch
// in flight on a stream that does not synchronise with the legacy default stream.
absl::Status SetDecodeTrace(DecodeTraceRecord* device_buffer, int capacity);

}  // namespace kvmem

#endif  // KVMEM_DEBUG_DECODE_TRACE_H_
