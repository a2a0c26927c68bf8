// Command-line flags of Loom's tools (loom-train, loom-prepare, loom-eval,
// loom-generate, loom-bench), parsed one way.
#pragma once

namespace loom {

// Parses argv with Abseil's flags after two adjustments every tool wants:
// flag names may be spelled with dashes (--output-prefix for
// --output_prefix; "--" ends the flags), and --help lists every Loom flag the
// tool links (Abseil's default lists only a file named after the program,
// and the tools' files are loom_*.cc against programs named loom-*).
// `usage` is printed first by --help.
void ParseToolFlags(int argc, char** argv, const char* usage);

}  // namespace loom
