// TensorBoard event files without TensorFlow: scalars written as Event
// protos (encoded here in protobuf wire format) inside TFRecord framing.
//
// TFRecord, one record:
//   uint64 length (little endian) | uint32 masked_crc32c(length bytes)
//   | data[length] | uint32 masked_crc32c(data)
// masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (CRC-32C, Castagnoli).
//
// The Event fields used (tensorflow/core/util/event.proto, summary.proto):
//   Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
//             Summary summary = 5; }
//   Summary { repeated Value value = 1; }
//   Value   { string tag = 1; float simple_value = 2; }
// The first record is {wall_time, file_version: "brain.Event:2"}.
//
// One writer per run: a resumed run starts a new file (TensorBoard then
// shows the later file's points for repeated steps, as with TF's writers).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "runtime/status.h"

namespace loom {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `n` bytes,
// continuing from `crc` (0 for a fresh checksum).
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);
uint32_t MaskedCrc32c(const void* data, size_t n);

class TensorBoardWriter {
 public:
  TensorBoardWriter() = default;
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // Creates `dir` if needed and the file events.out.tfevents.<unix time>.<host>
  // in it (a numeric suffix keeps two writers of one second apart), then
  // writes the file_version record.
  absl::Status Open(const std::string& dir);
  // One Event at `step` holding a scalar per (tag, value). Flushed.
  absl::Status WriteScalars(int64_t step, const std::vector<std::pair<std::string, double>>& scalars);
  // Flushes, fsyncs and closes; also run by the destructor.
  absl::Status Close();
  const std::string& path() const { return path_; }

 private:
  absl::Status WriteRecord(const std::string& data);

  FILE* file_ = nullptr;
  std::string path_;
};

struct TensorBoardScalar {
  int64_t step = 0;
  std::string tag;
  float value = 0;
  double wall_time = 0;
};

struct TensorBoardFile {
  std::string file_version;  // of the first record
  std::vector<TensorBoardScalar> scalars;
};

// Reads an event file: every record's two CRCs are checked, every Event
// parsed; fields other than the ones above are skipped by wire type.
absl::StatusOr<TensorBoardFile> ReadTensorBoardFile(const std::string& path);

}  // namespace loom
