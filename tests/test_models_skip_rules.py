"""The skip rule itself: paper Eq. 13, 15, 21 computed by hand."""

import pytest
import torch
from torch.nn import functional as F

from models import SkipRule, create_model
from models.preact_resnet import PreActBasicBlock, PreActBottleneck

# The rule writes its result into fx (as torchvision's `out += identity`): calls pass a clone.
X = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(2))
FX = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(3))


def with_lambda(rule: str, value: float) -> SkipRule:
    skip = SkipRule(rule, 8)
    skip.set_lambda(value)
    assert skip.scalar_lambda().item() == pytest.approx(value, abs=1e-7)
    return skip


@pytest.mark.parametrize("lam", [0.37, -0.4, 1.0, 1.7])
def test_in_resnet_is_eq13(lam):
    c = max(lam, 0.0)
    assert torch.allclose(with_lambda("in", lam)(X, FX.clone()), (1 - c) * X + FX, atol=1e-7)


@pytest.mark.parametrize("lam", [0.37, -0.4, 1.0, 1.7])
def test_lambda_in_resnet_is_eq15(lam):
    c = max(lam, 0.0)
    assert torch.allclose(with_lambda("lambda-in", lam)(X, FX.clone()), (1 - c) * X + (1 + c) * FX, atol=1e-7)


def test_sig_rule_uses_sigmoid():
    c = torch.sigmoid(torch.tensor(0.3))
    assert torch.allclose(with_lambda("in-sig", 0.3)(X, FX.clone()), (1 - c) * X + FX, atol=1e-7)


@pytest.mark.parametrize("rule, act", [("in-gating", F.relu), ("in-gating-sig", torch.sigmoid)])
def test_gating_rule_is_he_et_als_elementwise_1x1_convolution_gate(rule, act):
    """d(x) = W_d BN(x) + b_d, a 1x1 convolution C -> C: one coefficient per example,
    channel and position, and at evaluation an affine map of x itself (Eq. 21's W_d x + b_d)."""
    torch.manual_seed(0)
    skip = SkipRule(rule, 8)
    with torch.no_grad():
        skip.gate.weight.normal_(0, 0.5)
    skip.train()
    skip.coefficient(X)  # one batch sets the standardisation's running statistics (momentum 0.1)
    skip.eval()
    mean, var = skip.gate.norm.running_mean, skip.gate.norm.running_var
    scale = 1 / torch.sqrt(var + skip.gate.norm.eps)
    w = skip.gate.weight[:, :, 0, 0] * scale[None, :]  # W' = W diag(1/σ), b' = b - W' μ
    b = skip.gate.bias - w @ mean
    d = torch.einsum("oc,nchw->nohw", w, X) + b[None, :, None, None]
    c = act(d)
    assert skip.coefficient(X).shape == X.shape == (3, 8, 5, 5)
    assert torch.allclose(skip.coefficient(X), c, atol=1e-5)
    assert torch.allclose(skip(X, FX.clone()), (1 - c) * X + FX, atol=1e-5)
    per_position = c[0, 0].flatten()  # one example, one channel: varies over the positions
    assert per_position.max() - per_position.min() > 0.01
    assert (c[0, :, 0, 0].max() - c[0, :, 0, 0].min()) > 0.01  # and over the channels


def test_gate_starts_at_the_scalar_rules_coefficients():
    torch.manual_seed(0)
    skip = SkipRule("in-gating", 8, init=(0.2, 0.25))
    assert skip.gate.weight.shape == (8, 8, 1, 1) and torch.count_nonzero(skip.gate.weight) == 0
    assert skip.gate.bias.shape == (8,) and 0.2 <= skip.gate.bias.min() <= skip.gate.bias.max() <= 0.25
    assert torch.equal(skip.coefficient(X), skip.gate.bias[None, :, None, None].expand(3, 8, 5, 5))


def test_a_networks_convolution_init_leaves_the_gate_at_zero():
    """PreActResNet and ResNeXt Kaiming-initialise their convolutions after building: the gate's
    W_d must still be 0, so each block starts at its interval's coefficients."""
    for name in ("in-resnet-gating-sig20", "in-resnet-gating20"):
        model = create_model(name)
        assert all(torch.count_nonzero(s.gate.weight) == 0 for s in model.damped_skips())


def test_residual_plain_and_undamped():
    assert torch.equal(SkipRule("residual", 8)(X, FX.clone()), X + FX)
    assert torch.equal(SkipRule("plain", 8)(X, FX.clone()), FX)
    fx = FX.clone()
    assert SkipRule("in", 8)(X, fx).data_ptr() == fx.data_ptr()  # result written into fx
    undamped = SkipRule("in", 8, damped=False)
    assert undamped.rule == "residual" and not list(undamped.parameters())
    assert torch.equal(undamped(X, FX.clone()), X + FX)


@pytest.mark.parametrize("rule", ["in", "lambda-in", "in-sig"])
def test_init_range_is_respected(rule):
    values = torch.stack([SkipRule(rule, 8, init=(0.3, 0.4)).scalar_lambda().detach() for _ in range(500)])
    assert values.min() >= 0.3 - 1e-7 and values.max() <= 0.4 + 1e-7
    assert values.max() - values.min() > 0.09  # spread over the interval, not a constant


def test_in_resnet_stores_k_as_the_release_and_lambda_in_resnet_stores_lambda():
    """The release keeps k ~ U[0.75, 0.8] with coefficient 1 - ReLU(1 - k) for In-ResNet, and
    λ ~ U[0.2, 0.25] itself for λ-In-ResNet: the parameters SGD (and its decay) sees."""
    in_resnet, lambda_in = SkipRule("in", 8), SkipRule("lambda-in", 8)
    assert [n for n, _ in in_resnet.named_parameters()] == ["k"] and 0.75 <= in_resnet.k.item() <= 0.8
    assert [n for n, _ in lambda_in.named_parameters()] == ["lam"] and 0.2 <= lambda_in.lam.item() <= 0.25
    assert in_resnet.coefficient().item() == pytest.approx(1 - in_resnet.k.item(), abs=1e-7)
    assert [n for n, _ in SkipRule("in-gating", 8).named_parameters()] == ["gate.weight", "gate.bias"]
    assert [n for n, _ in SkipRule("in-gating", 8).named_buffers()] == [
        "gate.norm.running_mean",
        "gate.norm.running_var",
        "gate.norm.num_batches_tracked",
    ]
    with pytest.raises(ValueError, match="the in-gating rule has no scalar λ"):
        SkipRule("in-gating", 8).set_lambda(0.3)


@pytest.mark.parametrize(
    "rule, direction",
    [("in", +1), ("lambda-in", -1), ("in-sig", -1), ("in-gating", -1), ("in-gating-sig", -1)],
)
def test_weight_decay_alone_moves_lambda_the_releases_way(rule, direction):
    """One SGD step with a zero loss gradient (lr 0.1, momentum 0.9, wd 1e-4, as the release):
    In-ResNet's λ = 1 - k rises (decay pulls k to 0: λ to 1, more damping); λ-In-ResNet's λ
    falls (toward 0, the ResNet), and so does every variant's d (stored as written)."""
    skip = SkipRule(rule, 8, init=(0.3, 0.4)).double()  # float64: the step is 1e-5 of the value
    x = X.double()
    before = skip.coefficient(x).mean().item() if skip.is_input_dependent else skip.scalar_lambda().item()
    optimizer = torch.optim.SGD(skip.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in skip.parameters():
        p.grad = torch.zeros_like(p)  # the loss does not move it: weight decay alone
    optimizer.step()
    after = skip.coefficient(x).mean().item() if skip.is_input_dependent else skip.scalar_lambda().item()
    d = 1 - before if rule == "in" else before  # the stored value, for the expected step
    if skip.is_input_dependent:
        assert (after - before) * direction > 0
    else:
        assert after - before == pytest.approx(direction * 0.1 * 1e-4 * abs(d), rel=1e-6)


def test_bad_rule_and_range_are_refused():
    with pytest.raises(ValueError, match="unknown skip rule 'in-resnet'"):
        SkipRule("in-resnet", 8)
    with pytest.raises(ValueError, match="low <= high"):
        SkipRule("in", 8, init=(0.4, 0.3))


@pytest.mark.parametrize("block_cls, planes", [(PreActBasicBlock, 8), (PreActBottleneck, 2)])
def test_block_is_eq15_and_evaluates_its_branch_once(block_cls, planes):
    skip = with_lambda("lambda-in", 0.3)
    block = block_cls(8, planes, 1, skip).eval()
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    calls = []
    for conv in convs:
        conv.register_forward_hook(lambda m, i, o: calls.append(m))
    out = block(X)
    assert len(calls) == len(convs)  # each conv of f once: f is not recomputed
    bns = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    f = X
    for bn, conv in zip(bns, convs, strict=True):  # pre-activation: BN-ReLU-conv, repeated
        f = F.conv2d(F.relu(bn(f)), conv.weight, stride=conv.stride, padding=conv.padding)
    assert torch.allclose(out, 0.7 * X + 1.3 * f, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("scaled", [False, True])
def test_damped_sum_gradients_are_exact(layout, scaled):
    from models.skip import _DampedSum

    gen = torch.Generator().manual_seed(4)
    x, fx = (torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    if layout == "channels_last":
        x, fx = x.to(memory_format=torch.channels_last), fx.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x, fx = x[..., ::2], fx[..., 1::2]
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.3, dtype=torch.float64, requires_grad=True) if scaled else None
    x.requires_grad_(True)
    fx.requires_grad_(True)
    inputs = (x, fx, a, b)

    def damped_sum(x, fx, a, b):
        return _DampedSum.apply(x, fx.clone(), a, b)  # a leaf cannot be written in place

    assert torch.autograd.gradcheck(damped_sum, inputs)
    expected = 0.7 * x + (1.3 if scaled else 1.0) * fx
    assert torch.allclose(damped_sum(*inputs), expected)
    frozen = fx.detach().clone()  # frozen parameters (an attack): fx's memory holds the result
    out = _DampedSum.apply(x, frozen, a.detach(), None if b is None else b.detach())
    assert out.data_ptr() == frozen.data_ptr() and torch.allclose(out, expected)


@pytest.mark.parametrize("rule", ["in-gating", "in-gating-sig"])
def test_the_fused_gated_sum_equals_plain_autograd(rule):
    """The gated skip written into fx's memory (training, attacks) and out of place (the
    stability stage's torch.func transforms) give the same output and gradients."""
    torch.manual_seed(0)
    results = []
    for fused in (True, False):
        torch.manual_seed(1)
        skip = SkipRule(rule, 8)
        with torch.no_grad():
            skip.gate.weight.normal_(0, 0.5)
        skip.fused = fused
        x, fx = X.clone().requires_grad_(), FX.clone().requires_grad_()
        out = skip(x, fx * 1)  # fx * 1: the block's fresh branch output, which the fused sum overwrites
        out.square().sum().backward()
        results.append((out.detach(), x.grad, fx.grad, skip.gate.weight.grad, skip.gate.bias.grad))
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain)
