// loom-prepare --input FILE[,FILE...] --output-prefix P [--json-key text]
// Tokenizes text into a Megatron-compatible indexed dataset P.bin + P.idx
// (data/indexed_dataset.h) with the byte tokenizer, EOD after each document.
// Plain text: one document per line. .jsonl/.json: one JSON object per line,
// the document is its --json-key string field. Empty lines are skipped.
// Streams line by line; progress on stderr about once a second. Bad input is
// one line on stderr and exit code 2.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "data/byte_tokenizer.h"
#include "data/indexed_dataset.h"
#include "nlohmann/json.hpp"
#include "runtime/timer.h"

ABSL_FLAG(std::string, input, "", "comma-separated input files: plain text, or .jsonl/.json");
ABSL_FLAG(std::string, output_prefix, "", "writes PREFIX.bin and PREFIX.idx");
ABSL_FLAG(std::string, json_key, "text", "the JSON field that holds each document");

namespace loom {
namespace {

struct Totals {
  int64_t documents = 0;
  int64_t tokens = 0;
  int64_t input_bytes = 0;
};

bool IsJsonInput(const std::string& path) { return absl::EndsWith(path, ".jsonl") || absl::EndsWith(path, ".json"); }

// The document of one input line, or an error naming file and line.
absl::Status ExtractDocument(const std::string& path, int64_t line_number, const std::string& line, bool json,
                             const std::string& key, std::string* document) {
  if (!json) {
    *document = line;
    return absl::OkStatus();
  }
  nlohmann::json value = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded() || !value.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ":", line_number, ": bad JSON line (",
                                                   value.is_discarded() ? "does not parse" : "not an object",
                                                   ")"));
  }
  auto field = value.find(key);
  if (field == value.end() || !field->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ":", line_number, ": no string field \"", key, "\""));
  }
  *document = field->get<std::string>();
  return absl::OkStatus();
}

void PrintProgress(const Totals& t, double seconds, const char* prefix) {
  std::fprintf(stderr, "loom-prepare: %s%lld documents, %lld tokens, %.1f MB in %.1f s (%.0f documents/s, %.2f MB/s)\n",
               prefix, static_cast<long long>(t.documents), static_cast<long long>(t.tokens), t.input_bytes / 1e6,
               seconds, t.documents / std::max(seconds, 1e-9), t.input_bytes / 1e6 / std::max(seconds, 1e-9));
}

absl::Status Prepare(const std::vector<std::string>& inputs, const std::string& prefix, const std::string& key) {
  // Every input must open before anything is written.
  for (const std::string& path : inputs) {
    std::ifstream probe(path, std::ios::binary);
    if (!probe) return absl::NotFoundError(absl::StrCat(path, ": cannot open input file"));
  }
  LOOM_ASSIGN_OR_RETURN(auto writer,
                        IndexedDatasetWriter::Create(prefix, IndexedDTypeForVocab(ByteTokenizer::kVocab)));
  Timer timer;
  double last_report = 0;
  Totals totals;
  std::string line, document;
  std::vector<int32_t> tokens;
  for (const std::string& path : inputs) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open input file"));
    const bool json = IsJsonInput(path);
    int64_t line_number = 0;
    while (std::getline(in, line)) {
      ++line_number;
      totals.input_bytes += static_cast<int64_t>(line.size()) + 1;
      if (line.empty()) continue;
      LOOM_RETURN_IF_ERROR(ExtractDocument(path, line_number, line, json, key, &document));
      tokens.clear();
      ByteTokenizer::EncodeInto(document, &tokens);
      tokens.push_back(ByteTokenizer::kEod);
      LOOM_RETURN_IF_ERROR(writer->AddDocument(tokens));
      ++totals.documents;
      totals.tokens += static_cast<int64_t>(tokens.size());
      if (const double now = timer.Seconds(); now - last_report >= 1.0) {
        PrintProgress(totals, now, "");
        last_report = now;
      }
    }
    if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed at line ", line_number + 1));
  }
  LOOM_RETURN_IF_ERROR(writer->Finish());
  PrintProgress(totals, timer.Seconds(), absl::StrCat("done: ", prefix, ".{bin,idx} | ").c_str());
  return absl::OkStatus();
}

// Abseil's flag names are identifiers: accept --output-prefix for
// --output_prefix by rewriting dashes in the name part of each --flag.
void DashesToUnderscores(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    char* arg = argv[i];
    if (arg[0] != '-' || arg[1] != '-') continue;
    if (arg[2] == '\0') break;  // "--" ends the flags
    for (char* c = arg + 2; *c != '\0' && *c != '='; ++c) {
      if (*c == '-') *c = '_';
    }
  }
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("loom-prepare --input FILE[,FILE...] --output-prefix PREFIX [--json-key text]");
  loom::DashesToUnderscores(argc, argv);
  absl::ParseCommandLine(argc, argv);
  const std::string input = absl::GetFlag(FLAGS_input), prefix = absl::GetFlag(FLAGS_output_prefix);
  if (input.empty() || prefix.empty()) {
    std::fprintf(stderr, "loom-prepare: --input FILE[,FILE...] and --output-prefix PREFIX are required\n");
    return 2;
  }
  std::vector<std::string> inputs = absl::StrSplit(input, ',', absl::SkipEmpty());
  if (absl::Status s = loom::Prepare(inputs, prefix, absl::GetFlag(FLAGS_json_key)); !s.ok()) {
    std::fprintf(stderr, "loom-prepare: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  return 0;
}
