// Writes the fuzzers' seed corpora into <out>/<target>/: valid inputs made
// by Loom's own writers (IndexedDatasetWriter, SaveCheckpoint), so each
// fuzzer starts from files the reader accepts and mutates from there.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "data/indexed_dataset.h"
#include "fuzz/fuzz_files.h"

namespace {

namespace fs = std::filesystem;

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool Check(const absl::Status& s) {
  if (!s.ok()) std::fprintf(stderr, "make_seeds: %s\n", std::string(s.message()).c_str());
  return s.ok();
}

bool IndexedSeed(const fs::path& tmp, const fs::path& out, const std::string& name, loom::IndexedDType dtype,
                 const std::vector<std::vector<int32_t>>& documents) {
  const std::string prefix = (tmp / name).string();
  auto writer = loom::IndexedDatasetWriter::Create(prefix, dtype);
  if (!Check(writer.status())) return false;
  for (const auto& d : documents)
    if (!Check((*writer)->AddDocument(d))) return false;
  if (!Check((*writer)->Finish())) return false;
  loom::fuzz::WriteFile((out / name).string(), loom::fuzz::JoinTwo(ReadFile(prefix + ".idx"), ReadFile(prefix + ".bin")));
  return true;
}

bool CheckpointSeeds(const fs::path& tmp, const fs::path& safetensors_out, const fs::path& manifest_out) {
  loom::checkpoint::CheckpointState state;
  state.step = 3;
  state.data_tokens = 96;
  state.config_text = "train { steps: 3 }";
  state.rng["data"] = 7;
  state.tensors.push_back({"layers.0.w", loom::Tensor::FromVector<float>({1, 2, 3, 4, 5, 6}, {2, 3})});
  state.tensors.push_back({"layers.0.b", loom::Tensor::FromVector<double>({0.5, -0.5}, {2})});
  state.tensors.push_back({"empty", loom::Tensor::FromVector<float>({}, {0, 4})});
  state.tensors.push_back({"optim.steps", loom::Tensor::FromVector<int64_t>({3}, {1})});
  const fs::path dir = tmp / "ckpt";
  if (!Check(loom::checkpoint::SaveCheckpoint(dir.string(), state, 0))) return false;
  const fs::path step = dir / loom::checkpoint::StepDirName(3);
  const std::string shard = ReadFile(step / "rank_00000.safetensors");
  const std::string manifest = ReadFile(step / "manifest.textproto");
  loom::fuzz::WriteFile((safetensors_out / "four_tensors").string(), shard);
  loom::fuzz::WriteFile((manifest_out / "four_tensors").string(), loom::fuzz::JoinTwo(manifest, shard));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds OUT_DIR\n");
    return 2;
  }
  const fs::path out = argv[1];
  const fs::path tmp = fs::path(loom::fuzz::ScratchDir());
  for (const char* target : {"indexed_dataset", "safetensors", "checkpoint_manifest"}) fs::create_directories(out / target);
  const std::vector<std::vector<int32_t>> documents = {{5, 6, 7, 256}, {256}, {0, 1000, 65535, 42, 256}, {}};
  bool ok = IndexedSeed(tmp, out / "indexed_dataset", "u16", loom::IndexedDType::kU16, documents) &&
            IndexedSeed(tmp, out / "indexed_dataset", "i32", loom::IndexedDType::kI32, {{70000, -1, 3}, {9}}) &&
            IndexedSeed(tmp, out / "indexed_dataset", "u8_empty", loom::IndexedDType::kU8, {}) &&
            CheckpointSeeds(tmp, out / "safetensors", out / "checkpoint_manifest");
  return ok ? 0 : 1;
}
