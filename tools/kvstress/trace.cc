#include "tools/kvstress/trace.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace kvstress {
namespace {

constexpr absl::string_view kHeader3 = "arrival_step,prompt_len,output_len";
constexpr absl::string_view kHeader4 = "arrival_step,prompt_len,output_len,prefix_group";

}  // namespace

std::string Printable(absl::string_view text, size_t max_bytes) {
  std::string out;
  const absl::string_view shown = text.substr(0, max_bytes);
  for (char ch : shown) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c == '\\') {
      out += "\\\\";
    } else if (c < 0x20 || c >= 0x7f) {
      out += absl::StrFormat("\\x%02x", c);
    } else {
      out += ch;
    }
  }
  if (shown.size() < text.size()) {
    out += absl::StrFormat("... (%d bytes in all)", text.size());
  }
  return out;
}

absl::StatusOr<Workload> ParseTrace(absl::string_view text, absl::string_view source,
                                    int64_t max_context, int64_t prefix_len) {
  Workload w;
  w.name = absl::StrFormat("trace:%s", source);
  bool have_header = false;
  bool have_groups = false;
  std::set<int32_t> groups;
  int64_t line_no = 0;
  for (absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++line_no;
    absl::string_view line = absl::StripAsciiWhitespace(raw);
    if (line.empty() || line.front() == '#') continue;
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrFormat("%s:%d: %s", source, line_no, what));
    };
    std::vector<absl::string_view> fields = absl::StrSplit(line, ',');
    for (auto& f : fields) f = absl::StripAsciiWhitespace(f);
    if (!have_header) {
      const std::string joined = absl::StrJoin(fields, ",");
      if (joined == kHeader3) {
        have_groups = false;
      } else if (joined == kHeader4) {
        have_groups = true;
      } else {
        return bad(absl::StrFormat("expected the header '%s[,prefix_group]', got '%s'", kHeader3,
                                   Printable(line)));
      }
      have_header = true;
      continue;
    }
    const size_t want = have_groups ? 4 : 3;
    // A trailing empty prefix_group ("0,10,5,") is allowed; so is leaving it out.
    if (fields.size() != want && !(have_groups && fields.size() == 3)) {
      return bad(
          absl::StrFormat("expected %d comma-separated fields, got %d", want, fields.size()));
    }
    static constexpr const char* kNames[] = {"arrival_step", "prompt_len", "output_len",
                                             "prefix_group"};
    int64_t v[4] = {0, 0, 0, -1};
    for (size_t i = 0; i < fields.size(); ++i) {
      if (i == 3 && fields[i].empty()) continue;
      if (!absl::SimpleAtoi(fields[i], &v[i])) {
        return bad(absl::StrFormat("%s '%s' is not an integer", kNames[i], Printable(fields[i])));
      }
    }
    Request r;
    if (v[0] < 0) return bad(absl::StrFormat("arrival_step %d must be >= 0", v[0]));
    if (v[1] < 1) return bad(absl::StrFormat("prompt_len %d must be >= 1", v[1]));
    if (v[2] < 1) return bad(absl::StrFormat("output_len %d must be >= 1", v[2]));
    if (v[1] > max_context || v[2] > max_context - v[1]) {
      return bad(absl::StrFormat("prompt_len + output_len = %d exceeds max_context %d", v[1] + v[2],
                                 max_context));
    }
    if (v[3] < -1 || v[3] > (int64_t{1} << 30)) {
      return bad(absl::StrFormat("prefix_group %d must be >= 0 (or -1 / empty for none)", v[3]));
    }
    if (v[3] >= 0 && v[1] <= prefix_len) {
      return bad(absl::StrFormat(
          "prompt_len %d must exceed the shared prefix of its group (--prefix_len=%d)", v[1],
          prefix_len));
    }
    r.arrival_step = v[0];
    r.prompt_len = v[1];
    r.output_len = v[2];
    r.prefix_group = static_cast<int32_t>(v[3]);
    if (r.prefix_group >= 0) groups.insert(r.prefix_group);
    w.requests.push_back(r);
  }
  if (!have_header) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: empty trace: expected the header '%s[,prefix_group]'", source, kHeader3));
  }
  std::stable_sort(w.requests.begin(), w.requests.end(), [](const Request& a, const Request& b) {
    return a.arrival_step < b.arrival_step;
  });
  w.prefix_len = groups.empty() ? 0 : prefix_len;
  w.description =
      absl::StrFormat("trace %s: %d requests, arrivals over steps [0, %d]", source,
                      w.requests.size(), w.requests.empty() ? 0 : w.requests.back().arrival_step);
  if (!groups.empty()) {
    // Group numbers are labels, not a count: "2" alone is one group.
    w.description += absl::StrFormat(", %d prefix group%s sharing %d tokens", groups.size(),
                                     groups.size() == 1 ? "" : "s", prefix_len);
  }
  return w;
}

absl::StatusOr<Workload> LoadTrace(const std::string& path, int64_t max_context,
                                   int64_t prefix_len) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrFormat("trace '%s' is a directory", path));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrFormat("cannot open trace '%s': %s", path, std::strerror(errno)));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrFormat("error reading trace '%s'", path));
  return ParseTrace(buf.str(), path, max_context, prefix_len);
}

}  // namespace kvstress
