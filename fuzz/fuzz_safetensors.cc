// libFuzzer target: ReadSafetensors on an arbitrary file. Whatever it accepts
// must describe tensors that lie inside the data section, with as many bytes
// as their dtype and shape need; the bytes are then read (hashed) in full.
#include <cstdint>

#include "checkpoint/safetensors.h"
#include "fuzz/fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = loom::fuzz::ScratchDir() + "/shard.safetensors";
  loom::fuzz::WriteFile(path, std::string_view(reinterpret_cast<const char*>(data), size));
  auto file = loom::checkpoint::ReadSafetensors(path);
  if (!file.ok()) return 0;
  uint64_t sum = 0;
  for (const auto& [name, e] : file->tensors) {
    if (e.begin > e.end || file->data_start + e.end > file->size) __builtin_trap();
    auto t = loom::checkpoint::ReadTensor(*file, e);
    auto h = loom::checkpoint::HashTensor(*file, e);
    if (!t.ok() || !h.ok() || t->nbytes() != e.end - e.begin) __builtin_trap();
    const auto* p = static_cast<const unsigned char*>(t->raw());
    for (uint64_t i = 0; i < e.end - e.begin; ++i) sum += p[i];
  }
  return static_cast<int>(sum & 0);
}
