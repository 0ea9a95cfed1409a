// The tables of kvbench steps: printed row by row as figures come in, and written at the
// end as a results file of tools/scripts/gen_benchmarks.py (its docstring has the schema:
// one run per table, kvmem's figure beside its anchors, extra columns).
#ifndef KVMEM_TOOLS_KVBENCH_STEPS_REPORT_H_
#define KVMEM_TOOLS_KVBENCH_STEPS_REPORT_H_

#include <cstdio>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace kvbench {

// A number, or a text such as an error.
using Cell = std::variant<double, std::string>;

struct ReportRow {
  std::string what;
  Cell kvmem;
  std::vector<std::pair<std::string, Cell>> anchors;  // by anchor key
  std::vector<std::pair<std::string, Cell>> extra;    // by column name
  std::string command;
};

struct ReportAnchor {
  std::string key;
  std::string label;
  std::string command;
};

struct ReportRun {
  std::string id;
  std::string title;
  std::string method;
  std::string unit;
  std::vector<ReportAnchor> anchors;
  std::vector<std::string> columns;
  std::vector<ReportRow> rows;
  std::vector<std::string> notes;
};

// A number as the tables print it: 4 significant digits at most, no exponent below 10^7.
std::string FormatNumber(double v);

// The run's title, method and column heads.
void PrintHeader(const ReportRun& run, std::FILE* out);
// One row under them; "x" columns give anchor / kvmem (above 1: kvmem's figure is lower).
void PrintRow(const ReportRun& run, const ReportRow& row, std::FILE* out);
void PrintNotes(const ReportRun& run, std::FILE* out);

// The results file: every run, with the machine described by `machine`, `hardware` and
// `software`, measured at `commit` on `date`; each method after `method_prefix` (what the
// runs share). Lower is better in every run.
std::string ResultsJson(const std::vector<ReportRun>& runs, const std::string& machine,
                        const std::string& hardware, const std::string& software,
                        const std::string& commit, const std::string& date,
                        const std::string& method_prefix);

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_STEPS_REPORT_H_
