#include "runtime/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>

namespace loom {

MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

absl::Status MetricsWriter::Open(const std::string& path) {
  file_ = std::fopen(path.c_str(), "a");
  if (!file_) return absl::InternalError(absl::StrCat(path, ": cannot open for appending: ", std::strerror(errno)));
  return absl::OkStatus();
}

void MetricsWriter::Write(const std::vector<std::pair<std::string, double>>& fields) {
  if (!file_) return;
  std::string line = "{";
  for (size_t i = 0; i < fields.size(); ++i) {
    const double v = fields[i].second;
    // JSON has no NaN/inf: write null so that readers do not choke.
    char value[32] = "null";
    if (std::isfinite(v)) std::snprintf(value, sizeof(value), "%.17g", v);
    absl::StrAppend(&line, i ? ", " : "", "\"", fields[i].first, "\": ", value);
  }
  line += "}\n";
  std::fputs(line.c_str(), file_);
  std::fflush(file_);
}

}  // namespace loom
