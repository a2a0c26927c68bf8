// The pipeline behind loom-prepare: text in, a Megatron indexed dataset out
// (data/indexed_dataset.h), an EOD token after each document.
//
//   reader (1 thread)      reads each input in blocks of ~batch_bytes, cut
//                          at line ends, and numbers the batches in order;
//   workers (N threads)    take batches in any order and tokenize them
//                          (JSON decoding included);
//   writer (caller)        appends batches to the dataset strictly in their
//                          order, waiting for the next one if it is late.
//
// So the output is the same bytes for any number of workers. Memory stays
// flat: at most 2·workers + 2 batches exist at once (the reader waits), plus
// 12 bytes of index per document. A document (line) is the only thing held
// whole, however long it is.
//
// Inputs: plain text, one document per line; or JSON lines, the document is
// the `json_key` string field of each object. Empty lines are skipped. "-"
// reads standard input. Errors name the input and line; the first bad line in
// input order is the one reported, whatever the number of workers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace loom {

struct PrepareOptions {
  std::vector<std::string> inputs;  // paths, or "-" for standard input
  std::string output_prefix;        // writes <prefix>.bin and <prefix>.idx
  std::string json_key = "text";
  std::string input_format = "auto";  // auto (.json/.jsonl by name, else text) | text | jsonl
  int workers = 1;                    // tokenizing threads, >= 1
  int64_t batch_bytes = 1 << 20;      // text handed to a worker at once
  bool progress = false;              // progress on stderr, about once a second
};

struct PrepareStats {
  int64_t documents = 0;
  int64_t tokens = 0;       // EODs included
  int64_t input_bytes = 0;  // bytes read, newlines included
  double seconds = 0;
};

absl::StatusOr<PrepareStats> PrepareDataset(const PrepareOptions& options, const Tokenizer& tokenizer);

// This process's peak resident memory so far, in bytes (getrusage).
int64_t PeakResidentBytes();

}  // namespace loom
