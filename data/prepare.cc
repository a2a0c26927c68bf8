#include "data/prepare.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "data/indexed_dataset.h"
#include "nlohmann/json.hpp"
#include "runtime/timer.h"

namespace loom {
namespace {

// A run of whole lines of one input, and, once a worker is done, its tokens.
struct Batch {
  int64_t index = 0;       // position in input order
  size_t input = 0;        // which of PrepareOptions::inputs
  int64_t first_line = 1;  // 1-based line number of the first line
  std::string text;        // whole lines (the last may lack '\n' at the end of an input)
  int64_t text_bytes = 0;
  absl::Status status;           // a read error (from the reader) or the first bad line
  std::vector<int32_t> tokens;   // the documents back to back, each ending in EOD
  std::vector<int64_t> ends;     // end of each document in `tokens`
};

std::string DisplayName(const std::string& input) { return input == "-" ? "<stdin>" : input; }

class Pipeline {
 public:
  Pipeline(const PrepareOptions& options, const Tokenizer& tokenizer)
      : options_(options), tokenizer_(tokenizer), max_in_flight_(2 * options.workers + 2) {}

  absl::StatusOr<PrepareStats> Run(IndexedDatasetWriter& writer);

 private:
  bool IsJson(size_t input) const {
    if (options_.input_format == "jsonl") return true;
    if (options_.input_format == "text") return false;
    const std::string& path = options_.inputs[input];
    return absl::EndsWith(path, ".jsonl") || absl::EndsWith(path, ".json");
  }

  // Reader thread: every input in order, cut into batches.
  void ReadAll();
  absl::Status ReadInput(size_t input);
  // Hands a batch to the workers; waits while max_in_flight_ are out.
  // False once the run is aborted.
  bool Emit(std::unique_ptr<Batch> batch);
  // Worker thread.
  void Work();
  void Tokenize(Batch& batch) const;
  void ReportProgress(const PrepareStats& stats, bool last);

  const PrepareOptions& options_;
  const Tokenizer& tokenizer_;
  const int64_t max_in_flight_;
  int64_t total_bytes_ = -1;  // of all inputs, when every one is a regular file
  double last_report_ = 0;
  Timer timer_;

  std::mutex mu_;
  std::condition_variable room_cv_;  // reader waits: too many batches out
  std::condition_variable work_cv_;  // workers wait: nothing to tokenize
  std::condition_variable done_cv_;  // writer waits: the next batch is not done
  std::deque<std::unique_ptr<Batch>> work_;
  std::map<int64_t, std::unique_ptr<Batch>> done_;
  int64_t emitted_ = 0;  // batches made by the reader
  int64_t written_ = 0;  // batches appended by the writer
  bool reading_done_ = false;
  bool abort_ = false;
};

bool Pipeline::Emit(std::unique_ptr<Batch> batch) {
  std::unique_lock<std::mutex> lock(mu_);
  room_cv_.wait(lock, [&] { return abort_ || emitted_ - written_ < max_in_flight_; });
  if (abort_) return false;
  batch->index = emitted_++;
  work_.push_back(std::move(batch));
  work_cv_.notify_one();
  return true;
}

absl::Status Pipeline::ReadInput(size_t input) {
  const std::string& path = options_.inputs[input];
  const std::string name = DisplayName(path);
  const int fd = path == "-" ? STDIN_FILENO : ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(name, ": cannot open input file (", std::strerror(errno), ")"));
  const size_t block = static_cast<size_t>(options_.batch_bytes);
  int64_t line = 1;
  std::string carry;  // the unfinished last line of the previous block
  absl::Status status;
  bool eof = false;
  while (!eof) {
    auto batch = std::make_unique<Batch>();
    batch->input = input;
    batch->first_line = line;
    std::string& text = batch->text;
    text.swap(carry);
    // Fill one block (pipes return short reads); a line longer than a block
    // keeps growing `text` until its end is seen.
    size_t filled = 0;
    while (filled < block) {
      const size_t have = text.size();
      text.resize(have + (block - filled));
      const ssize_t n = ::read(fd, text.data() + have, block - filled);
      if (n < 0 && errno == EINTR) {
        text.resize(have);
        continue;
      }
      if (n < 0) {
        status = absl::DataLossError(
            absl::StrCat(name, ": read failed near line ", line, " (", std::strerror(errno), ")"));
        text.resize(have);
        break;
      }
      text.resize(have + static_cast<size_t>(n));
      if (n == 0) {
        eof = true;
        break;
      }
      filled += static_cast<size_t>(n);
    }
    if (!status.ok()) break;
    if (!eof) {
      const size_t last = text.rfind('\n');
      if (last == std::string::npos) {
        carry.swap(text);
        continue;
      }
      carry.assign(text, last + 1);
      text.resize(last + 1);
    }
    if (text.empty()) continue;
    line += std::count(text.begin(), text.end(), '\n');
    if (!Emit(std::move(batch))) break;
  }
  if (fd != STDIN_FILENO) ::close(fd);
  return status;
}

void Pipeline::ReadAll() {
  for (size_t input = 0; input < options_.inputs.size(); ++input) {
    absl::Status s = ReadInput(input);
    if (!s.ok()) {
      // The error takes its place in order: the writer reports it after
      // everything read before it.
      auto failed = std::make_unique<Batch>();
      failed->input = input;
      failed->status = std::move(s);
      Emit(std::move(failed));
      break;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (abort_) break;
  }
  std::lock_guard<std::mutex> lock(mu_);
  reading_done_ = true;
  work_cv_.notify_all();
  done_cv_.notify_all();
}

void Pipeline::Tokenize(Batch& batch) const {
  const std::string name = DisplayName(options_.inputs[batch.input]);
  const bool json = IsJson(batch.input);
  const int32_t eod = tokenizer_.eod();
  const char* p = batch.text.data();
  const char* const end = p + batch.text.size();
  batch.tokens.reserve(batch.text.size() + batch.text.size() / 64);
  std::string field;
  for (int64_t line = batch.first_line; p < end; ++line) {
    const char* nl = static_cast<const char*>(std::memchr(p, '\n', static_cast<size_t>(end - p)));
    const char* line_end = nl != nullptr ? nl : end;
    const std::string_view text(p, static_cast<size_t>(line_end - p));
    p = line_end + 1;
    if (text.empty()) continue;
    std::string_view document = text;
    if (json) {
      nlohmann::json value = nlohmann::json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
      if (value.is_discarded() || !value.is_object()) {
        batch.status = absl::InvalidArgumentError(absl::StrCat(
            name, ":", line, ": bad JSON line (", value.is_discarded() ? "does not parse" : "not an object", ")"));
        return;
      }
      auto it = value.find(options_.json_key);
      if (it == value.end() || !it->is_string()) {
        batch.status = absl::InvalidArgumentError(
            absl::StrCat(name, ":", line, ": no string field \"", options_.json_key, "\""));
        return;
      }
      field = it->get<std::string>();
      document = field;
    }
    if (absl::Status s = tokenizer_.EncodeInto(document, &batch.tokens); !s.ok()) {
      batch.status = absl::InvalidArgumentError(absl::StrCat(name, ":", line, ": ", s.message()));
      return;
    }
    batch.tokens.push_back(eod);
    batch.ends.push_back(static_cast<int64_t>(batch.tokens.size()));
  }
}

void Pipeline::Work() {
  for (;;) {
    std::unique_ptr<Batch> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return abort_ || !work_.empty() || reading_done_; });
      if (abort_ || work_.empty()) return;
      batch = std::move(work_.front());
      work_.pop_front();
    }
    if (batch->status.ok()) Tokenize(*batch);
    batch->text_bytes = static_cast<int64_t>(batch->text.size());
    std::string().swap(batch->text);  // the tokens are all the writer needs
    std::lock_guard<std::mutex> lock(mu_);
    done_.emplace(batch->index, std::move(batch));
    done_cv_.notify_one();
  }
}

void Pipeline::ReportProgress(const PrepareStats& stats, bool last) {
  const double now = timer_.Seconds();
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  // A redrawn bar on a terminal; in a log, a line every 5 s.
  if (!last && now - last_report_ < (tty ? 0.5 : 5.0)) return;
  if (last && !tty) return;
  last_report_ = now;
  const double secs = std::max(now, 1e-9);
  std::string bar;
  if (total_bytes_ > 0) {
    const double f = std::min(1.0, static_cast<double>(stats.input_bytes) / static_cast<double>(total_bytes_));
    constexpr int kWidth = 24;
    const int full = static_cast<int>(f * kWidth);
    bar = absl::StrFormat("[%s%s] %3.0f%% | ", std::string(full, '#'), std::string(kWidth - full, '.'), 100 * f);
  }
  std::fprintf(stderr, "%sloom-prepare: %s%lld documents | %.1f MB | %.0f documents/s | %.1f MB/s%s",
               tty ? "\r" : "", bar.c_str(), static_cast<long long>(stats.documents), stats.input_bytes / 1e6,
               stats.documents / secs, stats.input_bytes / 1e6 / secs, tty && !last ? "   " : "\n");
}

absl::StatusOr<PrepareStats> Pipeline::Run(IndexedDatasetWriter& writer) {
  total_bytes_ = 0;
  for (const std::string& path : options_.inputs) {
    struct stat st;
    if (path == "-" || ::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      total_bytes_ = -1;
      break;
    }
    total_bytes_ += st.st_size;
  }
  timer_.Reset();
  std::thread reader([this] { ReadAll(); });
  std::vector<std::thread> workers;
  for (int i = 0; i < options_.workers; ++i) workers.emplace_back([this] { Work(); });

  PrepareStats stats;
  absl::Status status;
  for (;;) {
    std::unique_ptr<Batch> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [&] { return done_.count(written_) > 0 || (reading_done_ && written_ == emitted_); });
      auto it = done_.find(written_);
      if (it == done_.end()) break;  // everything read is written
      batch = std::move(it->second);
      done_.erase(it);
    }
    status = batch->status;
    int64_t start = 0;
    for (size_t d = 0; status.ok() && d < batch->ends.size(); ++d) {
      const int64_t end = batch->ends[d];
      status = writer.AddDocument(std::span<const int32_t>(batch->tokens.data() + start, end - start));
      start = end;
    }
    if (!status.ok()) break;
    stats.documents += static_cast<int64_t>(batch->ends.size());
    stats.tokens += static_cast<int64_t>(batch->tokens.size());
    stats.input_bytes += batch->text_bytes;
    batch.reset();
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++written_;
      room_cv_.notify_one();
    }
    if (options_.progress) ReportProgress(stats, false);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!status.ok()) abort_ = true;
    room_cv_.notify_all();
    work_cv_.notify_all();
  }
  reader.join();
  for (std::thread& w : workers) w.join();
  if (options_.progress && status.ok()) ReportProgress(stats, true);
  if (!status.ok()) return status;
  stats.seconds = timer_.Seconds();
  return stats;
}

}  // namespace

absl::StatusOr<PrepareStats> PrepareDataset(const PrepareOptions& options, const Tokenizer& tokenizer) {
  if (options.inputs.empty()) return absl::InvalidArgumentError("--input: no input files");
  if (options.output_prefix.empty()) return absl::InvalidArgumentError("--output-prefix: empty");
  if (options.workers < 1 || options.workers > 256)
    return absl::InvalidArgumentError(absl::StrCat("--workers: ", options.workers, " is not in 1..256"));
  if (options.batch_bytes < 1) return absl::InvalidArgumentError("[prepare] batch_bytes must be positive");
  if (options.input_format != "auto" && options.input_format != "text" && options.input_format != "jsonl")
    return absl::InvalidArgumentError(
        absl::StrCat("--input-format: '", options.input_format, "' is not auto, text or jsonl"));
  // Every input must open before anything is written.
  for (const std::string& path : options.inputs) {
    if (path == "-") continue;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open input file (", std::strerror(errno), ")"));
    ::close(fd);
  }
  LOOM_ASSIGN_OR_RETURN(auto writer, IndexedDatasetWriter::Create(options.output_prefix,
                                                                  IndexedDTypeForVocab(tokenizer.vocab_size())));
  Pipeline pipeline(options, tokenizer);
  LOOM_ASSIGN_OR_RETURN(PrepareStats stats, pipeline.Run(*writer));
  LOOM_RETURN_IF_ERROR(writer->Finish());
  return stats;
}

int64_t PeakResidentBytes() {
  struct rusage usage;
  if (::getrusage(RUSAGE_SELF, &usage) != 0) return -1;
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

}  // namespace loom
