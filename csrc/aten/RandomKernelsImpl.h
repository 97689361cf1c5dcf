// Layer 3: body of the random kernels (see RandomKernels.h). Included by
// RandomKernels.cpp and RandomKernelsAVX2.cpp inside a namespace of their
// own, after all standard headers, so each TU compiles it for its ISA.
//
// Written as plain loops over short arrays (structure of arrays) so that the
// compiler vectorizes them; math is own polynomials (no libm calls) so the
// loops vectorize and give the same bits on every path.

constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// One block, scalar (remainders, non-x86 hosts).
inline void philoxOne(std::uint32_t k0, std::uint32_t k1, std::uint64_t ctr,
                      std::uint32_t* out) {
  std::uint32_t c0 = static_cast<std::uint32_t>(ctr), c1 = static_cast<std::uint32_t>(ctr >> 32);
  std::uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kM0) * c0;
    const std::uint64_t p1 = static_cast<std::uint64_t>(kM1) * c2;
    const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<std::uint32_t>(p1);
    c3 = static_cast<std::uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

#if defined(MPS_EXT_RNG_AVX2)
// Philox on W blocks at once: 32-bit lanes, structure of arrays. The 32x32
// -> 64-bit products come from mul_epu32 on the even lanes and on the odd
// lanes shifted down; integer math, so every ISA gives the same bits.
#if defined(MPS_EXT_RNG_AVX2)
using Vec = __m256i;
constexpr std::size_t kLanes = 8;
inline Vec vset1(std::uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline Vec vset1_64(std::uint64_t x) { return _mm256_set1_epi64x(static_cast<long long>(x)); }
inline Vec vload(const std::uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const Vec*>(p)); }
inline void vstore(std::uint32_t* p, Vec v) { _mm256_storeu_si256(reinterpret_cast<Vec*>(p), v); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_epu32(a, b); }
inline Vec vsrl64(Vec a) { return _mm256_srli_epi64(a, 32); }
inline Vec vsll64(Vec a) { return _mm256_slli_epi64(a, 32); }
inline Vec vand(Vec a, Vec b) { return _mm256_and_si256(a, b); }
inline Vec vor(Vec a, Vec b) { return _mm256_or_si256(a, b); }
inline Vec vxor(Vec a, Vec b) { return _mm256_xor_si256(a, b); }
inline Vec vunpacklo32(Vec a, Vec b) { return _mm256_unpacklo_epi32(a, b); }
inline Vec vunpackhi32(Vec a, Vec b) { return _mm256_unpackhi_epi32(a, b); }
inline Vec vunpacklo64(Vec a, Vec b) { return _mm256_unpacklo_epi64(a, b); }
inline Vec vunpackhi64(Vec a, Vec b) { return _mm256_unpackhi_epi64(a, b); }
#endif

// kLanes blocks first, first + 1, ... into out (4 words each, interleaved).
inline void philoxLanes(std::uint32_t k0, std::uint32_t k1, std::uint64_t first,
                        std::uint32_t* out) {
  alignas(32) std::uint32_t lo[kLanes], hi[kLanes];
  for (std::size_t i = 0; i < kLanes; ++i) {
    lo[i] = static_cast<std::uint32_t>(first + i);
    hi[i] = static_cast<std::uint32_t>((first + i) >> 32);
  }
  Vec c0 = vload(lo), c1 = vload(hi), c2 = vset1(0), c3 = vset1(0);
  const Vec m0 = vset1(kM0), m1 = vset1(kM1);
  const Vec mask_lo = vset1_64(0xffffffffULL), mask_hi = vset1_64(0xffffffff00000000ULL);
  for (int round = 0; round < 10; ++round) {
    const Vec e0 = vmul(c0, m0), o0 = vmul(vsrl64(c0), m0);
    const Vec e1 = vmul(c2, m1), o1 = vmul(vsrl64(c2), m1);
    const Vec lo0 = vor(vand(e0, mask_lo), vsll64(o0));
    const Vec hi0 = vor(vsrl64(e0), vand(o0, mask_hi));
    const Vec lo1 = vor(vand(e1, mask_lo), vsll64(o1));
    const Vec hi1 = vor(vsrl64(e1), vand(o1, mask_hi));
    const Vec n0 = vxor(vxor(hi1, c1), vset1(k0));
    const Vec n2 = vxor(vxor(hi0, c3), vset1(k1));
    c1 = lo1;
    c3 = lo0;
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
  // Transpose (c0, c1, c2, c3) lanes into blocks of 4 words.
  const Vec t0 = vunpacklo32(c0, c1), t1 = vunpacklo32(c2, c3);
  const Vec t2 = vunpackhi32(c0, c1), t3 = vunpackhi32(c2, c3);
  const Vec r0 = vunpacklo64(t0, t1), r1 = vunpackhi64(t0, t1);
  const Vec r2 = vunpacklo64(t2, t3), r3 = vunpackhi64(t2, t3);
  // Each 128-bit half holds blocks (0..3) and (4..7).
  vstore(out, _mm256_permute2x128_si256(r0, r1, 0x20));
  vstore(out + 8, _mm256_permute2x128_si256(r2, r3, 0x20));
  vstore(out + 16, _mm256_permute2x128_si256(r0, r1, 0x31));
  vstore(out + 24, _mm256_permute2x128_si256(r2, r3, 0x31));
}
#define MPS_EXT_RNG_HAVE_LANES 1
#else
// Baseline ISA: plain loops over a tile of blocks that the compiler
// vectorizes (SSE2), measured faster here than hand-written SSE2.
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

#endif

inline void philox(std::uint64_t seed, std::uint64_t first_block, std::size_t nblocks,
                   std::uint32_t* out) {
  const auto k0 = static_cast<std::uint32_t>(seed);
  const auto k1 = static_cast<std::uint32_t>(seed >> 32);
  std::size_t b = 0;
#ifdef MPS_EXT_RNG_HAVE_LANES
  for (; b + kLanes <= nblocks; b += kLanes) philoxLanes(k0, k1, first_block + b, out + 4 * b);
#else
  for (; b + kTile <= nblocks; b += kTile) philoxTile(k0, k1, first_block + b, kTile, out + 4 * b);
#endif
  for (; b < nblocks; ++b) philoxOne(k0, k1, first_block + b, out + 4 * b);
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

// In-place sqrt of n floats with the ISA's sqrt instruction (IEEE correctly
// rounded, so every build gives the same bits; a sqrt call in the main loop
// would carry errno and stop it from vectorizing).
inline void sqrtInPlace(float* x, std::size_t n) {
  std::size_t i = 0;
#if defined(MPS_EXT_RNG_AVX2)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
#elif defined(__SSE2__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = __builtin_sqrtf(x[i]);
}

inline void normalFloat(const std::uint32_t* __restrict w, std::size_t npairs, float mean,
                        float std, float* __restrict out) {
  constexpr std::size_t kSub = 256;
  alignas(32) float r[kSub], cs[kSub], sn[kSub];
  for (std::size_t base = 0; base < npairs; base += kSub) {
    const std::size_t m = npairs - base < kSub ? npairs - base : kSub;
    const std::uint32_t* wb = w + 2 * base;
    for (std::size_t p = 0; p < m; ++p) {
      const float u1 =
          (static_cast<float>(static_cast<std::int32_t>(wb[2 * p] >> 1)) + 0.5f) * 0x1p-31f;
      const std::int32_t t = static_cast<std::int32_t>(wb[2 * p + 1] >> 8);  // u2 * 2^24
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
      sn[p] = bitsToFloat(((cb & swap) | (sb & ~swap)) ^ (static_cast<std::uint32_t>(q & 2) << 30));
      cs[p] = bitsToFloat(((sb & swap) | (cb & ~swap)) ^
                          (static_cast<std::uint32_t>((q + 1) & 2) << 30));
      r[p] = -2.0f * logPositive(u1);  // >= 0 (log(1) = 0 exactly)
    }
    sqrtInPlace(r, m);
    float* o = out + 2 * base;
    for (std::size_t p = 0; p < m; ++p) {
      o[2 * p] = r[p] * cs[p] * std + mean;
      o[2 * p + 1] = r[p] * sn[p] * std + mean;
    }
  }
}

inline Kernels makeKernels() {
  return Kernels{&philox, &uniformFloat, &normalFloat};
}
