// Errors: absl::Status / absl::StatusOr<T> for everything that can fail on
// input; aborts (LOOM_CHECK) only for broken invariants.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define LOOM_CONCAT_INNER_(a, b) a##b
#define LOOM_CONCAT_(a, b) LOOM_CONCAT_INNER_(a, b)

// Returns the status of `expr` from the calling function if it is not OK.
#define LOOM_RETURN_IF_ERROR(expr)                  \
  do {                                              \
    ::absl::Status loom_status_ = (expr);           \
    if (!loom_status_.ok()) return loom_status_;    \
  } while (0)

// `LOOM_ASSIGN_OR_RETURN(auto x, F())`: x = *F(), or return F()'s error.
#define LOOM_ASSIGN_OR_RETURN(lhs, expr) \
  LOOM_ASSIGN_OR_RETURN_IMPL_(LOOM_CONCAT_(loom_statusor_, __LINE__), lhs, expr)
#define LOOM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return std::move(tmp).status();    \
  lhs = std::move(tmp).value()

namespace loom::internal {
// Streams any printable values into one string (LOOM_CHECK messages).
template <typename... Args>
std::string StreamCat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace loom::internal

// A broken invariant: a bug in Loom, not bad input. Prints where and aborts.
#define LOOM_CHECK(cond, ...)                                                  \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "[loom] %s:%d: check failed: %s %s\n", __FILE__,    \
                   __LINE__, #cond, ::loom::internal::StreamCat("", ##__VA_ARGS__).c_str()); \
      std::abort();                                                            \
    }                                                                          \
  } while (0)
