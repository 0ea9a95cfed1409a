#include "tools/kvbench/steps_report.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <variant>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace kvbench {
namespace {

constexpr int kWhatWidth = 40;
constexpr int kCellWidth = 11;

std::string CellText(const Cell& c) {
  if (const double* v = std::get_if<double>(&c)) return FormatNumber(*v);
  return std::get<std::string>(c);
}

const Cell* Find(const std::vector<std::pair<std::string, Cell>>& cells, absl::string_view key) {
  for (const auto& [k, v] : cells) {
    if (k == key) return &v;
  }
  return nullptr;
}

// anchor / kvmem, or "" where either is not a positive number.
std::string Ratio(const Cell& kvmem, const Cell* anchor) {
  const double* k = std::get_if<double>(&kvmem);
  const double* a = anchor == nullptr ? nullptr : std::get_if<double>(anchor);
  if (k == nullptr || a == nullptr || *k <= 0 || *a <= 0) return "";
  return absl::StrFormat("%.2fx", *a / *k);
}

// The project has no JSON dependency; these few values need none.
std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppendFormat(&out, "\\u%04x", c);
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string JsonCell(const Cell& c) {
  if (const double* v = std::get_if<double>(&c)) {
    return std::isfinite(*v) ? FormatNumber(*v) : "null";
  }
  return JsonString(std::get<std::string>(c));
}

std::string JsonCells(const std::vector<std::pair<std::string, Cell>>& cells) {
  std::string out = "{";
  for (size_t i = 0; i < cells.size(); ++i) {
    absl::StrAppend(&out, i ? ", " : "", JsonString(cells[i].first), ": ",
                    JsonCell(cells[i].second));
  }
  return out + "}";
}

std::string JsonStrings(const std::vector<std::string>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) absl::StrAppend(&out, i ? ", " : "", JsonString(v[i]));
  return out + "]";
}

}  // namespace

std::string FormatNumber(double v) {
  if (!std::isfinite(v)) return "-";
  const double a = std::fabs(v);
  if (a >= 1000) return absl::StrFormat("%.0f", v);
  if (a >= 100) return absl::StrFormat("%.1f", v);
  if (a >= 10) return absl::StrFormat("%.2f", v);
  return absl::StrFormat("%.3f", v);
}

void PrintHeader(const ReportRun& run, std::FILE* out) {
  std::fprintf(out, "\n== %s (%s; lower is better)\n", run.title.c_str(), run.unit.c_str());
  std::fprintf(out, "%s\n", run.method.c_str());
  std::string head = absl::StrFormat("%-*s %*s", kWhatWidth, "what", kCellWidth, "kvmem");
  for (const ReportAnchor& a : run.anchors) {
    absl::StrAppendFormat(&head, " %*s %*s", kCellWidth, a.key, 7, "x");
  }
  for (const std::string& c : run.columns) absl::StrAppendFormat(&head, " | %s", c);
  std::fprintf(out, "%s\n", head.c_str());
  std::fflush(out);
}

void PrintRow(const ReportRun& run, const ReportRow& row, std::FILE* out) {
  std::string line =
      absl::StrFormat("%-*s %*s", kWhatWidth, row.what, kCellWidth, CellText(row.kvmem));
  for (const ReportAnchor& a : run.anchors) {
    const Cell* v = Find(row.anchors, a.key);
    absl::StrAppendFormat(&line, " %*s %*s", kCellWidth, v ? CellText(*v) : "", 7,
                          Ratio(row.kvmem, v));
  }
  for (const std::string& c : run.columns) {
    const Cell* v = Find(row.extra, c);
    absl::StrAppendFormat(&line, " | %s", v ? CellText(*v) : "");
  }
  std::fprintf(out, "%s\n", line.c_str());
  std::fflush(out);
}

void PrintNotes(const ReportRun& run, std::FILE* out) {
  for (const std::string& n : run.notes) std::fprintf(out, "note: %s\n", n.c_str());
}

std::string ResultsJson(const std::vector<ReportRun>& runs, const std::string& machine,
                        const std::string& hardware, const std::string& software,
                        const std::string& commit, const std::string& date,
                        const std::string& method_prefix) {
  std::string out = absl::StrCat("{\n  \"machine\": ", JsonString(machine),
                                 ",\n  \"hardware\": ", JsonString(hardware),
                                 ",\n  \"software\": ", JsonString(software), ",\n  \"runs\": [");
  for (size_t r = 0; r < runs.size(); ++r) {
    const ReportRun& run = runs[r];
    absl::StrAppend(
        &out, r ? "," : "", "\n    {\n      \"id\": ", JsonString(run.id),
        ",\n      \"title\": ", JsonString(run.title), ",\n      \"commit\": ", JsonString(commit),
        ",\n      \"date\": ", JsonString(date),
        ",\n      \"method\": ", JsonString(absl::StrCat(method_prefix, " ", run.method)),
        ",\n      \"unit\": ", JsonString(run.unit), ",\n      \"better\": \"lower\"");
    if (!run.anchors.empty()) {
      absl::StrAppend(&out, ",\n      \"anchors\": [");
      for (size_t i = 0; i < run.anchors.size(); ++i) {
        const ReportAnchor& a = run.anchors[i];
        absl::StrAppend(&out, i ? ", " : "", "{\"key\": ", JsonString(a.key),
                        ", \"label\": ", JsonString(a.label),
                        ", \"command\": ", JsonString(a.command), "}");
      }
      absl::StrAppend(&out, "]");
    }
    if (!run.columns.empty()) {
      absl::StrAppend(&out, ",\n      \"columns\": ", JsonStrings(run.columns));
    }
    if (!run.notes.empty()) absl::StrAppend(&out, ",\n      \"notes\": ", JsonStrings(run.notes));
    absl::StrAppend(&out, ",\n      \"rows\": [");
    for (size_t i = 0; i < run.rows.size(); ++i) {
      const ReportRow& row = run.rows[i];
      absl::StrAppend(&out, i ? "," : "", "\n        {\"what\": ", JsonString(row.what),
                      ", \"kvmem\": ", JsonCell(row.kvmem));
      // An anchor's figure comes from the row's own command (the same run).
      if (!row.anchors.empty()) {
        absl::StrAppend(&out, ", \"anchors\": ", JsonCells(row.anchors));
        std::vector<std::pair<std::string, Cell>> commands;
        for (const auto& [key, value] : row.anchors) commands.push_back({key, row.command});
        absl::StrAppend(&out, ", \"anchor_commands\": ", JsonCells(commands));
      }
      if (!row.extra.empty()) absl::StrAppend(&out, ", \"extra\": ", JsonCells(row.extra));
      absl::StrAppend(&out, ", \"command\": ", JsonString(row.command), "}");
    }
    absl::StrAppend(&out, "\n      ]\n    }");
  }
  absl::StrAppend(&out, "\n  ]\n}\n");
  return out;
}

}  // namespace kvbench
