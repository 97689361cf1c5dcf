"""Training loops in the style of PyTorch's examples, each run once with
`device = "cpu"` and once with `device = "mps_ext"` (the loop's code is the
same, only the device string differs), from the same initial model and data;
everything the loop reports and every parameter at the end are compared.

* word-level language model: LSTM / GRU / RNN_TANH / Transformer encoder,
  decoder tied to the encoder, truncated BPTT with hidden-state detaching,
  gradient clipping, a hand-written SGD update, evaluation, then word-by-word
  generation sampling (on CPU, with a CPU generator) from the model's output;
* sequence prediction with stacked LSTMCell/GRUCell and the LBFGS optimizer;
* DCGAN: generator and discriminator, BCELoss, two Adam optimizers;
* CNN classifier on a DataLoader: Adadelta and a StepLR schedule, train and
  test epochs.
"""

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from zoo import (DEV, TOL, heavy, zoo_env, zoo_cache_dir, on_device, assert_same,  # noqa: F401
                 assert_grads, assert_state, seeded)

pytestmark = pytest.mark.usefixtures("zoo_env")

SIZES = ["small", pytest.param("large", marks=heavy)]

# Recurrent layers take another (equally valid) ATen path on an accelerator:
# RNN/GRU/LSTM layers compute each step's input projection separately (only
# on CPU does ATen's FullLayer project the whole sequence in one matmul), and
# LSTM/GRU cells run the fused `_thnn_fused_*_cell` operators. Same maths,
# floats summed in another order: gradients differ at ~1e-7 relative and
# training steps compound it (measured: <= 6e-6 relative after 40 steps).
RECURRENT_TOL = dict(rtol=1e-5, atol=1e-5)


def run_both(loop, model, *args, **kwargs):
    """`loop(model, device, ...)` on a CPU model and on its copy moved to the
    device (checked by on_device); returns both models and both results."""
    model_dev = on_device(model)
    out_cpu = loop(model, "cpu", *args, **kwargs)
    out_dev = loop(model_dev, DEV, *args, **kwargs)
    return model_dev, out_cpu, out_dev


def assert_reports(rep_dev, rep_cpu, what, **tol):
    """Numbers the loop reported (Python floats taken with .item())."""
    torch.testing.assert_close(torch.tensor(rep_dev, dtype=torch.float64),
                               torch.tensor(rep_cpu, dtype=torch.float64), **(tol or TOL),
                               msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------ word language model

class RNNModel(nn.Module):
    """Encoder (embedding), recurrent module, decoder (linear), optionally
    tied to the encoder ("Using the Output Embedding to Improve Language
    Models", Press & Wolf 2016)."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.0, tie_weights=True):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ("LSTM", "GRU"):
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        else:
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=rnn_type[4:].lower(), dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            assert nhid == ninp
            self.decoder.weight = self.encoder.weight
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                    weight.new_zeros(self.nlayers, bsz, self.nhid))
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=512):
        super().__init__()
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(1))  # (max_len, 1, d_model)

    def forward(self, x):
        return x + self.pe[:x.size(0)]


class TransformerModel(nn.Module):
    """Embedding * sqrt(d), positional encoding, causal TransformerEncoder,
    linear decoder tied to the embedding."""

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.0):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.pos_encoder = PositionalEncoding(ninp)
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight
        self.ninp = ninp
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, src, hidden=None):
        mask = nn.Transformer.generate_square_subsequent_mask(len(src), device=src.device)
        x = self.pos_encoder(self.encoder(src) * math.sqrt(self.ninp))
        output = self.transformer_encoder(x, mask, is_causal=True)
        return F.log_softmax(self.decoder(output), dim=-1).view(-1, self.decoder.out_features), None

    def init_hidden(self, bsz):
        return None


def synthetic_corpus(g, ntokens, length):
    """A token stream with structure to learn: a noisy repeating pattern."""
    pattern = torch.randint(0, ntokens, (17,), generator=g)
    stream = pattern.repeat(length // 17 + 1)[:length].clone()
    noise = torch.rand(length, generator=g) < 0.1
    stream[noise] = torch.randint(0, ntokens, (int(noise.sum()),), generator=g)
    return stream


def batchify(data, bsz, device):
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous().to(device)


def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    """Detach hidden states from their history (truncated BPTT)."""
    if h is None:
        return None
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def word_lm_loop(model, device, train_tokens, val_tokens, *, epochs, bptt, bsz, lr=5.0,
                 clip=0.25, ntokens, words=20):
    """Train (hand-written SGD: p -= lr * grad), evaluate, generate."""
    train_data = batchify(train_tokens, bsz, device)
    val_data = batchify(val_tokens, 4, device)
    criterion = nn.NLLLoss()
    report = {"train": [], "val": [], "grad_norm": []}
    for _ in range(epochs):
        model.train()
        hidden = model.init_hidden(bsz)
        for i in range(0, train_data.size(0) - 1, bptt):
            data, targets = get_batch(train_data, i, bptt)
            model.zero_grad()
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            report["train"].append(loss.item())
            report["grad_norm"].append(norm.item())
        model.eval()
        total, hidden = 0.0, model.init_hidden(4)
        with torch.no_grad():
            for i in range(0, val_data.size(0) - 1, bptt):
                data, targets = get_batch(val_data, i, bptt)
                output, hidden = model(data, hidden)
                total += len(data) * criterion(output, targets).item()
                hidden = repackage_hidden(hidden)
        report["val"].append(total / (len(val_data) - 1))
    # Generation as the examples do it: sample each word on CPU from the
    # model's output (a CPU generator, so both sides draw the same numbers
    # when the weights they are given are the same).
    g = torch.Generator().manual_seed(20)
    hidden = model.init_hidden(1)
    seq = torch.randint(ntokens, (1, 1), generator=g).to(device)
    generated = []
    with torch.no_grad():
        for _ in range(words):
            if isinstance(model, TransformerModel):
                output, _ = model(seq)
                word_weights = output[-1].squeeze().div(0.8).exp().cpu()
            else:
                output, hidden = model(seq[-1:], hidden)
                word_weights = output.squeeze().div(0.8).exp().cpu()
            word_idx = torch.multinomial(word_weights, 1, generator=g)[0]
            seq = torch.cat([seq, torch.full((1, 1), word_idx.item(), dtype=seq.dtype).to(device)])
            generated.append(word_idx.item())
    report["words"] = generated
    return report


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("arch", ["LSTM", "GRU", "RNN_TANH", "Transformer"])
def test_word_language_model(arch, size):
    large = size == "large"
    g = seeded(21)
    ntokens, emsize = 50, (64 if large else 16)
    train = synthetic_corpus(g, ntokens, 4000 if large else 600)
    val = synthetic_corpus(g, ntokens, 400 if large else 120)
    if arch == "Transformer":
        model = TransformerModel(ntokens, emsize, 2, 2 * emsize, 2)
    else:
        model = RNNModel(arch, ntokens, emsize, emsize, 2)
    assert model.decoder.weight is model.encoder.weight
    # (lr 1: the examples' lr 20 / 5 makes a tanh RNN chaotic enough that
    # the recurrent ~1e-7 differences grow to 1e-3 within 40 steps.)
    dev, rep_cpu, rep_dev = run_both(word_lm_loop, model, train, val, epochs=2 if large else 1,
                                     bptt=20 if large else 10, bsz=10, ntokens=ntokens,
                                     lr=0.5 if arch == "Transformer" else 1.0)
    assert dev.decoder.weight is dev.encoder.weight
    # The Transformer runs CPU's kernels in CPU's order: TOL. The recurrent
    # models take ATen's accelerator path (RECURRENT_TOL).
    tol = TOL if arch == "Transformer" else RECURRENT_TOL
    assert_reports(rep_dev["train"], rep_cpu["train"], "train losses", **tol)
    assert_reports(rep_dev["grad_norm"], rep_cpu["grad_norm"], "gradient norms", **tol)
    assert_reports(rep_dev["val"], rep_cpu["val"], "validation loss", **tol)
    assert rep_dev["words"] == rep_cpu["words"]
    assert_state(dev, model, **tol)
    assert rep_cpu["train"][-1] < rep_cpu["train"][0]


# ---------------------------------------- LSTMCell/GRUCell sequence + LBFGS

class Sequence(nn.Module):
    """Two stacked cells predicting the next value of a sine wave, then
    continuing it on their own for `future` steps."""

    def __init__(self, cell, hidden=24):
        super().__init__()
        self.cell_type = cell
        cls = getattr(nn, cell)
        self.cell1 = cls(1, hidden)
        self.cell2 = cls(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)
        self.hidden = hidden

    def _step(self, x, state):
        if self.cell_type == "LSTMCell":
            h1, c1, h2, c2 = state
            h1, c1 = self.cell1(x, (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            return self.linear(h2), (h1, c1, h2, c2)
        h1, h2 = state
        h1 = self.cell1(x, h1)
        h2 = self.cell2(h1, h2)
        return self.linear(h2), (h1, h2)

    def forward(self, input, future=0):
        n = input.size(0)
        state = tuple(input.new_zeros(n, self.hidden)
                      for _ in range(4 if self.cell_type == "LSTMCell" else 2))
        outputs = []
        for x in input.split(1, dim=1):
            out, state = self._step(x, state)
            outputs.append(out)
        for _ in range(future):
            out, state = self._step(out, state)
            outputs.append(out)
        return torch.cat(outputs, dim=1)


def sine_loop(model, device, data, *, steps):
    data = data.to(device)
    input, target = data[:-2, :-1], data[:-2, 1:]
    test_input, test_target = data[-2:, :-1], data[-2:, 1:]
    criterion = nn.MSELoss()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.8, max_iter=4)
    report = {"loss": [], "test": []}
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = criterion(model(input), target)
            loss.backward()
            report["loss"].append(loss.item())
            return loss
        optimizer.step(closure)
        with torch.no_grad():
            pred = model(test_input, future=10)
            report["test"].append(criterion(pred[:, :-10], test_target).item())
    report["prediction"] = pred.cpu()
    return report


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_cell_sequence_lbfgs(cell):
    g = seeded(30)
    t = torch.arange(40, dtype=torch.float32)
    phase = torch.randint(-20, 20, (8, 1), generator=g).float()
    data = torch.sin((t + phase) / 4.0)
    model = Sequence(cell)
    # One forward (with 10 free-running steps) and backward, compared tightly.
    dev = on_device(model)
    out_cpu = model(data[:, :-1], future=10)
    out_dev = dev(data[:, :-1].to(DEV), future=10)
    assert_same(out_dev, out_cpu, "prediction")
    out_cpu.square().mean().backward()
    out_dev.square().mean().backward()
    assert_grads(dev, model, **RECURRENT_TOL)
    # Then the LBFGS loop. LBFGS's curvature pairs and step lengths compound
    # the fused cells' ~1e-7 gradient differences over its 12 closure calls
    # (measured: 5e-5 relative on the losses, 1.4e-4 on the extrapolation).
    dev, rep_cpu, rep_dev = run_both(sine_loop, model, data, steps=3)
    lbfgs_tol = dict(rtol=1e-3, atol=1e-4)
    assert_reports(rep_dev["loss"], rep_cpu["loss"], "closure losses", **lbfgs_tol)
    assert_reports(rep_dev["test"], rep_cpu["test"], "test losses", **lbfgs_tol)
    torch.testing.assert_close(rep_dev["prediction"], rep_cpu["prediction"], **lbfgs_tol)
    assert_state(dev, model, **lbfgs_tol)
    assert rep_cpu["loss"][-1] < rep_cpu["loss"][0]


# ------------------------------------------------------------------- DCGAN

class Generator(nn.Module):
    def __init__(self, nz, ngf, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())  # nc x 32 x 32

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self, ndf, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


def weights_init(m):
    name = m.__class__.__name__
    if name.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif name.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class GAN(nn.Module):
    """Both networks in one module, only so that run_both moves them together."""

    def __init__(self, nz, ngf, ndf):
        super().__init__()
        self.netG, self.netD = Generator(nz, ngf), Discriminator(ndf)


def dcgan_loop(gan, device, real_images, noises, fixed_noise, *, nz):
    netG, netD = gan.netG, gan.netD
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real_label, fake_label = 1.0, 0.0
    report = {"errD": [], "errG": [], "D_x": [], "D_G_z1": [], "D_G_z2": []}
    for real_cpu, noise_cpu in zip(real_images, noises):
        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        real = real_cpu.to(device)
        batch_size = real.size(0)
        label = torch.full((batch_size,), real_label, dtype=real.dtype, device=device)
        errD_real = criterion(netD(real), label)
        errD_real.backward()
        D_x = netD(real).mean().item()
        noise = noise_cpu.to(device)
        fake = netG(noise)
        label.fill_(fake_label)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        optimizerD.step()
        # (2) Update G: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(real_label)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optimizerG.step()
        for key, value in zip(report, (errD.item(), errG.item(), D_x, D_G_z1, D_G_z2)):
            report[key].append(value)
    with torch.no_grad():
        netG.eval()
        report["fixed"] = netG(fixed_noise.to(device)).cpu()
        netG.train()
    return report


@pytest.mark.parametrize("size", SIZES)
def test_dcgan(size):
    large = size == "large"
    g = seeded(40)
    nz, nf, batch, iters = (32, 16, 16, 6) if large else (16, 8, 8, 3)
    gan = GAN(nz, nf, nf)
    gan.apply(weights_init)
    real = [torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1 for _ in range(iters)]
    noises = [torch.randn(batch, nz, 1, 1, generator=g) for _ in range(iters)]
    fixed = torch.randn(4, nz, 1, 1, generator=g)
    dev, rep_cpu, rep_dev = run_both(dcgan_loop, gan, real, noises, fixed, nz=nz)
    for key in ("errD", "errG", "D_x", "D_G_z1", "D_G_z2"):
        assert_reports(rep_dev[key], rep_cpu[key], key)
    torch.testing.assert_close(rep_dev["fixed"], rep_cpu["fixed"], **TOL)
    assert_state(dev, gan)  # both networks, with the BatchNorm running statistics


# ------------------------------------------------- CNN classifier + DataLoader

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def classifier_loop(model, device, train_set, test_set, *, epochs):
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(50))
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=32)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    report = {"train": [], "test_loss": [], "correct": []}
    for _ in range(epochs):
        model.train()
        for data, target in train_loader:
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
            report["train"].append(loss.item())
        model.eval()
        test_loss, correct = 0.0, 0
        with torch.no_grad():
            for data, target in test_loader:
                data, target = data.to(device), target.to(device)
                output = model(data)
                test_loss += F.nll_loss(output, target, reduction="sum").item()
                pred = output.argmax(dim=1, keepdim=True)
                correct += pred.eq(target.view_as(pred)).sum().item()
        report["test_loss"].append(test_loss / len(test_loader.dataset))
        report["correct"].append(correct)
        scheduler.step()
    return report


@pytest.mark.parametrize("size", SIZES)
def test_cnn_classifier_dataloader(size):
    large = size == "large"
    g = seeded(51)
    n_train, n_test = (512, 128) if large else (96, 64)

    def dataset(n):
        # Ten class templates plus noise: learnable in a few steps.
        templates = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(52))
        target = torch.randint(0, 10, (n,), generator=g)
        images = templates[target] + 0.5 * torch.randn(n, 1, 16, 16, generator=g)
        return torch.utils.data.TensorDataset(images, target)

    train_set, test_set = dataset(n_train), dataset(n_test)
    model = Net()
    dev, rep_cpu, rep_dev = run_both(classifier_loop, model, train_set, test_set,
                                     epochs=3 if large else 2)
    assert_reports(rep_dev["train"], rep_cpu["train"], "train losses")
    assert_reports(rep_dev["test_loss"], rep_cpu["test_loss"], "test losses")
    assert rep_dev["correct"] == rep_cpu["correct"]
    assert_state(dev, model)
    assert rep_cpu["correct"][-1] > n_test // 5  # better than chance
