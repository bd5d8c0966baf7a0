"""Defense adapters: each loads, reproduces logits, and fails with one clear line."""

import importlib.util
import json

import pytest
import torch
from torch import nn

from bench.core.files import sha256_file
from bench.eval.adapters import module_defense, robustbench_defense, state_dict_defense, zoo_defense
from bench.records.checkpoints import save_zoo_checkpoint
from models import CIFAR10_MEAN, CIFAR10_STD, UserError, create_model


def trained_like(name: str, **kw):
    """A model whose BN statistics and lambdas are not at their initial values."""
    model = create_model(name, **kw).train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32))
        for skip in model.damped_skips():
            if skip.has_scalar:
                skip.set_lambda(skip.scalar_lambda().item() + 0.1)
    return model.eval()


def assert_same_logits(defense, model, images):
    assert torch.allclose(defense.model(images), model(images), atol=1e-6)
    assert not defense.model.training
    assert not any(p.requires_grad for p in defense.model.parameters())


# --- 1. zoo ---------------------------------------------------------------------------------


def test_zoo_checkpoint_round_trip(tmp_path, images):
    model = trained_like("in-resnet14", num_classes=100, lambda_init=(0.3, 0.4))
    folder = save_zoo_checkpoint(model, "cifar100", 3, tmp_path, epochs=2)
    assert folder == tmp_path / "checkpoints" / "cifar100" / "in-resnet14" / "seed3"
    defense = zoo_defense("in-resnet14", "cifar100", 3, tmp_path)
    assert_same_logits(defense, model, images)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sha256"] == sha256_file(folder / "weights.pt") == defense.info.checkpoint_sha256
    assert meta["epochs"] == 2 and meta["model_kwargs"]["lambda_init"] == [0.3, 0.4]
    info = defense.info
    assert (info.name, info.family, info.dataset, info.num_classes, info.source) == (
        "in-resnet14",
        "preact-resnet",
        "cifar100",
        100,
        "zoo",
    )
    assert not list(folder.glob("*.tmp"))


def test_zoo_errors(tmp_path):
    with pytest.raises(
        UserError, match=r"no trained checkpoint for resnet8 on cifar10 seed 0: expected .*weights.pt"
    ):
        zoo_defense("resnet8", "cifar10", 0, tmp_path)
    folder = save_zoo_checkpoint(create_model("resnet8"), "cifar10", 0, tmp_path)
    with open(folder / "weights.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(
        UserError, match="does not match the sha256 in .*meta.json: it changed or is truncated"
    ):
        zoo_defense("resnet8", "cifar10", 0, tmp_path)
    save_zoo_checkpoint(create_model("resnet8"), "cifar10", 0, tmp_path, status="running")
    with pytest.raises(UserError, match="is 'running', not a finished run"):
        zoo_defense("resnet8", "cifar10", 0, tmp_path)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is not valid checkpoint metadata"):
        zoo_defense("resnet8", "cifar10", 0, tmp_path)


# --- 2. registered architecture + user's state_dict ------------------------------------------


def test_state_dict_defense(tmp_path, images):
    model = trained_like("lambda-in-resnet20")
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 9}, wrapped)
    for path in (plain, wrapped):
        defense = state_dict_defense("lambda-in-resnet20", path, name="mine")
        assert_same_logits(defense, model, images)
        assert defense.info.checkpoint_sha256 == sha256_file(path)
        assert (defense.info.name, defense.info.source) == ("mine", "state-dict")


def test_checkpoint_errors_are_one_line(tmp_path):
    good = tmp_path / "resnet8.pt"
    torch.save(create_model("resnet8").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.pt"
    torch.save(create_model("resnet8"), pickled)  # a whole module: needs code to unpickle
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    cases = [
        (tmp_path / "absent.pt", "resnet8", r"checkpoint .*absent.pt not found: check the path"),
        (
            truncated,
            "resnet8",
            r"checkpoint .*truncated.pt cannot be read with weights_only=True \(.*\); "
            "it is truncated, not a torch.save file, or pickles code",
        ),
        (pickled, "resnet8", r"pickled.pt cannot be read with weights_only=True"),
        (listing, "resnet8", r"list.pt holds a list, not a state_dict of named tensors"),
        (
            good,
            "resnet20",
            r"resnet8.pt does not fit PreActResNet: missing keys layer1.1.bn1.weight, "
            r"layer1.1.bn1.bias, layer1.1.bn1.running_mean, layer1.1.bn1.running_var "
            r"\(\+\d+ more\)",
        ),
    ]
    for path, arch, pattern in cases:
        with pytest.raises(UserError, match=pattern) as err:
            state_dict_defense(arch, path, name="mine")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"shape mismatch fc.weight file \(10, 64\) vs model \(100, 64\)"):
        state_dict_defense("resnet8", good, dataset="cifar100", name="mine")
    torch.save(create_model("in-resnet14").state_dict(), tmp_path / "in.pt")
    with pytest.raises(UserError, match="unexpected keys layer1.1.skip.k, layer2.1.skip.k, layer3.1.skip.k$"):
        state_dict_defense("resnet14", tmp_path / "in.pt")
    torch.save(create_model("resnet14").state_dict(), tmp_path / "res.pt")
    with pytest.raises(UserError, match="missing keys layer1.1.skip.k, layer2.1.skip.k, layer3.1.skip.k$"):
        state_dict_defense("in-resnet14", tmp_path / "res.pt")
    with pytest.raises(UserError, match="unknown dataset .svhn.; choose one of cifar10, cifar100, synthetic"):
        state_dict_defense("resnet8", good, dataset="svhn", name="mine")


# --- 3. any module ---------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_module_defense_normalises_inside(tmp_path, images):
    net = TinyNet()
    torch.save(net.state_dict(), tmp_path / "tiny.pt")
    defense = module_defense("tiny", TinyNet, tmp_path / "tiny.pt", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    assert torch.allclose(defense.model(images), net((images - mean) / std), atol=1e-6)
    assert (defense.info.family, defense.info.source, defense.info.num_classes) == ("external", "module", 10)


def test_module_defense_checks_the_output(tmp_path):
    torch.save(TinyNet(7).state_dict(), tmp_path / "seven.pt")
    with pytest.raises(
        UserError,
        match=r"defense odd returns \(2, 7\) torch.float32 for a 2x3x32x32 batch of \[0, 1\] images; expected finite "
        r"floating-point \(2, 10\) logits",
    ):
        module_defense("odd", lambda: TinyNet(7), tmp_path / "seven.pt", mean=(0, 0, 0), std=(1, 1, 1))


class NoForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


def _five() -> int:
    return 5


def _raises() -> nn.Module:
    raise ValueError("width must be even")


@pytest.mark.parametrize(
    "factory, mean, said",
    [
        (
            _five,
            None,
            r"defense bad: its factory \S+:_five\(\) returned an object of type int, not a torch.nn.Module",
        ),
        (_raises, None, r"defense bad: its factory \S+:_raises\(\) raised ValueError: width must be even"),
        (
            NoForward,
            None,
            r"defense bad fails on a 2x3x32x32 batch of \[0, 1\] images \(NotImplementedError: Module \[NoForward\] is "
            r"missing the required \"forward\" function\): check its forward and the data set it is for",
        ),
        (
            TinyNet,
            ("a", 0, 0),
            r"defense bad: mean must be finite numbers, one per channel, got \('a', 0, 0\)",
        ),
        (TinyNet, 0.5, r"defense bad: mean must be finite numbers, one per channel, got 0.5"),
        (TinyNet, (0.5, 0.5), r"defense bad: mean needs 3 numbers \(one per channel of cifar10\), got 2"),
    ],
)
def test_the_api_says_in_one_line_what_the_command_line_says(tmp_path, factory, mean, said):
    """The Python API's mistakes are UserErrors as the CLI's are, never an AttributeError
    or a ValueError from deep inside."""
    torch.save((NoForward() if factory is NoForward else TinyNet()).state_dict(), tmp_path / "w.pt")
    std = None if mean is None else (1, 1, 1)
    with pytest.raises(UserError, match=f"^{said}$"):
        module_defense("bad", factory, tmp_path / "w.pt", mean=mean, std=std)


def test_a_normalized_model_of_unlike_mean_and_std_is_one_line():
    from bench.eval.adapters import NormalizedModel

    with pytest.raises(
        UserError,
        match=r"^NormalizedModel: need one positive std per mean channel, got mean=\(0.1, 0.2\) std=\(1, 1, 1\)$",
    ):
        NormalizedModel(nn.Identity(), (0.1, 0.2), (1, 1, 1))


def test_an_eval_config_for_a_device_no_run_takes_is_refused_when_made():
    from bench.eval.protocol import EvalConfig

    with pytest.raises(
        UserError,
        match=r"^device 'gpu' is not usable here \(the benchmark runs on cpu, cuda, cuda:N or mps\); use --device cpu$",
    ):
        EvalConfig(device="gpu")


def test_nan_weights_are_named(tmp_path):
    state = create_model("resnet8").state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(UserError) as err:
        state_dict_defense("resnet8", tmp_path / "nan.pt", name="broken")
    said = str(err.value)  # the defense, what is wrong, where, and what to check
    assert all(
        p in said for p in ("defense broken", "non-finite logits", "fc.weight", str(tmp_path / "nan.pt"))
    )


def test_unreadable_checkpoints_say_why_in_whole_words(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(create_model("resnet8").state_dict(), good)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "half.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save(create_model("resnet8"), tmp_path / "module.pt")
    expected = {
        "empty.pt": "empty or truncated file",
        "half.pt": "PytorchStreamReader failed reading zip archive: failed finding central directory",
        "module.pt": r"Unsupported global: GLOBAL models.preact_resnet.PreActResNet was not an allowed global by default",
    }
    for name, why in expected.items():
        with pytest.raises(UserError) as err:
            state_dict_defense("resnet8", tmp_path / name)
        parts = (f"{tmp_path / name} cannot be read with weights_only=True", why, "re-save its state_dict")
        assert all(p in str(err.value) for p in parts), str(err.value)


# --- 4. RobustBench --------------------------------------------------------------------------

needs_robustbench = pytest.mark.skipif(
    importlib.util.find_spec("robustbench") is None, reason="robustbench extra not installed"
)
RB_NAME = "Hendrycks2020AugMix_WRN"  # 2.2M parameters: the smallest CIFAR-10 entry


@needs_robustbench
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_robustbench_from_local_model_dir(tmp_path, images, prefix):
    from bench.eval.adapters import _robustbench

    model_dicts, BenchmarkDataset, ThreatModel = _robustbench()
    net = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("corruptions")][RB_NAME]["model"]().eval()
    folder = tmp_path / "cifar10" / "corruptions"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {prefix + k: v for k, v in net.state_dict().items()}}, folder / f"{RB_NAME}.pt")
    defense = robustbench_defense(RB_NAME, "cifar10", "corruptions", tmp_path)
    assert_same_logits(defense, net, images)
    assert (defense.info.family, defense.info.num_classes) == ("robustbench", 10)


@needs_robustbench
def test_robustbench_errors(tmp_path):
    with pytest.raises(
        UserError, match=r"checkpoint .*Hendrycks2020AugMix_WRN.pt not found \(this adapter never downloads\)"
    ):
        robustbench_defense(RB_NAME, "cifar10", "corruptions", tmp_path)
    with pytest.raises(
        UserError,
        match="has no cifar10/corruptions model 'Hendrycks2020AugMix'; closest: Hendrycks2020AugMix_",
    ):
        robustbench_defense("Hendrycks2020AugMix", "cifar10", "corruptions", tmp_path)
    with pytest.raises(UserError, match="RobustBench has no cifar10/L7 models"):
        robustbench_defense(RB_NAME, "cifar10", "L7", tmp_path)


def test_robustbench_missing_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "robustbench", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo", None)
    with pytest.raises(UserError, match=r"needs the optional extra: pip install -e '.\[robustbench\]'"):
        robustbench_defense(RB_NAME, "cifar10", "corruptions", tmp_path)
