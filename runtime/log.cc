#include "runtime/log.h"

#include <cstdio>
#include <mutex>

namespace loom {
namespace {
int g_rank = 0;
int g_world = 1;
bool g_all_ranks = false;
std::mutex g_mutex;
}  // namespace

void SetLogRank(int rank, int world) {
  g_rank = rank;
  g_world = world;
}
void SetLogAllRanks(bool all) { g_all_ranks = all; }

void LogLine(LogLevel level, std::string_view message) {
  if (level == LogLevel::kInfo && g_rank != 0 && !g_all_ranks) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  FILE* out = level == LogLevel::kInfo ? stdout : stderr;
  const char* tag = level == LogLevel::kInfo ? "" : level == LogLevel::kWarning ? "warning: " : "error: ";
  if (g_world > 1 && (level != LogLevel::kInfo || g_all_ranks)) std::fprintf(out, "[rank %d] ", g_rank);
  std::fprintf(out, "%s%.*s\n", tag, static_cast<int>(message.size()), message.data());
  std::fflush(out);
}

}  // namespace loom
