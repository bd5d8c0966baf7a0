"""Parity with the authors' release, step for step.

`Release` below is written here from the documented structure of the release's
InResNet.py and train.py (minicheshire/InResNet): its pre-activation basic and bottleneck
blocks, which return the branch alone; a separate Downsample (BN-ReLU-1x1 conv with its
own BN) for every projection; the first block and the projection blocks undamped; one
trained scalar per block, k ~ U[0.75, 0.8] with skip weight 1 - ReLU(1 - k) for
In-ResNet, λ ~ U[0.2, 0.25] with (1 + ReLU(λ)) b(x) + (1 - ReLU(λ)) x for λ-In-ResNet
(whose line evaluates the branch twice, once for its shape); its init; normalised inputs;
SGD over all its parameters. Our model under the authors-code preset, given the same
weights, must compute the same logits and, after 20 steps of the release's optimiser on
the same batches, hold the same parameters, BN running statistics and coefficients.
"""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.attacks.gradient import pgd_around_start
from bench.train.epoch import epoch_generator, make_optimizer, train_epoch
from bench.train.recipes import AUTHORS_CODE_STD, Recipe, TrainConfig
from models import CIFAR10_MEAN, PreActResNet, skip

TOLERANCE = 1e-5
STEPS, BATCH, SIZE = 20, 16, 16  # steps, images per step, image side (16: a quarter of CIFAR's cost)
# The 20 steps run in float64: at lr 0.1 on random labels, float32 rounding alone (1e-7
# after one step) grows to 1e-2 within 5 steps in either network, so float32 would test
# the rounding; in float64 the two agree to 1e-13. The logits are checked in float32 too.


class Branch(nn.Module):
    """A release block: BN-ReLU-conv repeated, the branch b(x) only (no skip)."""

    def __init__(self, in_planes: int, planes: int, stride: int, bottleneck: bool):
        super().__init__()
        self.in_planes, self.planes, self.expansion = in_planes, planes, 4 if bottleneck else 1
        if bottleneck:  # 1x1, 3x3 (stride here), 1x1 to 4 planes
            shapes = [(in_planes, planes, 1, 1), (planes, planes, 3, stride), (planes, 4 * planes, 1, 1)]
        else:  # 3x3 (stride here), 3x3
            shapes = [(in_planes, planes, 3, stride), (planes, planes, 3, 1)]
        self.norms = nn.ModuleList(nn.BatchNorm2d(c_in) for c_in, _, _, _ in shapes)
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, k, stride=s, padding=k // 2, bias=False) for c_in, c_out, k, s in shapes
        )

    def forward(self, x):
        for norm, conv in zip(self.norms, self.convs, strict=True):
            x = conv(F.relu(norm(x)))
        return x


class Downsample(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.norm, self.conv = (
            nn.BatchNorm2d(in_planes),
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        )

    def forward(self, x):
        return self.conv(F.relu(self.norm(x)))


class Release(nn.Module):
    """The release's network on normalised inputs; `rule` "residual", "in" or "lambda-in"."""

    def __init__(self, n: int, bottleneck: bool, rule: str, classes: int = 10):
        super().__init__()
        expansion = 4 if bottleneck else 1
        self.rule, self.bottleneck = rule, bottleneck
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for j in range(n):
                blocks.append(Branch(in_planes, planes, stride if j == 0 else 1, bottleneck))
                in_planes = planes * expansion
        self.blocks = nn.ModuleList(blocks)
        self.downsample1 = Downsample(16, 16 * expansion, 1)  # the first block's, with bottlenecks
        self.downsample21 = Downsample(16 * expansion, 32 * expansion, 2)
        self.downsample31 = Downsample(32 * expansion, 64 * expansion, 2)
        low = 0.75 if rule == "in" else 0.2  # k for In-ResNet, λ for λ-In-ResNet
        self.ks = nn.ParameterList(nn.Parameter(torch.empty(1).uniform_(low, low + 0.05)) for _ in blocks)
        self.bn = nn.BatchNorm2d(64 * expansion)
        self.fc = nn.Linear(64 * expansion, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2 / (k * k * out_channels))
                m.weight.data.normal_(
                    0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                )
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward(self, x):
        x = self.conv1(x)
        x = self.blocks[0](x) + (self.downsample1(x) if self.bottleneck else x)
        for i, b in enumerate(self.blocks):
            if i == 0:
                continue
            if b.in_planes != b.planes * b.expansion:  # a projection block: never damped
                x = b(x) + (self.downsample21 if b.planes == 32 else self.downsample31)(x)
            elif self.rule == "in":
                x = b(x) + (1 - F.relu(1 - self.ks[i])) * x
            elif self.rule == "lambda-in":
                c = F.relu(self.ks[i])
                x = (1 + c).expand_as(b(x)) * b(x) + (1 - c) * x  # b twice, as the release's line
            else:
                x = b(x) + x
        x = F.avg_pool2d(F.relu(self.bn(x)), x.shape[-1])
        return self.fc(x.flatten(1))

    def coefficients(self, damped: list[int]) -> torch.Tensor:
        return torch.stack(
            [F.relu(1 - self.ks[i]) if self.rule == "in" else F.relu(self.ks[i]) for i in damped]
        ).flatten()


def correspondence(ours: PreActResNet, ref: Release) -> tuple[dict[str, str], list[int]]:
    """Our state_dict name -> the release's, and the release indices of the damped blocks."""
    names, damped = {"conv1.weight": "conv1.weight"}, []
    blocks = [b for layer in (ours.layer1, ours.layer2, ours.layer3) for b in layer]
    prefix = {
        id(b): f"layer{k}.{j}"
        for k, layer in enumerate((ours.layer1, ours.layer2, ours.layer3), 1)
        for j, b in enumerate(layer)
    }
    stats = ("weight", "bias", "running_mean", "running_var")
    for i, block in enumerate(blocks):
        ours_prefix, ref_block = prefix[id(block)], f"blocks.{i}"
        norms = [m for n, m in block.named_children() if n.startswith("bn")]
        for j in range(len(norms)):
            names |= {f"{ours_prefix}.bn{j + 1}.{s}": f"{ref_block}.norms.{j}.{s}" for s in stats}
            names[f"{ours_prefix}.conv{j + 1}.weight"] = f"{ref_block}.convs.{j}.weight"
        if block.shortcut is not None:
            down = (
                "downsample1"
                if i == 0
                else ("downsample21" if ref.blocks[i].planes == 32 else "downsample31")
            )
            names |= {f"{ours_prefix}.shortcut.0.{s}": f"{down}.norm.{s}" for s in stats}
            names[f"{ours_prefix}.shortcut.2.weight"] = f"{down}.conv.weight"
        if block.skip.has_scalar:
            names[f"{ours_prefix}.skip.{'k' if block.skip.stores_k else 'lam'}"] = f"ks.{i}"
            damped.append(i)
    names |= {f"bn.{s}": f"bn.{s}" for s in stats} | {"fc.weight": "fc.weight", "fc.bias": "fc.bias"}
    return names, damped


def twins(depth: int, block: str, rule: str) -> tuple[PreActResNet, Release, dict[str, str], list[int]]:
    """Our authors-code network and the release's, with the release's weights in ours."""
    torch.manual_seed(1)
    ref = Release((depth - 2) // (9 if block == "bottleneck" else 6), block == "bottleneck", rule)
    ours = PreActResNet(depth, rule, block, mean=CIFAR10_MEAN, std=AUTHORS_CODE_STD, network="release")
    names, damped = correspondence(ours, ref)
    state = ours.state_dict()
    assert set(names) == {
        k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("normalize.")
    }
    ours.load_state_dict({**state, **{k: release_value(ref, names, k, state[k].shape) for k in names}})
    return ours, ref, names, damped


def release_value(ref: Release, names: dict[str, str], key: str, shape) -> torch.Tensor:
    """The release's value of our entry `key`: its k as λ = 1 - k where we store λ for a k."""
    value = ref.state_dict()[names[key]].reshape(shape)
    return 1 - value if key.endswith("skip.lam") and ref.rule == "in" else value


def normalise(x: torch.Tensor) -> torch.Tensor:
    # float32 constants, as our Normalize holds them (then cast with the model)
    mean, std = (torch.tensor(v).to(x.dtype).view(1, 3, 1, 1) for v in (CIFAR10_MEAN, AUTHORS_CODE_STD))
    return (x - mean) / std


def train_both(ours: PreActResNet, ref: Release) -> None:
    """STEPS steps of the release's SGD (lr 0.1, momentum 0.9, weight decay 1e-4 on every
    parameter) on the same batches, in float64: ours through bench.train.loop's epoch loop and
    optimiser, the release's by hand in the order the epoch generator gives."""
    ours.double()
    ref.double()
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (STEPS * BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (STEPS * BATCH,), generator=gen)
    recipe = Recipe(1, 0.1, (), 1e-4, momentum=0.9, batch_size=BATCH, pad=0, flip=False)  # no augmentation
    config = TrainConfig("in-resnet20", "cifar10", 0, preset="authors-code", channels_last=False)
    train_epoch(
        ours, make_optimizer(ours, recipe, "cpu"), images, labels, recipe, epoch_generator(0, 0), config
    )
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref.train()
    order = torch.randperm(len(labels), generator=epoch_generator(0, 0))  # train_epoch's first draw
    for start in range(0, len(labels), BATCH):
        idx = order[start : start + BATCH]
        pixels = (images[idx].float() / 255).double()  # bench.train.epoch.augment's conversion, bit for bit
        loss = F.cross_entropy(ref(normalise(pixels)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def largest_gaps(ours, ref, names, damped) -> dict[str, float]:
    """The largest |ours - release| of the parameters, the BN running statistics (the BN
    step counters differ where the release runs a branch twice: unused with a momentum)
    and the coefficients ReLU(λ_n)."""
    mine = ours.state_dict()
    gaps = {
        "parameters": max(
            (mine[k] - release_value(ref, names, k, mine[k].shape)).abs().max().item()
            for k in names
            if not k.endswith(("running_mean", "running_var"))
        ),
        "running statistics": max(
            (mine[k] - release_value(ref, names, k, mine[k].shape)).abs().max().item()
            for k in names
            if k.endswith(("running_mean", "running_var"))
        ),
    }
    if damped:
        mine = torch.stack([s.coefficient().detach() for s in ours.damped_skips()])
        gaps["coefficients"] = (mine - ref.coefficients(damped).detach()).abs().max().item()
    return gaps


MODELS = [
    (20, "basic", "residual"),
    (20, "basic", "in"),
    (20, "basic", "lambda-in"),
    (20, "bottleneck", "in"),
    (20, "bottleneck", "lambda-in"),
]


@pytest.mark.parametrize("depth, block, rule", MODELS)
def test_authors_code_network_trains_step_for_step_as_the_release(depth, block, rule):
    ours, ref, names, damped = twins(depth, block, rule)
    assert len(damped) == (
        0 if rule == "residual" else 3 * ((depth - 2) // (9 if block == "bottleneck" else 6)) - 3
    )
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for mode in (False, True):  # eval (running statistics) and train (batch statistics)
            ours.train(mode)
            ref.train(mode)
            assert (ours(x) - ref(normalise(x))).abs().max().item() <= TOLERANCE
    ours, ref, names, damped = twins(depth, block, rule)  # the batches above moved train-mode statistics
    train_both(ours, ref)
    gaps = largest_gaps(ours, ref, names, damped)
    assert max(gaps.values()) <= TOLERANCE, gaps
    assert (
        ref.state_dict()["fc.weight"].sub(twins(depth, block, rule)[1].state_dict()["fc.weight"]).abs().max()
        > 1e-2
    )
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert (ours(x.double()) - ref(normalise(x.double()))).abs().max().item() <= TOLERANCE


def test_the_parity_check_catches_lambda_stored_as_itself(monkeypatch):
    """In-ResNet storing λ itself (the parametrisation before this check, under which decay
    pulled λ toward 0) computes the same logits from the same weights, but leaves the
    release within 20 steps: the check above has teeth."""
    monkeypatch.setitem(skip.RULES, "in", replace(skip.RULES["in"], stores_k=False))
    ours, ref, names, damped = twins(20, "basic", "in")
    assert not any(k.endswith("skip.k") for k in names)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours.eval()(x) - ref.eval()(normalise(x))).abs().max().item() <= TOLERANCE
    ours, ref, names, damped = twins(20, "basic", "in")
    train_both(ours, ref)
    gaps = largest_gaps(ours, ref, names, damped)
    assert gaps["coefficients"] > 10 * TOLERANCE, gaps


# --- PGD as the release's test_pgd.py runs it ---------------------------------------------------


def release_pgd(net, x_norm, y, eps: float, alpha: float, steps: int, start_norm):
    """test_pgd.py's loop, written here: on normalised inputs, per-channel radius eps / std
    and step alpha / std, the ball around the (unclipped) random start, clipped to the
    normalised image range after every step."""
    std = torch.tensor(AUTHORS_CODE_STD).to(x_norm.dtype).view(1, 3, 1, 1)
    mean = torch.tensor(CIFAR10_MEAN).to(x_norm.dtype).view(1, 3, 1, 1)
    inputs = (x_norm + start_norm).requires_grad_(True)
    centre = inputs.detach().clone()
    radius, step = eps / std, alpha / std
    for _ in range(steps):
        grad = torch.autograd.grad(F.cross_entropy(net(inputs), y), inputs)[0]
        inputs = inputs.detach() + step * grad.sign()
        inputs = torch.where(inputs > centre + radius, centre + radius, inputs)
        inputs = torch.where(inputs < centre - radius, centre - radius, inputs)
        inputs = torch.maximum(torch.minimum(inputs, (1 - mean) / std), -mean / std).requires_grad_(True)
    return inputs.detach()


def test_authors_code_pgd_is_the_releases_example_for_example():
    """Our pixel-space PGD around its random start equals the release's normalised-space
    loop (same start), and its images leave the eps-ball around x (up to 2 eps) as the
    release's do, unlike the paper preset's PGD."""
    from bench.attacks.perturbations import perturbation
    from bench.eval.protocol import EvalConfig

    torch.manual_seed(0)
    ours = (
        PreActResNet(8, mean=CIFAR10_MEAN, std=AUTHORS_CODE_STD, network="release")
        .double()
        .eval()
        .requires_grad_(False)
    )
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.arange(8) % 10
    eps, alpha = 4 / 255, 1 / 255
    torch.manual_seed(11)
    start = torch.empty_like(x).uniform_(-eps, eps)  # the draw pgd_around_start makes first
    std = torch.tensor(AUTHORS_CODE_STD).to(x.dtype).view(1, 3, 1, 1)
    expected = release_pgd(
        lambda v: ours.forward(v * std + torch.tensor(CIFAR10_MEAN).to(x.dtype).view(1, 3, 1, 1)),
        normalise(x),
        y,
        eps,
        alpha,
        20,
        start / std,
    )
    torch.manual_seed(11)
    mine = pgd_around_start(ours, x, y, eps, alpha, 20)
    mean = torch.tensor(CIFAR10_MEAN).to(x.dtype).view(1, 3, 1, 1)
    assert (mine - (expected * std + mean)).abs().max().item() <= 1e-9
    reach = (mine - x).abs().amax().item()
    assert eps < reach <= 2 * eps + 1e-12 and 0 <= mine.min() and mine.max() <= 1
    authors, paper = EvalConfig(preset="authors-code"), EvalConfig()
    pgd = perturbation("pgd")
    assert pgd.params(authors, 4.0) == {"alpha_255": 1.0, "steps": 20, "ball": "start"}
    assert pgd.params(paper, 4.0) == {"alpha_255": 2.0, "steps": 20}  # the paper's cells keep their key
    assert pgd.reach(authors, eps) == 2 * eps and pgd.reach(paper, eps) == eps
    assert perturbation("pgd50").params(authors, 16.0) == {
        "alpha_255": 0.8,
        "steps": 50,
    }  # a gate: the paper's ball
    torch.manual_seed(11)
    assert (pgd.perturb(ours, x, y, [eps], paper)[0] - x).abs().amax().item() <= eps + 1e-12


def test_the_parity_check_catches_lambda_in_resnets_branch_statistics_updated_once(monkeypatch):
    """Without the release's second branch pass (BN momentum 0.19 in λ-In-ResNet's damped
    blocks), parameters and coefficients still agree but the running statistics do not."""
    from models import preact_resnet

    monkeypatch.setattr(preact_resnet, "_branch_statistics_twice", lambda block: None)
    ours, ref, names, damped = twins(20, "basic", "lambda-in")
    train_both(ours, ref)
    gaps = largest_gaps(ours, ref, names, damped)
    assert gaps["parameters"] <= TOLERANCE and gaps["running statistics"] > 1e-3, gaps
