"""torch.compile on mps_ext: the Metal kernels torch.mps would run.

    python examples/compile_model.py

Inductor compiles mps_ext graphs with its Metal code generator, as for
torch.mps: pointwise ops and reductions fuse into Metal Shading Language
kernels, which torch.mps_ext.compile_shader builds for this machine; matmuls
stay aten calls. Nothing to configure (docs/compile.md).
"""

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
kernels = [line.strip() for line in code[0].splitlines() if "kernel void" in line]
print(f"Inductor generated {len(kernels)} Metal kernel(s) for the forward pass:")
for k in kernels:
    print("   ", k)

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
