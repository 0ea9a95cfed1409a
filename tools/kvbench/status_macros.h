// Status propagation inside kvbench (kvmem's own macros are internal to the library).
#ifndef KVMEM_TOOLS_KVBENCH_STATUS_MACROS_H_
#define KVMEM_TOOLS_KVBENCH_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVBENCH_CONCAT_INNER_(a, b) a##b
#define KVBENCH_CONCAT_(a, b) KVBENCH_CONCAT_INNER_(a, b)

// Returns the status of `expr` from the enclosing function unless it is OK.
#define KVBENCH_RETURN_IF_ERROR(expr)                  \
  do {                                                 \
    ::absl::Status kvbench_status_ = (expr);           \
    if (!kvbench_status_.ok()) return kvbench_status_; \
  } while (0)

// `lhs = *expr` for an OK StatusOr `expr`; otherwise returns its status.
#define KVBENCH_ASSIGN_OR_RETURN(lhs, expr) \
  KVBENCH_ASSIGN_OR_RETURN_IMPL_(KVBENCH_CONCAT_(kvbench_statusor_, __LINE__), lhs, expr)
#define KVBENCH_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return std::move(tmp).status();       \
  lhs = std::move(*tmp)

#endif  // KVMEM_TOOLS_KVBENCH_STATUS_MACROS_H_
