// Layer 2: the mps_ext random generator (c10::GeneratorImpl).
//
// Counter-based Philox 4x32-10: key = seed, counter = offset + element index.
// A random op is a pure function of (seed, offset, shape, parameters); each op
// advances the offset (see docs/random.md for how much).
//
// State tensor layout (get_state/set_state), 16 bytes, little endian:
//   bytes 0..7   seed   (uint64)
//   bytes 8..15  offset (uint64)
#pragma once

#include <ATen/core/Generator.h>
#include <c10/core/GeneratorImpl.h>

#include <cstdint>
#include <optional>

namespace torch_mps_ext {

class PhiloxGenerator final : public c10::GeneratorImpl {
 public:
  static constexpr std::size_t kStateSize = 16;

  explicit PhiloxGenerator(c10::DeviceIndex device, std::uint64_t seed = 67280421310721ULL);

  void set_current_seed(std::uint64_t seed) override;
  std::uint64_t current_seed() const override;
  std::uint64_t seed() override;
  void set_offset(std::uint64_t offset) override;
  std::uint64_t get_offset() const override;
  void set_state(const c10::TensorImpl& new_state) override;
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override;
  void graphsafe_set_state(const c10::intrusive_ptr<c10::GeneratorImpl>& state) override;
  c10::intrusive_ptr<c10::GeneratorImpl> graphsafe_get_state() const override;

  static c10::DeviceType device_type() { return c10::DeviceType::PrivateUse1; }

  // Reserves `increment` counter values for one op and returns the offset at
  // which the op starts. Callers hold mutex_ (the generator's lock).
  std::uint64_t advance(std::uint64_t increment);

 private:
  PhiloxGenerator* clone_impl() const override;
  std::uint64_t seed_;
  std::uint64_t offset_ = 0;
};

// Where one op's random words come from: Philox key `seed`, first block
// `offset`. Word j of the op's stream is word j % 4 of block offset + j / 4.
struct PhiloxStream {
  std::uint64_t seed;
  std::uint64_t offset;
};

// Locks `gen` and reserves ceil(words / 4) blocks (the op's offset
// increment) for an op that consumes `words` 32-bit words.
PhiloxStream reserveWords(PhiloxGenerator* gen, std::uint64_t words);

// The generator a random op on `device` uses: `gen` when given (it must be an
// mps_ext generator: a CPU one is an error, as on CUDA), else the device's
// default generator.
PhiloxGenerator* generatorFor(const std::optional<at::Generator>& gen, c10::DeviceIndex device);

// One default generator per device (created on first use).
const at::Generator& defaultGenerator(c10::DeviceIndex device);
at::Generator newGenerator(c10::DeviceIndex device);

} // namespace torch_mps_ext
