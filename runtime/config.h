// The one config loader: a text-proto file (configs/loom.proto), then
// `--set path.to.field=value` overrides, then validation.
#pragma once

#include <string>
#include <vector>

#include "configs/loom.pb.h"
#include "runtime/status.h"

namespace loom {

struct ConfigArgs {
  std::string config_path;        // --config FILE
  std::vector<std::string> sets;  // --set a.b=v, in order
};

// Takes --config and --set (either "--set x=y" or "--set=x=y") out of argv
// so that Abseil's flag parser only sees the rest.
absl::StatusOr<ConfigArgs> ExtractConfigArgs(int& argc, char** argv);

// Reads and parses `path`, applies `sets`, validates.
absl::StatusOr<config::Config> LoadConfig(const std::string& path, const std::vector<std::string>& sets);

// One override "model.hidden=128"; repeated fields by index: "data.paths[1].weight=0.3".
absl::Status ApplyOverride(config::Config& config, const std::string& assignment);

// Ranges and consistency; the message names the field and the reason.
absl::Status ValidateConfig(const config::Config& config);

// Text proto of the config with every field, defaults included (the resolved config).
std::string ConfigToText(const config::Config& config);

}  // namespace loom
