#pragma once
// The CLI's plumbing: subcommand registry and a small flag parser. Keep it
// thin: every subcommand is parsing and printing around library calls.

#include <lora/error.hpp>
#include <lora/io/file.hpp>

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace lora::cli {

/// Parsed arguments: --name value, --name=value, --flag, positionals; the same
/// option may repeat (all values kept, in order). Every command accepts --force (see
/// guard_output).
class Args {
 public:
  /// `flags` are options that take no value; every other --option takes one.
  Args(const std::vector<std::string>& argv, const std::set<std::string>& flags,
       const std::set<std::string>& options, std::string command)
      : command_(std::move(command)) {
    for (std::size_t i = 0; i < argv.size(); ++i) {
      const std::string& a = argv[i];
      if (a.size() > 2 && a.rfind("--", 0) == 0) {
        std::string name = a.substr(2), value;
        bool has_value = false;
        if (auto eq = name.find('='); eq != std::string::npos) {
          value = name.substr(eq + 1);
          name = name.substr(0, eq);
          has_value = true;
        }
        if (flags.count(name) || name == "force") {
          if (has_value) lora::fail("option --{} takes no value", name);
          values_[name].push_back("1");
        } else if (options.count(name)) {
          if (!has_value) {
            if (i + 1 >= argv.size()) lora::fail("option --{} needs a value", name);
            value = argv[++i];
          }
          values_[name].push_back(value);
        } else {
          lora::fail("unknown option --{} (see 'lora {} --help')", name, command_);
        }
      } else {
        positional_.push_back(a);
      }
    }
  }
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  std::optional<std::string> get(const std::string& name) const {
    auto it = values_.find(name);
    if (it == values_.end()) return std::nullopt;
    return it->second.back();
  }
  std::vector<std::string> all(const std::string& name) const {
    auto it = values_.find(name);
    return it == values_.end() ? std::vector<std::string>{} : it->second;
  }
  std::string required(const std::string& name) const {
    auto v = get(name);
    if (!v) lora::fail("missing required option --{} (see 'lora {} --help')", name, command_);
    return *v;
  }
  double number(const std::string& name, double fallback) const {
    auto v = get(name);
    return v ? parse_number(*v, "--" + name) : fallback;
  }
  /// A whole number in [lo, hi] ("8", not "8.0", "1e300" or "-1"), `fallback` when absent.
  std::int64_t integer(const std::string& name, std::int64_t fallback, std::int64_t lo, std::int64_t hi) const {
    auto v = get(name);
    return v ? parse_integer(*v, "--" + name, lo, hi) : fallback;
  }
  const std::vector<std::string>& positional() const { return positional_; }

  static std::int64_t parse_integer(const std::string& s, const std::string& what, std::int64_t lo, std::int64_t hi) {
    std::int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v < lo || v > hi)
      lora::fail("{} must be a whole number from {} to {}, got '{}'", what, lo, hi, s);
    return v;
  }

  static double parse_number(const std::string& s, const std::string& what) {
    double v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || !std::isfinite(v))
      lora::fail("{} must be a finite number, got '{}'", what, s);
    return v;
  }
  static std::vector<std::string> split(const std::string& s, char sep = ',') {
    std::vector<std::string> out;
    std::string cur;
    for (char c : s) {
      if (c == sep) {
        if (!cur.empty()) out.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) out.push_back(cur);
    return out;
  }

 private:
  std::string command_;
  std::map<std::string, std::vector<std::string>> values_;
  std::vector<std::string> positional_;
};

/// Refuses, before anything is read or written, an output that is, contains or lies inside
/// one of `inputs`, or that would replace a folder of unrelated files unless --force was
/// given (lora::io::check_output). One call per command, before loading anything:
///   cli::guard_output(args, out, {base, adapter}, io::output_kind::folder);
inline void guard_output(const Args& args, const std::filesystem::path& out,
                         const std::vector<std::filesystem::path>& inputs, io::output_kind kind,
                         std::string_view flag = "--out") {
  io::check_output(out, inputs, kind, args.has("force"), flag);
}

struct Command {
  std::string name;
  std::string summary;  ///< one line for `lora --help`
  std::string help;     ///< full text for `lora <name> --help`
  std::function<int(const std::vector<std::string>&)> run;
};

inline std::vector<Command>& registry() {
  static std::vector<Command> commands;
  return commands;
}

/// `static lora::cli::Register reg{{"merge", "...", "...", run_merge}};` in a cmd_*.cpp.
struct Register {
  explicit Register(Command c) { registry().push_back(std::move(c)); }
};

}  // namespace lora::cli
