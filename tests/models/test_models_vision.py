"""Image CNNs on CPU and mps_ext side by side: a ResNet (resnet18's layout:
BasicBlocks [2, 2, 2, 2], 7x7 stem, max-pool, downsampling 1x1 shortcuts) and
a MobileNetV3-Small (torchvision's block table: depthwise convolutions,
squeeze-and-excitation, hardswish/hardsigmoid), trained with torchvision's
reference-recipe optimizers (SGD + momentum + weight decay; RMSprop), in
contiguous and channels_last memory formats. Forward output, loss, every
gradient, parameters and BatchNorm running statistics after each step, then
eval-mode outputs.

Written here rather than taken from torchvision: PyPI's torchvision wheel for
torch 2.13.0 is the CUDA build (its _C.so links libtorch_cuda), so beside the
CPU torch it cannot load its operators and `import torchvision` fails
("operator torchvision::nms does not exist"); the definitions below follow
torchvision's architecture (same layers, same initialisation).
"""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from zoo import (DEV, TOL, heavy, zoo_env, zoo_cache_dir, on_device, assert_same,  # noqa: F401
                 train_side_by_side, eval_mode, seeded, optimizer)

pytestmark = pytest.mark.usefixtures("zoo_env")


# ------------------------------------------------------------------ ResNet

class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), width=64, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(inplanes, planes, stride)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------- MobileNetV3-Small

def make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_act(cin, cout, kernel, stride=1, groups=1, act=nn.Hardswish):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, act, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if act == "HS" else nn.ReLU
        layers = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=act))
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


# torchvision's mobilenet_v3_small table:
# input, kernel, expanded, output, squeeze-excitation, activation, stride
SMALL_TABLE = [(16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2),
               (24, 3, 88, 24, False, "RE", 1), (24, 5, 96, 40, True, "HS", 2),
               (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
               (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1),
               (48, 5, 288, 96, True, "HS", 2), (96, 5, 576, 96, True, "HS", 1),
               (96, 5, 576, 96, True, "HS", 1)]


class MobileNetV3Small(nn.Module):
    def __init__(self, width_mult=1.0, num_classes=10, last_channel=1024):
        super().__init__()
        c = lambda v: make_divisible(v * width_mult)  # noqa: E731
        layers = [conv_bn_act(3, c(16), 3, 2)]
        for cin, k, exp, cout, se, act, s in SMALL_TABLE:
            layers.append(InvertedResidual(c(cin), k, c(exp), c(cout), se, act, s))
        last_conv = 6 * c(96)
        layers.append(conv_bn_act(c(96), last_conv, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = make_divisible(last_channel * width_mult)
        # torchvision's classifier drops out with p=0.2; 0 here (module kept),
        # as the two sides' random streams differ (zoo.py).
        self.classifier = nn.Sequential(nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=0.0, inplace=True),
                                        nn.Linear(last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------- tests

SIZES = ["small", pytest.param("large", marks=heavy)]
FORMATS = ["contiguous", "channels_last"]


def _run_classifier(model, make_opt, memory_format, batch, side, steps):
    g = torch.Generator().manual_seed(10)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    model.train()
    dev = on_device(model)
    images = torch.randn(batch, 3, side, side, generator=g).to(memory_format=fmt)
    labels = torch.randint(0, 10, (batch,), generator=g)
    # One forward/backward: the output and its layout, the loss, every gradient.
    out_cpu = model(images)
    out_dev = dev(images.to(DEV))
    assert out_dev.is_contiguous(memory_format=fmt) == out_cpu.is_contiguous(memory_format=fmt)
    assert_same(out_dev, out_cpu, "logits")

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1], label_smoothing=0.1)

    # Training steps (batch-norm statistics updated in train mode each step).
    losses = train_side_by_side(model, dev, [(images, labels)] * steps, loss_fn, make_opt)
    assert losses[-1] < losses[0], losses
    # Eval mode: batch norm from the running statistics.
    test = torch.randn(batch, 3, side, side, generator=g).to(memory_format=fmt)
    with eval_mode(model, dev), torch.no_grad():
        assert_same(dev(test.to(DEV)), model(test), "eval logits")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_resnet18_layout(memory_format, size):
    seeded(11)
    large = size == "large"
    # large: resnet18 itself (width 64, 11.2 M parameters) on 64x64 images.
    model = ResNet(width=64 if large else 8)
    _run_classifier(model, optimizer("SGD", "default", lr=0.05, momentum=0.9, weight_decay=1e-4),
                    memory_format, batch=4, side=64 if large else 32, steps=4 if large else 3)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_mobilenet_v3_small_layout(memory_format, size):
    seeded(12)
    large = size == "large"
    model = MobileNetV3Small(width_mult=1.0 if large else 0.5)
    # torchvision's reference recipe for MobileNetV3: RMSprop, alpha 0.9, eps 0.0316.
    make_opt = optimizer("RMSprop", "default", lr=1e-3, alpha=0.9, eps=0.0316,
                         momentum=0.9, weight_decay=1e-5)
    _run_classifier(model, make_opt, memory_format, batch=4, side=64 if large else 32,
                    steps=4 if large else 3)
