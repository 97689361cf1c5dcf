// Layer 1: streams and events of the emulated device. Knows nothing of ATen.
//
// Execution model (docs/streams.md):
//  * A stream is an in-order queue. Asynchronous work (non_blocking copies
//    between pinned memory and the device, shader launches, cross-stream
//    waits, _sleep) is queued with enqueue() and run, in order, by the
//    stream's own worker thread (started on first use); enqueue() returns at
//    once.
//  * Everything else (ATen operators) runs inline on the calling thread,
//    after awaitStream() has drained the calling thread's current stream: it
//    is ordered after everything queued before it and has finished when it
//    returns.
//  * Work on a stream is numbered in submission order. A position ("mark")
//    taken with streamMark() has been reached once every piece of work
//    submitted before it has finished. Events, record_stream and the pinned
//    host allocator are built on marks.
//
// Stream ids per device: 0 is the default stream; 1..32 the normal-priority
// pool and 33..64 the high-priority pool (handed out round robin, like
// CUDA's). Priorities follow CUDA: lower is higher, 0 normal, -1 high.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

namespace torch_mps_ext::runtime {

constexpr int kStreamsPerPool = 32;
constexpr std::int64_t kNumStreams = 1 + 2 * kStreamsPerPool;
constexpr int kLowestPriority = 0;     // normal
constexpr int kHighestPriority = -1;   // high

// Throws std::out_of_range for an unknown device or stream id.
void checkStream(int device, std::int64_t stream);
// Priority of a stream id (0 or -1).
int streamPriority(std::int64_t stream);
// Next stream of the pool for `priority` (clamped to [-1, 0]).
std::int64_t poolStream(int device, int priority);

// An opaque, stable native handle for a stream (its runtime state), and back.
// The reverse returns false for a pointer that is not a stream handle.
void* streamHandle(int device, std::int64_t stream);
bool streamFromHandle(const void* handle, int* device, std::int64_t* stream);

// The calling thread's current stream id on `device` (0 = default stream).
std::int64_t currentStreamId(int device);
void setCurrentStreamId(int device, std::int64_t stream);

// Queues `work` on the stream; returns at once. An exception thrown by the
// work is reported with reportError() (surfacing at the next synchronize).
void enqueue(int device, std::int64_t stream, std::function<void()> work);
// Blocks until all work submitted to the stream so far has finished.
void awaitStream(int device, std::int64_t stream);
// awaitStream on the calling thread's current stream of `device`: call before
// touching device memory inline. Costs two atomic loads when nothing is queued.
void awaitCurrentStream(int device);
// True if all work submitted to the stream has finished.
bool queryStream(int device, std::int64_t stream);
// Waits for every stream of the device.
void synchronizeStreams(int device);

struct Event;
// Bounded waits, for callers that must stay responsive (Ctrl-C): each waits
// at most `timeout_ms` and returns whether the work it waits for finished.
bool awaitStreamFor(int device, std::int64_t stream, std::int64_t timeout_ms);
bool synchronizeStreamsFor(int device, std::int64_t timeout_ms);
bool synchronizeEventFor(const Event* event, std::int64_t timeout_ms);

// The position after the last work submitted so far to the stream.
std::uint64_t streamMark(int device, std::int64_t stream);
// True once all work before `mark` on the stream has finished.
bool streamReached(int device, std::int64_t stream, std::uint64_t mark);
// Blocks until streamReached().
void awaitMark(int device, std::int64_t stream, std::uint64_t mark);

// Events. An event is recorded on a stream; each record is a new version
// that completes (and takes its device timestamp) when the stream reaches it.
struct EventRecord;
struct Event {
  bool timing = false;
  int device = -1;                        // -1 until first recorded
  std::shared_ptr<EventRecord> last;      // latest record (version)
};

Event* createEvent(bool timing);
void destroyEvent(Event* event);
void recordEvent(Event* event, int device, std::int64_t stream);
// Makes later work on `stream` wait for the event's latest record.
void streamWaitEvent(Event* event, int device, std::int64_t stream);
// True if never recorded or its latest record has completed.
bool queryEvent(const Event* event);
void synchronizeEvent(const Event* event);
// Device milliseconds between two completed records. Throws
// std::runtime_error (timing disabled, never recorded, not completed, end
// recorded before start).
double elapsedMs(const Event* start, const Event* end);

} // namespace torch_mps_ext::runtime
