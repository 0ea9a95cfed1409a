// The one spdlog logger of kvmem, named "kvmem". Nothing above debug on hot paths.
// Errors are reported once (docs/errors.md): a failure repeated over many resources is
// one line with its counts (FailureTally), not a line per resource.
#ifndef KVMEM_SRC_CORE_LOGGING_H_
#define KVMEM_SRC_CORE_LOGGING_H_

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "spdlog/spdlog.h"

namespace kvmem::internal {

// Created on first use (stderr, level from KVMEM_LOG_LEVEL, default warn).
spdlog::logger* Logger();

// The outcomes of one kind of call made for many resources (a destructor giving back
// every leaked handle), so that the failures make one phrase of a log line or status:
// how many failed of how many, and the first error. Not thread-safe.
class FailureTally {
 public:
  // `what`: the call and what it was made for, "cuMemRelease of physical handles".
  explicit FailureTally(std::string_view what) : what_(what) {}

  void Succeeded() { ++total_; }
  void Failed(std::string error) {
    if (failed_++ == 0) first_ = std::move(error);
    ++total_;
  }

  int64_t failed() const { return failed_; }
  int64_t total() const { return total_; }
  // "" when none failed; else "<what>: <failed> of <total> failed (the first: <error>)".
  std::string Summary() const;

 private:
  std::string what_;
  int64_t failed_ = 0;
  int64_t total_ = 0;
  std::string first_;
};

// The Summary() of every tally with failures, joined with "; "; `none` when there are none.
std::string JoinFailures(std::initializer_list<const FailureTally*> tallies, std::string_view none);

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CORE_LOGGING_H_
