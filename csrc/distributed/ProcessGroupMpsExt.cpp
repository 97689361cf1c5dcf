// Layer 3½: the "mps_ext" c10d backend (see ProcessGroupMpsExt.h).
//
// torch.distributed reaches it through c10d's operators (c10d::allreduce_ &c.
// have PrivateUse1 kernels that ask the group for its backend of the tensors'
// device type), so dist.* calls, torch's functional collectives (DTensor,
// FSDP2, DeviceMesh) and DDP all arrive here. Every collective is the
// engine's, on host aliases; nothing is copied.
#include "distributed/ProcessGroupMpsExt.h"

#include "aten/HostView.h"

#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace torch_mps_ext::distributed {
namespace {

constexpr const char* kName = "mps_ext";

bool onDevice(const at::Tensor& t) {
  return t.defined() && t.device().type() == c10::DeviceType::PrivateUse1;
}

// The host aliases one collective hands the engine, and the way back from
// the engine's results (CPU tensors over an alias's memory) to device tensors
// over the same memory.
class Aliases {
 public:
  at::Tensor host(const at::Tensor& t) {
    if (!onDevice(t)) return t;  // CPU tensors go to the engine as they are
    at::Tensor alias = hostAlias(t);
    pairs_.emplace_back(alias.storage(), t.storage());
    return alias;
  }
  std::vector<at::Tensor> host(const std::vector<at::Tensor>& ts) {
    std::vector<at::Tensor> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back(host(t));
    return out;
  }
  std::vector<std::vector<at::Tensor>> host(const std::vector<std::vector<at::Tensor>>& tss) {
    std::vector<std::vector<at::Tensor>> out;
    out.reserve(tss.size());
    for (const auto& ts : tss) out.push_back(host(ts));
    return out;
  }

  at::Tensor device(const at::Tensor& t) const {
    if (!t.defined() || !t.has_storage()) return t;
    const c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
    for (const auto& [alias, dev] : pairs_) {
      if (alias.unsafeGetStorageImpl() == s) return deviceTensor(dev, t);
    }
    return t;
  }
  std::vector<at::Tensor> device(std::vector<at::Tensor> ts) const {
    for (auto& t : ts) t = device(t);
    return ts;
  }
  c10::IValue device(const c10::IValue& v) const {
    if (v.isTensor()) return device(v.toTensor());
    if (v.isTensorList()) return device(v.toTensorVector());
    if (v.isList()) {
      auto in = v.toList();
      c10::impl::GenericList out(in.elementType());
      out.reserve(in.size());
      for (const c10::IValue& e : in) out.push_back(device(e));
      return out;
    }
    return v;
  }

 private:
  // (alias storage, device storage); both held, so no address is reused
  // while the work that may name it lives.
  std::vector<std::pair<c10::Storage, c10::Storage>> pairs_;
};

// A 1-D view of a contiguous tensor, others as they are. The engine splits
// the big tensor of the single-tensor all-gather/reduce-scatter along dim 0
// into one chunk per rank, so an output of shape (1, world * n)
// (nn.SyncBatchNorm's) would be one chunk: both sides go as flat views,
// which is what the collective means (NCCL's view of them).
at::Tensor flat(const at::Tensor& t) {
  return t.is_contiguous() ? t.view({-1}) : t;
}

// The engine's work, reporting device tensors where the engine reports
// aliases of their memory. Waiting for it also waits until the engine's
// thread has let go of it (gloo's worker drops its references just after
// completing a work), so the waiter, not that thread, releases the tensors
// last: a tensor whose Python object it keeps alive needs the GIL to be
// released, which a gloo thread cannot take once the interpreter is shutting
// down (std::terminate at exit, after a last collective on CPU tensors).
class MpsExtWork final : public c10d::Work {
 public:
  MpsExtWork(c10::intrusive_ptr<c10d::Work> engine, std::shared_ptr<const Aliases> aliases,
             int rank)
      : Work(rank, engine->retrieveOpType()),
        engine_(std::move(engine)),
        aliases_(std::move(aliases)) {}

  bool isCompleted() override { return engine_->isCompleted(); }
  bool isSuccess() const override { return engine_->isSuccess(); }
  std::exception_ptr exception() const override { return engine_->exception(); }
  int sourceRank() const override { return engine_->sourceRank(); }
  std::vector<at::Tensor> result() override { return aliases_->device(engine_->result()); }
  void synchronize() override {
    engine_->synchronize();
    awaitEngineRelease();
  }
  bool wait(std::chrono::milliseconds timeout) override {
    bool done = engine_->wait(timeout);
    if (done) awaitEngineRelease();
    return done;
  }
  void blockCurrentStream() override { engine_->blockCurrentStream(); }
  void abort() override { engine_->abort(); }
  c10::intrusive_ptr<c10::ivalue::Future> getFutureResult() override {
    return engine_->getFutureResult();  // success or failure, no tensors
  }
  float getDuration() const override { return engine_->getDuration(); }
  uint64_t getSequencenumber() const override { return engine_->getSequencenumber(); }

  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override {
    std::lock_guard<std::mutex> lock(future_mutex_);
    if (!future_) {
      auto engine_future = engine_->getFuture();
      std::shared_ptr<const Aliases> aliases = aliases_;
      future_ = engine_future->then(
          [aliases](c10::ivalue::Future& done) { return aliases->device(done.value()); },
          engine_future->elementType());
    }
    return future_;
  }

 private:
  // Until this work holds the engine's last reference; bounded, so that an
  // engine keeping its works longer costs a second, never a hang.
  void awaitEngineRelease() const {
    using Clock = std::chrono::steady_clock;
    const Clock::time_point deadline = Clock::now() + std::chrono::seconds(1);
    for (int spin = 0; engine_.use_count() > 1; ++spin) {
      if (spin < 64) {
        std::this_thread::yield();
      } else if (Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      } else {
        return;
      }
    }
  }

  c10::intrusive_ptr<c10d::Work> engine_;
  std::shared_ptr<const Aliases> aliases_;
  std::mutex future_mutex_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

class MpsExtBackend final : public c10d::Backend {
 public:
  explicit MpsExtBackend(c10::intrusive_ptr<c10d::Backend> engine)
      : Backend(engine->getRank(), engine->getSize()), engine_(std::move(engine)) {}

  const std::string getBackendName() const override { return kName; }
  c10::intrusive_ptr<Options> getBackendOptions() override {
    return engine_->getBackendOptions();
  }
  void setTimeout(std::chrono::milliseconds timeout) override { engine_->setTimeout(timeout); }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override {
    return run([&](Aliases& a) {
      auto h = a.host(tensors);
      return engine_->broadcast(h, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override {
    return run([&](Aliases& a) {
      auto h = a.host(tensors);
      return engine_->allreduce(h, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override {
    return run([&](Aliases& a) {
      auto h = a.host(tensors);
      return engine_->allreduce_coalesced(h, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override {
    return run([&](Aliases& a) {
      auto h = a.host(tensors);
      return engine_->reduce(h, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = a.host(outputs);
      auto i = a.host(inputs);
      return engine_->allgather(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override {
    return run([&](Aliases& a) {
      at::Tensor o = flat(a.host(output));
      at::Tensor i = flat(a.host(input));
      return engine_->_allgather_base(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> allgather_coalesced(
      std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = a.host(outputs);
      auto i = a.host(inputs);
      return engine_->allgather_coalesced(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = flatAll(a.host(outputs));
      auto i = flatAll(a.host(inputs));
      return engine_->allgather_into_tensor_coalesced(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = a.host(outputs);
      auto i = a.host(inputs);
      return engine_->gather(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = a.host(outputs);
      auto i = a.host(inputs);
      return engine_->scatter(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = a.host(outputs);
      auto i = a.host(inputs);
      return engine_->reduce_scatter(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override {
    return run([&](Aliases& a) {
      at::Tensor o = flat(a.host(output));
      at::Tensor i = flat(a.host(input));
      return engine_->_reduce_scatter_base(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = flatAll(a.host(outputs));
      auto i = flatAll(a.host(inputs));
      return engine_->reduce_scatter_tensor_coalesced(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_splits,
                                               std::vector<int64_t>& input_splits,
                                               const c10d::AllToAllOptions& opts) override {
    return run([&](Aliases& a) {
      at::Tensor o = a.host(output);
      at::Tensor i = a.host(input);
      return engine_->alltoall_base(o, i, output_splits, input_splits, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override {
    return run([&](Aliases& a) {
      auto o = a.host(outputs);
      auto i = a.host(inputs);
      return engine_->alltoall(o, i, opts);
    });
  }

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst,
                                      int tag) override {
    return run([&](Aliases& a) {
      auto h = a.host(tensors);
      return engine_->send(h, dst, tag);
    });
  }

  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src,
                                      int tag) override {
    return run([&](Aliases& a) {
      auto h = a.host(tensors);
      return engine_->recv(h, src, tag);
    });
  }

  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors,
                                               int tag) override {
    return run([&](Aliases& a) {
      auto h = a.host(tensors);
      return engine_->recvAnysource(h, tag);
    });
  }

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override {
    return run([&](Aliases&) { return engine_->barrier(opts); });
  }

  void monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) override {
    engine_->monitoredBarrier(opts, wait_all_ranks);
  }
  void setSequenceNumberForGroup() override { engine_->setSequenceNumberForGroup(); }
  uint64_t getSequenceNumberForGroup() override { return engine_->getSequenceNumberForGroup(); }
  void enableCollectivesTiming() override { engine_->enableCollectivesTiming(); }
  void shutdown() override { engine_->shutdown(); }
  void abort() override { engine_->abort(); }

 private:
  template <typename F>
  c10::intrusive_ptr<c10d::Work> run(F&& start) {
    auto aliases = std::make_shared<Aliases>();
    c10::intrusive_ptr<c10d::Work> work = start(*aliases);
    return c10::make_intrusive<MpsExtWork>(std::move(work), std::move(aliases), rank_);
  }

  static std::vector<at::Tensor> flatAll(std::vector<at::Tensor> ts) {
    for (auto& t : ts) t = flat(t);
    return ts;
  }

  c10::intrusive_ptr<c10d::Backend> engine_;
};

// The group's name is its backend's, as gloo's and NCCL's groups report
// theirs ("custom" otherwise, for any third-party backend).
class MpsExtProcessGroup final : public c10d::ProcessGroup {
 public:
  using ProcessGroup::ProcessGroup;
  const std::string getBackendName() const override { return kName; }
};

} // namespace

c10::intrusive_ptr<c10d::ProcessGroup> processGroupOver(
    const c10::intrusive_ptr<c10d::ProcessGroup>& plain) {
  using BackendType = c10d::ProcessGroup::BackendType;
  TORCH_CHECK(plain->getDeviceTypes().size() == 1 &&
                  plain->getDeviceTypes()[0].type() == c10::DeviceType::CPU,
              "mps_ext process group: expected a group with one backend, for CPU tensors");
  auto backend = c10::make_intrusive<MpsExtBackend>(plain->getBackend(c10::DeviceType::CPU));
  auto pg = c10::make_intrusive<MpsExtProcessGroup>(plain->getStore(), plain->getRank(),
                                                    plain->getSize());
  // CPU tensors go through the backend too (as they are, to the engine), so
  // their works are waited for as the device tensors' are.
  pg->setBackend(c10::DeviceType::CPU, BackendType::GLOO, backend);
  pg->setBackend(c10::DeviceType::PrivateUse1, BackendType::CUSTOM, backend);
  pg->setDefaultBackend(BackendType::CUSTOM);
  return pg;
}

} // namespace torch_mps_ext::distributed
