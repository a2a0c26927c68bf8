#include "runtime/tensorboard.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>

namespace loom {
namespace {

std::filesystem::path FreshDir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / absl::StrCat("loom_tb_", name, "_", getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Check values from RFC 3720 (iSCSI), appendix B.4, and the common "123456789".
TEST(Crc32c, MatchesPublishedCheckValues) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0'), ones(32, '\xff');
  EXPECT_EQ(Crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(ones.data(), 32), 0x62A8AB43u);
  std::string ascending(32, 0);
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<char>(i);
  EXPECT_EQ(Crc32c(ascending.data(), 32), 0x46DD794Eu);
  // Continuing a checksum equals one pass over the concatenation.
  EXPECT_EQ(Crc32c("56789", 5, Crc32c("1234", 4)), 0xE3069283u);
}

TEST(Crc32c, MaskIsRotateAndAdd) {
  const uint32_t crc = Crc32c("123456789", 9);
  EXPECT_EQ(MaskedCrc32c("123456789", 9), ((crc >> 15) | (crc << 17)) + 0xa282ead8u);
}

TEST(TensorBoard, ScalarsRoundTripThroughTheReader) {
  const auto dir = FreshDir("roundtrip");
  TensorBoardWriter writer;
  ASSERT_TRUE(writer.Open(dir.string()).ok());
  EXPECT_EQ(writer.path().rfind((dir / "events.out.tfevents.").string(), 0), 0u) << writer.path();
  ASSERT_TRUE(writer.WriteScalars(1, {{"train/loss", 2.5}, {"train/lr", 3e-4}}).ok());
  ASSERT_TRUE(writer.WriteScalars(2, {{"train/loss", 2.25}}).ok());
  ASSERT_TRUE(writer.WriteScalars(300000000000, {{"eval/loss", -1.0 / 3}}).ok());  // a step past 2^32
  ASSERT_TRUE(writer.Close().ok());

  auto file = ReadTensorBoardFile(writer.path());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->file_version, "brain.Event:2");
  ASSERT_EQ(file->scalars.size(), 4u);
  const struct { int64_t step; const char* tag; float value; } want[] = {
      {1, "train/loss", 2.5f}, {1, "train/lr", 3e-4f}, {2, "train/loss", 2.25f},
      {300000000000, "eval/loss", static_cast<float>(-1.0 / 3)}};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(file->scalars[i].step, want[i].step) << i;
    EXPECT_EQ(file->scalars[i].tag, want[i].tag) << i;
    EXPECT_EQ(file->scalars[i].value, want[i].value) << i;
    EXPECT_GT(file->scalars[i].wall_time, 1.6e9) << i;  // seconds since 1970, after 2020
  }
  std::filesystem::remove_all(dir);
}

// The first record's bytes, laid out by hand from the format: length 8 bytes,
// its masked CRC, the Event {1: wall_time (fixed64), 3: "brain.Event:2"}.
TEST(TensorBoard, FirstRecordIsTheFileVersionInTfRecordFraming) {
  const auto dir = FreshDir("framing");
  TensorBoardWriter writer;
  ASSERT_TRUE(writer.Open(dir.string()).ok());
  ASSERT_TRUE(writer.Close().ok());
  const std::string bytes = ReadBytes(writer.path());
  const std::string event_tail = std::string("\x1a\x0d", 2) + "brain.Event:2";
  const uint64_t length = 1 + 8 + event_tail.size();
  ASSERT_EQ(bytes.size(), 8 + 4 + length + 4);
  uint64_t got_length;
  std::memcpy(&got_length, bytes.data(), 8);
  EXPECT_EQ(got_length, length);
  uint32_t crc;
  std::memcpy(&crc, bytes.data() + 8, 4);
  EXPECT_EQ(crc, MaskedCrc32c(bytes.data(), 8));
  EXPECT_EQ(bytes[12], '\x09');  // field 1, wire type 1 (fixed64)
  EXPECT_EQ(bytes.substr(12 + 9, event_tail.size()), event_tail);
  std::memcpy(&crc, bytes.data() + 12 + length, 4);
  EXPECT_EQ(crc, MaskedCrc32c(bytes.data() + 12, length));
  std::filesystem::remove_all(dir);
}

TEST(TensorBoard, TwoWritersInOneSecondGetTwoFiles) {
  const auto dir = FreshDir("two");
  TensorBoardWriter a, b;
  ASSERT_TRUE(a.Open(dir.string()).ok());
  ASSERT_TRUE(b.Open(dir.string()).ok());
  EXPECT_NE(a.path(), b.path());
  std::filesystem::remove_all(dir);
}

TEST(TensorBoard, ReaderRejectsACorruptedByteWithItsRecord) {
  const auto dir = FreshDir("corrupt");
  TensorBoardWriter writer;
  ASSERT_TRUE(writer.Open(dir.string()).ok());
  ASSERT_TRUE(writer.WriteScalars(7, {{"loss", 1.0}}).ok());
  ASSERT_TRUE(writer.Close().ok());
  const std::string good = ReadBytes(writer.path());
  const size_t first_record = 8 + 4 + (1 + 8 + 2 + 13) + 4;
  struct Case { size_t at; const char* message; };
  for (const Case& c : {Case{first_record + 2, "length CRC"}, Case{good.size() - 6, "data CRC"}}) {
    std::string bad = good;
    bad[c.at] ^= 0x01;
    std::ofstream(writer.path(), std::ios::binary | std::ios::trunc) << bad;
    auto file = ReadTensorBoardFile(writer.path());
    ASSERT_FALSE(file.ok()) << "flipped byte " << c.at;
    EXPECT_NE(file.status().message().find(c.message), std::string::npos) << file.status();
    EXPECT_NE(file.status().message().find("record 1"), std::string::npos) << file.status();
  }
  std::ofstream(writer.path(), std::ios::binary | std::ios::trunc) << good.substr(0, good.size() - 3);
  auto truncated = ReadTensorBoardFile(writer.path());
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.status().message().find("truncated"), std::string::npos) << truncated.status();
  std::filesystem::remove_all(dir);
}

// loom-train writes <run_dir>/tb/ events with the values of metrics.jsonl
// (as floats: simple_value is a float), a new file per run.
TEST(TensorBoard, LoomTrainEventsEqualMetricsJsonl) {
  const std::filesystem::path bin =
      std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "bin" / "loom-train";
  if (!std::filesystem::exists(bin)) GTEST_SKIP() << bin << " is not built";
  const auto dir = FreshDir("train");
  const std::string run = absl::StrCat(bin.string(), " --config ", LOOM_SOURCE_DIR,
                                       "/configs/default.textproto --set train.steps=", "%d",
                                       " --set optim.warmup_steps=1 --set train.eval_every=2 --set train.eval_sequences=64 --set train.run_dir=",
                                       dir.string(), " --set checkpoint.every=3 > ", dir.string(), ".log 2>&1");
  auto command = [&](int steps) {
    std::string c = run;
    c.replace(c.find("%d"), 2, std::to_string(steps));
    return c;
  };
  ASSERT_EQ(std::system(command(3).c_str()), 0) << ReadBytes(dir.string() + ".log");
  ASSERT_EQ(std::system(command(5).c_str()), 0) << ReadBytes(dir.string() + ".log");  // resumes at step 3

  // metrics.jsonl: {"step": N, "key": value, ...} per line.
  std::map<std::pair<int64_t, std::string>, double> want;
  std::istringstream lines(ReadBytes((dir / "metrics.jsonl").string()));
  for (std::string line; std::getline(lines, line);) {
    std::string body = line.substr(1, line.size() - 2);
    int64_t step = -1;
    std::vector<std::pair<std::string, double>> fields;
    for (size_t at = 0; at < body.size();) {
      const size_t k0 = body.find('"', at) + 1, k1 = body.find('"', k0);
      const size_t v0 = body.find(": ", k1) + 2, v1 = std::min(body.find(", ", v0), body.size());
      const std::string key = body.substr(k0, k1 - k0);
      const double value = std::stod(body.substr(v0, v1 - v0));
      if (key == "step") step = static_cast<int64_t>(value);
      else fields.emplace_back(key, value);
      at = v1 + 2;
    }
    for (auto& [k, v] : fields) want[{step, k}] = v;
  }
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir / "tb")) files.push_back(entry.path().string());
  ASSERT_EQ(files.size(), 2u) << "one events file per run";
  std::map<std::pair<int64_t, std::string>, float> got;
  for (const std::string& f : files) {
    auto file = ReadTensorBoardFile(f);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ(file->file_version, "brain.Event:2");
    for (const auto& s : file->scalars) got[{s.step, s.tag}] = s.value;
  }
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [key, value] : want) {
    auto it = got.find(key);
    ASSERT_NE(it, got.end()) << "step " << key.first << " " << key.second << " missing from the events";
    EXPECT_EQ(it->second, static_cast<float>(value)) << "step " << key.first << " " << key.second;
  }
  for (const char* tag : {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_rank", "max_rss_mb", "eval_loss",
                          "accuracy"})
    EXPECT_TRUE(got.count({2, tag}) || got.count({3, tag})) << tag;
  EXPECT_TRUE(got.count({5, "loss"}));
  std::filesystem::remove_all(dir);
  std::filesystem::remove(dir.string() + ".log");
}

}  // namespace
}  // namespace loom
