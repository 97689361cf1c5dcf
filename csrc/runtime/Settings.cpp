// Layer 1: environment variables of the native core (Settings.h).
#include "runtime/Settings.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace torch_mps_ext::runtime::settings {
namespace {

const char* raw(const char* name) {
  const char* text = std::getenv(name);
  return text == nullptr || *text == '\0' ? nullptr : text;
}

[[noreturn]] void bad(const char* name, const std::string& allowed, const char* text) {
  throw std::invalid_argument(std::string(name) + " must be " + allowed + ", got '" + text + "'");
}

} // namespace

std::optional<long long> integer(const char* name, long long lo, long long hi,
                                 const std::string& allowed) {
  const char* text = raw(name);
  if (text == nullptr) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text, &end, 10);
  if (errno != 0 || *end != '\0' || v < lo || v > hi) bad(name, allowed, text);
  return v;
}

std::optional<double> number(const char* name, double lo, double hi) {
  const char* text = raw(name);
  if (text == nullptr) return std::nullopt;
  char* end = nullptr;
  double v = std::strtod(text, &end);
  if (*end != '\0' || !(v >= lo && v <= hi)) {
    char range[64];
    std::snprintf(range, sizeof range, "a number in [%g, %g]", lo, hi);
    bad(name, range, text);
  }
  return v;
}

std::optional<bool> flag(const char* name) {
  const char* text = raw(name);
  if (text == nullptr) return std::nullopt;
  std::string s(text);
  if (s != "0" && s != "1") bad(name, "0 or 1", text);
  return s == "1";
}

} // namespace torch_mps_ext::runtime::settings
