#include "src/core/logging.h"

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>

#include "absl/strings/str_format.h"
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

std::string FailureTally::Summary() const {
  if (failed_ == 0) return "";
  return absl::StrFormat("%s: %d of %d failed (the first: %s)", what_, failed_, total_, first_);
}

std::string JoinFailures(std::initializer_list<const FailureTally*> tallies,
                         std::string_view none) {
  std::string out;
  for (const FailureTally* t : tallies) {
    if (t->failed() == 0) continue;
    if (!out.empty()) out += "; ";
    out += t->Summary();
  }
  return out.empty() ? std::string(none) : out;
}

}  // namespace kvmem::internal
