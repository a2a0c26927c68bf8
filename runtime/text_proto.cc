#include "runtime/text_proto.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace loom {
namespace {

namespace pb = google::protobuf;

// Keeps the first parse error.
class FirstError : public pb::io::ErrorCollector {
 public:
  explicit FirstError(std::string file) : file_(std::move(file)) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (error_.empty()) error_ = absl::StrCat(file_, ":", line + 1, ":", column + 1, ": ", message, Hint(message));
  }
  void AddWarning(int, pb::io::ColumnNumber, const std::string&) override {}
  const std::string& error() const { return error_; }

 private:
  // The parser's 'Message type "T" has no field named "f".' gains a hint.
  static std::string Hint(const std::string& message) {
    const std::vector<std::string> quoted = absl::StrSplit(message, '"');
    if (quoted.size() != 5 || !absl::StrContains(message, "has no field named")) return "";
    const pb::Descriptor* type = pb::DescriptorPool::generated_pool()->FindMessageTypeByName(quoted[1]);
    return type ? NearestFieldHint(*type, quoted[3]) : "";
  }

  std::string file_;
  std::string error_;
};

// Levenshtein distance.
int EditDistance(const std::string& a, const std::string& b) {
  std::vector<int> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    int diagonal = row[0];
    row[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      const int up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string NearestFieldHint(const pb::Descriptor& message, const std::string& name) {
  // Up to two edits, and fewer than a third of the name's letters.
  int best = std::min<int>(3, static_cast<int>(name.size() + 2) / 3);
  std::string nearest;
  for (int i = 0; i < message.field_count(); ++i) {
    const std::string& field = message.field(i)->name();
    if (const int d = EditDistance(name, field); d < best) best = d, nearest = field;
  }
  return nearest.empty() ? "" : absl::StrCat(" (did you mean '", nearest, "'?)");
}

absl::Status ParseTextProto(const std::string& text, const std::string& file, pb::Message* message) {
  FirstError errors(file);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, message)) return absl::InvalidArgumentError(errors.error());
  return absl::OkStatus();
}

}  // namespace loom
