// mpsx_metal.h -- the torch_mps_ext stand-in for Apple's <metal_stdlib>.
//
// Metal Shading Language (MSL) is C++14/17 with a few extra keywords, types
// and builtins.  This header supplies them for the host C++ compiler so that a
// compute kernel written for torch.mps.compile_shader compiles unchanged for
// the host CPU:
//   * address-space keywords (device/constant/thread/threadgroup) and `kernel`
//     become empty macros (the host has one flat address space; threadgroup
//     *storage* declarations are rewritten by the Python front end);
//   * scalar types: half = _Float16, bfloat (a 16-bit struct), uchar/ushort/...
//   * vector types vec<T,N> (float2..4, half2.., int2.., ...) with component
//     access, swizzles (generated on demand: MPSX_SWIZZLES_<N>), arithmetic;
//   * metal:: math (plus precise:: and fast::), integer, relational and
//     geometric functions, as_type, select, clamp, numeric_limits, type traits;
//   * metal::array, atomics, threadgroup_barrier and the simd-group functions,
//     which cooperate with the fiber scheduler at the end of this file.
// See docs/shaders.md for the execution model.
#pragma once

#ifndef MPSX_PARSE  // the parse pass only needs macros, not declarations

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <initializer_list>
#include <sys/mman.h>

// Vector math (global scope: the builtins only see attributes of the global
// declarations): declared as SIMD functions (GCC's simd attribute), the host libm's elementary
// functions vectorize in run_loop's thread loops through glibc's libmvec (linked by the
// shader compiler). libmvec's single-precision functions are within 4 ulp, the bound Metal
// gives its precise:: functions; without this, sin/exp/log ran one element at a time, 3-5x
// slower than torch's CPU kernels. glibc 2.22 has sin/cos/exp/log, 2.35 the others here
// (not expm1f/log1pf: c10/metal/special_math.h defines functions of those names).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && \
    !defined(MPSX_NO_LIBMVEC)
#define MPSX_SIMD_DECL(name) float name##f(float) noexcept __attribute__((simd("notinbranch")));
extern "C" {
MPSX_SIMD_DECL(sin) MPSX_SIMD_DECL(cos) MPSX_SIMD_DECL(exp) MPSX_SIMD_DECL(log)
#if __GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35)
MPSX_SIMD_DECL(acos) MPSX_SIMD_DECL(acosh) MPSX_SIMD_DECL(asin) MPSX_SIMD_DECL(asinh)
MPSX_SIMD_DECL(atan) MPSX_SIMD_DECL(atanh) MPSX_SIMD_DECL(cosh) MPSX_SIMD_DECL(exp2)
MPSX_SIMD_DECL(exp10) MPSX_SIMD_DECL(log10)
MPSX_SIMD_DECL(log2) MPSX_SIMD_DECL(sinh) MPSX_SIMD_DECL(tan) MPSX_SIMD_DECL(tanh)
#endif
}
#undef MPSX_SIMD_DECL
#endif

#ifndef MPSX_SWIZZLES_2
#define MPSX_SWIZZLES_2(T)
#endif
#ifndef MPSX_SWIZZLES_3
#define MPSX_SWIZZLES_3(T)
#endif
#ifndef MPSX_SWIZZLES_4
#define MPSX_SWIZZLES_4(T)
#endif

#define MPSX_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------- scalars
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static constexpr uint16_t from_float(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return uint16_t(u >> 16);
  }
  constexpr bfloat(float f) : bits(from_float(f)) {}
  template <class U, std::enable_if_t<(std::is_arithmetic<U>::value || std::is_same<U, _Float16>::value) &&
                                          !std::is_same<U, float>::value, int> = 0>
  constexpr bfloat(U u) : bits(from_float(float(u))) {}
  constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits) << 16); }
  static constexpr bfloat from_bits(uint16_t b) { bfloat r{}; r.bits = b; return r; }
  template <class U> bfloat& operator+=(U o) { return *this = bfloat(float(*this) + float(o)); }
  template <class U> bfloat& operator-=(U o) { return *this = bfloat(float(*this) - float(o)); }
  template <class U> bfloat& operator*=(U o) { return *this = bfloat(float(*this) * float(o)); }
  template <class U> bfloat& operator/=(U o) { return *this = bfloat(float(*this) / float(o)); }
  bfloat operator-() const { return from_bits(uint16_t(bits ^ 0x8000u)); }
  bfloat operator+() const { return *this; }
};
#define MPSX_BF_OP(op)                                                                     \
  template <class A, class B, std::enable_if_t<std::is_same<A, bfloat>::value && std::is_same<B, bfloat>::value, int> = 0> \
  MPSX_INLINE bfloat operator op(A a, B b) { return bfloat(float(a) op float(b)); }
MPSX_BF_OP(+)
MPSX_BF_OP(-)
MPSX_BF_OP(*)
MPSX_BF_OP(/)
#undef MPSX_BF_OP
#define MPSX_BF_CMP(op)                                                                    \
  template <class A, class B, std::enable_if_t<std::is_same<A, bfloat>::value && std::is_same<B, bfloat>::value, int> = 0> \
  MPSX_INLINE bool operator op(A a, B b) { return float(a) op float(b); }
MPSX_BF_CMP(==)
MPSX_BF_CMP(!=)
MPSX_BF_CMP(<)
MPSX_BF_CMP(>)
MPSX_BF_CMP(<=)
MPSX_BF_CMP(>=)
#undef MPSX_BF_CMP

// ---------------------------------------------------------------- macros
#define MAXFLOAT __builtin_huge_valf()
#define HUGE_VALF __builtin_huge_valf()
#define HUGE_VALH ((half)__builtin_huge_valf())
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_MAX 3.402823466e+38f
#define FLT_MIN 1.175494351e-38f
#define FLT_EPSILON 1.192092896e-07f
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)6.103515625e-05f)
#define HALF_EPSILON ((half)0.0009765625f)
#define DBL_MAX 1.7976931348623157e+308L
#define CHAR_BIT 8
#define SCHAR_MAX 127
#define SCHAR_MIN (-128)
#define UCHAR_MAX 255
#define CHAR_MAX SCHAR_MAX
#define CHAR_MIN SCHAR_MIN
#define USHRT_MAX 65535
#define SHRT_MAX 32767
#define SHRT_MIN (-32768)
#define UINT_MAX 0xffffffffU
#define INT_MAX 2147483647
#define INT_MIN (-2147483647 - 1)
#define ULONG_MAX 0xffffffffffffffffUL
#define LONG_MAX 0x7fffffffffffffffL
#define LONG_MIN (-LONG_MAX - 1)
#define M_E_F 2.718281828459045f
#define M_LOG2E_F 1.4426950408889634f
#define M_LOG10E_F 0.4342944819032518f
#define M_LN2_F 0.6931471805599453f
#define M_LN10_F 2.302585092994046f
#define M_PI_F 3.141592653589793f
#define M_PI_2_F 1.5707963267948966f
#define M_PI_4_F 0.7853981633974483f
#define M_1_PI_F 0.3183098861837907f
#define M_2_PI_F 0.6366197723675814f
#define M_2_SQRTPI_F 1.1283791670955126f
#define M_SQRT2_F 1.4142135623730951f
#define M_SQRT1_2_F 0.7071067811865476f
#define M_E_H ((half)M_E_F)
#define M_LOG2E_H ((half)M_LOG2E_F)
#define M_LOG10E_H ((half)M_LOG10E_F)
#define M_LN2_H ((half)M_LN2_F)
#define M_LN10_H ((half)M_LN10_F)
#define M_PI_H ((half)M_PI_F)
#define M_PI_2_H ((half)M_PI_2_F)
#define M_PI_4_H ((half)M_PI_4_F)
#define M_1_PI_H ((half)M_1_PI_F)
#define M_2_PI_H ((half)M_2_PI_F)
#define M_2_SQRTPI_H ((half)M_2_SQRTPI_F)
#define M_SQRT2_H ((half)M_SQRT2_F)
#define M_SQRT1_2_H ((half)M_SQRT1_2_F)

namespace metal {

// ---------------------------------------------------------------- traits
using std::conditional;
using std::conditional_t;
using std::declval;
using std::decay;
using std::decay_t;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_const;
using std::is_const_v;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_pointer;
using std::is_pointer_v;
using std::is_same;
using std::is_same_v;
using std::is_unsigned;
using std::is_unsigned_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_pointer_t;
using std::remove_reference;
using std::remove_reference_t;
using std::true_type;
using std::bool_constant;
using std::is_class_v;
using std::is_enum_v;
using std::is_trivially_copyable_v;
using std::is_void_v;
using std::is_reference_v;
using std::move;
using std::forward;
using std::integer_sequence;
using std::make_integer_sequence;

template <class T> struct is_floating_point : std::is_floating_point<T> {};
template <> struct is_floating_point<half> : std::true_type {};
template <> struct is_floating_point<bfloat> : std::true_type {};
template <class T> struct is_floating_point<const T> : is_floating_point<T> {};
template <class T> struct is_floating_point<volatile T> : is_floating_point<T> {};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_arithmetic : std::bool_constant<std::is_arithmetic<T>::value || is_floating_point<T>::value> {};
template <class T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_scalar : std::bool_constant<std::is_scalar<T>::value || is_floating_point<T>::value> {};
template <class T> constexpr bool is_scalar_v = is_scalar<T>::value;
template <class T> struct is_signed : std::bool_constant<std::is_signed<T>::value || is_floating_point<T>::value> {};
template <class T> constexpr bool is_signed_v = is_signed<T>::value;

// ---------------------------------------------------------------- numeric_limits
template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, is_exact = false,
                        has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 11, radix = 2;
  static constexpr half min() { return (half)6.103515625e-05f; }
  static constexpr half max() { return (half)65504.0f; }
  static constexpr half lowest() { return (half)-65504.0f; }
  static constexpr half epsilon() { return (half)0.0009765625f; }
  static constexpr half round_error() { return (half)0.5f; }
  static constexpr half infinity() { return (half)__builtin_inff(); }
  static constexpr half quiet_NaN() { return (half)__builtin_nanf(""); }
  static constexpr half signaling_NaN() { return (half)__builtin_nanf(""); }
  static constexpr half denorm_min() { return (half)5.960464477539063e-08f; }
};
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, is_exact = false,
                        has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 8, radix = 2;
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }
  static constexpr bfloat round_error() { return bfloat::from_bits(0x3f00); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
  static constexpr bfloat signaling_NaN() { return bfloat::from_bits(0x7fc0); }
  static constexpr bfloat denorm_min() { return bfloat::from_bits(0x0001); }
};

// ---------------------------------------------------------------- vectors
template <class T, int N> struct vec;
template <class T, int N, int... I> struct swz;
template <class T, int N> struct packed_vec;

namespace mpsx_d {
template <class T> struct scalar_like : std::bool_constant<is_arithmetic<T>::value> {};
template <class X> struct vt {
  static constexpr bool is = false;
  static constexpr int n = 1;
  using e = X;
};
template <class T, int N> struct vt<vec<T, N>> {
  static constexpr bool is = true;
  static constexpr int n = N;
  using e = T;
};
template <class T, int M, int... I> struct vt<swz<T, M, I...>> {
  static constexpr bool is = true;
  static constexpr int n = sizeof...(I);
  using e = T;
};
template <class T, int N> struct vt<packed_vec<T, N>> {
  static constexpr bool is = true;
  static constexpr int n = N;
  using e = T;
};
template <class X> struct vt<const X> : vt<X> {};
template <class X> struct vt<X&> : vt<X> {};
template <class X> struct vt<const X&> : vt<X> {};
template <class X> constexpr bool is_vecish = vt<std::decay_t<X>>::is;

template <class X> MPSX_INLINE constexpr auto get(const X& x, int i) {
  if constexpr (vt<X>::is) return x[i]; else return x;
}
template <class A, class B> struct common_e {
  using type = std::conditional_t<std::is_same<A, B>::value, A, decltype(declval<A>() + declval<B>())>;
};
template <class A, class B, bool ok = (vt<A>::is || vt<B>::is) && (vt<A>::is || scalar_like<A>::value) &&
                                      (vt<B>::is || scalar_like<B>::value)>
struct bin {
  static constexpr bool value = false;
};
template <class A, class B> struct bin<A, B, true> {
  static constexpr bool value = !(vt<A>::is && vt<B>::is) || vt<A>::n == vt<B>::n;
  static constexpr int n = vt<A>::is ? vt<A>::n : vt<B>::n;
  using e = std::conditional_t<vt<A>::is && vt<B>::is, typename common_e<typename vt<A>::e, typename vt<B>::e>::type,
                               std::conditional_t<vt<A>::is, typename vt<A>::e, typename vt<B>::e>>;
};
}  // namespace mpsx_d

// Swizzle proxy: a view of the parent vector's storage selecting lanes I...
template <class T, int N, int... I>
struct swz {
  T _e[N == 3 ? 4 : N];
  static constexpr int n = sizeof...(I);
  using vtype = vec<T, n>;
  MPSX_INLINE T operator[](int i) const {
    constexpr int idx[] = {I...};
    return _e[idx[i]];
  }
  MPSX_INLINE operator vtype() const { return vtype(_e[I]...); }
  template <class U, std::enable_if_t<mpsx_d::vt<U>::is && mpsx_d::vt<U>::n == n, int> = 0>
  MPSX_INLINE swz& operator=(const U& v) {
    T tmp[n];
    for (int k = 0; k < n; ++k) tmp[k] = T(v[k]);
    int k = 0;
    ((_e[I] = tmp[k++]), ...);
    return *this;
  }
  MPSX_INLINE swz& operator=(const swz& o) {
    vtype t = o;
    return *this = t;
  }
  template <class U, std::enable_if_t<mpsx_d::scalar_like<U>::value, int> = 0>
  MPSX_INLINE swz& operator=(U s) {
    ((_e[I] = T(s)), ...);
    return *this;
  }
#define MPSX_SWZ_CA(op) \
  template <class U> MPSX_INLINE swz& operator op##=(const U& u) { return *this = vtype(vtype(*this) op u); }
  MPSX_SWZ_CA(+) MPSX_SWZ_CA(-) MPSX_SWZ_CA(*) MPSX_SWZ_CA(/) MPSX_SWZ_CA(%) MPSX_SWZ_CA(&) MPSX_SWZ_CA(|)
  MPSX_SWZ_CA(^) MPSX_SWZ_CA(<<) MPSX_SWZ_CA(>>)
#undef MPSX_SWZ_CA
};

#define MPSX_VEC_COMMON(N_)                                                                          \
  using value_type = T;                                                                              \
  static constexpr int n = N_;                                                                       \
  vec() = default;                                                                                   \
  constexpr vec(const vec&) = default;                                                               \
  MPSX_INLINE constexpr vec& operator=(const vec& o) {                                               \
    for (int i = 0; i < N_; ++i) _e[i] = o._e[i];                                                    \
    return *this;                                                                                    \
  }                                                                                                  \
  template <int... K>                                                                                \
  constexpr vec(T s, std::integer_sequence<int, K...>) : _e{((void)K, s)...} {}                      \
  template <class U, int... K>                                                                       \
  constexpr vec(const vec<U, N_>& o, std::integer_sequence<int, K...>) : _e{T(o._e[K])...} {}        \
  template <class U, std::enable_if_t<mpsx_d::scalar_like<U>::value, int> = 0>                       \
  constexpr vec(U s) : vec(T(s), std::make_integer_sequence<int, N_ == 3 ? 4 : N_>{}) {}             \
  template <class U, std::enable_if_t<!std::is_same<U, T>::value, int> = 0>                          \
  explicit constexpr vec(const vec<U, N_>& o) : vec(o, std::make_integer_sequence<int, N_>{}) {}      \
  template <int M, int... I, std::enable_if_t<sizeof...(I) == N_, int> = 0>                          \
  constexpr vec(const swz<T, M, I...>& s) : vec(s._e[I]...) {}                                       \
  template <class U, int M, int... I, std::enable_if_t<sizeof...(I) == N_ && !std::is_same<U, T>::value, int> = 0> \
  explicit constexpr vec(const swz<U, M, I...>& s) : vec(T(s._e[I])...) {}                           \
  template <class... A, std::enable_if_t<(sizeof...(A) >= 2) && (0 + ... + mpsx_d::vt<A>::n) == N_ && \
                                             (false || ... || mpsx_d::vt<A>::is), int> = 0>            \
  MPSX_INLINE vec(const A&... a) {                                                                   \
    int k = 0;                                                                                       \
    (fill_(k, a), ...);                                                                              \
  }                                                                                                  \
  template <class A> MPSX_INLINE void fill_(int& k, const A& a) {                                    \
    if constexpr (mpsx_d::vt<A>::is) {                                                               \
      for (int i = 0; i < mpsx_d::vt<A>::n; ++i) _e[k++] = T(a[i]);                                  \
    } else {                                                                                         \
      _e[k++] = T(a);                                                                                \
    }                                                                                                \
  }                                                                                                  \
  MPSX_INLINE constexpr T& operator[](int i) { return _e[i]; }                                       \
  MPSX_INLINE constexpr const T& operator[](int i) const { return _e[i]; }                           \
  MPSX_VEC_CA(+) MPSX_VEC_CA(-) MPSX_VEC_CA(*) MPSX_VEC_CA(/) MPSX_VEC_CA(%) MPSX_VEC_CA(&)          \
  MPSX_VEC_CA(|) MPSX_VEC_CA(^) MPSX_VEC_CA(<<) MPSX_VEC_CA(>>)                                      \
  MPSX_INLINE vec& operator++() { for (int i = 0; i < N_; ++i) ++_e[i]; return *this; }              \
  MPSX_INLINE vec& operator--() { for (int i = 0; i < N_; ++i) --_e[i]; return *this; }              \
  MPSX_INLINE vec operator++(int) { vec t = *this; ++*this; return t; }                              \
  MPSX_INLINE vec operator--(int) { vec t = *this; --*this; return t; }

#define MPSX_VEC_CA(op)                                                                              \
  template <class U, std::enable_if_t<mpsx_d::vt<U>::is || mpsx_d::scalar_like<U>::value, int> = 0>  \
  MPSX_INLINE vec& operator op##=(const U& u) {                                                      \
    for (int i = 0; i < n; ++i) _e[i] = T(_e[i] op mpsx_d::get(u, i));                               \
    return *this;                                                                                    \
  }

template <class T>
struct alignas(2 * sizeof(T)) vec<T, 2> {
  union {
    T _e[2];
    struct { T x, y; };
    struct { T r, g; };
    MPSX_SWIZZLES_2(T)
  };
  template <class A, class B, std::enable_if_t<mpsx_d::scalar_like<A>::value && mpsx_d::scalar_like<B>::value, int> = 0>
  constexpr vec(A a, B b) : _e{T(a), T(b)} {}
  MPSX_VEC_COMMON(2)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 3> {
  union {
    T _e[4];
    struct { T x, y, z; };
    struct { T r, g, b; };
    MPSX_SWIZZLES_3(T)
  };
  template <class A, class B, class C,
            std::enable_if_t<mpsx_d::scalar_like<A>::value && mpsx_d::scalar_like<B>::value && mpsx_d::scalar_like<C>::value, int> = 0>
  constexpr vec(A a, B b, C c) : _e{T(a), T(b), T(c), T(0)} {}
  MPSX_VEC_COMMON(3)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 4> {
  union {
    T _e[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    MPSX_SWIZZLES_4(T)
  };
  template <class A, class B, class C, class D,
            std::enable_if_t<mpsx_d::scalar_like<A>::value && mpsx_d::scalar_like<B>::value && mpsx_d::scalar_like<C>::value &&
                                 mpsx_d::scalar_like<D>::value, int> = 0>
  constexpr vec(A a, B b, C c, D d) : _e{T(a), T(b), T(c), T(d)} {}
  MPSX_VEC_COMMON(4)
};
#undef MPSX_VEC_CA
#undef MPSX_VEC_COMMON

#define MPSX_VBIN(op)                                                                                \
  template <class A, class B, class D = mpsx_d::bin<A, B>, std::enable_if_t<D::value, int> = 0>      \
  MPSX_INLINE vec<typename D::e, D::n> operator op(const A& a, const B& b) {                         \
    vec<typename D::e, D::n> r;                                                                      \
    for (int i = 0; i < D::n; ++i) r[i] = typename D::e(mpsx_d::get(a, i) op mpsx_d::get(b, i));     \
    return r;                                                                                        \
  }
MPSX_VBIN(+) MPSX_VBIN(-) MPSX_VBIN(*) MPSX_VBIN(/) MPSX_VBIN(%) MPSX_VBIN(&) MPSX_VBIN(|) MPSX_VBIN(^)
MPSX_VBIN(<<) MPSX_VBIN(>>)
#undef MPSX_VBIN
#define MPSX_VCMP(op)                                                                                \
  template <class A, class B, class D = mpsx_d::bin<A, B>, std::enable_if_t<D::value, int> = 0>      \
  MPSX_INLINE vec<bool, D::n> operator op(const A& a, const B& b) {                                  \
    vec<bool, D::n> r;                                                                               \
    for (int i = 0; i < D::n; ++i) r[i] = (mpsx_d::get(a, i) op mpsx_d::get(b, i));                  \
    return r;                                                                                        \
  }
MPSX_VCMP(==) MPSX_VCMP(!=) MPSX_VCMP(<) MPSX_VCMP(>) MPSX_VCMP(<=) MPSX_VCMP(>=) MPSX_VCMP(&&) MPSX_VCMP(||)
#undef MPSX_VCMP
#define MPSX_VUN(op)                                                                                 \
  template <class A, std::enable_if_t<mpsx_d::vt<A>::is, int> = 0>                                   \
  MPSX_INLINE auto operator op(const A& a) {                                                         \
    using E = typename mpsx_d::vt<A>::e;                                                             \
    vec<E, mpsx_d::vt<A>::n> r;                                                                      \
    for (int i = 0; i < mpsx_d::vt<A>::n; ++i) r[i] = E(op a[i]);                                    \
    return r;                                                                                        \
  }
MPSX_VUN(-) MPSX_VUN(+) MPSX_VUN(~)
#undef MPSX_VUN
template <class A, std::enable_if_t<mpsx_d::vt<A>::is, int> = 0>
MPSX_INLINE vec<bool, mpsx_d::vt<A>::n> operator!(const A& a) {
  vec<bool, mpsx_d::vt<A>::n> r;
  for (int i = 0; i < mpsx_d::vt<A>::n; ++i) r[i] = !a[i];
  return r;
}

// packed_floatN & co: no padding, alignment of the element type; convert to and from vec
template <class T, int N> struct packed_vec;
// (constructors constexpr: a program-scope `constant packed_float3 k = ...` is constant-initialized)
#define MPSX_PACKED_COMMON(N_)                                                                       \
  packed_vec() = default;                                                                            \
  MPSX_INLINE T& operator[](int i) { return (&x)[i]; }                                               \
  MPSX_INLINE const T& operator[](int i) const { return (&x)[i]; }                                   \
  template <class U> MPSX_INLINE packed_vec& operator+=(const U& u) { return *this = vec<T, N_>(*this) + u; } \
  template <class U> MPSX_INLINE packed_vec& operator-=(const U& u) { return *this = vec<T, N_>(*this) - u; } \
  template <class U> MPSX_INLINE packed_vec& operator*=(const U& u) { return *this = vec<T, N_>(*this) * u; } \
  template <class U> MPSX_INLINE packed_vec& operator/=(const U& u) { return *this = vec<T, N_>(*this) / u; }
#define MPSX_SCALAR_CTOR template <class U, std::enable_if_t<mpsx_d::scalar_like<U>::value, int> = 0> MPSX_INLINE constexpr
template <class T> struct packed_vec<T, 2> {
  T x, y;
  MPSX_INLINE constexpr packed_vec(T a, T b) : x(a), y(b) {}
  MPSX_INLINE constexpr packed_vec(const vec<T, 2>& v) : x(v._e[0]), y(v._e[1]) {}
  MPSX_SCALAR_CTOR packed_vec(U s) : x(T(s)), y(T(s)) {}
  MPSX_INLINE constexpr operator vec<T, 2>() const { return vec<T, 2>(x, y); }
  MPSX_PACKED_COMMON(2)
};
template <class T> struct packed_vec<T, 3> {
  T x, y, z;
  MPSX_INLINE constexpr packed_vec(T a, T b, T c) : x(a), y(b), z(c) {}
  MPSX_INLINE constexpr packed_vec(const vec<T, 3>& v) : x(v._e[0]), y(v._e[1]), z(v._e[2]) {}
  MPSX_SCALAR_CTOR packed_vec(U s) : x(T(s)), y(T(s)), z(T(s)) {}
  MPSX_INLINE constexpr operator vec<T, 3>() const { return vec<T, 3>(x, y, z); }
  MPSX_PACKED_COMMON(3)
};
template <class T> struct packed_vec<T, 4> {
  T x, y, z, w;
  MPSX_INLINE constexpr packed_vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  MPSX_INLINE constexpr packed_vec(const vec<T, 4>& v) : x(v._e[0]), y(v._e[1]), z(v._e[2]), w(v._e[3]) {}
  MPSX_SCALAR_CTOR packed_vec(U s) : x(T(s)), y(T(s)), z(T(s)), w(T(s)) {}
  MPSX_INLINE constexpr operator vec<T, 4>() const { return vec<T, 4>(x, y, z, w); }
  MPSX_PACKED_COMMON(4)
};
#undef MPSX_SCALAR_CTOR
#undef MPSX_PACKED_COMMON

}  // namespace metal

using metal::vec;
#define MPSX_VTYPES(T, P)            \
  typedef metal::vec<T, 2> P##2;     \
  typedef metal::vec<T, 3> P##3;     \
  typedef metal::vec<T, 4> P##4;     \
  namespace metal {                  \
  typedef ::metal::vec<T, 2> P##2;   \
  typedef ::metal::vec<T, 3> P##3;   \
  typedef ::metal::vec<T, 4> P##4;   \
  typedef ::metal::packed_vec<T, 2> packed_##P##2; \
  typedef ::metal::packed_vec<T, 3> packed_##P##3; \
  typedef ::metal::packed_vec<T, 4> packed_##P##4; \
  }                                  \
  using metal::packed_##P##2;        \
  using metal::packed_##P##3;        \
  using metal::packed_##P##4;
MPSX_VTYPES(float, float)
MPSX_VTYPES(half, half)
MPSX_VTYPES(bfloat, bfloat)
MPSX_VTYPES(int, int)
MPSX_VTYPES(uint, uint)
MPSX_VTYPES(short, short)
MPSX_VTYPES(ushort, ushort)
MPSX_VTYPES(char, char)
MPSX_VTYPES(uchar, uchar)
MPSX_VTYPES(long, long)
MPSX_VTYPES(ulong, ulong)
MPSX_VTYPES(bool, bool)
#undef MPSX_VTYPES
#define MPSX_MTYPES(T, P)                                                                            \
  namespace metal {                                                                                  \
  typedef matrix<T, 2, 2> P##2x2; typedef matrix<T, 2, 3> P##2x3; typedef matrix<T, 2, 4> P##2x4;     \
  typedef matrix<T, 3, 2> P##3x2; typedef matrix<T, 3, 3> P##3x3; typedef matrix<T, 3, 4> P##3x4;     \
  typedef matrix<T, 4, 2> P##4x2; typedef matrix<T, 4, 3> P##4x3; typedef matrix<T, 4, 4> P##4x4;     \
  }                                                                                                  \
  using metal::P##2x2; using metal::P##2x3; using metal::P##2x4; using metal::P##3x2;                \
  using metal::P##3x3; using metal::P##3x4; using metal::P##4x2; using metal::P##4x3; using metal::P##4x4;

namespace metal {
typedef ::half half;
typedef ::bfloat bfloat;
typedef ::uint uint;
typedef ::uchar uchar;
typedef ::ushort ushort;
typedef ::ulong ulong;
}  // namespace metal

// ---------------------------------------------------------------- as_type
template <class To, class From>
MPSX_INLINE To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type requires types of the same size");
  To t;
  __builtin_memcpy(static_cast<void*>(&t), static_cast<const void*>(&f), sizeof(To));
  return t;
}

namespace metal {
using ::as_type;

// ---------------------------------------------------------------- math
namespace mpsx_d {
template <class A, class B> struct promote2 {
  using type = std::conditional_t<
      std::is_same<A, double>::value || std::is_same<B, double>::value, double,
      std::conditional_t<std::is_same<A, float>::value || std::is_same<B, float>::value, float,
                         std::conditional_t<std::is_same<A, half>::value || std::is_same<B, half>::value, half,
                                            std::conditional_t<std::is_same<A, bfloat>::value || std::is_same<B, bfloat>::value,
                                                               bfloat, float>>>>;
};
template <class T> constexpr bool is_fp_ovl = std::is_same<T, float>::value || std::is_same<T, double>::value ||
                                              std::is_same<T, half>::value || std::is_same<T, bfloat>::value;
template <class... A> constexpr bool any_vec = (false || ... || vt<A>::is);
constexpr int cmax() { return 1; }
template <class... R> constexpr int cmax(int a, R... r) { return a > cmax(r...) ? a : cmax(r...); }
template <class... A> constexpr int vn = cmax(vt<A>::n...);
template <class... A> struct first_vec_e;
template <class A, class... R> struct first_vec_e<A, R...> {
  using type = std::conditional_t<vt<A>::is, typename vt<A>::e, typename first_vec_e<R...>::type>;
};
template <> struct first_vec_e<> { using type = float; };
}  // namespace mpsx_d

// float-only unary functions: float/double/half/bfloat overloads, ints -> float, vectors elementwise
#define MPSX_M1(name, fexpr, dexpr)                                                                  \
  MPSX_INLINE float name(float x) { return fexpr; }                                                  \
  MPSX_INLINE double name(double x) { return dexpr; }                                                \
  MPSX_INLINE half name(half h) { return half(name(float(h))); }                                     \
  MPSX_INLINE bfloat name(bfloat h) { return bfloat(name(float(h))); }                               \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                          \
  MPSX_INLINE float name(I i) { return name(float(i)); }                                             \
  template <class V, std::enable_if_t<mpsx_d::vt<V>::is, int> = 0>                                   \
  MPSX_INLINE auto name(const V& v) {                                                                \
    vec<typename mpsx_d::vt<V>::e, mpsx_d::vt<V>::n> r;                                              \
    for (int i = 0; i < mpsx_d::vt<V>::n; ++i) r[i] = name(v[i]);                                    \
    return r;                                                                                        \
  }
#define MPSX_B1(name) MPSX_M1(name, __builtin_##name##f(x), __builtin_##name(x))
MPSX_B1(acos) MPSX_B1(acosh) MPSX_B1(asin) MPSX_B1(asinh) MPSX_B1(atan) MPSX_B1(atanh) MPSX_B1(ceil)
MPSX_B1(cos) MPSX_B1(cosh) MPSX_B1(exp) MPSX_B1(exp2) MPSX_B1(fabs) MPSX_B1(floor) MPSX_B1(log)
MPSX_B1(log10) MPSX_B1(log2) MPSX_B1(rint) MPSX_B1(round) MPSX_B1(sin) MPSX_B1(sinh) MPSX_B1(sqrt)
MPSX_B1(tan) MPSX_B1(tanh) MPSX_B1(trunc)
MPSX_M1(exp10, __builtin_exp2f(x * 3.321928094887362f), __builtin_pow(10.0L, x))
MPSX_M1(rsqrt, 1.0f / __builtin_sqrtf(x), 1.0 / __builtin_sqrt(x))
MPSX_M1(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f), x - __builtin_floor(x))
MPSX_M1(sinpi, __builtin_sinf(x * M_PI_F), __builtin_sin(x * 3.14159265358979323846L))
MPSX_M1(cospi, __builtin_cosf(x * M_PI_F), __builtin_cos(x * 3.14159265358979323846L))
MPSX_M1(tanpi, __builtin_tanf(x * M_PI_F), __builtin_tan(x * 3.14159265358979323846L))
MPSX_M1(saturate, (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)), (x < 0.0 ? 0.0 : (x > 1.0 ? 1.0 : x)))
MPSX_M1(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x != x ? 0.0f : x))), (x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : (x != x ? 0.0 : x))))
MPSX_M1(degrees, x * 57.29577951308232f, x * 57.29577951308232L)
MPSX_M1(radians, x * 0.017453292519943295f, x * 0.017453292519943295L)
#undef MPSX_B1

// float-only binary functions
#define MPSX_M2(name, fexpr, dexpr)                                                                  \
  MPSX_INLINE float name(float x, float y) { return fexpr; }                                         \
  MPSX_INLINE double name(double x, double y) { return dexpr; }                                      \
  MPSX_INLINE half name(half a, half b) { return half(name(float(a), float(b))); }                   \
  MPSX_INLINE bfloat name(bfloat a, bfloat b) { return bfloat(name(float(a), float(b))); }           \
  template <class A, class B,                                                                        \
            std::enable_if_t<mpsx_d::scalar_like<A>::value && mpsx_d::scalar_like<B>::value &&         \
                                 !(std::is_same<A, B>::value && mpsx_d::is_fp_ovl<A>), int> = 0>       \
  MPSX_INLINE auto name(A a, B b) {                                                                  \
    using C = typename mpsx_d::promote2<A, B>::type;                                                 \
    return name(C(a), C(b));                                                                         \
  }                                                                                                  \
  template <class A, class B, std::enable_if_t<mpsx_d::any_vec<A, B>, int> = 0>                      \
  MPSX_INLINE auto name(const A& a, const B& b) {                                                    \
    using E = typename mpsx_d::first_vec_e<A, B>::type;                                              \
    vec<E, mpsx_d::vn<A, B>> r;                                                                      \
    for (int i = 0; i < mpsx_d::vn<A, B>; ++i) r[i] = name(E(mpsx_d::get(a, i)), E(mpsx_d::get(b, i))); \
    return r;                                                                                        \
  }
MPSX_M2(atan2, __builtin_atan2f(x, y), __builtin_atan2(x, y))
MPSX_M2(pow, __builtin_powf(x, y), __builtin_pow(x, y))
MPSX_M2(powr, __builtin_powf(x, y), __builtin_pow(x, y))
MPSX_M2(fmod, __builtin_fmodf(x, y), __builtin_fmod(x, y))
MPSX_M2(copysign, __builtin_copysignf(x, y), __builtin_copysign(x, y))
MPSX_M2(fdim, (x > y ? x - y : (x != x || y != y) ? x + y : 0.0f), __builtin_fdim(x, y))
MPSX_M2(nextafter, __builtin_nextafterf(x, y), __builtin_nextafter(x, y))
MPSX_M2(fmin, ((x < y || y != y) ? x : y), ((x < y || y != y) ? x : y))
MPSX_M2(fmax, ((x > y || y != y) ? x : y), ((x > y || y != y) ? x : y))
MPSX_M2(step, (y < x ? 0.0f : 1.0f), (y < x ? 0.0 : 1.0))
MPSX_M2(divide, x / y, x / y)

// three-argument float functions
#define MPSX_M3(name, fexpr)                                                                         \
  MPSX_INLINE float name(float x, float y, float z) { return fexpr; }                                \
  MPSX_INLINE half name(half a, half b, half c) { return half(name(float(a), float(b), float(c))); } \
  MPSX_INLINE bfloat name(bfloat a, bfloat b, bfloat c) { return bfloat(name(float(a), float(b), float(c))); } \
  template <class A, class B, class C,                                                               \
            std::enable_if_t<!mpsx_d::any_vec<A, B, C> &&                                            \
                                 !(std::is_same<A, B>::value && std::is_same<B, C>::value &&          \
                                   mpsx_d::is_fp_ovl<A> && !std::is_same<A, double>::value), int> = 0>   \
  MPSX_INLINE auto name(A a, B b, C c) {                                                             \
    using P = typename mpsx_d::promote2<typename mpsx_d::promote2<A, B>::type, C>::type;             \
    using Q = std::conditional_t<std::is_same<P, double>::value, float, P>;                          \
    return name(Q(a), Q(b), Q(c));                                                                   \
  }                                                                                                  \
  template <class A, class B, class C, std::enable_if_t<mpsx_d::any_vec<A, B, C>, int> = 0>          \
  MPSX_INLINE auto name(const A& a, const B& b, const C& c) {                                        \
    using E = typename mpsx_d::first_vec_e<A, B, C>::type;                                           \
    vec<E, mpsx_d::vn<A, B, C>> r;                                                                   \
    for (int i = 0; i < mpsx_d::vn<A, B, C>; ++i)                                                    \
      r[i] = name(E(mpsx_d::get(a, i)), E(mpsx_d::get(b, i)), E(mpsx_d::get(c, i)));                \
    return r;                                                                                        \
  }
MPSX_M3(fma, __builtin_fmaf(x, y, z))
MPSX_M3(mad, x * y + z)
MPSX_M3(mix, x + (y - x) * z)
MPSX_M3(smoothstep, ([](float e0, float e1, float v) {
          float t = (v - e0) / (e1 - e0);
          t = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
          return t * t * (3.0f - 2.0f * t);
        })(x, y, z))
MPSX_M3(fmin3, fmin(fmin(x, y), z))
MPSX_M3(fmax3, fmax(fmax(x, y), z))
MPSX_M3(fmedian3, fmax(fmin(x, y), fmin(fmax(x, y), z)))

// classification (scalars -> bool, vectors -> bool vectors)
#define MPSX_C1(name, expr)                                                                          \
  MPSX_INLINE bool name(float x) { return expr; }                                                    \
  MPSX_INLINE bool name(double x) { return expr; }                                                   \
  MPSX_INLINE bool name(half h) { return name(float(h)); }                                           \
  MPSX_INLINE bool name(bfloat h) { return name(float(h)); }                                         \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                          \
  MPSX_INLINE bool name(I i) { return name(float(i)); }                                              \
  template <class V, std::enable_if_t<mpsx_d::vt<V>::is, int> = 0>                                   \
  MPSX_INLINE vec<bool, mpsx_d::vt<V>::n> name(const V& v) {                                         \
    vec<bool, mpsx_d::vt<V>::n> r;                                                                   \
    for (int i = 0; i < mpsx_d::vt<V>::n; ++i) r[i] = name(v[i]);                                    \
    return r;                                                                                        \
  }
MPSX_C1(isnan, x != x)
MPSX_C1(isinf, __builtin_isinf(x))
MPSX_C1(isfinite, __builtin_isfinite(x))
MPSX_C1(isnormal, __builtin_isnormal(x))
MPSX_C1(signbit, __builtin_signbit(x))
template <class A, class B> MPSX_INLINE auto isunordered(const A& a, const B& b) { return isnan(a) || isnan(b); }
template <class A, class B> MPSX_INLINE auto isordered(const A& a, const B& b) { return !isnan(a) && !isnan(b); }

// frexp / ldexp / modf / sincos / ilogb
MPSX_INLINE float frexp(float x, int& e) { return __builtin_frexpf(x, &e); }
MPSX_INLINE half frexp(half x, int& e) { return half(__builtin_frexpf(float(x), &e)); }
MPSX_INLINE float ldexp(float x, int e) { return __builtin_ldexpf(x, e); }
MPSX_INLINE half ldexp(half x, int e) { return half(__builtin_ldexpf(float(x), e)); }
MPSX_INLINE bfloat ldexp(bfloat x, int e) { return bfloat(__builtin_ldexpf(float(x), e)); }
template <class V, class E, std::enable_if_t<mpsx_d::vt<V>::is, int> = 0>
MPSX_INLINE auto ldexp(const V& v, const E& e) {
  vec<typename mpsx_d::vt<V>::e, mpsx_d::vt<V>::n> r;
  for (int i = 0; i < mpsx_d::vt<V>::n; ++i) r[i] = ldexp(v[i], int(mpsx_d::get(e, i)));
  return r;
}
MPSX_INLINE float modf(float x, float& ip) { return __builtin_modff(x, &ip); }
MPSX_INLINE half modf(half x, half& ip) { float f; float r = __builtin_modff(float(x), &f); ip = half(f); return half(r); }
MPSX_INLINE float sincos(float x, float& c) { float s; __builtin_sincosf(x, &s, &c); return s; }
MPSX_INLINE half sincos(half x, half& c) { float s, cf; __builtin_sincosf(float(x), &s, &cf); c = half(cf); return half(s); }
template <class V, std::enable_if_t<mpsx_d::vt<V>::is, int> = 0>
MPSX_INLINE auto sincos(const V& v, vec<typename mpsx_d::vt<V>::e, mpsx_d::vt<V>::n>& c) {
  vec<typename mpsx_d::vt<V>::e, mpsx_d::vt<V>::n> s;
  for (int i = 0; i < mpsx_d::vt<V>::n; ++i) s[i] = sincos(v[i], c[i]);
  return s;
}
MPSX_INLINE int ilogb(float x) { return __builtin_ilogbf(x); }

// ---------------------------------------------------------------- integer & common (non-template
// overloads per scalar type, as the Metal stdlib has them, so overload resolution matches Metal's)
typedef signed char mpsx_schar_;
typedef long long mpsx_ll_;
typedef unsigned long long mpsx_ull_;
#define MPSX_FOR_INTS(X) X(char) X(mpsx_schar_) X(uchar) X(short) X(ushort) X(int) X(uint) X(long) X(ulong) X(mpsx_ll_) X(mpsx_ull_)
#define MPSX_FOR_FLOATS(X) X(float) X(double) X(half) X(bfloat)
#define MPSX_MINMAX_I(T)                                                                             \
  MPSX_INLINE T min(T a, T b) { return b < a ? b : a; }                                              \
  MPSX_INLINE T max(T a, T b) { return a < b ? b : a; }                                              \
  MPSX_INLINE T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                               \
  MPSX_INLINE T min3(T a, T b, T c) { return min(min(a, b), c); }                                    \
  MPSX_INLINE T max3(T a, T b, T c) { return max(max(a, b), c); }                                    \
  MPSX_INLINE T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }                 \
  MPSX_INLINE T abs(T a) { return std::is_signed<T>::value ? (a < 0 ? T(-a) : a) : a; }               \
  MPSX_INLINE T absdiff(T a, T b) { return a > b ? T(a - b) : T(b - a); }                             \
  MPSX_INLINE T popcount(T a) { return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)a)); } \
  MPSX_INLINE T clz(T a) {                                                                           \
    using U = std::make_unsigned_t<T>;                                                               \
    U u = U(a);                                                                                      \
    return u == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll((unsigned long long)u) - (64 - sizeof(T) * 8)); \
  }                                                                                                  \
  MPSX_INLINE T ctz(T a) {                                                                           \
    using U = std::make_unsigned_t<T>;                                                               \
    U u = U(a);                                                                                      \
    return u == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)u));                    \
  }                                                                                                  \
  MPSX_INLINE T reverse_bits(T a) {                                                                  \
    using U = std::make_unsigned_t<T>;                                                               \
    U u = U(a), r = 0;                                                                               \
    for (unsigned i = 0; i < sizeof(T) * 8; ++i) { r = U((r << 1) | (u & 1)); u = U(u >> 1); }       \
    return T(r);                                                                                     \
  }                                                                                                  \
  MPSX_INLINE T rotate(T v, T s) {                                                                   \
    using U = std::make_unsigned_t<T>;                                                               \
    const unsigned bits = sizeof(T) * 8;                                                             \
    unsigned k = unsigned(U(s)) % bits;                                                              \
    U u = U(v);                                                                                      \
    return k == 0 ? v : T(U(u << k) | U(u >> (bits - k)));                                           \
  }                                                                                                  \
  MPSX_INLINE T hadd(T a, T b) { return T((a >> 1) + (b >> 1) + (a & b & 1)); }                      \
  MPSX_INLINE T rhadd(T a, T b) { return T((a >> 1) + (b >> 1) + ((a | b) & 1)); }                   \
  MPSX_INLINE T mulhi(T a, T b) {                                                                    \
    if constexpr (sizeof(T) == 8) {                                                                  \
      using W = std::conditional_t<std::is_signed<T>::value, __int128, unsigned __int128>;           \
      return T((W(a) * W(b)) >> 64);                                                                 \
    } else {                                                                                         \
      using W = std::conditional_t<std::is_signed<T>::value, long long, unsigned long long>;         \
      return T((W(a) * W(b)) >> (sizeof(T) * 8));                                                    \
    }                                                                                                \
  }                                                                                                  \
  MPSX_INLINE T addsat(T a, T b) { T r; return __builtin_add_overflow(a, b, &r) ? (b > 0 ? std::numeric_limits<T>::max() : std::numeric_limits<T>::min()) : r; } \
  MPSX_INLINE T subsat(T a, T b) { T r; return __builtin_sub_overflow(a, b, &r) ? (b < 0 ? std::numeric_limits<T>::max() : std::numeric_limits<T>::min()) : r; } \
  MPSX_INLINE T mad24(T a, T b, T c) { return T(a * b + c); }                                        \
  MPSX_INLINE T mul24(T a, T b) { return T(a * b); }
MPSX_FOR_INTS(MPSX_MINMAX_I)
#undef MPSX_MINMAX_I
// Metal's float min/max are fmin/fmax: a NaN argument yields the other argument
#define MPSX_MINMAX_F(T)                                                                             \
  MPSX_INLINE T min(T a, T b) { return (a < b || b != b) ? a : b; }                                  \
  MPSX_INLINE T max(T a, T b) { return (a > b || b != b) ? a : b; }                                  \
  MPSX_INLINE T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                               \
  MPSX_INLINE T min3(T a, T b, T c) { return min(min(a, b), c); }                                    \
  MPSX_INLINE T max3(T a, T b, T c) { return max(max(a, b), c); }                                    \
  MPSX_INLINE T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }                 \
  MPSX_INLINE T abs(T a) { return T(fabs(a)); }
MPSX_FOR_FLOATS(MPSX_MINMAX_F)
#undef MPSX_MINMAX_F
MPSX_INLINE bool min(bool a, bool b) { return a && b; }
MPSX_INLINE bool max(bool a, bool b) { return a || b; }

// mixed scalar types (e.g. min(float, int)): promote like C++ arithmetic, keeping Metal's
// "the floating type wins" rule
template <class A, class B,
          std::enable_if_t<mpsx_d::scalar_like<A>::value && mpsx_d::scalar_like<B>::value && !std::is_same<A, B>::value, int> = 0>
MPSX_INLINE auto min(A a, B b) {
  using C = std::conditional_t<is_floating_point<A>::value || is_floating_point<B>::value,
                               typename mpsx_d::promote2<A, B>::type, decltype(a + b)>;
  return min(C(a), C(b));
}
template <class A, class B,
          std::enable_if_t<mpsx_d::scalar_like<A>::value && mpsx_d::scalar_like<B>::value && !std::is_same<A, B>::value, int> = 0>
MPSX_INLINE auto max(A a, B b) {
  using C = std::conditional_t<is_floating_point<A>::value || is_floating_point<B>::value,
                               typename mpsx_d::promote2<A, B>::type, decltype(a + b)>;
  return max(C(a), C(b));
}
template <class A, class B, class C,
          std::enable_if_t<mpsx_d::scalar_like<A>::value && mpsx_d::scalar_like<B>::value && mpsx_d::scalar_like<C>::value &&
                               !(std::is_same<A, B>::value && std::is_same<B, C>::value), int> = 0>
MPSX_INLINE A clamp(A x, B lo, C hi) {
  return clamp(x, A(lo), A(hi));
}

// elementwise vector versions of the integer/common functions
#define MPSX_VF1(name)                                                                               \
  template <class V, std::enable_if_t<mpsx_d::vt<V>::is, int> = 0>                                   \
  MPSX_INLINE auto name(const V& v) {                                                                \
    vec<typename mpsx_d::vt<V>::e, mpsx_d::vt<V>::n> r;                                              \
    for (int i = 0; i < mpsx_d::vt<V>::n; ++i) r[i] = name(v[i]);                                    \
    return r;                                                                                        \
  }
#define MPSX_VF2(name)                                                                               \
  template <class A, class B, std::enable_if_t<mpsx_d::any_vec<A, B>, int> = 0>                      \
  MPSX_INLINE auto name(const A& a, const B& b) {                                                    \
    using E = typename mpsx_d::first_vec_e<A, B>::type;                                              \
    vec<E, mpsx_d::vn<A, B>> r;                                                                      \
    for (int i = 0; i < mpsx_d::vn<A, B>; ++i) r[i] = name(E(mpsx_d::get(a, i)), E(mpsx_d::get(b, i))); \
    return r;                                                                                        \
  }
#define MPSX_VF3(name)                                                                               \
  template <class A, class B, class C, std::enable_if_t<mpsx_d::any_vec<A, B, C>, int> = 0>          \
  MPSX_INLINE auto name(const A& a, const B& b, const C& c) {                                        \
    using E = typename mpsx_d::first_vec_e<A, B, C>::type;                                           \
    vec<E, mpsx_d::vn<A, B, C>> r;                                                                   \
    for (int i = 0; i < mpsx_d::vn<A, B, C>; ++i)                                                    \
      r[i] = name(E(mpsx_d::get(a, i)), E(mpsx_d::get(b, i)), E(mpsx_d::get(c, i)));                \
    return r;                                                                                        \
  }
MPSX_VF1(abs) MPSX_VF1(popcount) MPSX_VF1(clz) MPSX_VF1(ctz) MPSX_VF1(reverse_bits)
MPSX_VF2(min) MPSX_VF2(max) MPSX_VF2(absdiff) MPSX_VF2(rotate) MPSX_VF2(mulhi) MPSX_VF2(hadd) MPSX_VF2(rhadd)
MPSX_VF2(addsat) MPSX_VF2(subsat)
MPSX_VF3(clamp) MPSX_VF3(min3) MPSX_VF3(max3) MPSX_VF3(median3)

// ---------------------------------------------------------------- relational / geometric
MPSX_INLINE bool all(bool b) { return b; }
MPSX_INLINE bool any(bool b) { return b; }
template <class V, std::enable_if_t<mpsx_d::vt<V>::is, int> = 0>
MPSX_INLINE bool all(const V& v) {
  bool r = true;
  for (int i = 0; i < mpsx_d::vt<V>::n; ++i) r = r && bool(v[i]);
  return r;
}
template <class V, std::enable_if_t<mpsx_d::vt<V>::is, int> = 0>
MPSX_INLINE bool any(const V& v) {
  bool r = false;
  for (int i = 0; i < mpsx_d::vt<V>::n; ++i) r = r || bool(v[i]);
  return r;
}
// select(a, b, c): c ? b : a (elementwise for vectors)
template <class T, std::enable_if_t<!mpsx_d::vt<T>::is, int> = 0>
MPSX_INLINE T select(T a, T b, bool c) { return c ? b : a; }
template <class A, class B, class C, std::enable_if_t<mpsx_d::any_vec<A, B, C>, int> = 0>
MPSX_INLINE auto select(const A& a, const B& b, const C& c) {
  using E = typename mpsx_d::first_vec_e<A, B>::type;
  vec<E, mpsx_d::vn<A, B, C>> r;
  for (int i = 0; i < mpsx_d::vn<A, B, C>; ++i) r[i] = mpsx_d::get(c, i) ? E(mpsx_d::get(b, i)) : E(mpsx_d::get(a, i));
  return r;
}
template <class A, class B, std::enable_if_t<mpsx_d::any_vec<A, B>, int> = 0>
MPSX_INLINE auto dot(const A& a, const B& b) {
  using E = typename mpsx_d::first_vec_e<A, B>::type;
  E r = E(0);
  for (int i = 0; i < mpsx_d::vn<A, B>; ++i) r += E(mpsx_d::get(a, i)) * E(mpsx_d::get(b, i));
  return r;
}
template <class V> MPSX_INLINE auto length_squared(const V& v) { return dot(v, v); }
template <class V> MPSX_INLINE auto length(const V& v) { return decltype(dot(v, v))(sqrt(float(dot(v, v)))); }
template <class A, class B> MPSX_INLINE auto distance(const A& a, const B& b) { return length(a - b); }
template <class A, class B> MPSX_INLINE auto distance_squared(const A& a, const B& b) { return length_squared(a - b); }
template <class V> MPSX_INLINE auto normalize(const V& v) { return v * rsqrt(float(dot(v, v))); }
template <class T> MPSX_INLINE vec<T, 3> cross(const vec<T, 3>& a, const vec<T, 3>& b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}
template <class V> MPSX_INLINE auto reflect(const V& i, const V& n) { return i - 2 * dot(n, i) * n; }
template <class V> MPSX_INLINE auto faceforward(const V& n, const V& i, const V& nref) { return dot(nref, i) < 0 ? n : -n; }

// precise:: and fast:: share the implementations (the host libm is correctly rounded enough).
#define MPSX_MATH_NAMES(X)                                                                           \
  X(acos) X(acosh) X(asin) X(asinh) X(atan) X(atanh) X(ceil) X(cos) X(cosh) X(exp) X(exp2) X(exp10)   \
  X(fabs) X(floor) X(log) X(log10) X(log2) X(rint) X(round) X(sin) X(sinh) X(sqrt) X(tan) X(tanh)     \
  X(trunc) X(rsqrt) X(fract) X(sinpi) X(cospi) X(tanpi) X(atan2) X(pow) X(powr) X(fmod) X(copysign)   \
  X(fdim) X(nextafter) X(fmin) X(fmax) X(fma) X(sincos) X(divide) X(ldexp) X(frexp) X(modf) X(isnan)   \
  X(isinf) X(isfinite) X(abs) X(min) X(max) X(clamp) X(saturate) X(fmin3) X(fmax3) X(fmedian3)         \
  X(normalize) X(length) X(distance) X(dot) X(sign) X(step) X(mix) X(smoothstep) X(signbit)
#define MPSX_USING(n) using ::metal::n;
namespace precise {
MPSX_MATH_NAMES(MPSX_USING)
}
namespace fast {
MPSX_MATH_NAMES(MPSX_USING)
}
#undef MPSX_USING

// ---------------------------------------------------------------- matrices (column-major, like Metal)
template <class T, int C, int R>
struct matrix {
  vec<T, R> columns[C];
  matrix() = default;
  // The constructors are constexpr (a program-scope `constant float2x2 m = ...` is
  // constant-initialized): every column is built in the member initializer.
  struct vals_ {
    T v[C * R];
  };
  template <int... J>
  static constexpr vec<T, R> col_(const vals_& a, int c, std::integer_sequence<int, J...>) {
    return vec<T, R>(a.v[c * R + J]...);
  }
  template <int... J>
  static constexpr vec<T, R> diag_(T s, int c, std::integer_sequence<int, J...>) {
    return vec<T, R>((J == c ? s : T(0))...);
  }
  template <int... K>
  constexpr matrix(const vals_& a, std::integer_sequence<int, K...>)
      : columns{col_(a, K, std::make_integer_sequence<int, R>{})...} {}
  template <int... K>
  constexpr matrix(T s, std::integer_sequence<int, K...>, int)
      : columns{diag_(s, K, std::make_integer_sequence<int, R>{})...} {}
  // diagonal: matrix(s) puts s on the diagonal
  template <class U, std::enable_if_t<mpsx_d::scalar_like<U>::value, int> = 0>
  explicit constexpr matrix(U s) : matrix(T(s), std::make_integer_sequence<int, C>{}, 0) {}
  // from C column vectors
  template <class... V, std::enable_if_t<sizeof...(V) == C && (mpsx_d::vt<V>::is && ...), int> = 0>
  constexpr matrix(const V&... cols) : columns{vec<T, R>(cols)...} {}
  // from C*R scalars, column by column
  template <class... S, std::enable_if_t<sizeof...(S) == C * R && C * R != C && (mpsx_d::scalar_like<S>::value && ...), int> = 0>
  constexpr matrix(S... s) : matrix(vals_{{T(s)...}}, std::make_integer_sequence<int, C>{}) {}
  MPSX_INLINE vec<T, R>& operator[](int c) { return columns[c]; }
  MPSX_INLINE const vec<T, R>& operator[](int c) const { return columns[c]; }
};
template <class T, int C, int R, class V, std::enable_if_t<mpsx_d::vt<V>::is && mpsx_d::vt<V>::n == C, int> = 0>
MPSX_INLINE vec<T, R> operator*(const matrix<T, C, R>& m, const V& v) {
  vec<T, R> r(T(0));
  for (int c = 0; c < C; ++c) r += m.columns[c] * T(v[c]);
  return r;
}
template <class T, int C, int R, class V, std::enable_if_t<mpsx_d::vt<V>::is && mpsx_d::vt<V>::n == R, int> = 0>
MPSX_INLINE vec<T, C> operator*(const V& v, const matrix<T, C, R>& m) {
  vec<T, C> r;
  for (int c = 0; c < C; ++c) r[c] = dot(vec<T, R>(v), m.columns[c]);
  return r;
}
template <class T, int K, int C, int R>
MPSX_INLINE matrix<T, C, R> operator*(const matrix<T, K, R>& a, const matrix<T, C, K>& b) {
  matrix<T, C, R> r;
  for (int c = 0; c < C; ++c) r.columns[c] = a * b.columns[c];
  return r;
}
template <class T, int C, int R, class S, std::enable_if_t<mpsx_d::scalar_like<S>::value, int> = 0>
MPSX_INLINE matrix<T, C, R> operator*(const matrix<T, C, R>& m, S s) {
  matrix<T, C, R> r;
  for (int c = 0; c < C; ++c) r.columns[c] = m.columns[c] * T(s);
  return r;
}
template <class T, int C, int R, class S, std::enable_if_t<mpsx_d::scalar_like<S>::value, int> = 0>
MPSX_INLINE matrix<T, C, R> operator*(S s, const matrix<T, C, R>& m) { return m * s; }
template <class T, int C, int R>
MPSX_INLINE matrix<T, C, R> operator+(const matrix<T, C, R>& a, const matrix<T, C, R>& b) {
  matrix<T, C, R> r;
  for (int c = 0; c < C; ++c) r.columns[c] = a.columns[c] + b.columns[c];
  return r;
}
template <class T, int C, int R>
MPSX_INLINE matrix<T, C, R> operator-(const matrix<T, C, R>& a, const matrix<T, C, R>& b) {
  matrix<T, C, R> r;
  for (int c = 0; c < C; ++c) r.columns[c] = a.columns[c] - b.columns[c];
  return r;
}
template <class T, int C, int R>
MPSX_INLINE matrix<T, R, C> transpose(const matrix<T, C, R>& m) {
  matrix<T, R, C> r;
  for (int c = 0; c < C; ++c)
    for (int k = 0; k < R; ++k) r.columns[k][c] = m.columns[c][k];
  return r;
}
template <class T> MPSX_INLINE T determinant(const matrix<T, 2, 2>& m) {
  return m[0][0] * m[1][1] - m[1][0] * m[0][1];
}
template <class T> MPSX_INLINE T determinant(const matrix<T, 3, 3>& m) {
  return dot(m[0], cross(m[1], m[2]));
}

// ---------------------------------------------------------------- array
template <class T, size_t N>
struct array {
  T _M_elems[N ? N : 1];
  MPSX_INLINE constexpr T& operator[](size_t i) { return _M_elems[i]; }
  MPSX_INLINE constexpr const T& operator[](size_t i) const { return _M_elems[i]; }
  static constexpr size_t size() { return N; }
  static constexpr bool empty() { return N == 0; }
  constexpr T* data() { return _M_elems; }
  constexpr const T* data() const { return _M_elems; }
  constexpr T* begin() { return _M_elems; }
  constexpr T* end() { return _M_elems + N; }
  constexpr const T* begin() const { return _M_elems; }
  constexpr const T* end() const { return _M_elems + N; }
  constexpr T& front() { return _M_elems[0]; }
  constexpr T& back() { return _M_elems[N - 1]; }
};

// ---------------------------------------------------------------- atomics
enum memory_order { memory_order_relaxed = 0, memory_order_acquire = 2, memory_order_release = 3, memory_order_acq_rel = 4, memory_order_seq_cst = 5 };
enum class thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
template <class T>
struct atomic {
  T __v;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;
template <class T, class U>
MPSX_INLINE void atomic_store_explicit(volatile atomic<T>* o, U v, memory_order = memory_order_relaxed) {
  T t = T(v);
  __atomic_store(&const_cast<atomic<T>*>(o)->__v, &t, __ATOMIC_RELAXED);
}
template <class T>
MPSX_INLINE T atomic_load_explicit(const volatile atomic<T>* o, memory_order = memory_order_relaxed) {
  T t;
  __atomic_load(&const_cast<atomic<T>*>(o)->__v, &t, __ATOMIC_RELAXED);
  return t;
}
template <class T, class U>
MPSX_INLINE T atomic_exchange_explicit(volatile atomic<T>* o, U v, memory_order = memory_order_relaxed) {
  T t = T(v), r;
  __atomic_exchange(&const_cast<atomic<T>*>(o)->__v, &t, &r, __ATOMIC_RELAXED);
  return r;
}
template <class T, class U>
MPSX_INLINE bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* o, T* expected, U desired,
                                                       memory_order = memory_order_relaxed,
                                                       memory_order = memory_order_relaxed) {
  T d = T(desired);
  return __atomic_compare_exchange(&const_cast<atomic<T>*>(o)->__v, expected, &d, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
template <class T, class U>
MPSX_INLINE bool atomic_compare_exchange_strong_explicit(volatile atomic<T>* o, T* expected, U desired,
                                                         memory_order = memory_order_relaxed,
                                                         memory_order = memory_order_relaxed) {
  T d = T(desired);
  return __atomic_compare_exchange(&const_cast<atomic<T>*>(o)->__v, expected, &d, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
namespace mpsx_d {
template <class T, class F>
MPSX_INLINE T atomic_rmw_cas(volatile atomic<T>* o, F f) {
  T* p = &const_cast<atomic<T>*>(o)->__v;
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T nv;
  do {
    nv = f(old);
  } while (!__atomic_compare_exchange(p, &old, &nv, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
}  // namespace mpsx_d
#define MPSX_ATOMIC_RMW(name, builtin, expr)                                                         \
  template <class T, class U>                                                                        \
  MPSX_INLINE T atomic_fetch_##name##_explicit(volatile atomic<T>* o, U v, memory_order = memory_order_relaxed) { \
    const T val = T(v);                                                                              \
    if constexpr (std::is_integral<T>::value && !std::is_same<T, bool>::value) {                     \
      return builtin(&const_cast<atomic<T>*>(o)->__v, val, __ATOMIC_RELAXED);                        \
    } else {                                                                                         \
      return mpsx_d::atomic_rmw_cas(o, [val](T a) { return T(expr); });                              \
    }                                                                                                \
  }
MPSX_ATOMIC_RMW(add, __atomic_fetch_add, a + val)
MPSX_ATOMIC_RMW(sub, __atomic_fetch_sub, a - val)
MPSX_ATOMIC_RMW(and, __atomic_fetch_and, a && val)
MPSX_ATOMIC_RMW(or, __atomic_fetch_or, a || val)
MPSX_ATOMIC_RMW(xor, __atomic_fetch_xor, a != val)
#undef MPSX_ATOMIC_RMW
template <class T, class U>
MPSX_INLINE T atomic_fetch_min_explicit(volatile atomic<T>* o, U v, memory_order = memory_order_relaxed) {
  const T val = T(v);
  return mpsx_d::atomic_rmw_cas(o, [val](T a) { return val < a ? val : a; });
}
template <class T, class U>
MPSX_INLINE T atomic_fetch_max_explicit(volatile atomic<T>* o, U v, memory_order = memory_order_relaxed) {
  const T val = T(v);
  return mpsx_d::atomic_rmw_cas(o, [val](T a) { return val > a ? val : a; });
}
template <class T, class U>
MPSX_INLINE void atomic_max_explicit(volatile atomic<T>* o, U v, memory_order m = memory_order_relaxed) {
  atomic_fetch_max_explicit(o, v, m);
}
template <class T, class U>
MPSX_INLINE void atomic_min_explicit(volatile atomic<T>* o, U v, memory_order m = memory_order_relaxed) {
  atomic_fetch_min_explicit(o, v, m);
}
MPSX_INLINE void atomic_thread_fence(int = 0, memory_order = memory_order_relaxed, thread_scope = thread_scope::thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

}  // namespace metal

MPSX_MTYPES(float, float)
MPSX_MTYPES(half, half)
#undef MPSX_MTYPES

#endif  // MPSX_PARSE

// ---------------------------------------------------------------- address spaces, kernel
// (defined after every system header so the keywords cannot clash with library identifiers)
#ifndef MPSX_PARSE
#define kernel
#define device
#define constant  // the front end rewrites MSL `constant` to C++ `const` (keeps overloads distinct)
#define thread
#define threadgroup
#define threadgroup_imageblock
#define ray_data
#define object_data

#include "mpsx_runtime.h"
#endif
