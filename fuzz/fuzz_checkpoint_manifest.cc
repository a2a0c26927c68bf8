// libFuzzer target: LoadCheckpoint on a step directory holding an arbitrary
// manifest.textproto and rank_00000.safetensors (input = [u32 manifest
// length][manifest][shard]): the manifest parser, its cross-checks against
// the shard's header, the checksums and the tensor copies.
#include <cstdint>
#include <filesystem>

#include "checkpoint/checkpoint.h"
#include "fuzz/fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [manifest, shard] = loom::fuzz::SplitTwo(data, size);
  const std::string dir = loom::fuzz::ScratchDir() + "/step_00000001";
  std::filesystem::create_directories(dir);
  loom::fuzz::WriteFile(dir + "/manifest.textproto", manifest);
  loom::fuzz::WriteFile(dir + "/rank_00000.safetensors", shard);
  auto state = loom::checkpoint::LoadCheckpoint(dir);
  if (state.ok()) {
    for (const auto& t : state->tensors) {
      if (!t.tensor.defined()) __builtin_trap();
    }
  }
  return 0;
}
