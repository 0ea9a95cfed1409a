#include "tools/kvstress/svg_plot.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace kvstress {
namespace {

// Okabe-Ito: distinguishable with the common colour-vision deficiencies.
constexpr const char* kColours[] = {"#D55E00", "#0072B2", "#009E73", "#CC79A7",
                                    "#E69F00", "#56B4E9", "#000000", "#F0E442"};
constexpr int kWidth = 960;
constexpr int kHeight = 560;
constexpr int kLeft = 80;
constexpr int kRight = 190;  // legend
constexpr int kTop = 64;
constexpr int kBottom = 60;
constexpr size_t kMaxPoints = 1000;
constexpr double kGiB = double{1 << 30};

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string TickLabel(double v) {
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrFormat("%.0f", v);
  return absl::StrFormat("%g", v);
}

// Points of one line: (step, GiB), each bucket of steps reduced to its maximum.
template <typename F>
std::vector<std::pair<double, double>> Reduce(const std::vector<StepSample>& series, F get) {
  std::vector<std::pair<double, double>> pts;
  if (series.empty()) return pts;
  const size_t bucket = (series.size() + kMaxPoints - 1) / kMaxPoints;
  for (size_t i = 0; i < series.size(); i += bucket) {
    const size_t end = std::min(series.size(), i + bucket);
    int64_t m = 0;
    for (size_t k = i; k < end; ++k) m = std::max(m, get(series[k]));
    pts.emplace_back(static_cast<double>(i), m / kGiB);
  }
  // Close the line at the last step so every policy ends where its run ended.
  pts.emplace_back(static_cast<double>(series.size() - 1), get(series.back()) / kGiB);
  return pts;
}

}  // namespace

std::vector<double> NiceTicks(double max, int target) {
  if (!(max > 0) || !std::isfinite(max)) return {0, 1};
  const double raw = max / std::max(target, 1);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    step = m * mag;
    if (step >= raw) break;
  }
  std::vector<double> ticks;
  for (int i = 0;; ++i) {
    const double t = i * step;
    ticks.push_back(t);
    if (t >= max * (1 - 1e-9)) break;
  }
  return ticks;
}

namespace {

// The plot area's scales, shared by the lines and by the check for coinciding lines.
struct Frame {
  std::vector<double> xt, yt;  // ticks
  double xmax = 1, ymax = 1;
  int pw = kWidth - kLeft - kRight;
  int ph = kHeight - kTop - kBottom;
  double X(double v) const { return kLeft + v / xmax * pw; }
  double Y(double v) const { return kTop + ph - v / ymax * ph; }
};

Frame MakeFrame(const PlotInfo& info, const std::vector<SimResult>& results) {
  Frame f;
  double max_step = 1;
  double max_gib = info.budget_bytes / kGiB;
  for (const SimResult& r : results) {
    max_step = std::max(max_step, static_cast<double>(r.series.size()));
    for (const StepSample& s : r.series) max_gib = std::max(max_gib, s.held_bytes / kGiB);
  }
  if (!(max_gib > 0)) max_gib = 1;
  f.xt = NiceTicks(max_step, 8);
  f.yt = NiceTicks(max_gib * 1.02, 8);
  f.xmax = f.xt.back();
  f.ymax = f.yt.back();
  return f;
}

// One policy's held (or live) bytes in pixels; empty without a series.
using Pixels = std::vector<std::pair<double, double>>;

Pixels PixelsOf(const Frame& f, const SimResult& r, bool live) {
  const auto pts = live ? Reduce(r.series, [](const StepSample& s) { return s.live_bytes; })
                        : Reduce(r.series, [](const StepSample& s) { return s.held_bytes; });
  Pixels px;
  for (const auto& [step, gib] : pts) px.emplace_back(f.X(step), f.Y(gib));
  return px;
}

std::string PathOf(const Pixels& px) {
  std::string d;
  for (size_t k = 0; k < px.size(); ++k) {
    d += absl::StrFormat("%s%.1f,%.1f", k == 0 ? "M" : " L", px[k].first, px[k].second);
  }
  return d;
}

// Two lines the eye cannot tell apart: the same points, no more than a pixel apart.
bool Coincide(const Pixels& a, const Pixels& b) {
  if (a.empty() || a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (std::fabs(a[k].first - b[k].first) > 1 || std::fabs(a[k].second - b[k].second) > 1) {
      return false;
    }
  }
  return true;
}

std::vector<std::vector<size_t>> Groups(const std::vector<Pixels>& lines) {
  std::vector<std::vector<size_t>> groups;
  std::vector<bool> taken(lines.size(), false);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (taken[i] || lines[i].empty()) continue;
    std::vector<size_t> g = {i};
    for (size_t k = i + 1; k < lines.size(); ++k) {
      if (!taken[k] && Coincide(lines[i], lines[k])) {
        g.push_back(k);
        taken[k] = true;
      }
    }
    if (g.size() > 1) groups.push_back(std::move(g));
  }
  return groups;
}

std::vector<Pixels> Lines(const Frame& f, const std::vector<SimResult>& results, bool live) {
  std::vector<Pixels> lines;
  for (const SimResult& r : results) lines.push_back(PixelsOf(f, r, live));
  return lines;
}

// Legend text lines of at most about `width` characters listing `names`, comma-separated.
std::vector<std::string> Wrap(const std::vector<std::string>& names, size_t width) {
  std::vector<std::string> lines(1);
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string item = names[i] + (i + 1 < names.size() ? "," : "");
    if (!lines.back().empty() && lines.back().size() + 1 + item.size() > width)
      lines.emplace_back();
    lines.back() += (lines.back().empty() ? "" : " ") + item;
  }
  return lines;
}

}  // namespace

std::vector<std::vector<size_t>> CoincidingCurves(const PlotInfo& info,
                                                  const std::vector<SimResult>& results,
                                                  bool live) {
  return Groups(Lines(MakeFrame(info, results), results, live));
}

std::string RenderSvgPlot(const PlotInfo& info, const std::vector<SimResult>& results) {
  const Frame f = MakeFrame(info, results);
  const int pw = f.pw;
  const int ph = f.ph;
  auto X = [&](double v) { return f.X(v); };
  auto Y = [&](double v) { return f.Y(v); };

  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d "
      "%d\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"13\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
      kWidth, kHeight, kWidth, kHeight);
  svg +=
      absl::StrFormat("<text x=\"%d\" y=\"24\" font-size=\"17\" font-weight=\"bold\">%s</text>\n",
                      kLeft, Escape(info.title));
  svg += absl::StrFormat("<text x=\"%d\" y=\"44\" fill=\"#444\">%s</text>\n", kLeft,
                         Escape(info.subtitle));
  // Grid and ticks.
  for (double t : f.yt) {
    svg += absl::StrFormat(
        "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n"
        "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\" dominant-baseline=\"middle\">%s</text>\n",
        kLeft, kLeft + pw, Y(t), Y(t), kLeft - 8, Y(t), TickLabel(t));
  }
  for (double t : f.xt) {
    svg += absl::StrFormat(
        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#e4e4e4\"/>\n"
        "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n",
        X(t), X(t), kTop, kTop + ph, X(t), kTop + ph + 20, TickLabel(t));
  }
  svg += absl::StrFormat(
      "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#333\"/>\n", kLeft,
      kTop, pw, ph);
  svg += absl::StrFormat("<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">step</text>\n",
                         kLeft + pw / 2.0, kHeight - 16);
  svg += absl::StrFormat(
      "<text transform=\"translate(22 %.1f) rotate(-90)\" text-anchor=\"middle\">KV memory "
      "(GiB)</text>\n",
      kTop + ph / 2.0);
  // Budget.
  if (info.budget_bytes > 0) {
    const double yb = Y(info.budget_bytes / kGiB);
    svg += absl::StrFormat(
        "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#888\" "
        "stroke-dasharray=\"2,3\"/>\n<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\" "
        "fill=\"#666\">budget</text>\n",
        kLeft, kLeft + pw, yb, yb, kLeft + pw - 4, yb - 5);
  }
  // Lines: held solid, live dashed. A line shared by k policies is drawn by each of them
  // in every k-th segment (held) or dash (live), offset by its place in the group, so the
  // colours alternate along it. All of a group follow its first member's path (the others
  // are within a pixel of it), so the segments stay in step.
  std::vector<std::vector<size_t>> groups[2];
  for (int live = 0; live < 2; ++live) {
    const std::vector<Pixels> lines = Lines(f, results, live);
    groups[live] = Groups(lines);
    struct Place {
      size_t index = 0, size = 1, leader = 0;
    };
    std::vector<Place> place(results.size());
    for (size_t i = 0; i < results.size(); ++i) place[i].leader = i;
    for (const auto& g : groups[live]) {
      for (size_t m = 0; m < g.size(); ++m) place[g[m]] = {m, g.size(), g[0]};
    }
    for (size_t i = 0; i < results.size(); ++i) {
      if (lines[i].empty()) continue;
      const size_t m = place[i].index, k = place[i].size;
      std::string dash;
      if (live) {
        // Dashes of 6 with gaps of 4; in a group, each policy draws every k-th dash.
        dash = k == 1 ? " stroke-dasharray=\"6,4\""
                      : absl::StrFormat(" stroke-dasharray=\"6,%d\" stroke-dashoffset=\"%d\"",
                                        10 * k - 6, 10 * ((k - m) % k));
      } else if (k > 1) {
        dash = absl::StrFormat(" stroke-dasharray=\"12,%d\" stroke-dashoffset=\"%d\"", 12 * (k - 1),
                               12 * ((k - m) % k));
      }
      svg += absl::StrFormat(
          "<path d=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"%s\" "
          "stroke-linejoin=\"round\"%s/>\n",
          PathOf(lines[place[i].leader]), kColours[i % std::size(kColours)], live ? "1.4" : "1.8",
          dash);
    }
  }
  // Legend.
  const int lx = kLeft + pw + 18;
  int ly = kTop + 8;
  svg += absl::StrFormat("<text x=\"%d\" y=\"%d\" font-weight=\"bold\">policy</text>\n", lx, ly);
  ly += 22;
  for (size_t i = 0; i < results.size(); ++i) {
    const char* colour = kColours[i % std::size(kColours)];
    svg += absl::StrFormat(
        "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"3\"/>\n"
        "<text x=\"%d\" y=\"%d\" dominant-baseline=\"middle\">%s</text>\n",
        lx, lx + 26, ly, ly, colour, lx + 34, ly, Escape(results[i].policy));
    ly += 22;
  }
  for (const std::string& name : info.failed) {
    svg += absl::StrFormat(
        "<text x=\"%d\" y=\"%d\" dominant-baseline=\"middle\" fill=\"#888\">%s: failed, no "
        "line</text>\n",
        lx, ly, Escape(name));
    ly += 22;
  }
  ly += 12;
  svg += absl::StrFormat(
      "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"#333\" stroke-width=\"1.8\"/>\n"
      "<text x=\"%d\" y=\"%d\" dominant-baseline=\"middle\">held</text>\n",
      lx, lx + 26, ly, ly, lx + 34, ly);
  ly += 22;
  svg += absl::StrFormat(
      "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"#333\" stroke-width=\"1.4\" "
      "stroke-dasharray=\"6,4\"/>\n"
      "<text x=\"%d\" y=\"%d\" dominant-baseline=\"middle\">live</text>\n",
      lx, lx + 26, ly, ly, lx + 34, ly);
  // Which policies share a line: the alternating colours show it, the text says it.
  for (int live = 0; live < 2; ++live) {
    if (groups[live].empty()) continue;
    ly += 26;
    svg += absl::StrFormat(
        "<text x=\"%d\" y=\"%d\" font-size=\"11\" font-weight=\"bold\">"
        "coinciding %s lines:</text>\n",
        lx, ly, live ? "live" : "held");
    for (const auto& g : groups[live]) {
      std::vector<std::string> names;
      for (size_t i : g) names.push_back(results[i].policy);
      for (const std::string& line : Wrap(names, 26)) {
        ly += 15;
        svg += absl::StrFormat("<text x=\"%d\" y=\"%d\" font-size=\"11\">%s</text>\n", lx, ly,
                               Escape(line));
      }
    }
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace kvstress
