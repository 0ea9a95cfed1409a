#include "src/core/logging.h"

#include <cstdlib>
#include <string>

#include "spdlog/sinks/stdout_color_sinks.h"

namespace kvmem::internal {

spdlog::logger* Logger() {
  // Held here too, so the logger outlives a spdlog::drop_all() by the application.
  static const std::shared_ptr<spdlog::logger> logger = [] {
    std::shared_ptr<spdlog::logger> l = spdlog::get("kvmem");
    if (!l) l = spdlog::stderr_color_mt("kvmem");
    const char* level = std::getenv("KVMEM_LOG_LEVEL");
    l->set_level(level != nullptr ? spdlog::level::from_str(level) : spdlog::level::warn);
    return l;
  }();
  return logger.get();
}

}  // namespace kvmem::internal
