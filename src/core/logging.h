// The one spdlog logger of kvmem, named "kvmem". Nothing above debug on hot paths.
#ifndef KVMEM_SRC_CORE_LOGGING_H_
#define KVMEM_SRC_CORE_LOGGING_H_

#include <memory>

#include "spdlog/spdlog.h"

namespace kvmem::internal {

// Created on first use (stderr, level from KVMEM_LOG_LEVEL, default warn).
spdlog::logger* Logger();

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CORE_LOGGING_H_
