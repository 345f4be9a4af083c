// lora — command-line front end. Subcommands live in cmd_*.cpp.
#include <lora/io/file.hpp>
#include <lora/version.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>

#include "cli.hpp"

int main(int argc, char** argv) {
  // Ctrl-C or kill during a write removes the temporary it was filling (docs/reliability.md).
  lora::io::remove_temporaries_on_signal();
  auto& cmds = lora::cli::registry();
  std::sort(cmds.begin(), cmds.end(), [](auto& a, auto& b) { return a.name < b.name; });
  auto usage = [&](std::FILE* to) {
    fmt::print(to, "lora {} — low-rank adapter tools\n\nusage: lora <command> [options]\n\ncommands:\n",
               lora::version_string);
    for (auto& c : cmds) fmt::print(to, "  {:<12} {}\n", c.name, c.summary);
    fmt::print(to, "\n'lora <command> --help' describes each command. No command writes into or over its inputs;\n"
                   "an existing output folder of other files is replaced only with --force.\n");
  };
  if (argc < 2) {
    usage(stderr);
    return 1;
  }
  const std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return 0;
  }
  if (name == "--version") {
    fmt::print("lora {}\n", lora::version_string);
    return 0;
  }
  auto it = std::find_if(cmds.begin(), cmds.end(), [&](auto& c) { return c.name == name; });
  if (it == cmds.end()) {
    fmt::print(stderr, "lora: unknown command '{}' (see 'lora --help')\n", name);
    return 1;
  }
  std::vector<std::string> args(argv + 2, argv + argc);
  if (std::find(args.begin(), args.end(), "--help") != args.end() ||
      std::find(args.begin(), args.end(), "-h") != args.end()) {
    fmt::print("{}\n", it->help);
    return 0;
  }
  try {
    return it->run(args);
  } catch (const std::exception& e) {
    fmt::print(stderr, "lora {}: error: {}\n", name, e.what());
    return 1;
  }
}
