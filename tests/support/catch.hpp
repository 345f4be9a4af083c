#pragma once
// Builds the tests with Catch2 v3 (catch2/catch_test_macros.hpp) or v2 (catch2/catch.hpp).
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#define LORA_CATCH_V3 1
#else
#include <catch2/catch.hpp>
#endif
#ifdef LORA_CATCH_V3
using Catch::Approx;
#endif
#ifndef LORA_CATCH_V3
namespace Catch::Matchers {
inline auto ContainsSubstring(const std::string& s) { return Contains(s); }
}  // namespace Catch::Matchers
#endif
