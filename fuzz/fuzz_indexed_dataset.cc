// libFuzzer target: IndexedDataset::Open on an arbitrary .idx/.bin pair
// (input = [u32 .idx length][.idx][.bin]). Whatever Open accepts must then be
// readable in full without a read outside the mapping: every document range,
// every sequence's tokens.
#include <cstdint>
#include <vector>

#include "data/indexed_dataset.h"
#include "fuzz/fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [idx, bin] = loom::fuzz::SplitTwo(data, size);
  const std::string prefix = loom::fuzz::ScratchDir() + "/ds";
  loom::fuzz::WriteFile(prefix + ".idx", idx);
  loom::fuzz::WriteFile(prefix + ".bin", bin);
  auto ds = loom::IndexedDataset::Open(prefix);
  if (!ds.ok()) return 0;
  const loom::IndexedDataset& d = **ds;
  for (int64_t doc = 0; doc < d.num_documents(); ++doc) {
    const auto [first, last] = d.document_range(doc);
    if (first < 0 || last < first || last > d.num_sequences()) __builtin_trap();  // Validate promised this
  }
  std::vector<int32_t> tokens;
  for (int64_t s = 0; s < d.num_sequences(); ++s) {
    const int64_t n = d.sequence_length(s);
    tokens.resize(static_cast<size_t>(n));
    d.Read(s, 0, n, tokens.data());
    if (n > 1) d.Read(s, n / 2, n - n / 2, tokens.data());
  }
  return 0;
}
