#include "runtime/text_proto.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

namespace loom {
namespace {

namespace pb = google::protobuf;

// Keeps the first parse error.
class FirstError : public pb::io::ErrorCollector {
 public:
  explicit FirstError(std::string file) : file_(std::move(file)) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (error_.empty()) error_ = absl::StrCat(file_, ":", line + 1, ":", column + 1, ": ", message);
  }
  void AddWarning(int, pb::io::ColumnNumber, const std::string&) override {}
  const std::string& error() const { return error_; }

 private:
  std::string file_;
  std::string error_;
};

}  // namespace

absl::Status ParseTextProto(const std::string& text, const std::string& file, pb::Message* message) {
  FirstError errors(file);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, message)) return absl::InvalidArgumentError(errors.error());
  return absl::OkStatus();
}

}  // namespace loom
