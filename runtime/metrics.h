// metrics.jsonl: one JSON object a line, appended and flushed per record so
// that a crash loses nothing already logged.
#pragma once

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "runtime/status.h"

namespace loom {

class MetricsWriter {
 public:
  MetricsWriter() = default;
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  absl::Status Open(const std::string& path);
  // {"key": value, ...} numbers with 17 significant digits (a double round-trips exactly).
  void Write(const std::vector<std::pair<std::string, double>>& fields);

 private:
  FILE* file_ = nullptr;
};

}  // namespace loom
