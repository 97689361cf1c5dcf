// Layer 1: the environment variables the native core reads, all through here.
//
// One policy, shared with torch_mps_ext/_settings.py (which lists every
// variable, these included): an unset or empty variable gives the default; a
// bad value throws std::invalid_argument "NAME must be <allowed>, got '<value>'"
// (a ValueError in Python).
#pragma once

#include <optional>
#include <string>

namespace torch_mps_ext::runtime::settings {

// A whole decimal integer in [lo, hi]; `allowed` is what the message says.
std::optional<long long> integer(const char* name, long long lo, long long hi,
                                 const std::string& allowed);
// A number in [lo, hi] (NaN refused).
std::optional<double> number(const char* name, double lo, double hi);
// 0 or 1.
std::optional<bool> flag(const char* name);

} // namespace torch_mps_ext::runtime::settings
