// Checkpoints: bit-exact round trip, `latest` and retention, corruption and
// truncation caught with the tensor and file named, and crash safety: a
// writer killed at each stage (LOOM_FAULT) leaves the previous checkpoint as
// the latest good one.
#include "checkpoint/checkpoint.h"
#include "checkpoint/safetensors.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tests/testing.h"

namespace loom::checkpoint {
namespace {

namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (fs::path(::testing::TempDir()) / absl::StrCat("loom_ckpt_", ::getpid(), "_", info->name())).string();
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static CheckpointState MakeState(int64_t step) {
    CheckpointState s;
    s.step = step;
    s.data_tokens = step * 4096;
    s.config_text = "model { hidden: 64 heads: 4 }\ntrain { seq_len: 32 }\n";
    s.rng = {{"data", 17 + static_cast<uint64_t>(step)}, {"dropout", 0xfedcba9876543210ull}};
    s.tensors.push_back({"layers.0.attn.wq", loom::testing::RandomTensor({8, 16}, DType::kF32, 1 + step)});
    s.tensors.push_back({"embed", loom::testing::RandomTensor({5, 3, 2}, DType::kF64, 100 + step)});
    s.tensors.push_back({"optim.step", Tensor::FromVector<int64_t>({step, -1, INT64_MAX}, {3})});
    s.tensors.push_back({"scalar", Tensor::FromVector<float>({1.5f}, {})});
    return s;
  }

  std::string StepDir(int64_t step) const { return absl::StrCat(dir_, "/", StepDirName(step)); }
  std::string Shard(int64_t step) const { return StepDir(step) + "/rank_00000.safetensors"; }

  std::string dir_;
};

void ExpectSameState(const CheckpointState& want, const CheckpointState& got) {
  EXPECT_EQ(want.step, got.step);
  EXPECT_EQ(want.data_tokens, got.data_tokens);
  EXPECT_EQ(want.config_text, got.config_text);
  EXPECT_EQ(want.rng, got.rng);
  ASSERT_EQ(want.tensors.size(), got.tensors.size());
  for (size_t i = 0; i < want.tensors.size(); ++i) {
    const Tensor& a = want.tensors[i].tensor;
    const Tensor& b = got.tensors[i].tensor;
    EXPECT_EQ(want.tensors[i].name, got.tensors[i].name);
    EXPECT_EQ(a.dtype(), b.dtype()) << want.tensors[i].name;
    EXPECT_EQ(a.shape(), b.shape()) << want.tensors[i].name << ": " << ShapeString(a.shape()) << " vs "
                                    << ShapeString(b.shape());
    ASSERT_EQ(a.nbytes(), b.nbytes());
    EXPECT_EQ(0, std::memcmp(a.raw(), b.raw(), a.nbytes())) << want.tensors[i].name << " differs bitwise";
  }
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST_F(CheckpointTest, RoundTripIsBitExact) {
  const CheckpointState state = MakeState(10);
  ASSERT_TRUE(SaveCheckpoint(dir_, state, 0).ok());
  absl::StatusOr<CheckpointState> loaded = LoadCheckpoint(StepDir(10));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameState(state, *loaded);
  EXPECT_TRUE(VerifyCheckpoint(StepDir(10)).ok());
  // The safetensors header length is a multiple of 8 (data section aligned).
  std::ifstream in(Shard(10), std::ios::binary);
  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  EXPECT_EQ(header_len % 8, 0u) << header_len;
}

TEST_F(CheckpointTest, LatestNamesNewestAndResaveReplaces) {
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(1), 0).ok());
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(2), 0).ok());
  EXPECT_EQ(ReadText(dir_ + "/latest"), "step_00000002\n");
  absl::StatusOr<std::string> resolved = ResolveStepDir(dir_);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, StepDir(2));
  // Saving the same step again replaces it in place.
  CheckpointState again = MakeState(2);
  again.data_tokens = 7;
  ASSERT_TRUE(SaveCheckpoint(dir_, again, 0).ok());
  absl::StatusOr<CheckpointState> loaded = LoadCheckpoint(StepDir(2));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->data_tokens, 7);
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
}

TEST_F(CheckpointTest, KeepTwoDeletesOlder) {
  for (int64_t step : {1, 2, 3, 4}) ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(step), 2).ok());
  EXPECT_FALSE(fs::exists(StepDir(1)));
  EXPECT_FALSE(fs::exists(StepDir(2)));
  EXPECT_TRUE(fs::exists(StepDir(3)));
  EXPECT_TRUE(fs::exists(StepDir(4)));
}

TEST_F(CheckpointTest, FlippedByteNamesTensorAndFileAndIsSkipped) {
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(1), 0).ok());
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(2), 0).ok());
  {
    // The last byte of the data section belongs to the last tensor, "scalar".
    std::fstream f(Shard(2), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-1, std::ios::end);
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x01);
    f.seekp(-1, std::ios::end);
    f.write(&c, 1);
  }
  absl::StatusOr<CheckpointState> loaded = LoadCheckpoint(StepDir(2));
  ASSERT_FALSE(loaded.ok());
  const std::string msg(loaded.status().message());
  EXPECT_NE(msg.find(Shard(2) + ": tensor scalar: checksum mismatch"), std::string::npos) << msg;

  std::vector<std::string> skipped;
  absl::StatusOr<std::string> good = FindLatestGoodCheckpoint(dir_, &skipped);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(*good, StepDir(1));
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("checksum mismatch"), std::string::npos) << skipped[0];
}

TEST_F(CheckpointTest, TruncatedShardNamesFile) {
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(3), 0).ok());
  fs::resize_file(Shard(3), fs::file_size(Shard(3)) - 5);
  absl::Status s = VerifyCheckpoint(StepDir(3));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find(Shard(3)), std::string::npos) << s;
  // Cut inside the header: the length field now exceeds the file.
  fs::resize_file(Shard(3), 20);
  s = VerifyCheckpoint(StepDir(3));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find(Shard(3) + ": header length"), std::string::npos) << s;
  // Checkpoints that all fail are not "no checkpoint": loom-train stops
  // rather than start afresh.
  std::vector<std::string> skipped;
  EXPECT_EQ(FindLatestGoodCheckpoint(dir_, &skipped).status().message(),
            dir_ + ": none of its 1 checkpoints verifies");
  EXPECT_EQ(skipped.size(), 1u);
}

TEST_F(CheckpointTest, MissingTensorInShardIsNamed) {
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(1), 0).ok());
  // Rename a tensor in the manifest: the shard does not hold it.
  std::string manifest = ReadText(StepDir(1) + "/manifest.textproto");
  const size_t at = manifest.find("\"embed\"");
  ASSERT_NE(at, std::string::npos);
  manifest.replace(at, 7, "\"embex\"");
  std::ofstream(StepDir(1) + "/manifest.textproto") << manifest;
  absl::Status s = VerifyCheckpoint(StepDir(1));
  EXPECT_NE(std::string(s.message()).find(Shard(1) + ": tensor embex: missing"), std::string::npos) << s;
}

// Kills a writer at `stage` in a forked child; the parent then checks that
// step 1 is still the latest good checkpoint.
void ExpectFaultKeepsPrevious(const std::string& dir, const char* stage) {
  SCOPED_TRACE(stage);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("LOOM_FAULT", stage, 1);
    CheckpointState s;
    s.step = 2;
    s.tensors.push_back({"w", Tensor::Zeros({1024}, DType::kF32)});
    s.tensors.push_back({"b", Tensor::Zeros({1024}, DType::kF64)});
    absl::Status st = SaveCheckpoint(dir, s, 0);
    std::_Exit(st.ok() ? 0 : 1);
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), 77);

  const std::string step1 = absl::StrCat(dir, "/", StepDirName(1));
  const std::string step2 = absl::StrCat(dir, "/", StepDirName(2));
  std::vector<std::string> skipped;
  absl::StatusOr<std::string> good = FindLatestGoodCheckpoint(dir, &skipped);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(*good, step1);
  EXPECT_TRUE(skipped.empty());
  if (std::string_view(stage) != "before_latest") {
    // Only a *.tmp-* directory was left, and scanning never considers it.
    EXPECT_FALSE(fs::exists(step2));
    fs::remove(absl::StrCat(dir, "/latest"));
    good = FindLatestGoodCheckpoint(dir, &skipped);
    ASSERT_TRUE(good.ok()) << good.status();
    EXPECT_EQ(*good, step1);
  } else {
    // step_2 is complete and synced; only `latest` was not yet moved.
    EXPECT_TRUE(VerifyCheckpoint(step2).ok());
  }
}

TEST_F(CheckpointTest, CrashAtEachStageKeepsPreviousCheckpoint) {
  for (const char* stage : {"tensor_write", "before_fsync", "before_rename", "before_latest"}) {
    fs::remove_all(dir_);
    ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(1), 0).ok());
    ExpectFaultKeepsPrevious(dir_, stage);
  }
  // The next successful save cleans up the crashed writer's directory.
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(3), 0).ok());
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
}

TEST_F(CheckpointTest, UnwritableDirectoryIsAClearError) {
  fs::create_directories(dir_);
  const std::string file = dir_ + "/plain_file";
  std::ofstream(file) << "x";
  absl::Status s = SaveCheckpoint(file + "/ckpt", MakeState(1), 0);
  ASSERT_FALSE(s.ok());
  const std::string msg(s.message());
  EXPECT_NE(msg.find(file + "/ckpt"), std::string::npos) << msg;
  EXPECT_NE(msg.find("Not a directory"), std::string::npos) << msg;
}

TEST_F(CheckpointTest, PrepareCheckpointDirNamesTheProblem) {
  fs::create_directories(dir_);
  const std::string file = dir_ + "/plain_file";
  std::ofstream(file) << "x";
  EXPECT_EQ(PrepareCheckpointDir(file + "/ckpt").message(),
            "checkpoint.dir " + file + "/ckpt: cannot create: Not a directory");
  EXPECT_FALSE(PrepareCheckpointDir(file).ok());
  // A usable directory is made, and the probe file does not stay.
  ASSERT_TRUE(PrepareCheckpointDir(dir_ + "/new/ckpt").ok());
  EXPECT_TRUE(fs::is_directory(dir_ + "/new/ckpt"));
  EXPECT_TRUE(fs::is_empty(dir_ + "/new/ckpt"));
}

// A checkpoint written by several ranks: pieces of one [6, 10] tensor, as
// TP slices and ZeRO flat ranges are. Rank 0 holds columns 0-3 (a TP
// slice); columns 4-9 are cut into flat ranges held by rank 1 (two of
// them: one rank's second piece of a tensor) and rank 3 (rank 2 writes
// nothing). The loader puts the whole tensor back bit for bit.
class PiecesTest : public CheckpointTest {
 protected:
  static NamedTensor Cut(const Tensor& whole, int64_t col0, int64_t cols, int64_t flat_start, int64_t flat_n) {
    const int64_t rows = whole.dim(0);
    std::vector<double> slice;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) slice.push_back(whole.Get(r * whole.dim(1) + col0 + c));
    std::vector<double> part(slice.begin() + flat_start, slice.begin() + flat_start + flat_n);
    Tensor t = Tensor::FromVector<double>(part, {flat_n});
    return {"w", t, Piece{whole.shape(), {0, col0}, {rows, cols}, flat_start}};
  }

  // Writes the pieces per rank and publishes them as loom-train does.
  absl::Status Write(int64_t step, const std::vector<std::vector<NamedTensor>>& ranks) {
    int64_t tag = 0;
    LOOM_ASSIGN_OR_RETURN(const std::string tmp, BeginSave(dir_, step, &tag));
    EXPECT_EQ(tmp, SaveTempDir(dir_, step, tag));
    std::vector<TensorEntry> entries;
    absl::Status shards;
    for (size_t r = 0; r < ranks.size(); ++r) {
      absl::StatusOr<std::vector<TensorEntry>> e = WriteShard(tmp, static_cast<int>(r), ranks[r], step);
      if (!e.ok()) {
        shards = e.status();
        break;
      }
      entries.insert(entries.end(), e->begin(), e->end());
    }
    CheckpointState meta;
    meta.step = step;
    return EndSave(dir_, tmp, meta, entries, static_cast<int>(ranks.size()), 0, shards);
  }

  const Tensor whole_ = loom::testing::RandomTensor({6, 10}, DType::kF64, 7);
};

TEST_F(PiecesTest, TpSlicesAndZeroRangesLoadAsTheWholeTensor) {
  Tensor steps = Tensor::FromVector<int64_t>({3}, {1});
  std::vector<std::vector<NamedTensor>> ranks = {
      {Cut(whole_, 0, 4, 0, 24), {"optim.steps", steps}},
      {Cut(whole_, 4, 6, 0, 5), Cut(whole_, 4, 6, 20, 16)},
      {},
      {Cut(whole_, 4, 6, 5, 15)}};
  ASSERT_TRUE(Write(3, ranks).ok());
  EXPECT_TRUE(fs::exists(StepDir(3) + "/rank_00003.safetensors"));
  EXPECT_FALSE(fs::exists(StepDir(3) + "/rank_00002.safetensors")) << "a rank without pieces writes no file";
  const std::string manifest = ReadText(StepDir(3) + "/manifest.textproto");
  EXPECT_NE(manifest.find("key: \"w#1\""), std::string::npos) << manifest;
  EXPECT_NE(manifest.find("world_size: 4"), std::string::npos) << manifest;
  absl::StatusOr<CheckpointState> loaded = LoadCheckpoint(StepDir(3));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->tensors.size(), 2u);
  EXPECT_EQ(loaded->tensors[0].name, "w");
  const Tensor& w = loaded->tensors[0].tensor;
  ASSERT_EQ(w.shape(), whole_.shape());
  EXPECT_EQ(0, std::memcmp(w.raw(), whole_.raw(), whole_.nbytes())) << "the pieces were put back wrongly";
  EXPECT_EQ(loaded->tensors[1].tensor.data<int64_t>()[0], 3);
  EXPECT_TRUE(VerifyCheckpoint(StepDir(3)).ok());
}

// A reader that wants columns 4-9 reads only the pieces there: a corrupted
// piece elsewhere (rank 0's columns 0-3) fails a whole load but not this one.
TEST_F(PiecesTest, AReaderWantingARegionReadsOnlyThePiecesThere) {
  ASSERT_TRUE(Write(3, {{Cut(whole_, 0, 4, 0, 24)}, {Cut(whole_, 4, 6, 0, 5), Cut(whole_, 4, 6, 20, 16)}, {},
                        {Cut(whole_, 4, 6, 5, 15)}}).ok());
  const std::string shard = StepDir(3) + "/rank_00000.safetensors";
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x5a');
  }
  EXPECT_NE(LoadCheckpoint(StepDir(3)).status().message().find("checksum mismatch"), std::string::npos);
  absl::StatusOr<CheckpointState> loaded = LoadCheckpoint(StepDir(3), [](const std::string& name) {
    return name == "w" ? Interest{true, {0, 4}, {6, 6}} : Interest{false, {}, {}};
  });
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->tensors.size(), 1u);
  const Tensor& w = loaded->tensors[0].tensor;
  ASSERT_EQ(w.shape(), whole_.shape());
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t c = 4; c < 10; ++c) EXPECT_EQ(w.Get(r * 10 + c), whole_.Get(r * 10 + c)) << r << ", " << c;
}

TEST_F(PiecesTest, MissingOrOverlappingPiecesAreRefused) {
  const std::string manifest = absl::StrCat(dir_, "/", StepDirName(1), "/manifest.textproto");
  // Rank 3's range missing: 15 of the 60 elements are in no piece.
  ASSERT_TRUE(Write(1, {{Cut(whole_, 0, 4, 0, 24)}, {Cut(whole_, 4, 6, 0, 5), Cut(whole_, 4, 6, 20, 16)}}).ok());
  EXPECT_EQ(LoadCheckpoint(StepDir(1)).status().message(),
            manifest + ": tensor w: its pieces hold 45 of its 60 elements");
  EXPECT_FALSE(VerifyCheckpoint(StepDir(1)).ok());
  // Two ranks holding elements 20-23 of columns 4-9.
  ASSERT_TRUE(Write(1, {{Cut(whole_, 0, 4, 0, 24)}, {Cut(whole_, 4, 6, 0, 24)}, {Cut(whole_, 4, 6, 20, 16)}}).ok());
  EXPECT_EQ(LoadCheckpoint(StepDir(1)).status().message(),
            StepDir(1) + "/rank_00002.safetensors: tensor w: pieces in rank_00001.safetensors and "
                         "rank_00002.safetensors overlap");
  // A manifest edited so that a rectangle reaches past the tensor.
  ASSERT_TRUE(Write(1, {{Cut(whole_, 0, 4, 0, 24)}, {Cut(whole_, 4, 6, 0, 36)}}).ok());
  std::string text = ReadText(manifest);
  const std::string from = "slice_start: 0\n  slice_start: 4\n", to = "slice_start: 1\n  slice_start: 4\n";
  ASSERT_NE(text.find(from), std::string::npos) << text;
  text.replace(text.find(from), from.size(), to);
  std::ofstream(manifest) << text;
  EXPECT_EQ(LoadCheckpoint(StepDir(1)).status().message(),
            StepDir(1) + "/rank_00001.safetensors: tensor w: slice dimension 0 [1, +6) outside its shape [6, 10]");
}

// A rank whose write fails fails the save for all: nothing is published and
// the message says what `latest` still names.
TEST_F(PiecesTest, OneRankFailingFailsTheSave) {
  ASSERT_TRUE(Write(1, {{Cut(whole_, 0, 10, 0, 60)}}).ok());
  NamedTensor wrong = Cut(whole_, 4, 6, 0, 36);
  wrong.piece->length = {6, 5};  // 36 elements for a slice of 30
  const absl::Status s = Write(2, {{Cut(whole_, 0, 4, 0, 24)}, {wrong}});
  EXPECT_EQ(s.message(), absl::StrCat("[checkpoint] step 2 not saved: [checkpoint] tensor w: elements [0, +36) "
                                      "outside its slice of 30; ", dir_, "/latest still names ", StepDirName(1)));
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().find(StepDirName(2)), std::string::npos) << e.path() << " left behind";
  EXPECT_EQ(ReadText(dir_ + "/latest"), StepDirName(1) + "\n");
}

// A save that fails part-way (here: a file-size limit, as a full disk would)
// says which file, which OS error, and what `latest` still names; it leaves
// no step directory behind, and the previous checkpoint still loads.
TEST_F(CheckpointTest, FailedWriteKeepsPreviousAndSaysSo) {
  ASSERT_TRUE(SaveCheckpoint(dir_, MakeState(1), 0).ok());
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    const struct rlimit limit = {4096, 4096};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    CheckpointState s;
    s.step = 2;
    s.tensors.push_back({"w", Tensor::Zeros({4096}, DType::kF32)});
    const absl::Status st = SaveCheckpoint(dir_, s, 0);
    const std::string want = absl::StrCat("[checkpoint] step 2 not saved: ", dir_, "/", StepDirName(2), ".tmp-",
                                          ::getpid(), "/rank_00000.safetensors: write failed: File too large; ",
                                          dir_, "/latest still names ", StepDirName(1));
    if (st.message() != want) std::fprintf(stderr, "got:    %s\nwanted: %s\n", std::string(st.message()).c_str(), want.c_str());
    std::_Exit(st.message() == want ? 0 : 1);
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus)) << "the writer died by signal " << WTERMSIG(wstatus);
  EXPECT_EQ(WEXITSTATUS(wstatus), 0) << "wrong error message (printed above)";
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().find(StepDirName(2)), std::string::npos) << e.path() << " left behind";
  std::vector<std::string> skipped;
  absl::StatusOr<std::string> good = FindLatestGoodCheckpoint(dir_, &skipped);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(*good, absl::StrCat(dir_, "/", StepDirName(1)));
}

// A manifest may name any file in the step directory: a directory or a FIFO
// there is an error at once, never a hang waiting for a writer.
TEST_F(CheckpointTest, ShardThatIsNotARegularFileIsAnError) {
  fs::create_directories(dir_ + "/a_directory");
  ASSERT_EQ(::mkfifo((dir_ + "/a_fifo").c_str(), 0644), 0);
  for (const char* name : {"a_directory", "a_fifo"}) {
    const std::string path = dir_ + "/" + name;
    EXPECT_EQ(ReadSafetensors(path).status().message(), path + ": not a regular file");
  }
}

TEST_F(CheckpointTest, NoCheckpointIsNotFound) {
  fs::create_directories(dir_);
  std::vector<std::string> skipped;
  EXPECT_EQ(FindLatestGoodCheckpoint(dir_, &skipped).status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(ResolveStepDir(dir_).ok());
}

}  // namespace
}  // namespace loom::checkpoint
