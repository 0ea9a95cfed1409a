#include "tools/kvbench/flags.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace kvbench {
namespace {

absl::Status BadValue(absl::string_view name, absl::string_view value, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("--", name, "=", value, ": want ", want));
}

// `text` in lines of at most `width` characters (words longer stay whole), each after
// `indent`.
std::string Wrap(absl::string_view text, absl::string_view indent, size_t width) {
  std::string out;
  std::string line;
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!line.empty() && indent.size() + line.size() + 1 + word.size() > width) {
      absl::StrAppend(&out, indent, line, "\n");
      line.clear();
    }
    absl::StrAppend(&line, line.empty() ? "" : " ", word);
  }
  if (!line.empty()) absl::StrAppend(&out, indent, line, "\n");
  return out;
}

template <typename Int>
std::function<absl::Status(absl::string_view)> IntSetter(std::string name, Int* target) {
  return [name = std::move(name), target](absl::string_view v) {
    Int parsed = 0;
    if (!absl::SimpleAtoi(v, &parsed)) return BadValue(name, v, "an integer");
    *target = parsed;
    return absl::OkStatus();
  };
}

}  // namespace

FlagSet::FlagSet(std::string command, std::string about)
    : command_(std::move(command)), about_(std::move(about)) {}

void FlagSet::Add(Flag flag) { flags_.push_back(std::move(flag)); }

void FlagSet::Bool(std::string name, bool* target, std::string help) {
  std::string flag = name;
  Add({std::move(name), "", *target ? "true" : "false", std::move(help),
       [flag = std::move(flag), target](absl::string_view v) {
         if (v == "true") {
           *target = true;
         } else if (v == "false") {
           *target = false;
         } else {
           return BadValue(flag, v, "true or false (or --" + flag + " alone for true)");
         }
         return absl::OkStatus();
       }});
}

void FlagSet::Int(std::string name, int* target, std::string help) {
  std::string default_text = absl::StrCat(*target);
  auto set = IntSetter(name, target);
  Add({std::move(name), "N", std::move(default_text), std::move(help), std::move(set)});
}

void FlagSet::Int64(std::string name, int64_t* target, std::string help) {
  std::string default_text = absl::StrCat(*target);
  auto set = IntSetter(name, target);
  Add({std::move(name), "N", std::move(default_text), std::move(help), std::move(set)});
}

void FlagSet::String(std::string name, std::string* target, std::string help) {
  std::string default_text = target->empty() ? "\"\"" : *target;
  Add({std::move(name), "TEXT", std::move(default_text), std::move(help),
       [target](absl::string_view v) {
         *target = std::string(v);
         return absl::OkStatus();
       }});
}

absl::Status FlagSet::UnknownFlag(absl::string_view name) const {
  std::vector<std::string> names;
  std::string hint;
  // The one spelling mistake worth naming: dashes where kvbench's names have underscores
  // (the GPU anchors' scripts spell theirs with dashes).
  const std::string underscored = absl::StrReplaceAll(name, {{"-", "_"}});
  for (const Flag& f : flags_) {
    names.push_back("--" + f.name);
    if (f.name == underscored && underscored != name) hint = " (did you mean --" + f.name + "?)";
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, hint, "; ", command_,
                                                 " takes ", absl::StrJoin(names, " "),
                                                 " (and --help)"));
}

absl::Status FlagSet::Parse(const std::vector<std::string>& args) {
  for (const std::string& arg : args) {
    absl::string_view word = arg;
    if (word == "--help") {
      help_requested_ = true;
      return absl::OkStatus();
    }
    if (word.size() < 3 || word.substr(0, 2) != "--") {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", arg, "': flags are --name=value"));
    }
    word.remove_prefix(2);
    const size_t eq = word.find('=');
    const absl::string_view name = word.substr(0, eq);
    auto it =
        std::find_if(flags_.begin(), flags_.end(), [&](const Flag& f) { return f.name == name; });
    if (it == flags_.end()) return UnknownFlag(name);
    if (eq == absl::string_view::npos) {
      if (!it->value_hint.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " needs a value: --", name, "=", it->value_hint));
      }
      if (absl::Status s = it->set("true"); !s.ok()) return s;
      continue;
    }
    if (absl::Status s = it->set(word.substr(eq + 1)); !s.ok()) return s;
  }
  return absl::OkStatus();
}

std::string FlagSet::Help() const {
  std::string text = absl::StrCat("usage: ", command_, " [flags]\n", about_, "\n\nflags:\n");
  for (const Flag& f : flags_) {
    absl::StrAppend(&text, "  --", f.name, f.value_hint.empty() ? "" : "=", f.value_hint,
                    " (default ", f.default_text, ")\n", Wrap(f.help, "      ", 90));
  }
  absl::StrAppend(&text, "  --help\n      this text\n");
  return text;
}

std::optional<int> ParseCommandLine(FlagSet& flags, const std::vector<std::string>& args,
                                    const std::function<absl::Status()>& validate) {
  absl::Status s = flags.Parse(args);
  if (s.ok() && flags.help_requested()) {
    std::fputs(flags.Help().c_str(), stdout);
    return 0;
  }
  if (s.ok()) s = validate();
  if (s.ok()) return std::nullopt;
  std::fprintf(stderr, "%s: %s\n(%s --help lists the flags)\n", flags.command().c_str(),
               std::string(s.message()).c_str(), flags.command().c_str());
  return 2;
}

}  // namespace kvbench
