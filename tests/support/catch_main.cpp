#if __has_include(<catch2/catch_test_macros.hpp>)
#error "Catch2 v3 provides its own main (Catch2::Catch2WithMain)"
#else
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
