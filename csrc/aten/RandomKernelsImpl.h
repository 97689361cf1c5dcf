// Layer 3: body of the random kernels (see RandomKernels.h). Included by
// RandomKernels.cpp and RandomKernelsAVX2.cpp inside a namespace of their
// own, after all standard headers, so each TU compiles it for its ISA.
//
// Written as plain loops over short arrays (structure of arrays) so that the
// compiler vectorizes them; math is own polynomials (no libm calls) so the
// loops vectorize and give the same bits on every path.

constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr std::size_t kTile = 64;

inline void philoxTile(std::uint32_t k0, std::uint32_t k1, std::uint64_t first,
                       std::size_t n, std::uint32_t* __restrict out) {
  alignas(64) std::uint32_t c0[kTile], c1[kTile], c2[kTile], c3[kTile];
  for (std::size_t i = 0; i < kTile; ++i) {
    std::uint64_t ctr = first + i;
    c0[i] = static_cast<std::uint32_t>(ctr);
    c1[i] = static_cast<std::uint32_t>(ctr >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  for (int round = 0; round < 10; ++round) {
    for (std::size_t i = 0; i < kTile; ++i) {
      std::uint64_t p0 = static_cast<std::uint64_t>(kM0) * c0[i];
      std::uint64_t p1 = static_cast<std::uint64_t>(kM1) * c2[i];
      std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      std::uint32_t n1 = static_cast<std::uint32_t>(p1);
      std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      std::uint32_t n3 = static_cast<std::uint32_t>(p0);
      c0[i] = n0;
      c1[i] = n1;
      c2[i] = n2;
      c3[i] = n3;
    }
    k0 += kW0;
    k1 += kW1;
  }
  if (n == kTile) {
    for (std::size_t i = 0; i < kTile; ++i) {
      out[4 * i] = c0[i];
      out[4 * i + 1] = c1[i];
      out[4 * i + 2] = c2[i];
      out[4 * i + 3] = c3[i];
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      out[4 * i] = c0[i];
      out[4 * i + 1] = c1[i];
      out[4 * i + 2] = c2[i];
      out[4 * i + 3] = c3[i];
    }
  }
}

inline void philox(std::uint64_t seed, std::uint64_t first_block, std::size_t nblocks,
                   std::uint32_t* out) {
  const auto k0 = static_cast<std::uint32_t>(seed);
  const auto k1 = static_cast<std::uint32_t>(seed >> 32);
  for (std::size_t b = 0; b < nblocks; b += kTile) {
    std::size_t n = nblocks - b < kTile ? nblocks - b : kTile;
    philoxTile(k0, k1, first_block + b, n, out + 4 * b);
  }
}

inline float bitsToFloat(std::uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}

inline std::uint32_t floatToBits(float f) {
  std::uint32_t b;
  __builtin_memcpy(&b, &f, 4);
  return b;
}

// mask ? a : b for an all-ones/all-zeros mask, in integer operations: GCC
// does not if-convert float selects under -ftrapping-math, which would stop
// the loops from vectorizing.
inline float select(std::uint32_t mask, float a, float b) {
  return bitsToFloat((floatToBits(a) & mask) | (floatToBits(b) & ~mask));
}

inline void uniformFloat(const std::uint32_t* __restrict w, std::size_t n, float from,
                         float to, float* __restrict out) {
  const float range = to - from;
  for (std::size_t i = 0; i < n; ++i) {
    float u = static_cast<float>(static_cast<std::int32_t>(w[i] >> 8)) * 0x1p-24f;
    float v = u * range + from;
    // v >= to  <=>  !(v < to); written as a mask (see select).
    out[i] = select(0u - static_cast<std::uint32_t>(!(v < to)), from, v);
  }
}

// Natural log for x in [2^-126, 1] (Cephes logf: x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), a degree-9 polynomial in m - 1; ~1 ulp). Branch-free
// so that loops calling it vectorize.
inline float logPositive(float x) {
  const std::uint32_t bits = floatToBits(x);
  std::int32_t e = static_cast<std::int32_t>((bits >> 23) & 0xffu) - 126;
  float m = bitsToFloat((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  // m < sqrt(1/2) (0x3f3504f3), compared on the mantissa bits.
  const std::uint32_t small = 0u - static_cast<std::uint32_t>((bits & 0x007fffffu) < 0x003504f3u);
  e -= static_cast<std::int32_t>(small & 1u);
  m = select(small, m + m, m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// sqrt(x) for x >= 0 by Newton's method from a bit-level first guess (a
// libm/builtin sqrt would carry errno and stop vectorization). Relative error
// ~1 ulp; 0 for x == 0.
inline float sqrtNonNegative(float x) {
  float y = bitsToFloat(0x1fbd1df5u + (floatToBits(x) >> 1));
  y = 0.5f * (y + x / y);
  y = 0.5f * (y + x / y);
  y = 0.5f * (y + x / y);
  return select(0u - static_cast<std::uint32_t>(floatToBits(x) != 0u), y, 0.0f);
}

inline void normalFloat(const std::uint32_t* __restrict w, std::size_t npairs, float mean,
                        float std, float* __restrict out) {
  for (std::size_t p = 0; p < npairs; ++p) {
    const float u1 =
        (static_cast<float>(static_cast<std::int32_t>(w[2 * p] >> 1)) + 0.5f) * 0x1p-31f;
    const std::int32_t t = static_cast<std::int32_t>(w[2 * p + 1] >> 8);  // u2 * 2^24
    // 2 pi u2 = q pi/2 + a, |a| <= pi/4: q = round(4 u2), exact in integers.
    const std::int32_t q = (t + (1 << 21)) >> 22;
    const float f = static_cast<float>(t - (q << 22)) * 0x1p-24f;  // [-1/8, 1/8]
    const float a = f * 6.28318530717958647692f;
    const float a2 = a * a;
    float s = -1.9515295891e-4f;
    s = s * a2 + 8.3321608736e-3f;
    s = s * a2 - 1.6666654611e-1f;
    s = s * a2 * a + a;
    float c = 2.443315711809948e-5f;
    c = c * a2 - 1.388731625493765e-3f;
    c = c * a2 + 4.166664568298827e-2f;
    c = c * a2 * a2 - 0.5f * a2 + 1.0f;
    // Rotate by q quarter turns: odd q swaps sin and cos; the sign of sin
    // flips for q = 2, 3 and that of cos for q = 1, 2 (bit masks, no branches).
    const std::uint32_t swap = 0u - static_cast<std::uint32_t>(q & 1);
    const std::uint32_t sb = floatToBits(s), cb = floatToBits(c);
    const std::uint32_t sin_bits =
        ((cb & swap) | (sb & ~swap)) ^ (static_cast<std::uint32_t>(q & 2) << 30);
    const std::uint32_t cos_bits =
        ((sb & swap) | (cb & ~swap)) ^ (static_cast<std::uint32_t>((q + 1) & 2) << 30);
    const float r = sqrtNonNegative(-2.0f * logPositive(u1));
    out[2 * p] = r * bitsToFloat(cos_bits) * std + mean;
    out[2 * p + 1] = r * bitsToFloat(sin_bits) * std + mean;
  }
}

inline Kernels makeKernels() {
  return Kernels{&philox, &uniformFloat, &normalFloat};
}
