"""Quick start: train a small model on the mps_ext device.

    make demo        # or: python examples/quickstart.py

Installing torch_mps_ext registers it with torch's device-backend autoload,
so `import torch` is all a script needs: "mps_ext" is then a device like
"cuda" or "mps". This script trains a two-layer network on a toy problem,
prints the loss falling, checks the result against the same training on the
CPU, and shows what the device's caching allocator did.
"""

import torch

if not hasattr(torch, "mps_ext"):  # running from a source tree without installing
    import torch_mps_ext  # noqa: F401

device = torch.device("mps_ext")
print(f"torch {torch.__version__}, mps_ext devices: {torch.mps_ext.device_count()}, "
      f"device memory: {torch.mps_ext.recommended_max_memory() / 2**30:.1f} GiB")

# A toy problem: label points by which of four quadrants they fall in.
g = torch.Generator().manual_seed(0)
x = torch.randn(2048, 2, generator=g)
y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 4))


def train(device, epochs=60, log=False):
    model = make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    xs, ys = x.to(device), y.to(device)
    for epoch in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        opt.step()
        if log and (epoch % 10 == 0 or epoch == epochs - 1):
            acc = (model(xs).argmax(1) == ys).float().mean()
            print(f"epoch {epoch:3d}  cross-entropy loss {loss.item():.4f}  "
                  f"accuracy {acc.item():.1%}")
    return model, loss.item()


model, loss = train(device, log=True)
print("parameters live on", next(model.parameters()).device)

_, cpu_loss = train("cpu")
print(f"final cross-entropy loss on mps_ext {loss:.6f}, the same training on cpu {cpu_loss:.6f}")
assert abs(loss - cpu_loss) < 1e-5, "mps_ext and CPU disagree"

stats = torch.mps_ext.memory_stats()
print(f"memory: {torch.mps_ext.memory_allocated() / 1024:.1f} KiB in tensors, "
      f"{torch.mps_ext.memory_reserved() / 2**20:.1f} MiB reserved, "
      f"{stats['allocation.all.allocated']} allocations served by "
      f"{stats['num_device_alloc']} requests to the system")
print(torch.mps_ext.memory_summary(abbreviated=True))
