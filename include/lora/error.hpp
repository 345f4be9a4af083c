#pragma once
// lora::error — the one exception type of the library.

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace lora {

/// Thrown for every bad input: shape mismatches, invalid ranks or alphas,
/// malformed files. The message names the tensor or file, and says what was
/// expected and what was given.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error(what) {}
};

/// Throws lora::error with a {fmt}-formatted message; the format string is checked at
/// compile time. `lora::fail("{}: rank {} exceeds min(in, out) = {}", name, r, m);`
template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw error(fmt::format(f, std::forward<Args>(args)...));
}

namespace detail {
using lora::fail;  // the library's internals spell it detail::fail
}  // namespace detail

}  // namespace lora
