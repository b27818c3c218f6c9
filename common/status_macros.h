#ifndef SPARSEACCEL_COMMON_STATUS_MACROS_H_
#define SPARSEACCEL_COMMON_STATUS_MACROS_H_

// Early-return helpers for absl::Status / absl::StatusOr (Debian's Abseil has none).

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SA_CONCAT_INNER(a, b) a##b
#define SA_CONCAT(a, b) SA_CONCAT_INNER(a, b)

// Returns the status of `expr` from the enclosing function unless it is OK.
#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status sa_status_ = (expr);      \
    if (!sa_status_.ok()) return sa_status_; \
  } while (0)

// `lhs = value of the StatusOr expr`, or returns its error status.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(SA_CONCAT(sa_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()

#endif  // SPARSEACCEL_COMMON_STATUS_MACROS_H_
