#include "tools/kvstress/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace kvstress {
namespace {
constexpr auto kRedrawEvery = std::chrono::milliseconds(100);
constexpr int kBarWidth = 30;
}  // namespace

ProgressBar::ProgressBar(bool enabled) : active_(enabled && isatty(STDERR_FILENO) == 1) {}

ProgressBar::~ProgressBar() { Clear(); }

void ProgressBar::Update(int index, int count, const SimProgress& p) {
  if (!active_) return;
  const auto now = std::chrono::steady_clock::now();
  const bool last = p.finished == p.total;
  if (drawn_ && !last && now - last_ < kRedrawEvery) return;
  last_ = now;
  const double frac = p.total == 0 ? 1.0 : static_cast<double>(p.finished) / p.total;
  const int filled = std::clamp(static_cast<int>(frac * kBarWidth), 0, kBarWidth);
  std::string bar(filled, '#');
  bar.append(kBarWidth - filled, '.');
  std::fprintf(stderr, "\r\033[K[%d/%d] %-13s [%s] %3.0f%%  step %lld  running %lld  waiting %lld",
               index + 1, count, p.policy->c_str(), bar.c_str(), frac * 100,
               static_cast<long long>(p.step), static_cast<long long>(p.running),
               static_cast<long long>(p.waiting));
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressBar::Clear() {
  if (!drawn_) return;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
  drawn_ = false;
}

}  // namespace kvstress
