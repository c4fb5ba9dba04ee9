// cake: error hierarchy and the argument checks used at every public boundary.
//
// Every message carries a stable id in brackets, names the argument, what was
// expected and what came:
//   [cake.prefill.window] window must be in [2, S - 1 = 119], got 1
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace cake {

class error : public std::runtime_error {
 public:
  error(std::string id, const std::string& what)
      : std::runtime_error(bracketed(id, what)), id_(std::move(id)) {}
  // Stable identifier such as "cake.prefill.window", for programs that branch on it.
  const std::string& id() const noexcept { return id_; }

 private:
  // "[id] what", built by appending: GCC 12's -Wrestrict misfires on chains of
  // operator+ over temporaries (GCC PR 105329).
  static std::string bracketed(const std::string& id, const std::string& what) {
    std::string s;
    s.reserve(id.size() + what.size() + 3);
    s.append("[").append(id).append("] ").append(what);
    return s;
  }
  std::string id_;
};

// Bad input at a public boundary; thrown before any state changes.
class invalid_argument : public error {
  using error::error;
};

// A call that is valid in general but not in the object's current state
// (layers out of order, decoding before prefill).
class logic_error : public error {
  using error::error;
};

// A CUDA runtime error, naming the kernel or call that produced it.
class cuda_error : public error {
 public:
  cuda_error(const std::string& where, int code, const std::string& what)
      : error("cake.cuda", detail_message(where, code, what)), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  static std::string detail_message(const std::string& where, int code, const std::string& what) {
    std::string s(where);
    s.append(": ").append(what).append(" (cudaError ").append(std::to_string(code)).append(")");
    return s;
  }
  int code_;
};

// Outcome of a non-throwing validation; engines built without exceptions call
// the validate_* functions and read this instead.
struct status {
  std::string id;       // empty when ok
  std::string message;  // full message, "[id] ..."
  bool is_logic = false;
  explicit operator bool() const noexcept { return id.empty(); }
  bool ok() const noexcept { return id.empty(); }
  static status success() { return {}; }
  // Throws the matching exception when not ok.
  void throw_if_error() const {
    if (ok()) return;
    const std::string body = message.substr(id.size() + 3);
    if (is_logic) throw logic_error(id, body);
    throw invalid_argument(id, body);
  }
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << parts);
  return os.str();
}
template <class... Parts>
status make_status(const char* id, const Parts&... parts) {
  status s;
  s.id = id;
  s.message = concat("[", id, "] ", parts...);
  return s;
}
template <class... Parts>
status make_logic_status(const char* id, const Parts&... parts) {
  status s = make_status(id, parts...);
  s.is_logic = true;
  return s;
}
}  // namespace detail
}  // namespace cake

// Inside a function returning cake::status: return a failed status when cond is false.
#define CAKE_CHECK(cond, id, ...)                                     \
  do {                                                                \
    if (!(cond)) return ::cake::detail::make_status(id, __VA_ARGS__); \
  } while (0)

#define CAKE_CHECK_STATE(cond, id, ...)                                     \
  do {                                                                      \
    if (!(cond)) return ::cake::detail::make_logic_status(id, __VA_ARGS__); \
  } while (0)

// Propagate a failed status.
#define CAKE_TRY(expr)                   \
  do {                                   \
    ::cake::status cake_st_ = (expr);    \
    if (!cake_st_.ok()) return cake_st_; \
  } while (0)

// In throwing code: throw cake::invalid_argument when cond is false.
#define CAKE_EXPECTS(cond, id, ...)                                                       \
  do {                                                                                    \
    if (!(cond)) throw ::cake::invalid_argument(id, ::cake::detail::concat(__VA_ARGS__)); \
  } while (0)
