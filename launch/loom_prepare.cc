// loom-prepare --input FILE[,FILE...] --output-prefix P [--json-key text]
//              [--tokenizer byte|sentencepiece:MODEL] [--workers N]
//              [--input-format auto|text|jsonl]
// Tokenizes text into a Megatron-compatible indexed dataset P.bin + P.idx
// (data/indexed_dataset.h), EOD after each document, with N threads and the
// same bytes out for any N (data/prepare.h). Plain text: one document per
// line; .jsonl/.json: one JSON object per line, the document is its
// --json-key string field; "-" reads standard input. Progress on stderr; the
// last line gives the totals, MB/s and the peak resident memory. Bad input is
// one line on stderr and exit code 2.
#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_split.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "runtime/tool_flags.h"

ABSL_FLAG(std::string, input, "", "comma-separated input files: plain text, or .jsonl/.json; - is standard input");
ABSL_FLAG(std::string, output_prefix, "", "writes PREFIX.bin and PREFIX.idx");
ABSL_FLAG(std::string, json_key, "text", "the JSON field that holds each document");
ABSL_FLAG(std::string, tokenizer, "byte", "byte, or sentencepiece:MODEL (a SentencePiece .model file)");
ABSL_FLAG(int, workers, 0, "tokenizing threads (0: one per core)");
ABSL_FLAG(std::string, input_format, "auto", "auto (.json/.jsonl are JSON lines, the rest text), text or jsonl");

namespace loom {
namespace {

int Main() {
  PrepareOptions options;
  options.inputs = absl::StrSplit(absl::GetFlag(FLAGS_input), ',', absl::SkipEmpty());
  options.output_prefix = absl::GetFlag(FLAGS_output_prefix);
  if (options.inputs.empty() || options.output_prefix.empty()) {
    std::fprintf(stderr, "loom-prepare: --input FILE[,FILE...] and --output-prefix PREFIX are required\n");
    return 2;
  }
  options.json_key = absl::GetFlag(FLAGS_json_key);
  options.input_format = absl::GetFlag(FLAGS_input_format);
  options.workers = absl::GetFlag(FLAGS_workers);
  if (options.workers == 0) options.workers = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.progress = true;

  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = MakeTokenizer(absl::GetFlag(FLAGS_tokenizer));
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "loom-prepare: %s\n", std::string(tokenizer.status().message()).c_str());
    return 2;
  }
  absl::StatusOr<PrepareStats> stats = PrepareDataset(options, **tokenizer);
  if (!stats.ok()) {
    std::fprintf(stderr, "loom-prepare: %s\n", std::string(stats.status().message()).c_str());
    return 2;
  }
  const double secs = std::max(stats->seconds, 1e-9);
  std::fprintf(stderr,
               "loom-prepare: done: %s.{bin,idx} | %lld documents, %lld tokens, %.1f MB in %.2f s (%.0f documents/s, "
               "%.1f MB/s) | %s, %d workers | peak RSS %.1f MB\n",
               options.output_prefix.c_str(), static_cast<long long>(stats->documents),
               static_cast<long long>(stats->tokens), stats->input_bytes / 1e6, stats->seconds,
               stats->documents / secs, stats->input_bytes / 1e6 / secs, (*tokenizer)->description().c_str(),
               options.workers, PeakResidentBytes() / 1e6);
  return 0;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::ParseToolFlags(argc, argv,
      "loom-prepare --input FILE[,FILE...] --output-prefix PREFIX [--json-key text] "
      "[--tokenizer byte|sentencepiece:MODEL] [--workers N] [--input-format auto|text|jsonl]");
  return loom::Main();
}
