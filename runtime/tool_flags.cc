#include "runtime/tool_flags.h"

#include <string>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"

namespace loom {

void ParseToolFlags(int argc, char** argv, const char* usage) {
  for (int i = 1; i < argc; ++i) {
    char* arg = argv[i];
    if (arg[0] != '-' || arg[1] != '-') continue;
    if (arg[2] == '\0') break;
    for (char* c = arg + 2; *c != '\0' && *c != '='; ++c)
      if (*c == '-') *c = '_';
  }
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view file) { return !absl::StrContains(file, "absl/"); };
  config.contains_helpshort_flags = config.contains_help_flags;
  // Files named from the source tree's root (this file is runtime/tool_flags.cc).
  config.normalize_filename = [](absl::string_view file) {
    constexpr absl::string_view kThis = __FILE__, kSuffix = "runtime/tool_flags.cc";
    absl::ConsumePrefix(&file, kThis.substr(0, kThis.size() - kSuffix.size()));
    return std::string(file);
  };
  absl::SetFlagsUsageConfig(config);
  absl::SetProgramUsageMessage(usage);
  absl::ParseCommandLine(argc, argv);
}

}  // namespace loom
