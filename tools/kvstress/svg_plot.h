// The --plot output: an SVG line chart of bytes held (solid) and bytes live (dashed) per
// step, one colour per policy, with the memory budget for reference. Written by hand:
// the chart is simple and the project takes no plotting dependency.
//
// Policies often draw the same curve (paged-16 and virtual hold the same bytes on the
// chat mix; every policy that schedules alike has the same live bytes). One colour on
// top of another would hide a policy, so coinciding curves are drawn in segments that
// take each policy's colour in turn, and the legend names the policies that coincide.
#ifndef KVMEM_TOOLS_KVSTRESS_SVG_PLOT_H_
#define KVMEM_TOOLS_KVSTRESS_SVG_PLOT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "tools/kvstress/scheduler.h"

namespace kvstress {

struct PlotInfo {
  std::string title;     // e.g. the workload
  std::string subtitle;  // e.g. model shape and budget
  int64_t budget_bytes = 0;
  std::vector<std::string> failed;  // policies that failed: named in the legend, no line
};

// Renders the chart. Policies without a series are left out of the lines (still in the
// legend). Long series are reduced to at most ~1000 points per line by taking each
// bucket's maximum, so peaks survive.
std::string RenderSvgPlot(const PlotInfo& info, const std::vector<SimResult>& results);

// Groups of policies (indices into `results`, each group in order, groups by their first
// member) whose held-bytes lines (live-bytes lines with `live`) would be drawn within a
// pixel of each other all along. Only groups of two or more.
std::vector<std::vector<size_t>> CoincidingCurves(const PlotInfo& info,
                                                  const std::vector<SimResult>& results, bool live);

// "Nice" axis ticks (1, 2, 2.5, 5 x 10^k) covering [0, max]: at most about `target` steps.
std::vector<double> NiceTicks(double max, int target);

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_SVG_PLOT_H_
