// Rank-aware logging: by default only rank 0 prints INFO; warnings and errors
// print on every rank, prefixed by the rank when the world has several.
#pragma once

#include <string_view>

#include "absl/strings/str_cat.h"

namespace loom {

enum class LogLevel { kInfo, kWarning, kError };

// Set once at start-up (the launcher knows the rank before anything logs).
void SetLogRank(int rank, int world);
void SetLogAllRanks(bool all);  // INFO from every rank (debugging)
void LogLine(LogLevel level, std::string_view message);

template <typename... Args>
void LogInfo(const Args&... args) { LogLine(LogLevel::kInfo, absl::StrCat(args...)); }
template <typename... Args>
void LogWarning(const Args&... args) { LogLine(LogLevel::kWarning, absl::StrCat(args...)); }
template <typename... Args>
void LogError(const Args&... args) { LogLine(LogLevel::kError, absl::StrCat(args...)); }

}  // namespace loom
