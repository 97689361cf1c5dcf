// mpsx_runtime.h -- execution of a compute grid on the host CPU (included by mpsx_metal.h,
// after the address-space macros: do not use the identifiers device/constant/thread/kernel here).
//
// Two execution modes, chosen per kernel by the Python front end:
//  * run_loop:   kernels without threadgroup_barrier / simd-group functions.  The threads of a
//                threadgroup run one after another as a plain loop the compiler can vectorize.
//  * run_fibers: kernels that synchronize.  Each thread of a threadgroup is a fiber with its own
//                stack; a fiber runs until it reaches a barrier or a simd-group collective, then
//                switches back to the group scheduler (a ~20 ns user-space context switch).  When
//                every live fiber is blocked, the scheduler resolves pending simd collectives
//                (per simdgroup, for the lanes waiting at the same call site -- those are the
//                "active" lanes) or, if none are pending, releases the threadgroup barrier.
// A threadgroup always runs on one OS thread; different threadgroups run in parallel.
#pragma once

namespace mpsx {
typedef ::metal::vec<uint, 3> uint3_;

struct tinfo {
  uint3_ tpig;   // thread_position_in_grid
  uint3_ tpitg;  // thread_position_in_threadgroup
  uint3_ tgpig;  // threadgroup_position_in_grid
  uint3_ tptg;   // threads_per_threadgroup (actual size of this, possibly partial, group)
  uint3_ tpg;    // threads_per_grid
  uint3_ tgpg;   // threadgroups_per_grid
  uint3_ dtptg;  // dispatch_threads_per_threadgroup (requested group size)
  uint tiitg;    // thread_index_in_threadgroup
  uint lane;     // thread_index_in_simdgroup
  uint sgid;     // simdgroup_index_in_threadgroup
  uint nsg;      // simdgroups_per_threadgroup
};

// ------------------------------------------------------------ error reporting
struct err_state {
  int flag;
  char msg[1024];
};
static err_state g_err;

__attribute__((format(printf, 1, 2))) static void report(const char* fmt, ...) {
  if (__atomic_exchange_n(&g_err.flag, 1, __ATOMIC_ACQ_REL) != 0) return;  // keep the first error
  __builtin_va_list ap;
  __builtin_va_start(ap, fmt);
  vsnprintf(g_err.msg, sizeof(g_err.msg), fmt, ap);
  __builtin_va_end(ap);
}

static void misuse(const char* what) {
  report("internal error: %s was called by a kernel that the shader compiler classified as "
         "barrier-free; please report this kernel", what);
}

// ------------------------------------------------------------ argument unpacking
template <class F> struct fsig;
template <class R, class... A> struct fsig<R (*)(A...)> {
  template <int I> using arg = std::tuple_element_t<I, std::tuple<A...>>;
};

template <class P> MPSX_INLINE P slot_cast(void* s) {
  if constexpr (std::is_pointer<P>::value) {
    return reinterpret_cast<P>(s);
  } else if constexpr (std::is_reference<P>::value) {
    return *reinterpret_cast<std::remove_reference_t<P>*>(s);
  } else {
    return *reinterpret_cast<std::remove_cv_t<P>*>(s);
  }
}

template <class P> MPSX_INLINE P attr_cast(const uint3_& v) {
  using D = std::remove_cv_t<std::remove_reference_t<P>>;
  if constexpr (::metal::mpsx_d::vt<D>::is) {
    using E = typename ::metal::mpsx_d::vt<D>::e;
    if constexpr (::metal::mpsx_d::vt<D>::n == 2) return D(E(v.x), E(v.y));
    else if constexpr (::metal::mpsx_d::vt<D>::n == 3) return D(E(v.x), E(v.y), E(v.z));
    else return D(E(v.x), E(v.y), E(v.z), E(0));
  } else {
    return D(v.x);
  }
}
template <class P> MPSX_INLINE P attr_cast(uint v) {
  using D = std::remove_cv_t<std::remove_reference_t<P>>;
  return attr_cast<P>(uint3_(v, 0u, 0u));
  (void)sizeof(D);
}

// The argument block (built by the Python side, self-describing and relocatable so that an
// asynchronous runtime can copy it):
//   uint64 header[4] = {total size in bytes, nslots, error-buffer slot or ~0, 0}
//   uint64 slot[nslots]            buffer k: a pointer, or (1<<63 | offset) into this block
//   uint64 lo[nslots], hi[nslots]  checked builds only: byte range bound to each slot
//   inline data (scalars, lists, the error buffer)
constexpr uint64_t kInline = 1ull << 63;
MPSX_INLINE void* slot_ptr(const void* ab, uint64_t v) {
  return (v & kInline) ? static_cast<void*>(const_cast<char*>(static_cast<const char*>(ab)) + (v & ~kInline))
                       : reinterpret_cast<void*>(v);
}
MPSX_INLINE const uint64_t* ab_header(const void* ab) { return static_cast<const uint64_t*>(ab); }
MPSX_INLINE void* arg(const void* ab, uint64_t k) {
  const uint64_t* h = ab_header(ab);
  return k < h[1] ? slot_ptr(ab, h[4 + k]) : nullptr;
}
MPSX_INLINE const char* arg_lo(const void* ab, uint64_t k) {
  const uint64_t* h = ab_header(ab);
  return k < h[1] ? static_cast<const char*>(slot_ptr(ab, h[4 + h[1] + k])) : nullptr;
}
MPSX_INLINE const char* arg_hi(const void* ab, uint64_t k) {
  const uint64_t* h = ab_header(ab);
  return k < h[1] ? static_cast<const char*>(slot_ptr(ab, h[4 + 2 * h[1] + k])) : nullptr;
}

// threadgroup-memory *parameters* ([[threadgroup(k)]]): torch's API cannot size them, Metal
// would bind zero bytes; we give each index 32 KiB per OS thread (shared by a group's fibers).
static void* tg_param_buffer(int k) {
  alignas(64) static thread_local unsigned char buf[8][32768];
  return buf[k & 7];
}

// keep the address of threadgroup storage "escaped" so the compiler reloads it after a
// context switch (other fibers of the group write it)
template <class T> MPSX_INLINE void escape(T& x) { asm volatile("" : : "r"(&x) : "memory"); }

// ------------------------------------------------------------ checked mode
// TORCH_MPS_EXT_SHADER_CHECKED=1: the front end rewrites every `device T*` of the shader --
// kernel and helper parameters, locals, members, return types, casts -- to checked_ptr<T>,
// a pointer that carries the byte range of the buffer it points into.  Arithmetic keeps the
// range; there is no implicit conversion back to a raw pointer; a raw pointer converted to
// one (`&ref`, a pointer read from an argument buffer, an integer cast) gets the range of
// the kernel argument it points into, looked up in the launch's argument block.  Every
// element access is compared with the range: outside it, the access goes to a scratch
// location instead and the first such access is reported (kernel, argument, element).
struct launch_ctx {
  const void* ab;             // the argument block of the running launch
  const char* kname;          // kernel name
  const char* const* anames;  // parameter name of each buffer slot
  uint64_t nnames;
};
static thread_local const launch_ctx* tl_launch = nullptr;
struct launch_scope {
  const launch_ctx* prev;
  MPSX_INLINE explicit launch_scope(const launch_ctx* c) : prev(tl_launch) { tl_launch = c; }
  MPSX_INLINE ~launch_scope() { tl_launch = prev; }
};

// tag of a checked pointer: slot k of the argument block (item 0), the (i-1)-th tensor of the
// list bound to slot k (item i), or one of these:
constexpr long kTagNone = -1;  // points into no buffer of the launch
constexpr long kTagNull = -2;  // null

struct bound_range {
  const char* lo;
  const char* hi;
  long tag;
};

// The buffer of the running launch that `x` points into (one past its end counts, as for
// an end pointer).  Argument block (below): slots' lo[]/hi[] and, if header[3] != 0, a table
// {n, n x {lo, hi, slot, item}} of the tensors of lists bound to slots (argument buffers).
__attribute__((noinline)) static bound_range find_range(const void* x) {
  if (x == nullptr) return {nullptr, nullptr, kTagNull};
  const launch_ctx* c = tl_launch;
  if (c == nullptr) return {nullptr, nullptr, kTagNone};
  const char* a = static_cast<const char*>(x);
  const uint64_t* h = static_cast<const uint64_t*>(c->ab);
  const uint64_t ns = h[1];
  bound_range edge{nullptr, nullptr, kTagNone};
  auto consider = [&](const char* lo, const char* hi, long tag) {
    if (lo <= a && a < hi) return true;
    if (a == hi && edge.tag == kTagNone) edge = {lo, hi, tag};
    return false;
  };
  for (uint64_t k = 0; k < ns; ++k) {
    const char* lo = static_cast<const char*>(slot_ptr(c->ab, h[4 + ns + k]));
    const char* hi = static_cast<const char*>(slot_ptr(c->ab, h[4 + 2 * ns + k]));
    if (consider(lo, hi, long(k))) return {lo, hi, long(k)};
  }
  if (h[3] != 0) {
    const uint64_t* e = static_cast<const uint64_t*>(slot_ptr(c->ab, h[3]));
    for (uint64_t i = 0; i < e[0]; ++i) {
      const uint64_t* r = e + 1 + 4 * i;
      const char* lo = reinterpret_cast<const char*>(r[0]);
      const char* hi = reinterpret_cast<const char*>(r[1]);
      const long tag = long(r[2]) | long((r[3] + 1) << 32);
      if (consider(lo, hi, tag)) return {lo, hi, tag};
    }
  }
  return edge;
}

__attribute__((noinline, cold)) static void report_oob(const char* a, long elem_size, const char* lo,
                                                        const char* hi, long tag) {
  const launch_ctx* c = tl_launch;
  const char* kname = c ? c->kname : "?";
  if (tag == kTagNull) {
    report("out-of-bounds access in kernel '%s': a null device pointer was dereferenced", kname);
    return;
  }
  if (tag == kTagNone || c == nullptr) {
    report("out-of-bounds access in kernel '%s': a device pointer that points into none of the "
           "buffers bound to the kernel was dereferenced (address %p)", kname, static_cast<const void*>(a));
    return;
  }
  const uint64_t slot = uint64_t(tag & 0xffffffffL), item = uint64_t(tag >> 32);
  char name[160];
  const char* pname = slot < c->nnames ? c->anames[slot] : "?";
  if (item == 0) snprintf(name, sizeof(name), "%s", pname);
  else snprintf(name, sizeof(name), "%s[%llu]", pname, (unsigned long long)(item - 1));
  // element indices count from the pointer bound to the argument (a tensor's data pointer)
  const char* base = item == 0 ? static_cast<const char*>(arg(c->ab, slot)) : lo;
  auto idx = [&](const char* x) {
    const long d = long(x - base);
    return d >= 0 ? d / elem_size : -((-d + elem_size - 1) / elem_size);
  };
  report("out-of-bounds access in kernel '%s': argument '%s' accessed element %ld, but the buffer "
         "bound to it holds elements [%ld, %ld)", kname, name, idx(a), idx(lo), idx(hi));
}

template <class T> struct checked_ptr;
template <class P> struct is_checked : std::false_type {};
template <class T> struct is_checked<checked_ptr<T>> : std::true_type {};

template <class A, class B>
using same_base = std::is_same<std::remove_cv_t<A>, std::remove_cv_t<B>>;

template <class T> struct checked_ptr {
  T* p;
  const char* lo;
  const char* hi;
  long tag;

  checked_ptr() = default;
  MPSX_INLINE constexpr checked_ptr(std::nullptr_t) : p(nullptr), lo(nullptr), hi(nullptr), tag(kTagNull) {}
  MPSX_INLINE constexpr checked_ptr(T* q, const char* l, const char* h, long t) : p(q), lo(l), hi(h), tag(t) {}
  // from a raw pointer: the range of the argument it points into
  template <class U, std::enable_if_t<same_base<U, T>::value || std::is_convertible<U*, T*>::value, int> = 0>
  MPSX_INLINE checked_ptr(U* q) : p(const_cast<T*>(static_cast<const volatile T*>(q))) { bind(q); }
  template <class U, std::enable_if_t<!(same_base<U, T>::value || std::is_convertible<U*, T*>::value), int> = 0>
  MPSX_INLINE explicit checked_ptr(U* q) : p((T*)(q)) { bind(q); }
  template <class I, std::enable_if_t<std::is_integral<I>::value && !std::is_same<I, bool>::value, int> = 0>
  MPSX_INLINE explicit checked_ptr(I v) : p(reinterpret_cast<T*>(uintptr_t(v))) { bind(p); }
  // from another checked pointer: same range
  template <class U, std::enable_if_t<!std::is_same<U, T>::value &&
                                          (same_base<U, T>::value || std::is_convertible<U*, T*>::value), int> = 0>
  MPSX_INLINE checked_ptr(const checked_ptr<U>& o)
      : p(const_cast<T*>(static_cast<const volatile T*>(o.p))), lo(o.lo), hi(o.hi), tag(o.tag) {}
  template <class U, std::enable_if_t<!(same_base<U, T>::value || std::is_convertible<U*, T*>::value), int> = 0>
  MPSX_INLINE explicit checked_ptr(const checked_ptr<U>& o) : p((T*)(o.p)), lo(o.lo), hi(o.hi), tag(o.tag) {}

  MPSX_INLINE void bind(const volatile void* q) {
    const bound_range r = find_range(const_cast<const void*>(q));
    lo = r.lo;
    hi = r.hi;
    tag = r.tag;
  }

  __attribute__((noinline, cold)) T& oob(long i) const {
    report_oob(reinterpret_cast<const char*>(p) + i * long(sizeof(T)), long(sizeof(T)), lo, hi, tag);
    alignas(64) static thread_local unsigned char sink[sizeof(T) < 64 ? 64 : sizeof(T)];
    return *reinterpret_cast<T*>(sink);
  }
  MPSX_INLINE T& at(long i) const {
    const char* a = reinterpret_cast<const char*>(p) + i * long(sizeof(T));
    if (__builtin_expect(a < lo || a + sizeof(T) > hi, 0)) return oob(i);
    return p[i];
  }
  template <class I, std::enable_if_t<std::is_integral<I>::value || std::is_enum<I>::value, int> = 0>
  MPSX_INLINE T& operator[](I i) const { return at(long(i)); }
  MPSX_INLINE T& operator*() const { return at(0); }
  MPSX_INLINE T* operator->() const { return &at(0); }
  // raw pointers only by an explicit cast: (device float*)p, (ulong)p
  template <class U> MPSX_INLINE explicit operator U*() const { return (U*)(p); }
  template <class I, std::enable_if_t<std::is_integral<I>::value && !std::is_same<I, bool>::value, int> = 0>
  MPSX_INLINE explicit operator I() const { return I(reinterpret_cast<uintptr_t>(p)); }
  MPSX_INLINE explicit operator bool() const { return p != nullptr; }
  template <class I, std::enable_if_t<std::is_integral<I>::value || std::is_enum<I>::value, int> = 0>
  MPSX_INLINE checked_ptr operator+(I i) const { checked_ptr r = *this; r.p += long(i); return r; }
  template <class I, std::enable_if_t<std::is_integral<I>::value || std::is_enum<I>::value, int> = 0>
  MPSX_INLINE checked_ptr operator-(I i) const { checked_ptr r = *this; r.p -= long(i); return r; }
  template <class I, std::enable_if_t<std::is_integral<I>::value || std::is_enum<I>::value, int> = 0>
  friend MPSX_INLINE checked_ptr operator+(I i, const checked_ptr& q) { return q + i; }
  template <class I> MPSX_INLINE checked_ptr& operator+=(I i) { p += long(i); return *this; }
  template <class I> MPSX_INLINE checked_ptr& operator-=(I i) { p -= long(i); return *this; }
  MPSX_INLINE checked_ptr& operator++() { ++p; return *this; }
  MPSX_INLINE checked_ptr& operator--() { --p; return *this; }
  MPSX_INLINE checked_ptr operator++(int) { checked_ptr r = *this; ++p; return r; }
  MPSX_INLINE checked_ptr operator--(int) { checked_ptr r = *this; --p; return r; }
};

template <class T> MPSX_INLINE const volatile void* ptr_addr(const checked_ptr<T>& q) { return q.p; }
template <class T> MPSX_INLINE const volatile void* ptr_addr(T* q) { return q; }
MPSX_INLINE const volatile void* ptr_addr(std::nullptr_t) { return nullptr; }
template <class A, class B>
using any_checked = std::enable_if_t<is_checked<std::decay_t<A>>::value || is_checked<std::decay_t<B>>::value, int>;
#define MPSX_CHECKED_CMP(op)                                                           \
  template <class A, class B, any_checked<A, B> = 0>                                   \
  MPSX_INLINE bool operator op(const A& a, const B& b) {                               \
    return static_cast<const volatile char*>(ptr_addr(a)) op static_cast<const volatile char*>(ptr_addr(b)); \
  }
MPSX_CHECKED_CMP(==)
MPSX_CHECKED_CMP(!=)
MPSX_CHECKED_CMP(<)
MPSX_CHECKED_CMP(<=)
MPSX_CHECKED_CMP(>)
MPSX_CHECKED_CMP(>=)
#undef MPSX_CHECKED_CMP
template <class T, class U>
MPSX_INLINE ptrdiff_t operator-(const checked_ptr<T>& a, const checked_ptr<U>& b) { return a.p - b.p; }
template <class T, class U>
MPSX_INLINE ptrdiff_t operator-(const checked_ptr<T>& a, U* b) { return a.p - b; }
template <class T, class U>
MPSX_INLINE ptrdiff_t operator-(U* a, const checked_ptr<T>& b) { return a - b.p; }

// reinterpret_cast<device T*>(x) / static_cast<device T*>(x) in checked builds
template <class T, class U> MPSX_INLINE checked_ptr<T> dev_cast(const checked_ptr<U>& o) { return checked_ptr<T>(o); }
template <class T, class U> MPSX_INLINE checked_ptr<T> dev_cast(U* q) { return checked_ptr<T>(q); }
template <class T, class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
MPSX_INLINE checked_ptr<T> dev_cast(I v) { return checked_ptr<T>(v); }

// reinterpret_cast<X>(x) to anything but a device pointer (e.g. reinterpret_cast<ulong>(p))
template <class To, class From> MPSX_INLINE To reinterpret_as(From&& f) {
  if constexpr (is_checked<std::decay_t<From>>::value) {
    return reinterpret_cast<To>(f.p);
  } else {
    return reinterpret_cast<To>(std::forward<From>(f));
  }
}

template <class P>
MPSX_INLINE P slot_cast_checked(void* s, const void* ab, uint64_t k) {
  using D = std::remove_cv_t<std::remove_reference_t<P>>;
  if constexpr (is_checked<D>::value) {
    using E = std::remove_pointer_t<decltype(D().p)>;
    return D(reinterpret_cast<E*>(s), arg_lo(ab, k), arg_hi(ab, k), long(k));
  } else {
    return slot_cast<P>(s);
  }
}

}  // namespace mpsx
// Atomics through checked pointers: the element access is checked, then the operation runs.
namespace metal {
#define MPSX_CHECKED_ATOMIC(fn)                                                                \
  template <class A, class... R>                                                               \
  MPSX_INLINE decltype(auto) fn(::mpsx::checked_ptr<A> o, R... r) { return fn(&o.at(0), r...); }
MPSX_CHECKED_ATOMIC(atomic_store_explicit)
MPSX_CHECKED_ATOMIC(atomic_load_explicit)
MPSX_CHECKED_ATOMIC(atomic_exchange_explicit)
MPSX_CHECKED_ATOMIC(atomic_compare_exchange_weak_explicit)
MPSX_CHECKED_ATOMIC(atomic_compare_exchange_strong_explicit)
MPSX_CHECKED_ATOMIC(atomic_fetch_add_explicit)
MPSX_CHECKED_ATOMIC(atomic_fetch_sub_explicit)
MPSX_CHECKED_ATOMIC(atomic_fetch_and_explicit)
MPSX_CHECKED_ATOMIC(atomic_fetch_or_explicit)
MPSX_CHECKED_ATOMIC(atomic_fetch_xor_explicit)
MPSX_CHECKED_ATOMIC(atomic_fetch_min_explicit)
MPSX_CHECKED_ATOMIC(atomic_fetch_max_explicit)
MPSX_CHECKED_ATOMIC(atomic_max_explicit)
MPSX_CHECKED_ATOMIC(atomic_min_explicit)
#undef MPSX_CHECKED_ATOMIC
}  // namespace metal
namespace mpsx {

// ------------------------------------------------------------ loop mode
template <class F>
MPSX_INLINE void run_loop(const uint32_t* grid, const uint32_t* grp, uint64_t gb, uint64_t ge, F& body) {
  const uint gx = grid[0], gy = grid[1], gz = grid[2];
  const uint bx = grp[0], by = grp[1], bz = grp[2];
  // Group counts and group ends in 64 bits: a grid dimension may be up to 2^32 - 1.
  const uint nx = uint((uint64_t(gx) + bx - 1) / bx), ny = uint((uint64_t(gy) + by - 1) / by),
             nz = uint((uint64_t(gz) + bz - 1) / bz);
  tinfo t;
  t.tpg = uint3_(gx, gy, gz);
  t.tgpg = uint3_(nx, ny, nz);
  t.dtptg = uint3_(bx, by, bz);
  for (uint64_t g = gb; g < ge; ++g) {
    const uint ix = uint(g % nx);
    const uint64_t r = g / nx;
    const uint iy = uint(r % ny), iz = uint(r / ny);
    const uint x0 = ix * bx, y0 = iy * by, z0 = iz * bz;
    const uint x1 = uint64_t(x0) + bx < gx ? x0 + bx : gx;
    const uint y1 = uint64_t(y0) + by < gy ? y0 + by : gy;
    const uint z1 = uint64_t(z0) + bz < gz ? z0 + bz : gz;
    const uint sx = x1 - x0, sy = y1 - y0, sz = z1 - z0;
    t.tgpig = uint3_(ix, iy, iz);
    t.tptg = uint3_(sx, sy, sz);
    t.nsg = (sx * sy * sz + 31) / 32;
    for (uint z = z0; z < z1; ++z) {
      for (uint y = y0; y < y1; ++y) {
        const uint base = ((z - z0) * sy + (y - y0)) * sx;
        for (uint x = x0; x < x1; ++x) {
          tinfo u = t;
          u.tpig = uint3_(x, y, z);
          u.tpitg = uint3_(x - x0, y - y0, z - z0);
          u.tiitg = base + (x - x0);
          u.lane = u.tiitg & 31u;
          u.sgid = u.tiitg >> 5;
          body(u);
        }
      }
    }
  }
}

// ------------------------------------------------------------ fibers
extern "C" void mpsx_fiber_switch(void** save_sp, void* new_sp);
#if defined(__x86_64__)
asm(R"(
  .text
  .p2align 4
  .hidden mpsx_fiber_switch
  .globl mpsx_fiber_switch
  .type mpsx_fiber_switch,@function
mpsx_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mpsx_fiber_switch,.-mpsx_fiber_switch

  .p2align 4
  .hidden mpsx_fiber_trampoline
  .globl mpsx_fiber_trampoline
  .type mpsx_fiber_trampoline,@function
mpsx_fiber_trampoline:
  andq $-16, %rsp
  movq %r12, %rdi
  call mpsx_fiber_main
  ud2
  .size mpsx_fiber_trampoline,.-mpsx_fiber_trampoline
)");
#elif defined(__aarch64__)
asm(R"(
  .text
  .p2align 4
  .hidden mpsx_fiber_switch
  .globl mpsx_fiber_switch
  .type mpsx_fiber_switch,%function
mpsx_fiber_switch:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
  .size mpsx_fiber_switch,.-mpsx_fiber_switch

  .p2align 4
  .hidden mpsx_fiber_trampoline
  .globl mpsx_fiber_trampoline
  .type mpsx_fiber_trampoline,%function
mpsx_fiber_trampoline:
  mov x0, x19
  bl mpsx_fiber_main
  brk #0
  .size mpsx_fiber_trampoline,.-mpsx_fiber_trampoline
)");
#else
#error "torch_mps_ext shaders: fiber context switch is implemented for x86_64 and aarch64 only"
#endif
extern "C" void mpsx_fiber_trampoline();

enum { F_READY = 0, F_SIMD = 1, F_BARRIER = 2, F_DONE = 3 };
constexpr unsigned kMaxThreads = 1024;
}  // namespace mpsx
// Bytes of stack per fiber: set by the Python side when the library is loaded, before any
// launch, from the frame sizes the compiler measured (shader/_compiler.py fiber_frames).
extern "C" __attribute__((visibility("default"))) size_t mpsx_fiber_stack_size = 256 * 1024;
namespace mpsx {
constexpr unsigned kSlot = 64;

struct fiber {
  void* sp;
  int state;
  unsigned key;
  unsigned sz;
  unsigned seq;  // simd collectives this lane has entered (divergence bookkeeping)
  alignas(16) unsigned char slot[kSlot];
  tinfo t;
};

struct group_ctx {
  fiber f[kMaxThreads];
  alignas(64) unsigned char snap[kMaxThreads / 32][32][kSlot];
  uint32_t mask[kMaxThreads / 32];
  uint32_t epoch[kMaxThreads / 32];  // bumped each time a collective of the simdgroup resolves
  struct {
    uint32_t epoch;
    alignas(16) unsigned char val[kSlot];
  } result[kMaxThreads / 32];  // uniform results (sum, max, ballot, ...) computed by the first lane
  void* sched_sp;
  void (*body)(void*, const tinfo&);
  void* fn;
  fiber* cur;
  unsigned n;
  char* stacks;
  size_t stack;      // bytes per fiber stack
  unsigned guarded;  // fibers [0, guarded) have a guard page below their stack
};

static thread_local group_ctx* tl_ctx = nullptr;

// A blocking fiber hands the CPU straight to the next ready fiber of the pass (one context
// switch instead of two through the scheduler); the last one returns to the scheduler.
MPSX_INLINE void fiber_leave(group_ctx* c, fiber* f) {
  fiber* end = c->f + c->n;
  for (fiber* nx = f + 1; nx < end; ++nx) {
    if (nx->state == F_READY) {
      c->cur = nx;
      mpsx_fiber_switch(&f->sp, nx->sp);
      return;
    }
  }
  mpsx_fiber_switch(&f->sp, c->sched_sp);
}

extern "C" __attribute__((used, visibility("hidden"))) void mpsx_fiber_main(fiber* f) {
  group_ctx* c = tl_ctx;
  c->body(c->fn, f->t);
  f->state = F_DONE;
  fiber_leave(c, f);
  __builtin_unreachable();
}

static group_ctx* thread_group_ctx() {
  static thread_local group_ctx* ctx = nullptr;
  if (!ctx) {
    ctx = static_cast<group_ctx*>(::operator new(sizeof(group_ctx)));
    std::memset(static_cast<void*>(ctx), 0, sizeof(group_ctx));
    const size_t stack = (mpsx_fiber_stack_size + 0xFFFF) & ~size_t(0xFFFF);
    const size_t total = stack * kMaxThreads;
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      report("could not reserve fiber stacks (%zu bytes: %zu per thread of a threadgroup)", total, stack);
      ::operator delete(ctx);
      ctx = nullptr;
      return nullptr;
    }
    // One reservation; guard pages are added below the stacks of the fibers a launch actually
    // uses (guard_fiber_stacks), not all 1024 up front: each guard costs two memory mappings
    // per OS thread (vm.max_map_count is 65530).
    ctx->stacks = static_cast<char*>(m);
    ctx->stack = stack;
  }
  return ctx;
}

MPSX_INLINE void fiber_yield(group_ctx* c, int state) {
  fiber* f = c->cur;
  f->state = state;
  fiber_leave(c, f);
}

// An inaccessible page at the bottom of the stacks of fibers [c->guarded, n): a fiber that
// overflows its stack faults there (a device error, runtime/Fault.h) instead of writing into
// its neighbour's stack. If the system refuses more mappings, the remaining stacks stay
// unguarded (overflow still faults below the lowest stack).
static void guard_fiber_stacks(group_ctx* c, unsigned n) {
  const size_t page = 4096;
  while (c->guarded < n) {
    if (mprotect(c->stacks + size_t(c->guarded) * c->stack, page, PROT_NONE) != 0) {
      c->guarded = kMaxThreads;
      return;
    }
    ++c->guarded;
  }
}

static void resolve(group_ctx* c) {
  const unsigned n = c->n;
  bool any = false;
  for (unsigned s = 0; s * 32 < n; ++s) {
    const unsigned l0 = s * 32, l1 = (s * 32 + 32 < n) ? s * 32 + 32 : n;
    // Divergent lanes may wait at different collectives.  Resolve first the one reached by
    // the lane that has executed the fewest collectives (the branch that is "behind"), so that
    // lanes meeting again after the branch (reconvergence) run the next collective together.
    unsigned key = 0, best_seq = ~0u;
    bool found = false;
    for (unsigned l = l0; l < l1; ++l) {
      if (c->f[l].state == F_SIMD && c->f[l].seq < best_seq) {
        key = c->f[l].key;
        best_seq = c->f[l].seq;
        found = true;
      }
    }
    if (!found) continue;
    any = true;
    uint32_t mask = 0;
    for (unsigned l = l0; l < l1; ++l) {
      fiber& f = c->f[l];
      if (f.state == F_SIMD && f.key == key) {
        mask |= 1u << (l - l0);
        std::memcpy(c->snap[s][l - l0], f.slot, kSlot);
        f.state = F_READY;
      } else {
        std::memset(c->snap[s][l - l0], 0, kSlot);  // inactive lanes read as zero
      }
    }
    for (unsigned l = l1 - l0; l < 32; ++l) std::memset(c->snap[s][l], 0, kSlot);
    c->mask[s] = mask;
    c->epoch[s]++;
  }
  if (!any) {  // everybody still alive waits at a threadgroup barrier: release it
    for (unsigned l = 0; l < n; ++l)
      if (c->f[l].state == F_BARRIER) c->f[l].state = F_READY;
  }
}

static void run_group(group_ctx* c) {
  const unsigned n = c->n;
  for (unsigned i = 0; i < n; ++i) {
    fiber& f = c->f[i];
    // Stagger the stack tops: tops exactly a stack size apart would all map to the same cache
    // sets and evict each other on every switch.
    char* top = c->stacks + (i + 1) * c->stack - ((i * 1088u) % 65536u);
    void** sp = reinterpret_cast<void**>(top);
#if defined(__x86_64__)
    *--sp = nullptr;                                          // alignment slot
    *--sp = reinterpret_cast<void*>(&mpsx_fiber_trampoline);  // return address
    *--sp = nullptr;                                          // rbp
    *--sp = nullptr;                                          // rbx
    *--sp = &f;                                               // r12 -> fiber
    *--sp = nullptr;                                          // r13
    *--sp = nullptr;                                          // r14
    *--sp = nullptr;                                          // r15
#else
    sp -= 22;  // 176 bytes frame
    for (int k = 0; k < 22; ++k) sp[k] = nullptr;
    sp[0] = &f;                                               // x19 -> fiber
    sp[11] = reinterpret_cast<void*>(&mpsx_fiber_trampoline); // x30 (lr)
#endif
    f.sp = sp;
    f.state = F_READY;
    f.seq = 0;
  }
  for (;;) {
    // one pass: every ready fiber runs until it blocks or finishes (they chain to each other)
    for (unsigned i = 0; i < n; ++i) {
      if (c->f[i].state == F_READY) {
        c->cur = &c->f[i];
        mpsx_fiber_switch(&c->sched_sp, c->f[i].sp);
        break;
      }
    }
    unsigned live = 0;
    for (unsigned i = 0; i < n; ++i) live += c->f[i].state != F_DONE;
    if (!live) break;
    resolve(c);
  }
}

template <class F> static void fiber_body(void* fn, const tinfo& t) { (*static_cast<F*>(fn))(t); }

template <class F>
static void run_fibers(const uint32_t* grid, const uint32_t* grp, uint64_t gb, uint64_t ge, F& body) {
  group_ctx* c = thread_group_ctx();
  if (!c) return;
  group_ctx* prev = tl_ctx;
  tl_ctx = c;
  c->body = &fiber_body<F>;
  c->fn = &body;
  const uint gx = grid[0], gy = grid[1], gz = grid[2];
  const uint bx = grp[0], by = grp[1], bz = grp[2];
  // Group counts and group ends in 64 bits: a grid dimension may be up to 2^32 - 1.
  const uint nx = uint((uint64_t(gx) + bx - 1) / bx), ny = uint((uint64_t(gy) + by - 1) / by),
             nz = uint((uint64_t(gz) + bz - 1) / bz);
  for (uint64_t g = gb; g < ge; ++g) {
    const uint ix = uint(g % nx);
    const uint64_t r = g / nx;
    const uint iy = uint(r % ny), iz = uint(r / ny);
    const uint x0 = ix * bx, y0 = iy * by, z0 = iz * bz;
    const uint x1 = uint64_t(x0) + bx < gx ? x0 + bx : gx;
    const uint y1 = uint64_t(y0) + by < gy ? y0 + by : gy;
    const uint z1 = uint64_t(z0) + bz < gz ? z0 + bz : gz;
    const uint sx = x1 - x0, sy = y1 - y0, sz = z1 - z0;
    const unsigned n = sx * sy * sz;
    if (n == 0) continue;
    if (n > kMaxThreads) {
      report("threadgroup of %u threads exceeds the %u-thread limit", n, kMaxThreads);
      break;
    }
    c->n = n;
    guard_fiber_stacks(c, n);
    unsigned i = 0;
    for (uint z = z0; z < z1; ++z)
      for (uint y = y0; y < y1; ++y)
        for (uint x = x0; x < x1; ++x, ++i) {
          tinfo& t = c->f[i].t;
          t.tpg = uint3_(gx, gy, gz);
          t.tgpg = uint3_(nx, ny, nz);
          t.dtptg = uint3_(bx, by, bz);
          t.tgpig = uint3_(ix, iy, iz);
          t.tptg = uint3_(sx, sy, sz);
          t.tpig = uint3_(x, y, z);
          t.tpitg = uint3_(x - x0, y - y0, z - z0);
          t.tiitg = i;
          t.lane = i & 31u;
          t.sgid = i >> 5;
          t.nsg = (n + 31) / 32;
        }
    run_group(c);
  }
  tl_ctx = prev;
}

// A simd-group rendezvous: publish this lane's value, wait until the active lanes of the
// simdgroup have published theirs, then read them from the snapshot.
struct simd_view {
  const unsigned char* snap;
  uint32_t mask;
  unsigned lane;
  group_ctx* ctx;
  unsigned sg;
  // uniform results: the first lane of a resolved collective computes, the others copy
  template <class T> MPSX_INLINE bool cached(T& out) const {
    auto& r = ctx->result[sg];
    if (r.epoch != ctx->epoch[sg]) return false;
    std::memcpy(static_cast<void*>(&out), r.val, sizeof(T));
    return true;
  }
  template <class T> MPSX_INLINE void store(const T& v) const {
    auto& r = ctx->result[sg];
    std::memcpy(r.val, static_cast<const void*>(&v), sizeof(T));
    r.epoch = ctx->epoch[sg];
  }
  template <class T> MPSX_INLINE T get(unsigned l) const {
    T t;
    std::memcpy(static_cast<void*>(&t), snap + l * kSlot, sizeof(T));
    return t;
  }
};
template <class T>
MPSX_INLINE simd_view simd_xchg(const T& v, unsigned op, unsigned line, const char* what) {
  static_assert(sizeof(T) <= kSlot, "simd-group operand too large");
  group_ctx* c = tl_ctx;
  if (__builtin_expect(!c, 0)) {
    misuse(what);
    return simd_view{nullptr, 0, 0, nullptr, 0};
  }
  fiber* f = c->cur;
  std::memcpy(f->slot, static_cast<const void*>(&v), sizeof(T));
  f->sz = sizeof(T);
  f->key = op * 2654435761u ^ line;
  f->seq++;
  fiber_yield(c, F_SIMD);
  f = c->cur;
  return simd_view{&c->snap[f->t.sgid][0][0], c->mask[f->t.sgid], f->t.lane, c, f->t.sgid};
}
}  // namespace mpsx

// ---------------------------------------------------------------- barriers and simd-group functions
namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8, mem_object_data = 16 };
MPSX_INLINE constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
MPSX_INLINE constexpr mem_flags operator&(mem_flags a, mem_flags b) { return mem_flags(int(a) & int(b)); }

MPSX_INLINE void threadgroup_barrier(mem_flags = mem_flags::mem_none) {
  ::mpsx::group_ctx* c = ::mpsx::tl_ctx;
  if (__builtin_expect(!c, 0)) return ::mpsx::misuse("threadgroup_barrier");
  ::mpsx::fiber_yield(c, ::mpsx::F_BARRIER);
}
MPSX_INLINE void simdgroup_barrier(mem_flags = mem_flags::mem_none, unsigned line = __builtin_LINE()) {
  (void)::mpsx::simd_xchg(0, 99, line, "simdgroup_barrier");
}

typedef ulong vote_t;
struct simd_vote {
  vote_t v;
  constexpr simd_vote(vote_t x = 0) : v(x) {}
  explicit constexpr operator vote_t() const { return v; }
  constexpr bool all() const { return v == 0xffffffffull; }
  constexpr bool any() const { return v != 0; }
};

#define MPSX_SIMD_FOLD(name, op_id, init, combine)                                                   \
  template <class T>                                                                                 \
  MPSX_INLINE T name(T v, unsigned line = __builtin_LINE()) {                                        \
    ::mpsx::simd_view w = ::mpsx::simd_xchg(v, op_id, line, #name);                                             \
    if (!w.snap) return v;                                                                           \
    T acc;                                                                                           \
    if (w.cached(acc)) return acc;                                                                   \
    acc = init;                                                                                      \
    for (uint32_t m = w.mask; m; m &= m - 1) {                                                       \
      T x = w.get<T>(__builtin_ctz(m));                                                              \
      acc = combine;                                                                                 \
    }                                                                                                \
    w.store(acc);                                                                                    \
    return acc;                                                                                      \
  }
MPSX_SIMD_FOLD(simd_sum, 1, T(0), T(acc + x))
MPSX_SIMD_FOLD(simd_product, 2, T(1), T(acc * x))
MPSX_SIMD_FOLD(simd_max, 3, w.get<T>(__builtin_ctz(w.mask)), T(max(acc, x)))
MPSX_SIMD_FOLD(simd_min, 4, w.get<T>(__builtin_ctz(w.mask)), T(min(acc, x)))
MPSX_SIMD_FOLD(simd_and, 5, T(~T(0)), T(acc & x))
MPSX_SIMD_FOLD(simd_or, 6, T(0), T(acc | x))
MPSX_SIMD_FOLD(simd_xor, 7, T(0), T(acc ^ x))
#undef MPSX_SIMD_FOLD

MPSX_INLINE bool simd_all(bool b, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(b, 8, line, "simd_all");
  if (!w.snap) return b;
  bool r = true;
  for (uint32_t m = w.mask; m; m &= m - 1) r = r && w.get<bool>(__builtin_ctz(m));
  return r;
}
MPSX_INLINE bool simd_any(bool b, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(b, 9, line, "simd_any");
  if (!w.snap) return b;
  bool r = false;
  for (uint32_t m = w.mask; m; m &= m - 1) r = r || w.get<bool>(__builtin_ctz(m));
  return r;
}
MPSX_INLINE simd_vote simd_ballot(bool b, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(b, 10, line, "simd_ballot");
  if (!w.snap) return simd_vote(b ? 1 : 0);
  vote_t r = 0;
  for (uint32_t m = w.mask; m; m &= m - 1) {
    unsigned l = __builtin_ctz(m);
    if (w.get<bool>(l)) r |= vote_t(1) << l;
  }
  return simd_vote(r);
}
MPSX_INLINE simd_vote simd_active_threads_mask(unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(0, 11, line, "simd_active_threads_mask");
  return simd_vote(w.snap ? vote_t(w.mask) : 1);
}
MPSX_INLINE bool simd_is_first(unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(0, 12, line, "simd_is_first");
  return w.snap ? unsigned(__builtin_ctz(w.mask)) == w.lane : true;
}
template <class T> MPSX_INLINE T simd_broadcast(T v, ushort lane, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 13, line, "simd_broadcast");
  return w.snap ? w.get<T>(lane & 31u) : v;
}
template <class T> MPSX_INLINE T simd_broadcast_first(T v, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 14, line, "simd_broadcast_first");
  return w.snap ? w.get<T>(__builtin_ctz(w.mask)) : v;
}
template <class T> MPSX_INLINE T simd_shuffle(T v, ushort lane, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 15, line, "simd_shuffle");
  return w.snap ? w.get<T>(lane & 31u) : v;
}
template <class T> MPSX_INLINE T simd_shuffle_up(T v, ushort delta, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 16, line, "simd_shuffle_up");
  if (!w.snap) return v;
  return w.lane >= delta ? w.get<T>(w.lane - delta) : v;
}
template <class T> MPSX_INLINE T simd_shuffle_down(T v, ushort delta, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 17, line, "simd_shuffle_down");
  if (!w.snap) return v;
  return w.lane + delta < 32 ? w.get<T>(w.lane + delta) : v;
}
template <class T> MPSX_INLINE T simd_shuffle_xor(T v, ushort mask, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 18, line, "simd_shuffle_xor");
  return w.snap ? w.get<T>((w.lane ^ mask) & 31u) : v;
}
template <class T> MPSX_INLINE T simd_shuffle_rotate_up(T v, ushort delta, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 19, line, "simd_shuffle_rotate_up");
  return w.snap ? w.get<T>((w.lane + 32u - (delta & 31u)) & 31u) : v;
}
template <class T> MPSX_INLINE T simd_shuffle_rotate_down(T v, ushort delta, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 20, line, "simd_shuffle_rotate_down");
  return w.snap ? w.get<T>((w.lane + delta) & 31u) : v;
}
template <class T>
MPSX_INLINE T simd_shuffle_and_fill_up(T v, T fill, ushort delta, ushort modulo = 32, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 21, line, "simd_shuffle_and_fill_up");
  if (!w.snap) return v;
  const unsigned base = w.lane - w.lane % modulo, off = w.lane % modulo;
  return off >= delta ? w.get<T>(base + off - delta) : fill;
}
template <class T>
MPSX_INLINE T simd_shuffle_and_fill_down(T v, T fill, ushort delta, ushort modulo = 32, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 22, line, "simd_shuffle_and_fill_down");
  if (!w.snap) return v;
  const unsigned base = w.lane - w.lane % modulo, off = w.lane % modulo;
  return off + delta < modulo ? w.get<T>(base + off + delta) : fill;
}
#define MPSX_SIMD_PREFIX(name, op_id, init, combine, inclusive)                                      \
  template <class T> MPSX_INLINE T name(T v, unsigned line = __builtin_LINE()) {                     \
    ::mpsx::simd_view w = ::mpsx::simd_xchg(v, op_id, line, #name);                                             \
    if (!w.snap) return inclusive ? v : T(init);                                                     \
    T acc = T(init);                                                                                 \
    const uint32_t upto = inclusive ? (w.lane == 31 ? 0xffffffffu : ((1u << (w.lane + 1)) - 1)) : ((1u << w.lane) - 1); \
    for (uint32_t m = w.mask & upto; m; m &= m - 1) {                                                \
      T x = w.get<T>(__builtin_ctz(m));                                                              \
      acc = combine;                                                                                 \
    }                                                                                                \
    return acc;                                                                                      \
  }
MPSX_SIMD_PREFIX(simd_prefix_inclusive_sum, 23, 0, T(acc + x), true)
MPSX_SIMD_PREFIX(simd_prefix_exclusive_sum, 24, 0, T(acc + x), false)
MPSX_SIMD_PREFIX(simd_prefix_inclusive_product, 25, 1, T(acc * x), true)
MPSX_SIMD_PREFIX(simd_prefix_exclusive_product, 26, 1, T(acc * x), false)
#undef MPSX_SIMD_PREFIX

// quad-group (4 lanes) variants of the common collectives
template <class T> MPSX_INLINE T quad_sum(T v, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 30, line, "quad_sum");
  if (!w.snap) return v;
  T acc = T(0);
  for (uint32_t m = w.mask & (0xfu << (w.lane & ~3u)); m; m &= m - 1) acc = T(acc + w.get<T>(__builtin_ctz(m)));
  return acc;
}
template <class T> MPSX_INLINE T quad_broadcast(T v, ushort lane, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 31, line, "quad_broadcast");
  return w.snap ? w.get<T>((w.lane & ~3u) + (lane & 3u)) : v;
}
template <class T> MPSX_INLINE T quad_shuffle(T v, ushort lane, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 32, line, "quad_shuffle");
  return w.snap ? w.get<T>((w.lane & ~3u) + (lane & 3u)) : v;
}
template <class T> MPSX_INLINE T quad_shuffle_xor(T v, ushort mask, unsigned line = __builtin_LINE()) {
  ::mpsx::simd_view w = ::mpsx::simd_xchg(v, 33, line, "quad_shuffle_xor");
  return w.snap ? w.get<T>((w.lane & ~3u) + ((w.lane ^ mask) & 3u)) : v;
}
}  // namespace metal

// After a launch has completed: collect what the kernels reported -- the checked-mode /
// runtime error of this library and the messages TORCH_REPORT_ERROR wrote into the error
// buffer (c10/metal/error.h layout) -- as text in `out`.  Returns its length (0: no error).
extern "C" __attribute__((visibility("default"))) size_t mpsx_finish(const void* ab, char* out, size_t cap) {
  size_t n = 0;
  if (cap == 0) return 0;
  out[0] = 0;
  auto put = [&](const char* fmt, auto... a) {
    if (n + 1 >= cap) return;
    int w = snprintf(out + n, cap - n, fmt, a...);
    if (w > 0) n = (n + size_t(w) < cap) ? n + size_t(w) : cap - 1;
  };
  if (__atomic_exchange_n(&::mpsx::g_err.flag, 0, __ATOMIC_ACQ_REL)) put("%s", ::mpsx::g_err.msg);
  const uint64_t* h = ::mpsx::ab_header(ab);
  if (h[2] != ~0ull && h[2] < h[1]) {
    const unsigned char* eb = static_cast<const unsigned char*>(::mpsx::slot_ptr(ab, h[4 + h[2]]));
    uint32_t count;
    std::memcpy(&count, eb, 4);
    if (count > 30) count = 30;
    for (uint32_t i = 0; i < count; ++i) {
      const unsigned char* m = eb + 4 + 512 * i;
      uint32_t line;
      std::memcpy(&line, m + 508, 4);
      put("%s%.*s (reported by kernel '%.*s' at %.*s:%u)", n ? "\n" : "", 250, (const char*)m + 256, 128,
          (const char*)m + 128, 128, (const char*)m, line);
    }
  }
  return n;
}

