// A one-line progress bar on stderr for long kvstress runs. It draws only when enabled
// and stderr is a terminal, so logs and pipes stay clean; redraws are throttled.
#ifndef KVMEM_TOOLS_KVSTRESS_PROGRESS_H_
#define KVMEM_TOOLS_KVSTRESS_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <string>

#include "tools/kvstress/scheduler.h"

namespace kvstress {

class ProgressBar {
 public:
  // Draws only if `enabled` and stderr is a terminal.
  explicit ProgressBar(bool enabled);
  ~ProgressBar();
  bool active() const { return active_; }

  // Policy `index` of `count` is at `p`.
  void Update(int index, int count, const SimProgress& p);
  // Clears the line (before normal output is printed).
  void Clear();

 private:
  bool active_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_PROGRESS_H_
