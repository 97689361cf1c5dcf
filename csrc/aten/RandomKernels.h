// Layer 3: the hot inner loops of the random operators, free of ATen.
//
// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC'11): key = the generator's 64-bit seed, 128-bit counter = block
// index (the generator's offset + the block's position in the op's stream).
// Each block yields four 32-bit words; word j of an op's stream is word j % 4
// of block offset + j / 4. Every value an op produces is a function of the
// words at its own element index, so chunks can run on any thread in any
// order and give the same bits.
//
// The loops are compiled twice (RandomKernels.cpp for the baseline ISA,
// RandomKernelsAVX2.cpp with AVX2 enabled, no FMA so both give identical
// bits) and picked at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace torch_mps_ext::rng {

struct Kernels {
  // out[4*i + lane] = word `lane` of block (first_block + i), i < nblocks.
  void (*philox)(std::uint64_t seed, std::uint64_t first_block, std::size_t nblocks,
                 std::uint32_t* out);
  // out[i] = from + u_i * (to - from) in float, u_i = (w[i] >> 8) * 2^-24,
  // a value that rounds up to `to` is replaced by `from` ([from, to)).
  void (*uniformFloat)(const std::uint32_t* w, std::size_t n, float from, float to,
                       float* out);
  // Box-Muller on word pairs: for pair p, u1 = ((w[2p] >> 1) + 0.5) * 2^-31
  // in (0, 1], u2 = (w[2p+1] >> 8) * 2^-24 in [0, 1);
  // out[2p] = mean + std * r cos(2 pi u2), out[2p+1] = mean + std * r sin(2 pi u2),
  // r = sqrt(-2 log u1). Writes 2 * npairs floats.
  void (*normalFloat)(const std::uint32_t* w, std::size_t npairs, float mean, float std,
                      float* out);
};

// The kernels for this CPU (AVX2 when the CPU has it).
const Kernels& kernels();
// Both variants, for tests that they agree (index 0 baseline, 1 AVX2 or
// nullptr when the CPU lacks AVX2).
const Kernels* kernelVariant(int which);

// Scalar reference of one Philox block (for the non-hot paths).
void philoxBlock(std::uint64_t seed, std::uint64_t block, std::uint32_t out[4]);

} // namespace torch_mps_ext::rng
