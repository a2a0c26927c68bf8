// safetensors: the shard format of a checkpoint (huggingface/safetensors).
//
//   [u64 little-endian N][N bytes of JSON header, space-padded to a multiple
//   of 8][data section]
//   header = {"<name>": {"dtype": "F32", "shape": [2, 3],
//                        "data_offsets": [begin, end]}, ...,
//             "__metadata__": {"key": "string value", ...}}
//
// Offsets are relative to the start of the data section; end - begin must be
// numel(shape) * size(dtype). The reader checks all of it against the file
// size before anything is trusted.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "runtime/dtype.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace loom::checkpoint {

// "F32", "F64", "BF16", "F16", "I32", "I64".
const char* SafetensorsDTypeName(DType dtype);
absl::StatusOr<DType> DTypeFromSafetensorsName(std::string_view name);

struct SafetensorsEntry {
  DType dtype = DType::kF32;
  Shape shape;
  uint64_t begin = 0;  // byte offsets into the data section, [begin, end)
  uint64_t end = 0;
};

// The 8-byte length plus the padded JSON header for `entries`; the data
// section that follows must hold each entry's bytes at its offsets.
std::string EncodeSafetensorsHeader(const std::map<std::string, SafetensorsEntry>& entries,
                                    const std::map<std::string, std::string>& metadata);

// A shard's header, validated against the file's size. The data stay on
// disk and are read tensor by tensor (ReadTensor, HashTensor) through the
// descriptor opened here, so a reader holds no more than the tensors it
// keeps.
struct SafetensorsFile {
  std::string path;
  std::map<std::string, SafetensorsEntry> tensors;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // where the data section begins in the file
  uint64_t size = 0;        // the file's bytes
  std::shared_ptr<const int> fd;  // closed with the last copy
};

// Errors name the file: "<path>: header length 99999 exceeds file size 120".
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);
// Entry e's bytes as a CPU tensor of its dtype and shape.
absl::StatusOr<Tensor> ReadTensor(const SafetensorsFile& f, const SafetensorsEntry& e);
// XXH3-64 of entry e's bytes, read in pieces of at most 64 MiB.
absl::StatusOr<uint64_t> HashTensor(const SafetensorsFile& f, const SafetensorsEntry& e);

}  // namespace loom::checkpoint
