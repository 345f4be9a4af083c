#pragma once
// The regular expressions of PEFT configs (a string target_modules, rank_pattern and
// alpha_pattern keys), matched in time linear in the name with RE2: std::regex backtracks,
// so a pattern like ([a-z_.0-9]|[a-z_.0-9])*Z hangs and a 60,000-character name overflows
// its recursion. Semantics as PEFT (Python's re):
//
//   lora::io::regex_full_match(p, name)    re.fullmatch(p, name)          target_modules string
//   lora::io::pattern_key_matches(k, name) re.match(rf"(.*\.)?({k})$", name)   get_pattern_key
//
// Python's re and RE2 agree on the syntax configs use (classes, alternation, groups,
// repetition, (?P<name>...)); look-around and back-references, which need backtracking,
// are refused with a message naming the pattern. Built without RE2 (LORA_WITH_RE2 unset,
// e.g. a CUDA-only build), std::regex is used with patterns and names bounded in length.
// nvcc cannot parse <re2/re2.h> (nvcc 13: "incomplete type re2::RE2::Arg"), so .cu files take
// the std::regex path too; the two sit in different inline namespaces, so a program that mixes
// .cu and .cpp files gets two distinct sets of functions rather than one name with two bodies.

#include <lora/error.hpp>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#if defined(LORA_WITH_RE2) && !defined(__CUDACC__)
#define LORA_PATTERN_RE2 1
#include <re2/re2.h>
#else
#define LORA_PATTERN_RE2 0
#include <regex>
#endif

namespace lora::io {

namespace detail {
#if LORA_PATTERN_RE2
inline namespace re2_matcher {
#else
inline namespace std_regex_matcher {
#endif

#if LORA_PATTERN_RE2
using compiled_regex = re2::RE2;

// `shown` is what messages quote (the user's pattern, not our wrapping of it).
inline std::shared_ptr<const re2::RE2> compile_regex(const std::string& pattern, std::string_view what,
                                                     std::string_view shown) {
  // A small cache: the same few patterns are matched against every module name.
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const re2::RE2>, std::less<>> cache;
  {
    std::lock_guard lk(mu);
    if (auto it = cache.find(pattern); it != cache.end()) return it->second;
  }
  re2::RE2::Options opt;
  opt.set_log_errors(false);
  auto re = std::make_shared<const re2::RE2>(pattern, opt);
  if (!re->ok())
    lora::detail::fail("{} pattern '{}' is not a regular expression this library accepts (RE2 syntax: no "
                       "look-around or back-references): {}",
                       what, shown.size() > 200 ? std::string(shown.substr(0, 200)) + "..." : std::string(shown),
                       re->error());
  std::lock_guard lk(mu);
  if (cache.size() >= 256) cache.clear();
  cache.emplace(pattern, re);
  return re;
}

inline bool full_match(const std::string& pattern, std::string_view s, std::string_view what,
                       std::string_view shown) {
  const auto re = compile_regex(pattern, what, shown);
  return re2::RE2::FullMatch(re2::StringPiece(s.data(), s.size()), *re);
}

inline std::optional<std::string> search_group(const std::string& pattern, std::string_view s, std::string_view what) {
  const auto re = compile_regex(pattern, what, pattern);
  if (re->NumberOfCapturingGroups() < 1) lora::detail::fail("{} pattern '{}' has no capturing group", what, pattern);
  std::string g;
  if (!re2::RE2::PartialMatch(re2::StringPiece(s.data(), s.size()), *re, &g)) return std::nullopt;
  return g;
}
#else
// libstdc++'s regex compiler accumulates back-reference numbers and {m,n} counts in a
// signed int without an overflow check (undefined behaviour, found by fuzzing).
inline void check_regex_digits(const std::string& pattern, std::string_view what) {
  for (std::size_t i = 0, run = 0; i < pattern.size(); ++i) {
    run = (pattern[i] >= '0' && pattern[i] <= '9') ? run + 1 : 0;
    if (run == 6 && i >= 6 && (pattern[i - 6] == '\\' || pattern[i - 6] == '{' || pattern[i - 6] == ','))
      lora::detail::fail("{} pattern '{}' has a repetition count or back-reference with more than 5 digits", what,
                         pattern);
  }
}
inline bool full_match(const std::string& pattern, std::string_view s, std::string_view what,
                       std::string_view shown) {
  // std::regex recurses per character and backtracks: keep both sides short.
  if (pattern.size() > 512 || s.size() > 1024)
    lora::detail::fail("{} pattern '{}' against a name of {} characters: too long for a build without RE2 (at most "
                       "512 and 1024)",
                       what, pattern.substr(0, 200), s.size());
  check_regex_digits(pattern, what);
  try {
    return std::regex_match(s.begin(), s.end(), std::regex(pattern, std::regex::ECMAScript));
  } catch (const std::regex_error& e) {
    lora::detail::fail("{} pattern '{}' is not a valid regular expression: {}", what, shown, e.what());
  }
}

inline std::optional<std::string> search_group(const std::string& pattern, std::string_view s, std::string_view what) {
  if (pattern.size() > 512 || s.size() > 1024)
    lora::detail::fail("{} pattern '{}' against a name of {} characters: too long for a build without RE2", what,
                       pattern.substr(0, 200), s.size());
  check_regex_digits(pattern, what);
  try {
    std::match_results<std::string_view::const_iterator> m;
    if (!std::regex_search(s.begin(), s.end(), m, std::regex(pattern, std::regex::ECMAScript))) return std::nullopt;
    if (m.size() < 2) lora::detail::fail("{} pattern '{}' has no capturing group", what, pattern);
    return m[1].str();
  } catch (const std::regex_error& e) {
    lora::detail::fail("{} pattern '{}' is not a valid regular expression: {}", what, pattern, e.what());
  }
}
#endif
}  // inline namespace

}  // namespace detail

/// Python's re.fullmatch(pattern, name) (PEFT's test for a string target_modules).
/// Throws lora::error naming `what` (e.g. "adapter_config.json: target_modules") when the
/// pattern does not compile.
inline bool regex_full_match(const std::string& pattern, std::string_view name,
                             std::string_view what = "target_modules") {
  return detail::full_match(pattern, name, what, pattern);
}

/// Python's re.search(pattern, name).group(1), or nullopt when there is no match.
inline std::optional<std::string> regex_search_group(const std::string& pattern, std::string_view name,
                                                     std::string_view what) {
  return detail::search_group(pattern, name, what);
}

/// PEFT's get_pattern_key test for one rank_pattern/alpha_pattern key:
/// re.match(rf"(.*\.)?({key})$", name). Python's $ also matches before a final newline.
inline bool pattern_key_matches(const std::string& key, std::string_view name,
                                std::string_view what = "rank_pattern/alpha_pattern") {
  return detail::full_match("(.*\\.)?(" + key + ")\\n?", name, what, key);
}

}  // namespace lora::io
