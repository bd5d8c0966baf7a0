"""Whole networks: parameter counts, limits of the interpolation, gradients, metadata."""

import pytest
import torch

from models import CIFAR10_MEAN, CIFAR10_STD, PreActResNet, ResNeXt, SkipRule, UserError, create_model


def n_params(model) -> int:
    """Parameters without the interpolation ones (lambda_n, gates), as the README's parameter table counts them."""
    return sum(p.numel() for name, p in model.named_parameters() if ".skip." not in name)


@pytest.mark.parametrize(
    "name, classes, expected",
    [
        ("resnet110", 10, 1_730_522),
        ("resnet110", 100, 1_736_372),
        ("resnet164", 10, 1_703_258),
        ("resnet164", 100, 1_726_388),
        ("resnext29-8x64d", 10, 34_426_698),
        ("resnext29-8x64d", 100, 34_518_948),
    ],
)
def test_parameter_counts_match_the_reference(name, classes, expected):
    for prefix in ("", "in-", "lambda-in-"):
        assert n_params(create_model(prefix + name, num_classes=classes)) == expected


@pytest.mark.parametrize(
    "name, classes, expected",
    [
        ("resnet110", 10, 1_730_618),
        ("resnet110", 100, 1_736_468),
        ("resnet164", 10, 1_703_674),
        ("resnet164", 100, 1_726_804),
    ],
)
def test_the_release_network_adds_a_bn_to_each_projection(name, classes, expected):
    """The release's Downsample has a BN of its own: 2 x (16 + 32) parameters more in
    ResNet-110's two projections, 2 x (16 + 64 + 128) in ResNet-164's three."""
    for prefix in ("", "in-", "lambda-in-"):
        model = create_model(prefix + name, num_classes=classes, network="release")
        assert n_params(model) == expected and model.info.network == "release"
    with pytest.raises(UserError, match="the authors' release has no ResNeXt"):
        create_model("resnext20-2x4d", network="release")


@pytest.mark.parametrize(
    "name, damped, blocks, lambdas",
    [
        ("in-resnet110", 51, 54, 51),
        ("in-resnet164", 51, 54, 51),
        ("in-resnext29-8x64d", 6, 9, 6),
        ("in-resnet-gating110", 51, 54, 0),
    ],
)
def test_release_scope_damps_identity_blocks_except_the_first(name, damped, blocks, lambdas):
    model = create_model(name)
    skips = [m for m in model.modules() if isinstance(m, SkipRule)]
    assert (len(model.damped_skips()), len(skips)) == (damped, blocks)
    assert sum(s.has_scalar for s in skips) == lambdas
    assert not skips[0].damped  # the very first block stays plain residual
    assert len(create_model(name, damp_scope="all").damped_skips()) == blocks


def twin(reference_name: str, damped_name: str, **kw):
    """Two models with the same weights, differing only in the skip rule."""
    reference, damped = create_model(reference_name, **kw).eval(), create_model(damped_name, **kw).eval()
    missing, unexpected = damped.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(".skip." in k for k in missing)
    return reference, damped


def set_interpolation(model, value: float) -> None:
    for skip in model.damped_skips():
        if skip.has_scalar:
            skip.set_lambda(value)
        else:
            skip.gate.bias.data.fill_(value)


FAMILIES = [("resnet20", "{}20"), ("resnet164", "{}164"), ("resnext20-2x4d", "{}20-2x4d")]


@pytest.mark.parametrize("rule_prefix", ["in-resnet", "lambda-in-resnet"])
@pytest.mark.parametrize("base, pattern", FAMILIES)
@pytest.mark.parametrize("lam", [0.0, -0.3])  # ReLU(lambda) = 0 either way
def test_zero_interpolation_is_exactly_resnet(rule_prefix, base, pattern, lam, images):
    damped_name = pattern.format(rule_prefix)
    if "resnext" in base:
        damped_name = damped_name.replace("resnet", "resnext")
    resnet, damped = twin(base, damped_name)
    set_interpolation(damped, lam)
    assert torch.allclose(damped(images), resnet(images), atol=1e-6)


@pytest.mark.parametrize(
    "name, d", [("in-resnet-sig20", -1e4), ("in-resnet-gating20", 0.0), ("in-resnet-gating-sig20", -1e4)]
)
def test_variants_at_zero_coefficient_are_resnet(name, d, images):
    resnet, damped = twin("resnet20", name)
    set_interpolation(damped, d)
    assert torch.allclose(damped(images), resnet(images), atol=1e-6)


@pytest.mark.parametrize("name, d", [("in-resnet20", 1.0), ("in-resnet-sig20", 1e4), ("in-resnet164", 1.0)])
def test_unit_coefficient_is_the_plain_network(name, d, images):
    plain, damped = twin(name.replace("in-resnet-sig", "plain").replace("in-resnet", "plain"), name)
    set_interpolation(damped, d)
    assert torch.allclose(damped(images), plain(images), atol=1e-6)
    # and it really differs from the residual network with the same weights
    resnet, _ = twin(name.replace("in-resnet-sig", "resnet").replace("in-resnet", "resnet"), name)
    assert not torch.allclose(resnet(images), plain(images), atol=1e-3)


@pytest.mark.parametrize(
    "name",
    [
        "in-resnet20",
        "lambda-in-resnet20",
        "in-resnet-sig20",
        "in-resnet-gating20",
        "in-resnet-gating-sig20",
        "in-resnext20-2x4d",
    ],
)
def test_gradients_reach_every_interpolation_parameter(name, images):
    model = create_model(name)
    model(images).logsumexp(1).sum().backward()
    params = [p for s in model.damped_skips() for p in s.parameters()]
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_lambda_init_defaults_and_override():
    def within(name: str, low: float, high: float, **kw) -> bool:
        values = torch.stack([s.scalar_lambda().detach() for s in create_model(name, **kw).damped_skips()])
        return bool(values.min() >= low - 1e-7 and values.max() <= high + 1e-7)  # λ = 1 - k in float32

    assert within("in-resnet110", 0.2, 0.25) and within("in-resnet164", 0.1, 0.2)
    assert within("lambda-in-resnext29-8x64d", 0.2, 0.25)
    assert within("in-resnet20", 0.3, 0.4, lambda_init=(0.3, 0.4))


@pytest.mark.parametrize(
    "name", ["in-resnet-sig110", "in-resnet-gating-sig110", "in-resnet-gating110", "in-resnet110"]
)
def test_every_rule_starts_at_in_resnets_coefficients(name, images):
    """Table 4's variants start where In-ResNet-110 does, act(d) in [0.2, 0.25]: the sig rules
    from d ~ U[logit 0.2, logit 0.25] (sigmoid of the ReLU rules' U[0.2, 0.25] would be 0.55)."""
    model = create_model(name)
    coefficients = model.interpolation_coefficients(images)  # a gate's: each example's mean
    assert coefficients.min() >= 0.2 - 1e-6 and coefficients.max() <= 0.25 + 1e-6
    each = torch.cat(
        [
            s.act(s.gate.bias).detach() if s.is_input_dependent else s.coefficient().reshape(1)
            for s in model.damped_skips()
        ]
    )
    assert each.min() >= 0.2 - 1e-6 and each.max() <= 0.25 + 1e-6
    assert each.max() - each.min() > 0.045  # drawn over the interval


def test_interpolation_coefficients(images):
    model = create_model("in-resnet20")
    set_interpolation(model, 0.5)
    model.damped_skips()[0].set_lambda(-2.0)
    coef = model.interpolation_coefficients()
    assert coef.tolist() == [0.0] + [0.5] * 5  # ReLU(lambda) of 6 damped blocks, depth order
    assert create_model("resnet20").interpolation_coefficients().tolist() == [0.0] * 6
    assert create_model("plain20").interpolation_coefficients().tolist() == [1.0] * 6
    assert create_model("resnet8").interpolation_coefficients().shape == (0,)
    sig = create_model("in-resnet-sig20")
    set_interpolation(sig, 0.0)
    assert sig.interpolation_coefficients().tolist() == [0.5] * 6


def test_gating_coefficients_need_an_input_and_restore_the_mode(images):
    model = create_model("in-resnet-gating20").train()
    with pytest.raises(ValueError, match="pass a batch x"):
        model.interpolation_coefficients()
    coef = model.interpolation_coefficients(images)
    assert coef.shape == (6, 4) and model.training
    biases = torch.stack([s.gate.bias.detach().mean() for s in model.damped_skips()])
    assert torch.allclose(coef, biases[:, None].expand(6, 4))  # W_d = 0 at init: each example the bias's mean


def test_normalisation_lives_inside_the_model(images):
    torch.manual_seed(5)
    inside = create_model("resnet8", mean=CIFAR10_MEAN, std=CIFAR10_STD).eval()
    torch.manual_seed(5)
    identity = create_model("resnet8", mean=(0, 0, 0), std=(1, 1, 1)).eval()
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    assert torch.allclose(inside(images), identity((images - mean) / std), atol=1e-5)
    info = inside.info
    assert (info.name, info.mean, info.std, info.num_classes, info.input_range) == (
        "resnet8",
        CIFAR10_MEAN,
        CIFAR10_STD,
        10,
        (0.0, 1.0),
    )
    assert torch.equal(inside.state_dict()["normalize.std"].flatten(), torch.tensor(CIFAR10_STD))


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = create_model("lambda-in-resnet20").state_dict()
    torch.manual_seed(3)
    b = create_model("lambda-in-resnet20").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_any_valid_depth_and_clear_errors_for_invalid_ones(images):
    assert PreActResNet(depth=14, rule="in")(images).shape == (4, 10)
    assert PreActResNet(depth=29, block="bottleneck")(images).shape == (4, 10)
    assert ResNeXt(depth=11, cardinality=2, base_width=4, widths=(16, 32, 64))(images).shape == (4, 10)
    with pytest.raises(ValueError, match=r"depth = 6n\+2 \(n >= 1\), got 21"):
        PreActResNet(depth=21)
    with pytest.raises(UserError, match=r"model .resnet20.: .*9n\+2 \(n >= 1\), got 21"):
        create_model("resnet20", depth=21, block="bottleneck")
    with pytest.raises(
        UserError,
        match="no block of preact-resnet8-basic takes the 'in' skip under "
        "damp_scope='release': use a deeper model or damp_scope='all'",
    ):
        create_model("resnet8", rule="in")
    assert len(create_model("resnet8", rule="in", damp_scope="all").damped_skips()) == 3
    with pytest.raises(UserError, match="damp_scope must be one of"):
        create_model("in-resnet20", damp_scope="some")
