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

std::string RenderSvgPlot(const PlotInfo& info, const std::vector<SimResult>& results) {
  const int pw = kWidth - kLeft - kRight;
  const int ph = kHeight - kTop - kBottom;
  double max_step = 1;
  double max_gib = info.budget_bytes / kGiB;
  for (const SimResult& r : results) {
    max_step = std::max(max_step, static_cast<double>(r.series.size()));
    for (const StepSample& s : r.series) max_gib = std::max(max_gib, s.held_bytes / kGiB);
  }
  if (!(max_gib > 0)) max_gib = 1;
  const std::vector<double> xt = NiceTicks(max_step, 8);
  const std::vector<double> yt = NiceTicks(max_gib * 1.02, 8);
  const double xmax = xt.back();
  const double ymax = yt.back();
  auto X = [&](double v) { return kLeft + v / xmax * pw; };
  auto Y = [&](double v) { return kTop + ph - v / ymax * ph; };

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
  for (double t : yt) {
    svg += absl::StrFormat(
        "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n"
        "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\" dominant-baseline=\"middle\">%s</text>\n",
        kLeft, kLeft + pw, Y(t), Y(t), kLeft - 8, Y(t), TickLabel(t));
  }
  for (double t : xt) {
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
  // Lines: held solid, live dashed.
  for (size_t i = 0; i < results.size(); ++i) {
    const char* colour = kColours[i % std::size(kColours)];
    const auto held = Reduce(results[i].series, [](const StepSample& s) { return s.held_bytes; });
    const auto live = Reduce(results[i].series, [](const StepSample& s) { return s.live_bytes; });
    for (int dashed = 0; dashed < 2; ++dashed) {
      const auto& pts = dashed ? live : held;
      if (pts.empty()) continue;
      std::string d;
      for (size_t k = 0; k < pts.size(); ++k) {
        d += absl::StrFormat("%s%.1f,%.1f", k == 0 ? "M" : " L", X(pts[k].first), Y(pts[k].second));
      }
      svg += absl::StrFormat(
          "<path d=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"%s\" "
          "stroke-linejoin=\"round\"%s/>\n",
          d, colour, dashed ? "1.4" : "1.8", dashed ? " stroke-dasharray=\"6,4\"" : "");
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
  svg += "</svg>\n";
  return svg;
}

}  // namespace kvstress
