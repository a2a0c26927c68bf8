// Text-proto parsing with the first error as one line "file:line:col: message".
#pragma once

#include <google/protobuf/message.h>

#include <string>

#include "runtime/status.h"

namespace loom {

// Parses `text` (read from `file`, named in the error) into `message`.
// InvalidArgument on a syntax or schema error.
absl::Status ParseTextProto(const std::string& text, const std::string& file, google::protobuf::Message* message);

// " (did you mean 'hidden'?)" when `message` has a field within a few edits
// of `name` (a misspelt field in a config file or a --set path), else "".
std::string NearestFieldHint(const google::protobuf::Descriptor& message, const std::string& name);

}  // namespace loom
