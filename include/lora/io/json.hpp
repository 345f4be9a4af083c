#pragma once
// JSON from files we did not write: bounded nesting, no duplicate keys, and typed getters
// whose messages name the file and the key (not nlohmann's "type must be string").
//
//   auto j = lora::io::read_json_file("adapter_config.json");        // depth ≤ 64, keys unique
//   int r = lora::io::json_int(j, "r", "adapter_config.json", 1, 1 << 30);
//   std::string s = lora::io::json_string(j, "peft_type", "adapter_config.json");
//
// Why bounded: nlohmann parses iteratively, but copying, comparing and dumping a value
// recurse, so a 100,000-deep array crashes later, far from the file (see docs/reliability.md).

#include <lora/error.hpp>
#include <lora/io/file.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <type_traits>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace lora::io {

/// The deepest nesting parse_json accepts by default (configs and headers use < 10).
inline constexpr int json_max_depth = 64;

/// How parse_json reads: nesting bound, and a hook that sees every object key with its
/// depth (1 = a key of the top-level object), in document order.
struct JsonParseOptions {
  int max_depth = json_max_depth;
  std::function<void(int depth, const std::string& key)> on_key;
};

/// Parses `text` as JSON (J = nlohmann::json or nlohmann::ordered_json). Throws lora::error
/// naming `where` for invalid JSON, nesting deeper than options.max_depth, or a key given
/// twice in one object (which JSON readers resolve differently: Python keeps the last).
namespace detail {
/// nlohmann's DOM builder with a depth bound, duplicate-key detection and a key hook. A SAX
/// handler, not the parser callback: the callback parser rescans the parent container at
/// every object end (quadratic: 100,000 tensors took 379 s).
template <class J>
class BoundedSax : public nlohmann::detail::json_sax_dom_parser<J> {
  using base = nlohmann::detail::json_sax_dom_parser<J>;

 public:
  BoundedSax(J& root, const std::string& where, const JsonParseOptions& options)
      : base(root, true), where_(where), options_(options) {}
  bool start_object(std::size_t n) {
    open(true);
    return base::start_object(n);
  }
  bool end_object() {
    keys_.pop_back();
    close();
    return base::end_object();
  }
  bool start_array(std::size_t n) {
    open(false);
    return base::start_array(n);
  }
  bool end_array() {
    close();
    return base::end_array();
  }
  bool key(typename J::string_t& k) {
    if (!keys_.back().insert(k).second)
      lora::detail::fail("{}: key '{}' appears twice in one JSON object", where_, k);
    if (keys_.back().size() > key_cap)
      lora::detail::fail("{}: a JSON object with more than {} keys", where_, key_cap);
    if (options_.on_key) options_.on_key(depth_, k);
    return base::key(k);
  }

 private:
  // ordered_json finds keys by linear search, so a hostile object of 10^5 keys would take
  // minutes; configs have dozens. (nlohmann::json has no such limit here.)
  static constexpr std::size_t key_cap =
      std::is_same_v<J, nlohmann::ordered_json> ? std::size_t{10000} : std::numeric_limits<std::size_t>::max();
  void open(bool object) {
    if (depth_ >= options_.max_depth)
      lora::detail::fail("{}: JSON nested deeper than {} levels", where_, options_.max_depth);
    ++depth_;
    if (object) keys_.emplace_back();
  }
  void close() { --depth_; }
  const std::string& where_;
  const JsonParseOptions& options_;
  int depth_ = 0;
  std::vector<std::set<std::string>> keys_;  // the keys seen so far in each open object
};
}  // namespace detail

/// Parses `text` as JSON (J = nlohmann::json or nlohmann::ordered_json). Throws lora::error
/// naming `where` for invalid JSON, nesting deeper than options.max_depth, or a key given
/// twice in one object (which JSON readers resolve differently: Python keeps the last).
template <class J = nlohmann::json>
J parse_json(std::string_view text, const std::string& where, const JsonParseOptions& options = {}) {
  J out;
  detail::BoundedSax<J> sax(out, where, options);
  try {
    // nlohmann's parser itself: J::sax_parse would also compile its binary formats' reader
    // (CBOR, MessagePack, …), which JSON text never takes, into every file that parses JSON
    auto input = nlohmann::detail::input_adapter(text.begin(), text.end());
    nlohmann::detail::parser<J, decltype(input)>(std::move(input), nullptr, true, false).sax_parse(&sax, true);
  } catch (const nlohmann::json::exception& e) {
    lora::detail::fail("{}: not valid JSON: {}", where, e.what());
  }
  return out;
}

/// Reads a regular file of at most `max_bytes` (see read_regular_file) and parses it.
template <class J = nlohmann::json>
J read_json_file(const std::filesystem::path& path, const JsonParseOptions& options = {},
                 std::size_t max_bytes = std::size_t{100} << 20) {
  return parse_json<J>(read_regular_file(path, max_bytes), path.string(), options);
}

namespace detail {
template <class J>
std::string json_type_of(const J& v) {
  if (v.is_number_integer()) return "an integer";
  if (v.is_number_float()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_boolean()) return "a boolean";
  if (v.is_null()) return "null";
  if (v.is_array()) return "an array";
  return "an object";
}
template <class J>
std::string json_excerpt(const J& v) {
  if (v.is_array() || v.is_object()) return json_type_of(v);
  std::string s = v.dump();
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}
}  // namespace detail

/// An integer value (JSON 64 or 64.0; not 64.5, "64" or 1e300) in [lo, hi]; `what` names
/// the key ("'r'", "rank_pattern['q_proj']") and `where` the file.
template <class J>
std::int64_t json_int_value(const J& v, const std::string& what, const std::string& where, std::int64_t lo,
                            std::int64_t hi) {
  auto bad = [&]() -> std::int64_t {
    lora::detail::fail("{}: {} must be an integer in [{}, {}], got {}", where, what, lo, hi, detail::json_excerpt(v));
  };
  if (v.is_number_unsigned()) {
    const auto u = v.template get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(hi) || (lo > 0 && u < static_cast<std::uint64_t>(lo))) return bad();
    return static_cast<std::int64_t>(u);
  }
  if (v.is_number_integer()) {
    const auto i = v.template get<std::int64_t>();
    if (i < lo || i > hi) return bad();
    return i;
  }
  if (v.is_number_float()) {
    const double d = v.template get<double>();
    // the bounds as doubles: an int64 limit may round up, so compare with < on the far side
    if (!std::isfinite(d) || d != std::floor(d) || d < static_cast<double>(lo) || d > static_cast<double>(hi) ||
        d >= 9.2233720368547758e18)
      return bad();
    return static_cast<std::int64_t>(d);
  }
  return bad();
}

/// obj[key] as an integer in [lo, hi]; throws naming the file and key when it is missing.
template <class J>
std::int64_t json_int(const J& obj, const std::string& key, const std::string& where, std::int64_t lo,
                      std::int64_t hi) {
  if (!obj.is_object() || !obj.contains(key)) lora::detail::fail("{}: missing integer '{}'", where, key);
  return json_int_value(obj.at(key), "'" + key + "'", where, lo, hi);
}

/// obj[key] as an integer in [lo, hi], or nullopt when absent or null.
template <class J>
std::optional<std::int64_t> json_int_opt(const J& obj, const std::string& key, const std::string& where,
                                         std::int64_t lo, std::int64_t hi) {
  if (!obj.is_object() || !obj.contains(key) || obj.at(key).is_null()) return std::nullopt;
  return json_int_value(obj.at(key), "'" + key + "'", where, lo, hi);
}

/// A finite number (integer or not).
template <class J>
double json_number_value(const J& v, const std::string& what, const std::string& where) {
  if (!v.is_number() || !std::isfinite(v.template get<double>()))
    lora::detail::fail("{}: {} must be a finite number, got {}", where, what, detail::json_excerpt(v));
  return v.template get<double>();
}

/// obj[key] as a finite number, or nullopt when absent or null.
template <class J>
std::optional<double> json_number_opt(const J& obj, const std::string& key, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key) || obj.at(key).is_null()) return std::nullopt;
  return json_number_value(obj.at(key), "'" + key + "'", where);
}

/// A string value.
template <class J>
const std::string& json_string_value(const J& v, const std::string& what, const std::string& where) {
  if (!v.is_string()) lora::detail::fail("{}: {} must be a string, got {}", where, what, detail::json_excerpt(v));
  return v.template get_ref<const std::string&>();
}

/// obj[key] as a string; throws naming the file and key when missing or not a string.
template <class J>
const std::string& json_string(const J& obj, const std::string& key, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key)) lora::detail::fail("{}: missing string '{}'", where, key);
  return json_string_value(obj.at(key), "'" + key + "'", where);
}

/// obj[key] as a string, or nullopt when absent or null.
template <class J>
std::optional<std::string> json_string_opt(const J& obj, const std::string& key, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key) || obj.at(key).is_null()) return std::nullopt;
  return json_string_value(obj.at(key), "'" + key + "'", where);
}

/// obj[key] as a boolean, `fallback` when absent or null.
template <class J>
bool json_bool(const J& obj, const std::string& key, bool fallback, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key) || obj.at(key).is_null()) return fallback;
  const auto& v = obj.at(key);
  if (!v.is_boolean())
    lora::detail::fail("{}: '{}' must be true or false, got {}", where, key, detail::json_excerpt(v));
  return v.template get<bool>();
}

}  // namespace lora::io
