"""Parity with the release's June 2020 scripts (commit 4b91b2c), preset `release-2020-06`.

The reference functions below are written here in the shape of those scripts: the attack
runs on the normalised input z = (x - mean) / std; FGSM adds eps * sign(grad) and clips z
to [0, 1]; IFGSM and PGD take 20 steps of alpha = 2/255, each projected onto the eps-ball
(in z's units) around z, for PGD around its unclipped random start, then clip z to [0, 1];
training keeps the weights of the epoch with the best test accuracy (`acc > self.max`).
Our preset, which attacks [0, 1] images through the model's Normalize layer, must give the
same images example for example, and each mutation below (the August scripts' choices, or
the paper's) must be caught.
"""

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from bench.attacks import gradient, perturbations
from bench.attacks.perturbations import perturbation
from bench.core import presets
from bench.core.presets import IMAGE, LAST, PIXEL, PRESETS
from bench.eval.protocol import EvalConfig
from bench.train import loop
from bench.train.loop import train
from bench.train.recipes import AUTHORS_CODE_STD, TrainConfig
from models import CIFAR10_MEAN, PreActResNet, UserError

JUNE = "release-2020-06"
# The release's constants as the model stores them (float32 buffers, made float64 with it)
MEAN = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).double().view(1, 3, 1, 1)
STD = torch.tensor(AUTHORS_CODE_STD, dtype=torch.float32).double().view(1, 3, 1, 1)
TOLERANCE = 1e-12  # float64: the two differ only by the normalisation's rounding
EPS, ALPHA, STEPS = 4 / 255, 2 / 255, 20


def june_fgsm(net, z, y, eps):
    z = z.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(net(z), y), z)[0]
    return (z.detach() + eps * grad.sign()).clamp(min=0, max=1)


def june_iterative(net, z, y, eps, alpha, steps, start=None):
    if start is not None:  # test_pgd.py: inputs += U[-eps, eps], then the copy it projects around
        z = z + start
    centre = z.detach().clone()
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(net(z), y), z)[0]
        z = z.detach() + alpha * grad.sign()
        z = torch.where(z > centre + eps, centre + eps, z)
        z = torch.where(z < centre - eps, centre - eps, z)
        z = z.clamp(min=0, max=1)
    return z


@pytest.fixture(scope="module")
def subject():
    torch.manual_seed(0)
    ours = (
        PreActResNet(8, mean=CIFAR10_MEAN, std=AUTHORS_CODE_STD, network="release")
        .double()
        .eval()
        .requires_grad_(False)
    )
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return ours, x, torch.arange(8) % 10


def releases(ours, x, y, name: str) -> torch.Tensor:
    """The June script's adversarial images, back in pixels (the same random start as ours)."""
    net = lambda z: ours.forward(z * STD + MEAN)  # noqa: E731 - the release's network takes z
    z = (x - MEAN) / STD
    if name == "fgsm":
        out = june_fgsm(net, z, y, EPS)
    elif name == "ifgsm":
        out = june_iterative(net, z, y, EPS, ALPHA, STEPS)
    else:
        torch.manual_seed(11)
        out = june_iterative(net, z, y, EPS, ALPHA, STEPS, torch.empty_like(x).uniform_(-EPS, EPS))
    return out * STD + MEAN


def ours_images(ours, x, y, name: str) -> torch.Tensor:
    torch.manual_seed(11)
    return perturbation(name).perturb(ours, x, y, [EPS], EvalConfig(preset=JUNE))[0]


@pytest.mark.parametrize("name", ["fgsm", "ifgsm", "pgd"])
def test_june_attacks_are_the_releases_example_for_example(subject, name):
    ours, x, y = subject
    mine, expected = ours_images(ours, x, y, name), releases(ours, x, y, name)
    assert (mine - expected).abs().max().item() <= TOLERANCE
    # what the release's clip does: every pixel in [mean, mean + std], some moved far from x
    assert ((mine >= MEAN - 1e-12) & (mine <= MEAN + STD + 1e-12)).all()
    assert (mine - x).abs().amax().item() > 0.2
    config = EvalConfig(preset=JUNE)
    assert perturbation(name).reach(config, EPS) == 1.0  # the audit checks the range only
    expected_params = {
        "fgsm": {"units": "normalised"},
        "ifgsm": {"alpha_255": 2.0, "steps": 20, "units": "normalised"},
        "pgd": {"alpha_255": 2.0, "steps": 20, "units": "normalised", "ball": "start"},
    }
    assert perturbation(name).params(config, 4.0) == expected_params[name]


def _mutate(monkeypatch, **change):
    monkeypatch.setitem(PRESETS, JUNE, replace(PRESETS[JUNE], **change))


MUTATIONS = {
    "alpha 1/255 (the August scripts)": (("ifgsm", "pgd"), lambda mp: _mutate(mp, alpha_255=1.0)),
    "pixel units, eps / std per channel (the August scripts)": (
        ("fgsm", "ifgsm", "pgd"),
        lambda mp: _mutate(mp, attack_units=PIXEL),
    ),
    "PGD's ball around x (the paper's text)": (("pgd",), lambda mp: _mutate(mp, pgd_ball=IMAGE)),
    "pixels clipped to [0, 1], not the normalised input": (
        ("fgsm", "ifgsm", "pgd"),
        lambda mp: mp.setattr(
            perturbations,
            "normalised_space",
            lambda model: replace(gradient.normalised_space(model), low=0.0, high=1.0),
        ),
    ),
    "the random start clipped to the range": (
        ("pgd",),
        lambda mp: mp.setattr(perturbations, "signed_steps", _clipped_start(gradient.signed_steps)),
    ),
}


def _clipped_start(signed_steps):
    def clipped(model, x, y, eps, alpha, steps, *, random_start, ball, space):
        if not random_start:
            return signed_steps(model, x, y, eps, alpha, steps, random_start=False, ball=ball, space=space)
        start = (x + torch.empty_like(x).uniform_(-eps, eps) * space.scale).clamp(
            min=space.low, max=space.high
        )
        low, high = start - eps * space.scale, start + eps * space.scale
        x_adv = start
        for _ in range(steps):
            x_adv = x_adv.clone().requires_grad_(True)
            grad = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)[0]
            x_adv = torch.clamp(
                torch.minimum(torch.maximum(x_adv.detach() + alpha * space.scale * grad.sign(), low), high),
                min=space.low,
                max=space.high,
            )
        return x_adv

    return clipped


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_june_parity_check_catches(subject, monkeypatch, mutation):
    ours, x, y = subject
    attacks, apply = MUTATIONS[mutation]
    expected = {name: releases(ours, x, y, name) for name in attacks}
    apply(monkeypatch)
    gaps = {name: (ours_images(ours, x, y, name) - expected[name]).abs().max().item() for name in attacks}
    assert all(gap > 1e-3 for gap in gaps.values()), gaps


def test_attacks_in_normalised_units_need_one_normalisation(subject):
    class Bare(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    x, y = subject[1].float(), subject[2]
    with pytest.raises(UserError, match="need a model with one input normalisation"):
        perturbation("fgsm").perturb(Bare(), x, y, [EPS], EvalConfig(preset=JUNE))


def test_the_june_preset_trains_as_the_august_one_and_names_its_runs():
    june, august = PRESETS[JUNE], PRESETS["authors-code"]
    assert (june.pad, june.pad_mode, june.release_network, june.noise_normalisation) == (
        august.pad,
        august.pad_mode,
        august.release_network,
        august.noise_normalisation,
    )
    assert (june.alpha_255, june.checkpoint, june.test_selected, august.test_selected) == (
        2.0,
        "best-test",
        True,
        False,
    )
    assert TrainConfig("in-resnet110", "cifar10", 0, preset=JUNE).run_tag == "in-resnet110@release-2020-06"
    assert presets.preset(JUNE) is june
    with pytest.raises(UserError, match="unknown preset 'june'"):
        EvalConfig(preset="june")


# --- the checkpoint of the best test accuracy ------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from bench.data.splits import load_test

    root = tmp_path_factory.mktemp("data")
    load_test("synthetic", root)
    return root


def _scripted(monkeypatch, accuracies):
    """Test accuracies as scripted, and each epoch's weights as they were when tested."""
    seen, calls = [], iter(accuracies)

    def scripted(model, test, device):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(calls)

    monkeypatch.setattr(loop, "test_accuracy", scripted)
    return seen


def _config(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            "model": "in-resnet14",
            "dataset": "synthetic",
            "seed": 0,
            "preset": JUNE,
            "length": "smoke",
            "n_train": 256,
            **kw,
        }
    )


@pytest.mark.slow
def test_june_runs_keep_the_weights_of_the_best_test_accuracy(tmp_path, data_dir, monkeypatch):
    seen = _scripted(monkeypatch, [0.5, 0.3])  # 2 epochs: the first is the best
    meta = train(_config(), tmp_path, data_dir, progress=False)
    assert (meta["status"], meta["test_accuracy"], meta["checkpoint"]) == (
        "finished",
        0.5,
        {"rule": "best-test", "epoch": 1},
    )
    stored = torch.load(
        tmp_path
        / "checkpoints"
        / "synthetic"
        / "in-resnet14@release-2020-06@smoke@n256"
        / "seed0"
        / "weights.pt",
        weights_only=True,
    )
    assert all(torch.equal(stored[k], seen[0][k]) for k in seen[0])
    assert any(not torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # the last epoch's weights differ


@pytest.mark.slow
def test_the_best_checkpoint_check_catches_the_last_epochs_weights(tmp_path, data_dir, monkeypatch):
    seen = _scripted(monkeypatch, [0.5, 0.3])
    monkeypatch.setitem(PRESETS, JUNE, replace(PRESETS[JUNE], checkpoint=LAST))
    meta = train(_config(), tmp_path, data_dir, progress=False)
    stored = torch.load(
        tmp_path
        / "checkpoints"
        / "synthetic"
        / "in-resnet14@release-2020-06@smoke@n256"
        / "seed0"
        / "weights.pt",
        weights_only=True,
    )
    assert meta["checkpoint"] == {"rule": "last", "epoch": 2} and meta["test_accuracy"] == 0.3
    assert any(not torch.equal(stored[k], seen[0][k]) for k in seen[0])


@pytest.mark.slow
def test_a_resumed_june_run_remembers_its_best_epoch(tmp_path, data_dir, monkeypatch):
    """Killed after epoch 1 (its best), resumed: epoch 2 is worse, so epoch 1's weights stay."""
    seen = _scripted(monkeypatch, [0.5])
    original = loop.write_epochs
    calls = []

    def killed(folder, epochs):
        original(folder, epochs)
        calls.append(1)
        raise KeyboardInterrupt  # after the state of epoch 1 is committed

    monkeypatch.setattr(loop, "write_epochs", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_config(), tmp_path, data_dir, progress=False)
    monkeypatch.setattr(loop, "write_epochs", original)
    _scripted(monkeypatch, [0.4])
    meta = train(_config(), tmp_path, data_dir, progress=False)
    assert (
        calls == [1]
        and meta["checkpoint"] == {"rule": "best-test", "epoch": 1}
        and meta["test_accuracy"] == 0.5
    )
    stored = torch.load(
        tmp_path
        / "checkpoints"
        / "synthetic"
        / "in-resnet14@release-2020-06@smoke@n256"
        / "seed0"
        / "weights.pt",
        weights_only=True,
    )
    assert all(torch.equal(stored[k], seen[0][k]) for k in seen[0])
