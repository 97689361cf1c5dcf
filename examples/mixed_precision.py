"""Mixed-precision training on mps_ext: torch.autocast + GradScaler.

    python examples/mixed_precision.py

The same code as on CUDA or MPS with the device name changed. Inside
`torch.autocast("mps_ext")` matmuls and convolutions run in float16 (or
bfloat16 with `dtype=torch.bfloat16`), while softmax, losses and other
precision-sensitive ops run in float32. GradScaler multiplies the loss so
float16 gradients do not underflow, and skips steps whose gradients
overflowed.
"""

import torch

if not hasattr(torch, "mps_ext"):  # running from a source tree without installing
    import torch_mps_ext  # noqa: F401

device = "mps_ext"
print("autocast dtypes on mps_ext:", torch.mps_ext.get_amp_supported_dtype())

g = torch.Generator().manual_seed(0)
x = torch.randn(1024, 16, generator=g)
y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
x, y = x.to(device), y.to(device)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 3)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.2)
scaler = torch.amp.GradScaler(device)

for step in range(300):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device):
        logits = model(x)  # float16: Linear runs in the autocast dtype
        loss = torch.nn.functional.cross_entropy(logits, y)  # float32
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    if step % 100 == 0:
        print(f"step {step:3d}  cross-entropy loss {loss.item():.4f}  "
              f"(logits {logits.dtype}, loss {loss.dtype}, GradScaler scale {scaler.get_scale():.0f})")

with torch.no_grad(), torch.autocast(device):
    accuracy = (model(x).argmax(1) == y).float().mean().item()
print(f"accuracy after mixed-precision training: {accuracy:.1%} of {len(y)} points")
assert logits.dtype == torch.float16 and loss.dtype == torch.float32
assert accuracy > 0.9, accuracy
# Parameters stay float32 (autocast casts on the fly), gradients too.
assert all(p.dtype == torch.float32 for p in model.parameters())
