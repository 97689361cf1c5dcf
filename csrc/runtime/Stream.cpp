#include "runtime/Stream.h"

#include "runtime/Device.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <chrono>
#include <thread>
#include <utility>

namespace torch_mps_ext::runtime {

struct EventRecord {
  int device;
  std::int64_t stream;
  std::uint64_t mark;                 // complete once the stream reaches it
  std::atomic<std::int64_t> time_ns{0};
  EventRecord(int d, std::int64_t s, std::uint64_t m) : device(d), stream(s), mark(m) {}
};

namespace {

// One stream's queue. Never destroyed (threads and records may outlive any
// static destructor order), so a state is leaked on purpose.
struct StreamState {
  int device;
  std::int64_t id;
  std::mutex mu;
  std::condition_variable work_cv;   // worker: work arrived
  std::condition_variable done_cv;   // waiters: `completed` moved
  std::deque<std::pair<std::uint64_t, std::function<void()>>> queue;
  std::atomic<std::uint64_t> submitted{0};
  std::atomic<std::uint64_t> completed{0};
  bool worker = false;

  StreamState(int d, std::int64_t i, std::uint64_t start = 0) : device(d), id(i) {
    submitted.store(start);
    completed.store(start);
  }

  bool idle() const {
    return completed.load(std::memory_order_acquire) >=
        submitted.load(std::memory_order_acquire);
  }
};

std::atomic<StreamState*> g_streams[kMaxDevices][kNumStreams];
std::atomic<std::uint32_t> g_pool_next[kMaxDevices][2];
thread_local std::int64_t t_current[kMaxDevices] = {};

void afterForkInChild() {
  // Worker threads do not survive fork: give every stream a fresh, idle
  // state at the same position, so marks taken before the fork stay valid.
  for (auto& dev : g_streams) {
    for (auto& slot : dev) {
      StreamState* old = slot.load();
      if (old == nullptr) continue;
      std::uint64_t pos = old->submitted.load();
      slot.store(new StreamState(old->device, old->id, pos));
    }
  }
}

StreamState* find(int device, std::int64_t stream) {
  return g_streams[device][stream].load(std::memory_order_acquire);
}

StreamState* get(int device, std::int64_t stream) {
  checkStream(device, stream);
  StreamState* st = find(device, stream);
  if (st != nullptr) return st;
  static std::once_flag atfork;
  std::call_once(atfork, [] { pthread_atfork(nullptr, nullptr, afterForkInChild); });
  auto* fresh = new StreamState(device, stream);
  if (g_streams[device][stream].compare_exchange_strong(st, fresh)) return fresh;
  delete fresh;  // another thread won; `st` holds its state
  return st;
}

void workerLoop(StreamState* st) {
  std::unique_lock<std::mutex> lock(st->mu);
  for (;;) {
    st->work_cv.wait(lock, [st] { return !st->queue.empty(); });
    auto item = std::move(st->queue.front());
    st->queue.pop_front();
    lock.unlock();
    try {
      item.second();
    } catch (const std::exception& e) {
      reportError(st->device, e.what());
    } catch (...) {
      reportError(st->device, "mps_ext: unknown error in queued device work");
    }
    item.second = nullptr;  // release what the work held before completing
    lock.lock();
    st->completed.store(item.first, std::memory_order_release);
    st->done_cv.notify_all();
  }
}

void waitFor(StreamState* st, std::uint64_t mark) {
  if (st->completed.load(std::memory_order_acquire) >= mark) return;
  std::unique_lock<std::mutex> lock(st->mu);
  st->done_cv.wait(lock, [&] {
    return st->completed.load(std::memory_order_acquire) >= mark;
  });
}

bool waitForUntil(StreamState* st, std::uint64_t mark,
                  std::chrono::steady_clock::time_point deadline) {
  if (st->completed.load(std::memory_order_acquire) >= mark) return true;
  std::unique_lock<std::mutex> lock(st->mu);
  return st->done_cv.wait_until(lock, deadline, [&] {
    return st->completed.load(std::memory_order_acquire) >= mark;
  });
}

std::chrono::steady_clock::time_point deadlineIn(std::int64_t ms) {
  return std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
}

std::uint64_t submit(StreamState* st, std::function<void()> work) {
  std::lock_guard<std::mutex> lock(st->mu);
  std::uint64_t seq = st->submitted.load() + 1;
  st->queue.emplace_back(seq, std::move(work));
  st->submitted.store(seq, std::memory_order_release);
  if (!st->worker) {
    st->worker = true;
    std::thread(workerLoop, st).detach();
  }
  st->work_cv.notify_one();
  return seq;
}

bool recordReached(const EventRecord& r) {
  StreamState* st = find(r.device, r.stream);
  return st == nullptr || st->completed.load(std::memory_order_acquire) >= r.mark;
}

} // namespace

void checkStream(int device, std::int64_t stream) {
  checkDevice(device);
  if (stream < 0 || stream >= kNumStreams) {
    throw std::out_of_range("Invalid mps_ext stream id " + std::to_string(stream) +
                            ": valid ids are 0.." + std::to_string(kNumStreams - 1));
  }
}

int streamPriority(std::int64_t stream) {
  return stream > kStreamsPerPool ? kHighestPriority : kLowestPriority;
}

std::int64_t poolStream(int device, int priority) {
  checkDevice(device);
  int level = priority < 0 ? 1 : 0;
  std::uint32_t n = g_pool_next[device][level].fetch_add(1, std::memory_order_relaxed);
  return 1 + level * kStreamsPerPool + static_cast<std::int64_t>(n % kStreamsPerPool);
}

void* streamHandle(int device, std::int64_t stream) {
  return get(device, stream);
}

bool streamFromHandle(const void* handle, int* device, std::int64_t* stream) {
  if (handle == nullptr) return false;
  for (int d = 0; d < deviceCount(); ++d) {
    for (std::int64_t s = 0; s < kNumStreams; ++s) {
      if (find(d, s) == handle) {
        *device = d;
        *stream = s;
        return true;
      }
    }
  }
  return false;
}

std::int64_t currentStreamId(int device) {
  if (device < 0 || device >= kMaxDevices) return 0;
  return t_current[device];
}

void setCurrentStreamId(int device, std::int64_t stream) {
  checkStream(device, stream);
  t_current[device] = stream;
}

void enqueue(int device, std::int64_t stream, std::function<void()> work) {
  submit(get(device, stream), std::move(work));
}

void awaitStream(int device, std::int64_t stream) {
  checkStream(device, stream);
  StreamState* st = find(device, stream);
  if (st != nullptr) waitFor(st, st->submitted.load(std::memory_order_acquire));
}

void awaitCurrentStream(int device) {
  if (device < 0 || device >= kMaxDevices) return;
  StreamState* st = find(device, t_current[device]);
  if (st != nullptr && !st->idle()) {
    waitFor(st, st->submitted.load(std::memory_order_acquire));
  }
}

bool queryStream(int device, std::int64_t stream) {
  checkStream(device, stream);
  StreamState* st = find(device, stream);
  return st == nullptr || st->idle();
}

void synchronizeStreams(int device) {
  checkDevice(device);
  for (std::int64_t s = 0; s < kNumStreams; ++s) {
    StreamState* st = find(device, s);
    if (st != nullptr) waitFor(st, st->submitted.load(std::memory_order_acquire));
  }
}

bool awaitStreamFor(int device, std::int64_t stream, std::int64_t timeout_ms) {
  checkStream(device, stream);
  StreamState* st = find(device, stream);
  return st == nullptr ||
         waitForUntil(st, st->submitted.load(std::memory_order_acquire), deadlineIn(timeout_ms));
}

bool synchronizeStreamsFor(int device, std::int64_t timeout_ms) {
  checkDevice(device);
  auto deadline = deadlineIn(timeout_ms);
  for (std::int64_t s = 0; s < kNumStreams; ++s) {
    StreamState* st = find(device, s);
    if (st != nullptr &&
        !waitForUntil(st, st->submitted.load(std::memory_order_acquire), deadline)) {
      return false;
    }
  }
  return true;
}

std::uint64_t streamMark(int device, std::int64_t stream) {
  checkStream(device, stream);
  StreamState* st = find(device, stream);
  return st == nullptr ? 0 : st->submitted.load(std::memory_order_acquire);
}

bool streamReached(int device, std::int64_t stream, std::uint64_t mark) {
  checkStream(device, stream);
  StreamState* st = find(device, stream);
  return st == nullptr || st->completed.load(std::memory_order_acquire) >= mark;
}

void awaitMark(int device, std::int64_t stream, std::uint64_t mark) {
  checkStream(device, stream);
  StreamState* st = find(device, stream);
  if (st != nullptr) waitFor(st, mark);
}

// ---- events ----

Event* createEvent(bool timing) {
  auto* e = new Event();
  e->timing = timing;
  return e;
}

void destroyEvent(Event* event) {
  delete event;
}

void recordEvent(Event* event, int device, std::int64_t stream) {
  if (event->device >= 0 && event->device != device) {
    throw std::invalid_argument(
        "Event device index " + std::to_string(event->device) +
        " does not match recording stream's device index " + std::to_string(device));
  }
  StreamState* st = get(device, stream);
  std::shared_ptr<EventRecord> rec;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    if (st->queue.empty() && st->idle()) {
      // Nothing pending: the stream reaches the record right now.
      rec = std::make_shared<EventRecord>(device, stream, st->submitted.load());
      rec->time_ns.store(nowNs());
    }
  }
  if (!rec) {
    // Reached when the worker gets to it; the mark is that work's number.
    auto pending = std::make_shared<EventRecord>(device, stream, 0);
    pending->mark = submit(st, [pending] { pending->time_ns.store(nowNs()); });
    rec = std::move(pending);
  }
  event->device = device;
  event->last = std::move(rec);
}

void streamWaitEvent(Event* event, int device, std::int64_t stream) {
  std::shared_ptr<EventRecord> rec = event->last;
  if (!rec || recordReached(*rec)) return;
  if (rec->device == device && rec->stream == stream) return;  // same queue: ordered
  enqueue(device, stream, [rec] { awaitMark(rec->device, rec->stream, rec->mark); });
}

bool queryEvent(const Event* event) {
  return !event->last || recordReached(*event->last);
}

void synchronizeEvent(const Event* event) {
  std::shared_ptr<EventRecord> rec = event->last;
  if (rec) awaitMark(rec->device, rec->stream, rec->mark);
}

bool synchronizeEventFor(const Event* event, std::int64_t timeout_ms) {
  std::shared_ptr<EventRecord> rec = event->last;
  if (!rec) return true;
  checkStream(rec->device, rec->stream);
  StreamState* st = find(rec->device, rec->stream);
  return st == nullptr || waitForUntil(st, rec->mark, deadlineIn(timeout_ms));
}

double elapsedMs(const Event* start, const Event* end) {
  if (!start->timing || !end->timing) {
    throw std::runtime_error(
        "Events were not created with argument 'enable_timing=True'");
  }
  if (!start->last || !end->last) {
    throw std::runtime_error(
        std::string("Both events must be recorded before calculating elapsed time (the ") +
        (!start->last ? "start" : "end") + " event was never recorded)");
  }
  if (!recordReached(*start->last) || !recordReached(*end->last)) {
    throw std::runtime_error(
        "Both events must be completed before calculating elapsed time.");
  }
  std::int64_t t0 = start->last->time_ns.load();
  std::int64_t t1 = end->last->time_ns.load();
  if (t1 < t0) {
    throw std::runtime_error(
        "The end event was recorded before the start event: elapsed_time(end) "
        "needs end to be reached on the device after start");
  }
  return static_cast<double>(t1 - t0) / 1.0e6;
}

} // namespace torch_mps_ext::runtime
