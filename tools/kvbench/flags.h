// kvbench's command lines. Each subcommand declares its flags once, each bound to a field
// of its settings struct (tools/kvbench/settings.h), and every subcommand parses the same
// syntax: --name=value, or --name alone for a boolean (--name=false turns one off).
// Names are lowercase with underscores, as kvstress's. An unknown flag or a bad value is
// an error that names it and lists the valid ones; --help prints the flags.
#ifndef KVMEM_TOOLS_KVBENCH_FLAGS_H_
#define KVMEM_TOOLS_KVBENCH_FLAGS_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvbench {

class FlagSet {
 public:
  // `command` names the flags' owner in messages ("kvbench decode"); `about` heads the
  // help text.
  FlagSet(std::string command, std::string about);

  // Declares --name, stored in *target, whose value at declaration is the default.
  void Bool(std::string name, bool* target, std::string help);
  void Int(std::string name, int* target, std::string help);
  void Int64(std::string name, int64_t* target, std::string help);
  void String(std::string name, std::string* target, std::string help);
  // --name=CHOICE, one of the names in `choices`, stored as its value.
  template <typename T>
  void Choice(std::string name, T* target, std::vector<std::pair<std::string, T>> choices,
              std::string help);

  // Sets the targets from `args` (the words after the subcommand), left to right: a flag
  // given twice keeps the last value. InvalidArgument for a word that is not a declared
  // flag or a value its type does not take. --help stops the parse (help_requested()).
  absl::Status Parse(const std::vector<std::string>& args);
  bool help_requested() const { return help_requested_; }

  // "usage: ..." and every flag with its default and help.
  std::string Help() const;
  const std::string& command() const { return command_; }

 private:
  struct Flag {
    std::string name;
    std::string value_hint;  // "N", "a|b|c"; empty for a boolean
    std::string default_text;
    std::string help;
    std::function<absl::Status(absl::string_view)> set;
  };

  void Add(Flag flag);
  absl::Status UnknownFlag(absl::string_view name) const;

  std::string command_;
  std::string about_;
  std::vector<Flag> flags_;
  bool help_requested_ = false;
};

// Parses `args` into `flags`, then checks the settings with `validate`. nullopt when the
// subcommand should run; otherwise the exit code to return: 0 after --help (the help on
// stdout), 2 after an error (on stderr, with a pointer to --help).
std::optional<int> ParseCommandLine(FlagSet& flags, const std::vector<std::string>& args,
                                    const std::function<absl::Status()>& validate);

// ---- implementation of the template ---------------------------------------------------

template <typename T>
void FlagSet::Choice(std::string name, T* target, std::vector<std::pair<std::string, T>> choices,
                     std::string help) {
  std::string hint;
  std::string default_text;
  for (const auto& [choice, value] : choices) {
    hint += (hint.empty() ? "" : "|") + choice;
    if (value == *target && default_text.empty()) default_text = choice;
  }
  std::string flag = name;
  Add({std::move(name), hint, std::move(default_text), std::move(help),
       [target, choices = std::move(choices), flag, hint](absl::string_view v) {
         for (const auto& [choice, value] : choices) {
           if (v == choice) {
             *target = value;
             return absl::OkStatus();
           }
         }
         return absl::InvalidArgumentError("--" + flag + "=" + std::string(v) + ": want one of " +
                                           hint);
       }});
}

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_FLAGS_H_
