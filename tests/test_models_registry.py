"""Registry: names, globs, groups, errors."""

import pytest

from models import GROUPS, UserError, create_model, list_models, register_model, registry, resolve_models

PAPER_MAIN = [
    "resnet110",
    "in-resnet110",
    "lambda-in-resnet110",
    "resnet164",
    "in-resnet164",
    "lambda-in-resnet164",
    "resnext29-8x64d",
    "in-resnext29-8x64d",
    "lambda-in-resnext29-8x64d",
]
VARIANTS = ["in-resnet-sig110", "in-resnet-gating110", "in-resnet-gating-sig110"]


def test_groups_list_the_papers_models_in_table_order():
    assert resolve_models("main") == PAPER_MAIN
    assert resolve_models("variants") == VARIANTS
    assert sorted(resolve_models("all")) == sorted(PAPER_MAIN + VARIANTS)
    assert resolve_models("all")[:6] == ["resnet110", "in-resnet110", "lambda-in-resnet110", *VARIANTS]
    small = resolve_models("small")
    assert {"resnet8", "in-resnet20", "lambda-in-resnet14", "plain20", "in-resnext20-2x4d"} <= set(small)
    assert set(GROUPS) == {"main", "variants", "all", "small"}


def test_globs_lists_and_natural_order():
    assert list_models("lambda-in-resnet*") == [
        "lambda-in-resnet14",
        "lambda-in-resnet20",
        "lambda-in-resnet32",
        "lambda-in-resnet44",
        "lambda-in-resnet56",
        "lambda-in-resnet110",
        "lambda-in-resnet164",
    ]
    assert resolve_models("resnet8, in-resnet14,resnet8") == ["resnet8", "in-resnet14"]
    assert resolve_models(["plain2?"]) == ["plain20"]
    assert len(list_models()) == 7 * 7 + 1 + 3 * 2  # 7 rules x 7 depths, resnet8, 3 rules x 2 ResNeXts


def test_unknown_names_fail_with_the_closest_ones():
    with pytest.raises(UserError) as err:
        resolve_models("resnet111")
    said = str(err.value)
    assert all(
        p in said for p in ("unknown model 'resnet111'", "closest: resnet110, resnet14", "--list-models")
    )
    with pytest.raises(UserError, match="unknown model 'nothing-like-it'; groups: main, variants"):
        create_model("nothing-like-it")
    with pytest.raises(UserError, match=r"unknown model 'zz\*'"):
        resolve_models("zz*")
    with pytest.raises(UserError, match="no model named"):
        resolve_models(" , ")


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="model 'resnet8' has no option lamda_init; it takes: depth, rule"):
        create_model("resnet8", lamda_init=(0, 1))


def test_register_a_new_model(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model("tiny-in", groups=["small"], description="a tiny In-ResNet")
    def tiny_in(**kw):
        from models import PreActResNet

        return PreActResNet(depth=14, rule="in", **kw)

    model = create_model("tiny-in", num_classes=3)
    assert model.info.name == "tiny-in" and model.info.num_classes == 3
    assert "tiny-in" in resolve_models("small")
    with pytest.raises(ValueError, match="registered twice"):
        register_model("tiny-in")(tiny_in)
    with pytest.raises(ValueError, match="unknown groups"):
        register_model("other", groups=["nope"])(tiny_in)
