"""torch.compile on mps_ext: compiled CPU's speed by default, the Metal
kernels torch.mps would run on request.

    python examples/compile_model.py

By default Inductor compiles mps_ext graphs with its C++ (CPU) code
generator: pointwise ops and reductions fuse into vectorized, OpenMP-parallel
C++ loops that run directly on the device's memory (it is host memory);
matmuls stay aten calls; buffers come from the device's allocator. With
TORCH_MPS_EXT_INDUCTOR=metal (or in MPS fidelity mode) it uses its Metal
code generator instead, as for torch.mps, and torch.mps_ext.compile_shader
builds those kernels (docs/compile.md).
"""

import os

import torch
from torch._inductor.utils import run_and_get_code

if not hasattr(torch, "mps_ext"):  # running from a source tree without installing
    import torch_mps_ext  # noqa: F401

device = "mps_ext"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                            torch.nn.LayerNorm(128), torch.nn.Linear(128, 10)).to(device)
x = torch.randn(32, 64, device=device)

compiled = torch.compile(model)
out, code = run_and_get_code(compiled, x)
kernels = [line.split("=")[0].strip() for line in code[0].splitlines()
           if "async_compile.cpp_pybinding" in line]
print(f"Inductor generated {len(kernels)} C++ kernel(s) for the forward pass:")
for k in kernels:
    print("   ", k)
assert kernels and out.device.type == device

# The Metal code generator, for the kernels a Mac would run (read at compile time).
os.environ["TORCH_MPS_EXT_INDUCTOR"] = "metal"
torch._dynamo.reset()
metal_out, code = run_and_get_code(torch.compile(model), x)
del os.environ["TORCH_MPS_EXT_INDUCTOR"]
torch._dynamo.reset()
metal = [line.strip() for line in code[0].splitlines() if "kernel void" in line]
print(f"with TORCH_MPS_EXT_INDUCTOR=metal: {len(metal)} Metal kernel(s)")
assert metal and torch.allclose(metal_out, out, rtol=1e-5, atol=1e-5)

expected = model(x)
print(f"largest absolute difference from eager (float32): {(out - expected).abs().max().item():.2e}")
assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)

# Training works the same way: the backward graph is compiled too.
opt = torch.optim.SGD(model.parameters(), lr=0.1)
y = torch.randint(0, 10, (32,), device=device)
for step in range(5):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    opt.step()
    print(f"compiled training step {step}: cross-entropy loss {loss.item():.4f}")
