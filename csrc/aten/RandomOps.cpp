// Layer 3: the random operators of mps_ext, on the device's Philox generator.
//
// Every op here:
//   1. checks its arguments as the CPU op does (same messages where sensible),
//   2. takes the generator (the one passed, else the device's default) and
//      reserves ceil(words / 4) Philox blocks for the words it consumes
//      (docs/random.md lists the words per element of each op),
//   3. computes element i from the words at i's position in the op's stream,
//      in parallel chunks (at::parallel_for) written straight into device
//      memory (host-addressable). Element order is the logical row-major
//      order of the output; a non-contiguous output is filled through a
//      contiguous temporary.
// So results depend on (seed, offset, shape, parameters) only: not on thread
// count, chunking or device index.
#include "aten/Fidelity.h"
#include "aten/HostView.h"
#include "runtime/Stream.h"
#include "aten/RandomKernels.h"
#include "core/Generator.h"

#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/view_as_real.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace torch_mps_ext {
namespace {

using u32 = std::uint32_t;
using u64 = std::uint64_t;

constexpr int64_t kChunk = 4096;  // elements per work item (a multiple of 4)
constexpr int64_t kGrainChunks = 8;  // below 8 chunks (32k elements): one thread
constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double kPi = 3.1415926535897932384626433832795;

PhiloxGenerator* gen(const std::optional<at::Generator>& g, const at::Tensor& t) {
  // MPS's random kernels compute nothing in float64/complex128 (Fidelity.h).
  if (C10_UNLIKELY(fidelity::on())) fidelity::checkOperandDtype(t.scalar_type(), nullptr);
  return generatorFor(g, t.device().index());
}

// Calls f(begin, count) over [0, n) in chunks of kChunk elements, in parallel.
template <class F>
void forChunks(int64_t n, const F& f) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      f(begin, std::min(kChunk, n - begin));
    }
  });
}

// The words of elements [begin, begin + count) of a stream with K words per
// element; `begin` is a multiple of kChunk, so the words start on a block.
template <int K>
void fetch(const PhiloxStream& s, int64_t begin, int64_t count, u32* buf) {
  const u64 first_word = static_cast<u64>(begin) * K;
  const u64 nblocks = (static_cast<u64>(count) * K + 3) / 4;
  rng::kernels().philox(s.seed, s.offset + first_word / 4, nblocks, buf);
}

inline u64 word64(const u32* w) {
  return static_cast<u64>(w[0]) | (static_cast<u64>(w[1]) << 32);
}
// [0, 1) with 53 random bits.
inline double unitClosedOpen53(const u32* w) {
  return static_cast<double>(word64(w) >> 11) * 0x1p-53;
}
// (0, 1) with 53 random bits.
inline double unitOpen53(const u32* w) {
  return (static_cast<double>(word64(w) >> 11) + 0.5) * 0x1p-53;
}
// (0, 1) with 32 random bits.
inline double unitOpen32(u32 w) {
  return (static_cast<double>(w) + 0.5) * 0x1p-32;
}
// floor(x * range / 2^64): an integer in [0, range), bias <= range / 2^64.
inline u64 scaleToRange(u64 x, u64 range) {
  return static_cast<u64>((static_cast<unsigned __int128>(x) * range) >> 64);
}

// Runs fill(out) on `self` when it is contiguous, else on a contiguous
// temporary that is then copied into `self`.
template <class Fill>
at::Tensor& withContiguous(at::Tensor& self, const Fill& fill) {
  // Kernels write through data_ptr(): queued work on the stream comes first.
  runtime::awaitCurrentStream(self.device().index());
  if (self.is_contiguous()) {
    fill(self);
    return self;
  }
  at::Tensor tmp = at::empty(self.sizes(), self.options());
  fill(tmp);
  self.copy_(tmp);
  return self;
}

// out[i] = f(words of element i), K words per element.
template <typename T, int K, class F>
void generate(const at::Tensor& out, const PhiloxStream& s, const F& f) {
  T* data = static_cast<T*>(out.data_ptr());
  forChunks(out.numel(), [&](int64_t begin, int64_t count) {
    u32 buf[kChunk * K + 4];
    fetch<K>(s, begin, count, buf);
    T* o = data + begin;
    for (int64_t i = 0; i < count; ++i) o[i] = f(buf + K * i);
  });
}

template <typename T>
constexpr bool isReducedFloat() {
  return std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;
}

// The largest Half/BFloat16 below `to` (both: 16 bits, sign in bit 15).
template <typename T>
T largestBelow(float to) {
  if constexpr (isReducedFloat<T>()) {
    T h = static_cast<T>(to);
    while (static_cast<float>(h) >= to) {
      const float f = static_cast<float>(h);
      h.x = f > 0 ? static_cast<uint16_t>(h.x - 1)
                  : (f == 0 ? static_cast<uint16_t>(0x8001) : static_cast<uint16_t>(h.x + 1));
    }
    return h;
  } else {
    return static_cast<T>(std::nextafter(to, -std::numeric_limits<float>::infinity()));
  }
}

// ---------------------------------------------------------------- uniform_

at::Tensor& uniform_(at::Tensor& self, double from, double to,
                     std::optional<at::Generator> generator) {
  if (self.is_complex()) {
    if (self.numel() == 0) return self;
    at::Tensor real = at::view_as_real(self);
    uniform_(real, from, to, generator);
    return self;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(),
                                  "check_uniform_bounds", [&] {
    const auto dtype = self.dtype();
    const auto min = static_cast<double>(std::numeric_limits<scalar_t>::lowest());
    const auto max = static_cast<double>(std::numeric_limits<scalar_t>::max());
    TORCH_CHECK(from >= min && from <= max, "from is out of bounds for ", dtype);
    TORCH_CHECK(to >= min && to <= max, "to is out of bounds for ", dtype);
    TORCH_CHECK(from <= to, "uniform_ expects to return a [from, to) range, but found from=",
                from, " > to=", to);
    TORCH_CHECK((to - from) <= std::numeric_limits<scalar_t>::max(),
                "uniform_ expects to-from <= std::numeric_limits<",
                toString(self.scalar_type()), ">::max(), but found to=", to,
                " and from=", from, " which result in to-from to exceed the limit");
  });
  if (self.numel() == 0) return self;
  at::assert_no_internal_overlap(self);
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    const int64_t n = out.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "uniform_", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        const PhiloxStream s = reserveWords(g, 2 * static_cast<u64>(n));
        const double range = to - from;
        generate<double, 2>(out, s, [=](const u32* w) {
          const double v = unitClosedOpen53(w) * range + from;
          return v >= to ? from : v;
        });
      } else {
        const PhiloxStream s = reserveWords(g, static_cast<u64>(n));
        const float from_f = static_cast<float>(from);
        const float to_f = static_cast<float>(to);
        scalar_t* data = static_cast<scalar_t*>(out.data_ptr());
        const rng::Kernels& k = rng::kernels();
        forChunks(n, [&](int64_t begin, int64_t count) {
          u32 buf[kChunk + 4];
          fetch<1>(s, begin, count, buf);
          if constexpr (std::is_same_v<scalar_t, float>) {
            k.uniformFloat(buf, count, from_f, to_f, reinterpret_cast<float*>(data + begin));
          } else {
            float tmp[kChunk];
            k.uniformFloat(buf, count, from_f, to_f, tmp);
            // Rounding to the narrow type may reach `to`: those draws take
            // the largest value below it, keeping [from, to) (and no excess
            // of `from`: 1 in 4096 float16 draws would round up to 1.0).
            const scalar_t top = from_f < to_f ? largestBelow<scalar_t>(to_f)
                                               : static_cast<scalar_t>(from_f);
            for (int64_t i = 0; i < count; ++i) {
              const scalar_t v = static_cast<scalar_t>(tmp[i]);
              data[begin + i] = static_cast<float>(v) >= to_f ? top : v;
            }
          }
        });
      }
    });
  });
}

// ------------------------------------------------- normal_ and log_normal_

// out[i] = post(mean + std * z_i) for standard normal z_i (Box-Muller on
// pairs). float/half/bfloat16: one word per element (pairs of words), math
// in float; double: two words per element (a block per pair), math in double.
template <typename T, class Post>
void normalFill(const at::Tensor& out, PhiloxGenerator* g, double mean, double std,
                const Post& post) {
  const int64_t n = out.numel();
  T* data = static_cast<T*>(out.data_ptr());
  if constexpr (std::is_same_v<T, double>) {
    const PhiloxStream s = reserveWords(g, 2 * static_cast<u64>(n + (n & 1)));
    forChunks(n, [&](int64_t begin, int64_t count) {
      u32 buf[2 * kChunk + 4];
      fetch<2>(s, begin, count + (count & 1), buf);
      for (int64_t i = 0; i < count; i += 2) {
        const u32* w = buf + 2 * i;
        const double r = std::sqrt(-2.0 * std::log(unitOpen53(w)));
        const double theta = kTwoPi * unitClosedOpen53(w + 2);
        data[begin + i] = post(r * std::cos(theta) * std + mean);
        if (i + 1 < count) data[begin + i + 1] = post(r * std::sin(theta) * std + mean);
      }
    });
  } else {
    const PhiloxStream s = reserveWords(g, static_cast<u64>(n + (n & 1)));
    const rng::Kernels& k = rng::kernels();
    const float mean_f = static_cast<float>(mean);
    const float std_f = static_cast<float>(std);
    forChunks(n, [&](int64_t begin, int64_t count) {
      u32 buf[kChunk + 4];
      const int64_t npairs = (count + 1) / 2;
      fetch<1>(s, begin, 2 * npairs, buf);
      if constexpr (std::is_same_v<T, float> && std::is_same_v<Post, std::nullptr_t>) {
        if ((count & 1) == 0) {
          k.normalFloat(buf, npairs, mean_f, std_f, data + begin);
          return;
        }
      }
      float tmp[kChunk + 2];
      k.normalFloat(buf, npairs, mean_f, std_f, tmp);
      for (int64_t i = 0; i < count; ++i) {
        if constexpr (std::is_same_v<Post, std::nullptr_t>) {
          data[begin + i] = static_cast<T>(tmp[i]);
        } else {
          data[begin + i] = post(tmp[i]);
        }
      }
    });
  }
}

at::Tensor& normal_(at::Tensor& self, double mean, double std,
                    std::optional<at::Generator> generator) {
  TORCH_CHECK(std >= 0.0, "normal expects std >= 0.0, but found std ", std);
  if (self.numel() == 0) return self;
  if (self.is_complex()) {
    at::Tensor real = at::view_as_real(self);
    // The real and imaginary parts each get half the variance.
    normal_(real, mean, std / std::sqrt(2.0), generator);
    return self;
  }
  // MPS draws normals in float32/float16/bfloat16 only (random_mps_impl).
  TORCH_CHECK_TYPE(!fidelity::on() || at::isFloatingType(self.scalar_type()),
                   "Unsupported type ", self.scalar_type(), " for operation normal");
  at::assert_no_internal_overlap(self);
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "normal_", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        normalFill<double>(out, g, mean, std, [](double v) { return v; });
      } else {
        normalFill<scalar_t>(out, g, mean, std, nullptr);
      }
    });
  });
}

at::Tensor& log_normal_(at::Tensor& self, double mean, double std,
                        std::optional<at::Generator> generator) {
  TORCH_CHECK(std > 0.0, "log_normal_ expects std > 0.0, but found std=", std);
  if (self.numel() == 0) return self;
  at::assert_no_internal_overlap(self);
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "log_normal_", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        normalFill<double>(out, g, mean, std, [](double v) { return std::exp(v); });
      } else {
        normalFill<scalar_t>(out, g, mean, std,
                             [](float v) { return static_cast<scalar_t>(std::exp(v)); });
      }
    });
  });
}

// ------------------------------------ exponential_, geometric_, cauchy_

// Smallest positive value of T where `v` underflowed to 0 (exponential
// samples are > 0).
template <typename T>
T positive(double v) {
  T r = static_cast<T>(v);
  return static_cast<double>(r) > 0.0 ? r : std::numeric_limits<T>::denorm_min();
}

at::Tensor& exponential_(at::Tensor& self, double lambda,
                         std::optional<at::Generator> generator) {
  TORCH_CHECK(lambda > 0.0, "exponential_ expects lambda > 0.0, but found lambda=", lambda);
  TORCH_CHECK(at::isFloatingType(self.scalar_type()),
              "Exponential distribution is a continuous probability distribution. "
              "dtype must be a floating point but you specified ", self.scalar_type());
  if (self.numel() == 0) return self;
  at::assert_no_internal_overlap(self);
  // An infinite rate: every sample is 0, as on CPU and CUDA (the clamp to the
  // smallest positive value below is for finite rates whose samples
  // underflow). No numbers are drawn, as on CPU.
  if (std::isinf(lambda)) return self.zero_();
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    const u64 n = static_cast<u64>(out.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "exponential_", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        const PhiloxStream s = reserveWords(g, 2 * n);
        generate<double, 2>(out, s, [=](const u32* w) {
          return positive<double>(-std::log(unitOpen53(w)) / lambda);
        });
      } else {
        const PhiloxStream s = reserveWords(g, n);
        generate<scalar_t, 1>(out, s, [=](const u32* w) {
          return positive<scalar_t>(-std::log(unitOpen32(w[0])) / lambda);
        });
      }
    });
  });
}

at::Tensor& geometric_(at::Tensor& self, double p, std::optional<at::Generator> generator) {
  TORCH_CHECK(0 < p && p < 1, "geometric_ expects p to be in (0, 1), but got p=", p);
  if (self.numel() == 0) return self;
  at::assert_no_internal_overlap(self);
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    const PhiloxStream s = reserveWords(g, 2 * static_cast<u64>(out.numel()));
    const double log1mp = std::log1p(-p);
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "geometric_", [&] {
      generate<scalar_t, 2>(out, s, [=](const u32* w) {
        // P(X > k) = (1 - p)^k: X = ceil(log(u) / log(1 - p)) >= 1.
        double v = std::ceil(std::log(unitOpen53(w)) / log1mp);
        if constexpr (std::is_integral_v<scalar_t>) {
          v = std::min(v, static_cast<double>(std::numeric_limits<scalar_t>::max()));
        }
        return static_cast<scalar_t>(std::max(v, 1.0));
      });
    });
  });
}

at::Tensor& cauchy_(at::Tensor& self, double median, double sigma,
                    std::optional<at::Generator> generator) {
  TORCH_CHECK(sigma > 0.0, "cauchy_ expects sigma > 0.0, but found sigma=", sigma);
  TORCH_CHECK(at::isFloatingType(self.scalar_type()),
              "Cauchy distribution is a continuous probability distribution. "
              "dtype must be a floating point but you specified ", self.dtype());
  if (self.numel() == 0) return self;
  at::assert_no_internal_overlap(self);
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    const u64 n = static_cast<u64>(out.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "cauchy_", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {
        const PhiloxStream s = reserveWords(g, 2 * n);
        generate<double, 2>(out, s, [=](const u32* w) {
          return median + sigma * std::tan(kPi * (unitOpen53(w) - 0.5));
        });
      } else {
        const PhiloxStream s = reserveWords(g, n);
        generate<scalar_t, 1>(out, s, [=](const u32* w) {
          return static_cast<scalar_t>(median + sigma * std::tan(kPi * (unitOpen32(w[0]) - 0.5)));
        });
      }
    });
  });
}

// ----------------------------------------------------------------- random_

// (from, to) adjusted to values the floating type represents (as CPU does).
template <typename T>
int64_t updateFrom(int64_t from) {
  const auto from_plus_1 = static_cast<int64_t>(static_cast<T>(from + 1));
  if (from_plus_1 < from) {
    int64_t from_ = std::abs(from + 1);
    int n = 0;
    while (from_ >>= 1) ++n;
    from = from_plus_1 + (1LL << (n - std::numeric_limits<T>::digits + 1));
  }
  return from;
}

template <typename T>
int64_t updateTo(int64_t to) {
  const auto to_minus_1 = static_cast<int64_t>(static_cast<T>(to - 1));
  if (to_minus_1 >= to) {
    int64_t to_ = std::abs(to - 1);
    int n = 0;
    while (to_ >>= 1) ++n;
    to = to_minus_1 - (1LL << (n - std::numeric_limits<T>::digits + 1));
  }
  return to;
}

#define MPS_EXT_CHECK_OUT_OF_BOUNDS(var, name, min, max, dtype) \
  TORCH_CHECK(var >= min && var <= max, name, " is out of bounds for ", dtype)

#define MPS_EXT_WARN_OUT_OF_BOUNDS(var, name, digits, dtype)                                   \
  if (var < -(1LL << digits) || var > (1LL << digits)) {                                      \
    TORCH_WARN(name, " is out of bounds [-(2^", digits, "), 2^", digits, "]. ",               \
               "Due to precision limitations ", dtype,                                        \
               " can support discrete uniform distribution only within this range. ",         \
               "This warning will become an error in version 1.7 release, please fix the "    \
               "code in advance");                                                            \
  }

void checkFromToInRange(int64_t from, int64_t to_inc, caffe2::TypeMeta dtype) {
  const auto st = c10::typeMetaToScalarType(dtype);
  if (at::isFloatingType(st)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "check_random_fp_bounds", [&] {
      const auto min = static_cast<double>(std::numeric_limits<scalar_t>::lowest());
      const auto max = static_cast<double>(std::numeric_limits<scalar_t>::max());
      MPS_EXT_CHECK_OUT_OF_BOUNDS(from, "from", min, max, dtype);
      MPS_EXT_CHECK_OUT_OF_BOUNDS(to_inc, "to - 1", min, max, dtype);
      constexpr auto digits = std::numeric_limits<scalar_t>::digits;
      MPS_EXT_WARN_OUT_OF_BOUNDS(from, "from", digits, dtype);
      MPS_EXT_WARN_OUT_OF_BOUNDS(to_inc, "to - 1", digits, dtype);
    });
  } else if (st == at::kUInt64) {
    MPS_EXT_CHECK_OUT_OF_BOUNDS(from, "from", 0, INT64_MAX, dtype);
    MPS_EXT_CHECK_OUT_OF_BOUNDS(to_inc, "to - 1", 0, INT64_MAX, dtype);
  } else if (at::isIntegralType(st, /*includeBool=*/true)) {
    AT_DISPATCH_V2(st, "check_random_integral_bounds", AT_WRAP([&] {
      const auto min = static_cast<int64_t>(std::numeric_limits<scalar_t>::lowest());
      const auto max = static_cast<int64_t>(std::numeric_limits<scalar_t>::max());
      MPS_EXT_CHECK_OUT_OF_BOUNDS(from, "from", min, max, dtype);
      MPS_EXT_CHECK_OUT_OF_BOUNDS(to_inc, "to - 1", min, max, dtype);
    }), AT_EXPAND(AT_INTEGRAL_TYPES), at::kUInt16, at::kUInt32, at::kBool);
  } else {
    TORCH_CHECK(false, "check_random_bounds handles only integral, floating-point and boolean types");
  }
}

// self[i] = base + (64-bit word pair of i scaled to [0, range)).
void randomFromTo(at::Tensor& self, u64 range, int64_t base,
                  const std::optional<at::Generator>& generator) {
  at::assert_no_internal_overlap(self);
  PhiloxGenerator* g = gen(generator, self);
  withContiguous(self, [&](const at::Tensor& out) {
    const PhiloxStream s = reserveWords(g, 2 * static_cast<u64>(out.numel()));
    AT_DISPATCH_V2(out.scalar_type(), "random_from_to", AT_WRAP([&] {
      generate<scalar_t, 2>(out, s, [=](const u32* w) {
        const auto v = static_cast<int64_t>(scaleToRange(word64(w), range) + static_cast<u64>(base));
        return static_cast<scalar_t>(v);
      });
    }), at::kBool, at::kHalf, at::kBFloat16, AT_EXPAND(AT_ALL_TYPES), AT_EXPAND(AT_BAREBONES_UNSIGNED_TYPES));
  });
}

at::Tensor& random_from(at::Tensor& self, int64_t from, std::optional<int64_t> to_opt,
                        std::optional<at::Generator> generator) {
  const auto st = self.scalar_type();
  if (to_opt.has_value()) {
    int64_t to = *to_opt;
    TORCH_CHECK(from < to, "random_ expects 'from' to be less than 'to', but got from=", from,
                " >= to=", to);
    if (at::isFloatingType(st)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "random_update_from_to", [&] {
        from = updateFrom<scalar_t>(from);
        to = updateTo<scalar_t>(to);
        TORCH_CHECK(from < to,
                    "random_ expects 'from' casted to dtype to be less than 'to' casted to "
                    "dtype, but got from=", from, " >= to=", to);
      });
    }
    checkFromToInRange(from, to - 1, self.dtype());
    if (self.numel() == 0) return self;
    randomFromTo(self, static_cast<u64>(to) - static_cast<u64>(from), from, generator);
  } else if (from != std::numeric_limits<int64_t>::lowest()) {
    int64_t to_inc = 0;
    if (at::isFloatingType(st)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "random_from_to_range_calc", [&] {
        constexpr int64_t scalar_t_max = static_cast<int64_t>(1) << std::numeric_limits<scalar_t>::digits;
        to_inc = scalar_t_max;
        from = updateFrom<scalar_t>(from);
        TORCH_CHECK(from < to_inc,
                    "random_ expects 'from' casted to dtype to be less than or equal to "
                    "'to_inc' casted to dtype, but got from=", from, " > to_inc=", to_inc);
      });
    } else if (at::isIntegralType(st, /*includeBool=*/true)) {
      AT_DISPATCH_V2(st, "random_from_to_range_calc", AT_WRAP([&] {
        if constexpr (std::is_same_v<scalar_t, bool>) {
          to_inc = 1;
        } else if constexpr (std::is_same_v<scalar_t, u64>) {
          to_inc = std::numeric_limits<int64_t>::max();
        } else {
          to_inc = static_cast<int64_t>(std::numeric_limits<scalar_t>::max());
        }
      }), AT_EXPAND(AT_INTEGRAL_TYPES_V2), at::kBool);
    } else {
      TORCH_CHECK(false, "random_from_to_impl handles only integral, floating-point and boolean types");
    }
    checkFromToInRange(from, to_inc, self.dtype());
    if (self.numel() == 0) return self;
    randomFromTo(self, static_cast<u64>(to_inc) - static_cast<u64>(from) + 1, from, generator);
  } else {
    // The full 64-bit range: [-2^63, 2^63).
    AT_DISPATCH_ALL_TYPES_AND(at::kBFloat16, st, "random_full_64_bits_range_kernel", [&] {
      TORCH_CHECK((std::is_same_v<scalar_t, int64_t> || std::is_same_v<scalar_t, double> ||
                   std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>),
                  "random_full_64_bits_range_kernel handles only int64, double, float and bfloat16");
    });
    if (self.numel() == 0) return self;
    at::assert_no_internal_overlap(self);
    PhiloxGenerator* g = gen(generator, self);
    withContiguous(self, [&](const at::Tensor& out) {
      const PhiloxStream s = reserveWords(g, 2 * static_cast<u64>(out.numel()));
      AT_DISPATCH_ALL_TYPES_AND(at::kBFloat16, st, "random_full_64_bits_range_kernel", [&] {
        generate<scalar_t, 2>(out, s, [](const u32* w) {
          return static_cast<scalar_t>(static_cast<int64_t>(word64(w)));
        });
      });
    });
  }
  return self;
}

at::Tensor& random_to(at::Tensor& self, int64_t to, std::optional<at::Generator> generator) {
  return random_from(self, 0, to, std::move(generator));
}

at::Tensor& random_(at::Tensor& self, std::optional<at::Generator> generator) {
  // Integers: [0, max]; floating types: [0, 2^digits]; bool: {false, true}.
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, self.scalar_type(), "random_", [&] {});
  if (self.numel() == 0) return self;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, self.scalar_type(), "random_", [&] {
    u64 range;
    if constexpr (std::is_same_v<scalar_t, bool>) {
      range = 2;
    } else if constexpr (std::is_floating_point_v<scalar_t> || isReducedFloat<scalar_t>()) {
      range = (1ULL << std::numeric_limits<scalar_t>::digits) + 1;
    } else {
      range = static_cast<u64>(std::numeric_limits<scalar_t>::max()) + 1;
    }
    randomFromTo(self, range, 0, generator);
  });
  return self;
}

// --------------------------------------------------------------- bernoulli

at::Tensor& bernoulli_float_(at::Tensor& self, double p, std::optional<at::Generator> generator) {
  TORCH_CHECK(0 <= p && p <= 1, "bernoulli_ expects p to be in [0, 1], but got p=", p);
  if (self.numel() == 0) return self;
  at::assert_no_internal_overlap(self);
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    const PhiloxStream s = reserveWords(g, static_cast<u64>(out.numel()));
    const double threshold = p * 0x1p32;  // P(w < threshold) = p, to 2^-32
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, out.scalar_type(), "bernoulli_scalar", [&] {
      generate<scalar_t, 1>(out, s, [=](const u32* w) {
        return static_cast<scalar_t>(static_cast<double>(w[0]) < threshold);
      });
    });
  });
}

at::Tensor& bernoulli_tensor_(at::Tensor& self, const at::Tensor& p_,
                              std::optional<at::Generator> generator) {
  if (self.numel() == 0) return self;
  at::assert_no_internal_overlap(self);
  TORCH_CHECK(p_.device() == self.device() || p_.is_cpu(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              self.device(), " and ", p_.device(), "!");
  at::Tensor p_host = p_.device().type() == c10::DeviceType::PrivateUse1 ? hostView(p_) : p_;
  // p keeps its floating dtype (no conversion pass); expand + contiguous
  // copies only when p is broadcast or strided.
  if (!at::isFloatingType(p_host.scalar_type())) p_host = p_host.to(at::kDouble);
  at::Tensor p = p_host.expand(self.sizes()).contiguous();
  PhiloxGenerator* g = gen(generator, self);
  return withContiguous(self, [&](const at::Tensor& out) {
    const PhiloxStream s = reserveWords(g, static_cast<u64>(out.numel()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "bernoulli_tensor_p", [&] {
      using p_t = scalar_t;
      const p_t* pd = p.const_data_ptr<p_t>();
      AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, out.scalar_type(), "bernoulli_tensor", [&] {
        scalar_t* data = static_cast<scalar_t*>(out.data_ptr());
        forChunks(out.numel(), [&](int64_t begin, int64_t count) {
          u32 buf[kChunk + 4];
          fetch<1>(s, begin, count, buf);
          for (int64_t i = 0; i < count; ++i) {
            const double p_in = static_cast<double>(pd[begin + i]);
            TORCH_CHECK(p_in >= 0 && p_in <= 1);
            data[begin + i] = static_cast<scalar_t>(static_cast<double>(buf[i]) < p_in * 0x1p32);
          }
        });
      });
    });
  });
}

at::Tensor& bernoulli_out(const at::Tensor& self, std::optional<at::Generator> generator,
                          at::Tensor& result) {
  result.resize_(self.sizes());
  return bernoulli_tensor_(result, self, std::move(generator));
}

// ---------------------------------------------------------------- randperm

at::Tensor& randperm_out(int64_t n, std::optional<at::Generator> generator, at::Tensor& result) {
  TORCH_CHECK(n >= 0, "n must be non-negative, got", n);
  runtime::awaitCurrentStream(result.device().index());
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "randperm", [&] {
    if constexpr (std::is_floating_point_v<scalar_t> || isReducedFloat<scalar_t>()) {
      const int64_t limit = (int64_t(1) << std::numeric_limits<scalar_t>::digits) + 1;
      TORCH_CHECK(n <= limit, "n cannot be greater than ", limit, " for ",
                  result.scalar_type(), " type.");
    } else {
      TORCH_CHECK(n == 0 || n - 1 <= static_cast<int64_t>(std::numeric_limits<scalar_t>::max()),
                  "n is too large for result tensor type: '", result.toString(), "'");
    }
  });
  TORCH_CHECK(result.device().type() == c10::DeviceType::PrivateUse1,
              "randperm: expected an mps_ext out tensor, got ", result.device());
  result.resize_({n});
  if (n == 0) return result;
  PhiloxGenerator* g = gen(generator, result);
  // Fisher-Yates: step i (0 <= i < n - 1) swaps i with i + j, j uniform in
  // [0, n - i) from the 64-bit word pair i. Serial, like CPU's.
  const PhiloxStream s = reserveWords(g, 2 * static_cast<u64>(n - 1));
  std::vector<int64_t> perm(static_cast<std::size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::vector<u32> buf(2 * kChunk + 4);
  for (int64_t begin = 0; begin < n - 1; begin += kChunk) {
    const int64_t count = std::min(kChunk, n - 1 - begin);
    fetch<2>(s, begin, count, buf.data());
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = begin + k;
      const auto j = i + static_cast<int64_t>(scaleToRange(word64(buf.data() + 2 * k),
                                                           static_cast<u64>(n - i)));
      std::swap(perm[i], perm[j]);
    }
  }
  return withContiguous(result, [&](const at::Tensor& out) {
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "randperm", [&] {
      scalar_t* data = static_cast<scalar_t*>(out.data_ptr());
      at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) data[i] = static_cast<scalar_t>(perm[i]);
      });
    });
  });
}

// ------------------------------------------------------------- multinomial

at::Tensor& multinomial_out(const at::Tensor& self, int64_t n_sample, bool with_replacement,
                            std::optional<at::Generator> generator, at::Tensor& result) {
  TORCH_CHECK(result.device() == self.device(), "multinomial arguments must have the same device");
  TORCH_CHECK(self.dim() > 0 && self.dim() <= 2, "prob_dist must be 1 or 2 dim");
  TORCH_CHECK(at::isFloatingType(self.scalar_type()),
              "multinomial only supports floating-point dtypes for input, got: ", self.scalar_type());
  TORCH_CHECK(result.scalar_type() == at::kLong,
              "multinomial expects Long tensor out, got: ", result.scalar_type());
  TORCH_CHECK(n_sample > 0, "cannot sample n_sample <= 0 samples");
  const int64_t n_categories = self.size(-1);
  TORCH_CHECK(with_replacement || (n_sample <= n_categories),
              "cannot sample n_sample > prob_dist.size(-1) samples without replacement");
  TORCH_CHECK(n_categories <= (int64_t(1) << 24), "number of categories cannot exceed 2^24");
  const int64_t rows = self.dim() == 1 ? 1 : self.size(0);
  if (self.dim() == 1) {
    result.resize_({n_sample});
  } else {
    result.resize_({rows, n_sample});
  }
  if (result.numel() == 0) return result;

  at::Tensor probs = hostView(self).to(at::kDouble).contiguous().view({rows, n_categories});
  const double* pd = probs.data_ptr<double>();
  // As CPU: sampling one, or without replacement, uses the exponential race
  // (argmax / top-k of p_j / E_j with E_j ~ Exp(1)); n > 1 with replacement
  // inverts the cumulative distribution.
  const bool race = !with_replacement || n_sample == 1;
  if (race) {
    bool valid = true;
    bool zero_row = false;
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0;
      for (int64_t j = 0; j < n_categories; ++j) {
        const double v = pd[r * n_categories + j];
        valid &= v >= 0 && v < std::numeric_limits<double>::infinity();
        sum += v;
      }
      zero_row |= sum == 0;
    }
    TORCH_CHECK(valid, "probability tensor contains either `inf`, `nan` or element < 0");
    TORCH_CHECK(!zero_row, "invalid multinomial distribution (sum of probabilities <= 0)");
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0;
      for (int64_t j = 0; j < n_categories; ++j) {
        const double v = pd[r * n_categories + j];
        TORCH_CHECK(v >= 0, "invalid multinomial distribution (encountering probability entry < 0)");
        TORCH_CHECK(std::isfinite(v),
                    "invalid multinomial distribution (encountering probability entry = infinity or NaN)");
        sum += v;
      }
      TORCH_CHECK(sum > 0, "invalid multinomial distribution (sum of probabilities <= 0)");
    }
  }
  // Each row consumes a whole number of blocks: 2 words per category (race)
  // or per sample (inversion), rounded up to a multiple of 4.
  const int64_t row_words = ((2 * (race ? n_categories : n_sample)) + 3) / 4 * 4;
  PhiloxGenerator* g = gen(generator, self);
  const PhiloxStream s = reserveWords(g, static_cast<u64>(rows) * row_words);
  at::Tensor out = result.is_contiguous() ? result : at::empty(result.sizes(), result.options());
  int64_t* od = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<u32> words(static_cast<std::size_t>(row_words));
    std::vector<double> acc(static_cast<std::size_t>(n_categories));
    std::vector<int64_t> idx;
    for (int64_t r = r0; r < r1; ++r) {
      rng::kernels().philox(s.seed, s.offset + static_cast<u64>(r * row_words / 4),
                            static_cast<std::size_t>(row_words / 4), words.data());
      const double* p = pd + r * n_categories;
      int64_t* o = od + r * n_sample;
      if (race) {
        for (int64_t j = 0; j < n_categories; ++j) {
          acc[j] = p[j] / -std::log(unitOpen53(words.data() + 2 * j));  // p_j / E_j
        }
        idx.resize(static_cast<std::size_t>(n_categories));
        std::iota(idx.begin(), idx.end(), int64_t{0});
        auto larger = [&](int64_t a, int64_t b) {
          return acc[a] > acc[b] || (acc[a] == acc[b] && a < b);
        };
        std::partial_sort(idx.begin(), idx.begin() + n_sample, idx.end(), larger);
        std::copy(idx.begin(), idx.begin() + n_sample, o);
      } else {
        double sum = 0;
        int64_t last_positive = 0;
        for (int64_t j = 0; j < n_categories; ++j) {
          sum += p[j];
          acc[j] = sum;
          if (p[j] > 0) last_positive = j;
        }
        for (int64_t k = 0; k < n_sample; ++k) {
          const double target = unitClosedOpen53(words.data() + 2 * k) * sum;
          auto it = std::upper_bound(acc.begin(), acc.end(), target);
          int64_t j = it - acc.begin();
          o[k] = j >= n_categories ? last_positive : j;
        }
      }
    }
  });
  if (!out.is_same(result)) result.copy_(out);
  return result;
}

at::Tensor multinomial(const at::Tensor& self, int64_t n_sample, bool with_replacement,
                       std::optional<at::Generator> generator) {
  at::Tensor result = at::empty({0}, self.options().dtype(at::kLong));
  multinomial_out(self, n_sample, with_replacement, std::move(generator), result);
  return result;
}

// ----------------------------------------------------------------- dropout

std::tuple<at::Tensor, at::Tensor> native_dropout(const at::Tensor& input, double p,
                                                  std::optional<bool> train) {
  if (input.numel() == 0) {
    return std::make_tuple(input, at::empty_like(input, input.options()));
  }
  if (train.has_value() && !*train) {
    // The input's layout (channels_last stays channels_last), as on CPU.
    at::Tensor mask = at::empty_like(input, input.options().dtype(at::kBool));
    mask.fill_(true);
    return std::make_tuple(input.clone(), mask);
  }
  const double p1m = 1. - p;
  TORCH_CHECK(0 <= p1m && p1m <= 1, "bernoulli_ expects p to be in [0, 1], but got p=", p1m);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "result type Float can't be cast to the desired output type ", input.scalar_type());
  // Avoid dividing by zero when every element is dropped.
  const double scale = p1m == 0 ? 0. : 1. / p1m;
  at::Tensor in = hostView(input).contiguous();
  at::Tensor output = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty_like(input, input.options().dtype(at::kBool),
                                   at::MemoryFormat::Contiguous);
  PhiloxGenerator* g = gen(std::nullopt, input);
  const PhiloxStream s = reserveWords(g, static_cast<u64>(input.numel()));
  const double threshold = p1m * 0x1p32;
  bool* md = mask.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "native_dropout", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = in.data_ptr<scalar_t>();
    scalar_t* o = static_cast<scalar_t*>(output.data_ptr());
    const acc_t sc = static_cast<acc_t>(scale);
    forChunks(input.numel(), [&](int64_t begin, int64_t count) {
      u32 buf[kChunk + 4];
      fetch<1>(s, begin, count, buf);
      for (int64_t i = begin; i < begin + count; ++i) {
        const bool keep = static_cast<double>(buf[i - begin]) < threshold;
        md[i] = keep;
        // As CPU: input * mask, then * scale, each rounded to the dtype.
        const auto masked = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * acc_t(keep ? 1 : 0));
        o[i] = static_cast<scalar_t>(static_cast<acc_t>(masked) * sc);
      }
    });
  });
  // Element i (in logical order) takes word i whatever the layout; outputs
  // keep the input's layout, as CPU's and CUDA's do (empty_like preserves it).
  if (!input.is_contiguous()) {
    at::Tensor out_l = at::empty_like(input);
    at::Tensor mask_l = at::empty_like(input, input.options().dtype(at::kBool));
    out_l.copy_(output);
    mask_l.copy_(mask);
    return std::make_tuple(out_l, mask_l);
  }
  return std::make_tuple(output, mask);
}

// ------------------------------------------------- normal(Tensor, Tensor)

c10::DimVector broadcastShape(c10::IntArrayRef a, c10::IntArrayRef b) {
  const std::size_t n = std::max(a.size(), b.size());
  c10::DimVector out(n);
  for (std::size_t k = 0; k < n; ++k) {
    const std::ptrdiff_t ia = static_cast<std::ptrdiff_t>(a.size()) - 1 - static_cast<std::ptrdiff_t>(k);
    const std::ptrdiff_t ib = static_cast<std::ptrdiff_t>(b.size()) - 1 - static_cast<std::ptrdiff_t>(k);
    const int64_t sa = ia >= 0 ? a[ia] : 1;
    const int64_t sb = ib >= 0 ? b[ib] : 1;
    TORCH_CHECK(sa == sb || sa == 1 || sb == 1, "The size of tensor a (", sa,
                ") must match the size of tensor b (", sb, ") at non-singleton dimension ",
                n - 1 - k);
    out[n - 1 - k] = sa == 1 ? sb : sa;
  }
  return out;
}

void resizeOutput(at::Tensor& output, c10::IntArrayRef shape) {
  if (output.sizes() == shape) return;
  if (output.numel() != 0) {
    TORCH_WARN("An output with one or more elements was resized since it had shape ",
               output.sizes(), ", which does not match the required output shape ", shape, ". ",
               "This behavior is deprecated, and in a future PyTorch release outputs will not "
               "be resized unless they have zero elements. You can explicitly reuse an out "
               "tensor t by resizing it, inplace, to zero elements with t.resize_(0).");
  }
  output.resize_(shape);
}

void checkStdTensor(const at::Tensor& std) {
  TORCH_CHECK(!std.is_complex(), "normal expects standard deviation to be non-complex");
  TORCH_CHECK(std.numel() == 0 || std.min().ge(0).item<bool>(),
              "normal expects all elements of std >= 0.0");
}

at::Tensor& normal_tensor_float_out(const at::Tensor& mean, double std,
                                    std::optional<at::Generator> generator, at::Tensor& output) {
  TORCH_CHECK(std >= 0.0, "normal expects std >= 0.0, but found std ", std);
  resizeOutput(output, broadcastShape(mean.sizes(), output.sizes()));
  normal_(output, 0, std, generator);
  output.add_(mean);
  return output;
}

at::Tensor& normal_float_tensor_out(double mean, const at::Tensor& std,
                                    std::optional<at::Generator> generator, at::Tensor& output) {
  checkStdTensor(std);
  resizeOutput(output, std.sizes());
  normal_(output, 0, 1, generator);
  output.mul_(std).add_(mean);
  return output;
}

at::Tensor& normal_tensor_tensor_out(const at::Tensor& mean, const at::Tensor& std,
                                     std::optional<at::Generator> generator, at::Tensor& output) {
  checkStdTensor(std);
  resizeOutput(output, broadcastShape(mean.sizes(), std.sizes()));
  normal_(output, 0, 1, generator);
  output.mul_(std).add_(mean);
  return output;
}

at::Tensor normal_tensor_float(const at::Tensor& mean, double std,
                               std::optional<at::Generator> generator) {
  TORCH_CHECK(std >= 0.0, "normal expects std >= 0.0, but found std ", std);
  at::Tensor ret = at::empty_like(mean, at::MemoryFormat::Contiguous);
  return normal_tensor_float_out(mean, std, std::move(generator), ret);
}

at::Tensor normal_float_tensor(double mean, const at::Tensor& std,
                               std::optional<at::Generator> generator) {
  checkStdTensor(std);
  at::Tensor ret = at::empty_like(std, at::MemoryFormat::Contiguous);
  return normal_float_tensor_out(mean, std, std::move(generator), ret);
}

at::Tensor normal_tensor_tensor(const at::Tensor& mean, const at::Tensor& std,
                                std::optional<at::Generator> generator) {
  checkStdTensor(std);
  at::Tensor ret = at::empty(broadcastShape(mean.sizes(), std.sizes()), mean.options(),
                             at::MemoryFormat::Contiguous);
  return normal_tensor_tensor_out(mean, std, std::move(generator), ret);
}

} // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("uniform_", TORCH_FN(uniform_));
  m.impl("normal_", TORCH_FN(normal_));
  m.impl("log_normal_", TORCH_FN(log_normal_));
  m.impl("exponential_", TORCH_FN(exponential_));
  m.impl("geometric_", TORCH_FN(geometric_));
  m.impl("cauchy_", TORCH_FN(cauchy_));
  m.impl("random_", TORCH_FN(random_));
  m.impl("random_.from", TORCH_FN(random_from));
  m.impl("random_.to", TORCH_FN(random_to));
  m.impl("bernoulli_.float", TORCH_FN(bernoulli_float_));
  m.impl("bernoulli_.Tensor", TORCH_FN(bernoulli_tensor_));
  m.impl("bernoulli.out", TORCH_FN(bernoulli_out));
  m.impl("randperm.generator_out", TORCH_FN(randperm_out));
  m.impl("multinomial", TORCH_FN(multinomial));
  m.impl("multinomial.out", TORCH_FN(multinomial_out));
  m.impl("native_dropout", TORCH_FN(native_dropout));
  m.impl("normal.Tensor_float", TORCH_FN(normal_tensor_float));
  m.impl("normal.Tensor_float_out", TORCH_FN(normal_tensor_float_out));
  m.impl("normal.float_Tensor", TORCH_FN(normal_float_tensor));
  m.impl("normal.float_Tensor_out", TORCH_FN(normal_float_tensor_out));
  m.impl("normal.Tensor_Tensor", TORCH_FN(normal_tensor_tensor));
  m.impl("normal.Tensor_Tensor_out", TORCH_FN(normal_tensor_tensor_out));
}

} // namespace torch_mps_ext
