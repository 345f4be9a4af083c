// fixture_facts: facts of a fixture file for the CLI tests (tests/cli/common.sh's fx), so that an
// expectation follows the fixture's own shapes (tests also run on held-out fixtures of other
// sizes). It reads a safetensors header itself (8-byte little-endian length, then JSON) with
// nlohmann-json, not through the library under test.
//
//   fixture_facts count FILE REGEX    tensors whose name contains a match of REGEX (ECMAScript)
//   fixture_facts numel FILE REGEX    their elements, summed
//   fixture_facts bytes FILE REGEX    their data bytes, summed
//   fixture_facts shape FILE NAME     a tensor's shape as "d0, d1"
//   fixture_facts layers FILE         how many distinct <i> appear as "layers.<i>." in the names
//   fixture_facts json FILE KEY       a top-level integer of a JSON file (config.json)
//
// A count or size of 0, a missing key or an unreadable file is an error (exit 1, the reason on
// stderr, nothing on stdout), so that an expectation built from it fails instead of being met
// trivially.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <regex>
#include <set>
#include <string>

namespace {

int fail(const std::string& why) {
  std::fprintf(stderr, "fixture_facts: %s\n", why.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return fail("usage: fixture_facts count|numel|bytes|shape|layers|json FILE [ARG]");
  const std::string what = argv[1], path = argv[2], arg = argc > 3 ? argv[3] : "";
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail(path + ": cannot open");
  nlohmann::json j;
  try {
    if (what == "json") {
      in >> j;
      if (!j.contains(arg) || !j[arg].is_number_integer()) return fail(path + ": no integer '" + arg + "'");
      const long long v = j[arg].get<long long>();
      if (v <= 0) return fail(path + ": '" + arg + "' is " + std::to_string(v) + ", expected a positive integer");
      std::printf("%lld\n", v);
      return 0;
    }
    unsigned char len[8];
    if (!in.read(reinterpret_cast<char*>(len), 8)) return fail(path + ": shorter than a safetensors header");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | len[i];
    if (n > (std::uint64_t{1} << 30)) return fail(path + ": header length " + std::to_string(n));
    std::string header(n, '\0');
    if (!in.read(header.data(), static_cast<std::streamsize>(n))) return fail(path + ": truncated header");
    j = nlohmann::json::parse(header);
  } catch (const std::exception& e) {
    return fail(path + ": " + e.what());
  }
  j.erase("__metadata__");
  if (what == "shape") {
    if (!j.contains(arg)) return fail(path + ": no tensor '" + arg + "'");
    std::string out;
    for (const auto& d : j[arg]["shape"]) out += (out.empty() ? "" : ", ") + std::to_string(d.get<long long>());
    std::printf("%s\n", out.c_str());
    return 0;
  }
  long long v = 0;
  if (what == "layers") {
    const std::regex layer(R"(layers\.(\d+)\.)");
    std::set<std::string> seen;
    for (const auto& [name, t] : j.items()) {
      std::smatch m;
      if (std::regex_search(name, m, layer)) seen.insert(m[1].str());
    }
    v = static_cast<long long>(seen.size());
  } else if (what == "count" || what == "numel" || what == "bytes") {
    const std::regex re(arg, std::regex::ECMAScript);
    for (const auto& [name, t] : j.items()) {
      if (!std::regex_search(name, re)) continue;
      if (what == "count") {
        v += 1;
      } else if (what == "numel") {
        long long e = 1;
        for (const auto& d : t["shape"]) e *= d.get<long long>();
        v += e;
      } else {
        v += t["data_offsets"][1].get<long long>() - t["data_offsets"][0].get<long long>();
      }
    }
  } else {
    return fail("unknown fact '" + what + "' (count, numel, bytes, shape, layers, json)");
  }
  if (v <= 0) return fail(what + " " + path + " " + arg + ": " + std::to_string(v) + ", expected a positive integer");
  std::printf("%lld\n", v);
  return 0;
}
