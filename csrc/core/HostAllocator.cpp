#include "core/HostAllocator.h"

#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <c10/util/Exception.h>

#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace torch_mps_ext {
namespace {

constexpr std::size_t kMinBlock = 512;

std::size_t roundSize(std::size_t n) {
  std::size_t s = kMinBlock;
  while (s < n) s <<= 1;
  return s;
}

struct HostBlock {
  char* ptr;
  std::size_t size;
  bool allocated = false;
  // (device, stream) pairs that used the block while allocated.
  std::vector<std::pair<int, std::int64_t>> uses;
  // After free: positions those streams must reach before reuse.
  std::vector<std::tuple<int, std::int64_t, std::uint64_t>> marks;
};

class PinnedAllocator final : public at::HostAllocator {
 public:
  c10::DataPtr allocate(std::size_t n) override {
    if (n == 0) return c10::DataPtr(nullptr, c10::Device(c10::DeviceType::CPU));
    std::size_t size = roundSize(n);
    std::lock_guard<std::mutex> lock(mu_);
    processDeferred();
    HostBlock* b = nullptr;
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
      b = it->second.back();
      it->second.pop_back();
    } else {
      void* p = runtime::allocateSegment(size);
      TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr,
                       "mps_ext: out of pinned host memory (tried to allocate ",
                       size, " bytes)");
      b = new HostBlock{static_cast<char*>(p), size};
      blocks_[reinterpret_cast<std::uintptr_t>(p)] = b;
      stats_.allocations.increase(1);
      stats_.allocated_bytes.increase(size);
      stats_.num_host_alloc += 1;
    }
    b->allocated = true;
    stats_.active_requests.increase(1);
    stats_.active_bytes.increase(size);
    return c10::DataPtr(b->ptr, b, &PinnedAllocator::deleter,
                        c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &PinnedAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }

  bool record_event(void* ptr, void* /*ctx*/, c10::Stream stream) override {
    return recordUse(ptr, stream.device_index(), stream.id());
  }

  bool recordUse(const void* ptr, int device, std::int64_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    HostBlock* b = containing(ptr);
    if (b == nullptr || !b->allocated) return false;
    for (auto& u : b->uses) {
      if (u.first == device && u.second == stream) return true;
    }
    b->uses.emplace_back(device, stream);
    return true;
  }

  void empty_cache() override {
    std::lock_guard<std::mutex> lock(mu_);
    processDeferred();
    for (auto& [size, list] : free_) {
      for (HostBlock* b : list) {
        blocks_.erase(reinterpret_cast<std::uintptr_t>(b->ptr));
        runtime::freeSegment(b->ptr, b->size);
        stats_.allocations.decrease(1);
        stats_.allocated_bytes.decrease(b->size);
        stats_.num_host_free += 1;
        delete b;
      }
      list.clear();
    }
  }

  at::HostStats get_stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void reset_accumulated_stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto* s : {&stats_.active_requests, &stats_.active_bytes,
                    &stats_.allocations, &stats_.allocated_bytes}) {
      s->reset_accumulated();
    }
    stats_.num_host_alloc = 0;
    stats_.num_host_free = 0;
  }

  void reset_peak_stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto* s : {&stats_.active_requests, &stats_.active_bytes,
                    &stats_.allocations, &stats_.allocated_bytes}) {
      s->reset_peak();
    }
  }

  bool contains(const void* ptr) {
    std::lock_guard<std::mutex> lock(mu_);
    return containing(ptr) != nullptr;
  }

 private:
  static void deleter(void* ctx);

  void release(HostBlock* b) {
    std::lock_guard<std::mutex> lock(mu_);
    b->allocated = false;
    stats_.active_requests.decrease(1);
    stats_.active_bytes.decrease(b->size);
    if (b->uses.empty()) {
      free_[b->size].push_back(b);
      return;
    }
    for (auto& [device, stream] : b->uses) {
      b->marks.emplace_back(device, stream, runtime::streamMark(device, stream));
    }
    b->uses.clear();
    deferred_.push_back(b);
    processDeferred();
  }

  // Moves blocks whose streams have passed their marks to the free lists.
  void processDeferred() {
    if (deferred_.empty()) return;
    std::vector<HostBlock*> still;
    for (HostBlock* b : deferred_) {
      bool done = true;
      for (auto& [device, stream, mark] : b->marks) {
        if (!runtime::streamReached(device, stream, mark)) {
          done = false;
          break;
        }
      }
      if (done) {
        b->marks.clear();
        free_[b->size].push_back(b);
      } else {
        still.push_back(b);
      }
    }
    deferred_.swap(still);
  }

  HostBlock* containing(const void* ptr) {
    auto p = reinterpret_cast<std::uintptr_t>(ptr);
    auto it = blocks_.upper_bound(p);
    if (it == blocks_.begin()) return nullptr;
    --it;
    HostBlock* b = it->second;
    return p < it->first + b->size ? b : nullptr;
  }

  std::mutex mu_;
  std::map<std::uintptr_t, HostBlock*> blocks_;          // every block, by address
  std::map<std::size_t, std::vector<HostBlock*>> free_;  // cached, by size
  std::vector<HostBlock*> deferred_;                     // freed, streams pending
  at::HostStats stats_;
};

PinnedAllocator& impl() {
  static PinnedAllocator* a = new PinnedAllocator();  // never destroyed
  return *a;
}

void PinnedAllocator::deleter(void* ctx) {
  impl().release(static_cast<HostBlock*>(ctx));
}

} // namespace

at::HostAllocator& hostAllocator() {
  return impl();
}

bool isPinnedPtr(const void* ptr) {
  return ptr != nullptr && impl().contains(ptr);
}

void recordHostUse(const void* ptr, int device, std::int64_t stream) {
  impl().recordUse(ptr, device, stream);
}

void registerHostAllocator() {
  static bool done = false;
  if (done) return;
  done = true;
  at::setHostAllocator(c10::DeviceType::PrivateUse1, &impl());
}

} // namespace torch_mps_ext
