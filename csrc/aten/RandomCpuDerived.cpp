// Layer 3: random operators without a Philox kernel (poisson, binomial,
// _standard_gamma, _sample_dirichlet, rrelu_with_noise).
//
// They run CPU's kernel in place on host views of the device memory, with a
// CPU generator seeded from the device generator: the first 64 bits of one
// reserved Philox block. So they follow the device's seed and state (and
// accept mps_ext generators), and never touch the CPU default generator;
// they are not counter-based per element (see docs/random.md).
#include "aten/Fidelity.h"
#include "aten/HostView.h"
#include "aten/RandomKernels.h"
#include "core/Generator.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_sample_dirichlet.h>
#include <ATen/ops/_standard_gamma.h>
#include <ATen/ops/binomial.h>
#include <ATen/ops/poisson.h>
#include <ATen/ops/rrelu_with_noise.h>
#include <torch/library.h>

namespace torch_mps_ext {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

// MPS has no kernel for poisson, binomial and rrelu_with_noise: in mps
// fidelity mode they are refused (or warned about) as MPS's fallback does.
void mpsLacks(const char* name, const char* overload) {
  if (C10_UNLIKELY(fidelity::on())) fidelity::checkOperator(name, overload);
}

// A CPU generator for one op, seeded from one block of `device`'s stream.
at::Generator derivedCpuGenerator(const std::optional<at::Generator>& generator,
                                  const at::Tensor& t) {
  PhiloxGenerator* g = generatorFor(generator, t.device().index());
  const PhiloxStream s = reserveWords(g, 4);
  std::uint32_t w[4];
  rng::philoxBlock(s.seed, s.offset, w);
  return at::detail::createCPUGenerator(static_cast<std::uint64_t>(w[0]) |
                                        (static_cast<std::uint64_t>(w[1]) << 32));
}

at::Tensor host(const at::Tensor& t) {
  return t.defined() && t.device().type() == kDev ? hostView(t) : t;
}

void checkSameDevice(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              a.device(), " and ", b.device(), "!");
}

template <class F>
at::Tensor runOnHost(const at::Tensor& like, const F& f) {
  const int device = like.device().index();
  at::Tensor r;
  {
    LendScope lend(device);
    r = f();
  }
  return adoptResult(r, device);
}

at::Tensor poisson(const at::Tensor& self, std::optional<at::Generator> generator) {
  mpsLacks("aten::poisson", "");
  at::Generator cpu = derivedCpuGenerator(generator, self);
  return runOnHost(self, [&] { return at::poisson(host(self), cpu); });
}

at::Tensor binomial(const at::Tensor& count, const at::Tensor& prob,
                    std::optional<at::Generator> generator) {
  mpsLacks("aten::binomial", "");
  checkSameDevice(count, prob);
  at::Generator cpu = derivedCpuGenerator(generator, count);
  return runOnHost(count, [&] { return at::binomial(host(count), host(prob), cpu); });
}

at::Tensor standard_gamma(const at::Tensor& self, std::optional<at::Generator> generator) {
  at::Generator cpu = derivedCpuGenerator(generator, self);
  return runOnHost(self, [&] { return at::_standard_gamma(host(self), cpu); });
}

at::Tensor sample_dirichlet(const at::Tensor& self, std::optional<at::Generator> generator) {
  at::Generator cpu = derivedCpuGenerator(generator, self);
  if (self.scalar_type() == at::kHalf || self.scalar_type() == at::kBFloat16) {
    // MPS samples these; CPU's kernel takes float/double only: sampled in
    // float32, rounded to the input's dtype (issue 23, docs/fidelity.md).
    at::Tensor f = self.to(at::kFloat);
    return runOnHost(f, [&] { return at::_sample_dirichlet(host(f), cpu); }).to(self.scalar_type());
  }
  return runOnHost(self, [&] { return at::_sample_dirichlet(host(self), cpu); });
}

at::Tensor rrelu_with_noise(const at::Tensor& self, at::Tensor& noise, const at::Scalar& lower,
                            const at::Scalar& upper, bool training,
                            std::optional<at::Generator> generator) {
  mpsLacks("aten::rrelu_with_noise", "");
  checkSameDevice(self, noise);
  at::Generator cpu = derivedCpuGenerator(generator, self);
  at::Tensor noise_h = host(noise);
  return runOnHost(self, [&] {
    return at::rrelu_with_noise(host(self), noise_h, lower, upper, training, cpu);
  });
}

at::Tensor& rrelu_with_noise_(at::Tensor& self, at::Tensor& noise, const at::Scalar& lower,
                              const at::Scalar& upper, bool training,
                              std::optional<at::Generator> generator) {
  mpsLacks("aten::rrelu_with_noise_", "");
  checkSameDevice(self, noise);
  at::Generator cpu = derivedCpuGenerator(generator, self);
  at::Tensor self_h = host(self);
  at::Tensor noise_h = host(noise);
  at::rrelu_with_noise_(self_h, noise_h, lower, upper, training, cpu);
  return self;
}

at::Tensor& rrelu_with_noise_out(const at::Tensor& self, at::Tensor& noise,
                                 const at::Scalar& lower, const at::Scalar& upper,
                                 bool training, std::optional<at::Generator> generator,
                                 at::Tensor& out) {
  mpsLacks("aten::rrelu_with_noise", "out");
  checkSameDevice(self, noise);
  checkSameDevice(self, out);
  at::Generator cpu = derivedCpuGenerator(generator, self);
  at::Tensor noise_h = host(noise);
  at::Tensor r = at::rrelu_with_noise(host(self), noise_h, lower, upper, training, cpu);
  if (out.sizes() != r.sizes()) out.resize_(r.sizes());
  at::Tensor out_h = host(out);
  out_h.copy_(r);
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("poisson", TORCH_FN(poisson));
  m.impl("binomial", TORCH_FN(binomial));
  m.impl("_standard_gamma", TORCH_FN(standard_gamma));
  m.impl("_sample_dirichlet", TORCH_FN(sample_dirichlet));
  m.impl("rrelu_with_noise", TORCH_FN(rrelu_with_noise));
  m.impl("rrelu_with_noise_", TORCH_FN(rrelu_with_noise_));
  m.impl("rrelu_with_noise.out", TORCH_FN(rrelu_with_noise_out));
}

} // namespace torch_mps_ext
