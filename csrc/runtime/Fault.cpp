// Layer 1: guarded execution of device code (Fault.h).
#include "runtime/Fault.h"

#include "runtime/Settings.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace torch_mps_ext::runtime {
namespace {

constexpr int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
constexpr int kTimeoutSignal = SIGURG;  // ignored by default: harmless if it arrives late
constexpr std::size_t kAltStackBytes = 256 * 1024;

struct Guard {
  sigjmp_buf jump;
  volatile sig_atomic_t signal = 0;
  void* address = nullptr;
  Guard* outer = nullptr;
};

thread_local Guard* t_guard = nullptr;
thread_local bool t_altstack = false;
struct sigaction g_previous[NSIG];

void describe(int sig, void* addr, std::string* what) {
  char buf[160];
  const char* name = sig == SIGSEGV ? "SIGSEGV (invalid memory access)"
                     : sig == SIGBUS ? "SIGBUS (misaligned or unmapped memory access)"
                     : sig == SIGFPE ? "SIGFPE (arithmetic fault, e.g. integer division by zero)"
                     : sig == SIGILL ? "SIGILL (illegal instruction, e.g. a trap)"
                                     : "a signal";
  std::snprintf(buf, sizeof buf, "%s at address %p", name, addr);
  *what = buf;
}

void onSignal(int sig, siginfo_t* info, void* ctx) {
  Guard* g = t_guard;
  if (g != nullptr) {
    g->signal = sig;
    g->address = info != nullptr ? info->si_addr : nullptr;
    siglongjmp(g->jump, 1);
  }
  if (sig == kTimeoutSignal) return;  // the run it was meant for has ended
  // Not device code: what was there before us.
  const struct sigaction& prev = g_previous[sig];
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction != nullptr) {
      prev.sa_sigaction(sig, info, ctx);
      return;
    }
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    prev.sa_handler(sig);
    return;
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

void installHandlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = &onSignal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    for (int sig : kFaultSignals) sigaction(sig, &sa, &g_previous[sig]);
    sigaction(kTimeoutSignal, &sa, &g_previous[kTimeoutSignal]);
  });
}

// An alternate signal stack for this thread (once; kept for its lifetime),
// so that a handler can run when device code has exhausted its stack.
void ensureAltStack() {
  if (t_altstack) return;
  t_altstack = true;
  void* mem = mmap(nullptr, kAltStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return;
  stack_t ss{};
  ss.ss_sp = mem;
  ss.ss_size = kAltStackBytes;
  if (sigaltstack(&ss, nullptr) != 0) munmap(mem, kAltStackBytes);
}

// The watchdog: guarded runs register their thread and deadline.
struct Watch {
  std::mutex mu;
  std::unordered_map<const Guard*, std::pair<pthread_t, std::chrono::steady_clock::time_point>>
      runs;
  std::atomic<bool> started{false};
};

Watch& watch() {
  static Watch* w = new Watch();  // never destroyed: its thread outlives statics
  return *w;
}

double timeoutSeconds() {
  static const double s =
      settings::number("TORCH_MPS_EXT_KERNEL_TIMEOUT_S", 0.0, 1e9).value_or(0.0);
  return s;
}

void watchdogLoop() {
  Watch& w = watch();
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(w.mu);
    for (auto& [guard, run] : w.runs) {
      if (now >= run.second) pthread_kill(run.first, kTimeoutSignal);
    }
  }
}

} // namespace

bool runGuarded(const std::function<void()>& fn, std::string* what) {
  installHandlers();
  ensureAltStack();
  Guard g;
  g.outer = t_guard;
  const double timeout = timeoutSeconds();
  if (sigsetjmp(g.jump, 1) == 0) {
    t_guard = &g;
    if (timeout > 0) {
      Watch& w = watch();
      if (!w.started.exchange(true)) std::thread(watchdogLoop).detach();
      std::lock_guard<std::mutex> lock(w.mu);
      w.runs[&g] = {pthread_self(), std::chrono::steady_clock::now() +
                                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                            std::chrono::duration<double>(timeout))};
    }
    fn();
    t_guard = g.outer;
    if (timeout > 0) {
      std::lock_guard<std::mutex> lock(watch().mu);
      watch().runs.erase(&g);
    }
    return true;
  }
  // Came back from the signal handler.
  t_guard = g.outer;
  if (timeout > 0) {
    std::lock_guard<std::mutex> lock(watch().mu);
    watch().runs.erase(&g);
  }
  if (g.signal == kTimeoutSignal) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "ran longer than TORCH_MPS_EXT_KERNEL_TIMEOUT_S=%g and was stopped",
                  timeout);
    *what = buf;
  } else {
    describe(g.signal, g.address, what);
  }
  return false;
}

} // namespace torch_mps_ext::runtime
