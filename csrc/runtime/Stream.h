// Layer 1: stream progress, as the allocator sees it.
//
// Work on a stream is numbered in submission order. A position ("mark") taken
// with streamMark() has been reached once every piece of work submitted
// before it has finished. The caching allocator uses this to keep a block a
// stream may still touch from being handed out again (record_stream).
#pragma once

#include <cstdint>

namespace torch_mps_ext::runtime {

// The calling thread's current stream id on `device` (0 = default stream).
std::int64_t currentStreamId(int device);
// The position after the last work submitted so far to the stream.
std::uint64_t streamMark(int device, std::int64_t stream);
// True once all work before `mark` on the stream has finished.
bool streamReached(int device, std::int64_t stream, std::uint64_t mark);

} // namespace torch_mps_ext::runtime
