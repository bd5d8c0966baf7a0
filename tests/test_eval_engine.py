"""Evaluation engine: attacks, audit, ensembles, records, resume."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchattacks
from torch import nn

from bench.attacks import perturbations
from bench.attacks.gradient import AttackAuditError, audit, fgsm, run_seeded
from bench.attacks.perturbations import metric_name, metric_radius, parse_metric, perturbation
from bench.data.noise import NOISE_GROUPS
from bench.data.splits import load_test
from bench.eval import engine
from bench.eval.adapters import Defense, ensemble_defense, state_dict_defense
from bench.eval.engine import evaluate
from bench.eval.protocol import Cell, EvalConfig, Subject, protocol_cells
from bench.eval.testdata import EvalData
from bench.records.aggregate import with_pooled_noise, with_worst_case
from bench.records.load import load_bits, load_correct, load_records
from bench.records.schema import COLUMNS
from bench.records.store import RecordStore
from models import UserError, create_model

WRONG = 30  # the grey_root fixture (conftest.py): the first 30 of its 100 test images carry a wrong label


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    load_test("synthetic", root)
    return root


def resnet8_defense(tmp_path: Path, seed: int = 0, name: str = "mine8") -> Defense:
    torch.manual_seed(seed)
    path = tmp_path / f"{name}-{seed}.pt"
    torch.save(create_model("resnet8").state_dict(), path)
    return state_dict_defense("resnet8", path, "synthetic", name=name)


def subject(defense: Defense, seed: int = 0, members: int = 1) -> Subject:
    return Subject(defense, defense.info.name, defense.info.name, seed, members)


def run(defense, config, root, results, seed=0, members=1):
    store = RecordStore(results)
    data = EvalData("synthetic" if "data" in root.name else "cifar10", root, config)
    return evaluate(subject(defense, seed, members), config, store, data, progress=False)


def accuracies(results) -> dict:
    frame = with_pooled_noise(load_records(results))
    return {(r.perturbation, r.eps_255, r.severity): r.accuracy for r in frame.itertuples()}


# --- the protocol on a model whose every number is known ---------------------------------------


def test_known_accuracy_under_every_perturbation(grey_root, grey_defense, tmp_path):
    config = EvalConfig(radii_255=(1.0, 4.0, 20.0))  # the paper's 20 steps of 2/255
    ran, cached, errors = run(grey_defense, config, grey_root, tmp_path)
    assert (ran, cached, errors) == (1 + 20 + 9, 0, [])
    got = accuracies(tmp_path)
    for kind in ("fgsm", "ifgsm", "pgd"):
        assert got[kind, 1.0, 0] == got[kind, 4.0, 0] == 0.7  # within half the level spacing
        assert got[kind, 20.0, 0] == 0.0  # past it: every prediction flips
    assert got["clean", 0.0, 0] == 0.7
    assert got["gaussian_noise", 0.0, 1] == 0.7  # zero-mean noise barely moves a mean of 3072 values
    correct = load_correct(tmp_path, perturbation="clean")
    assert correct.tolist() == [False] * WRONG + [True] * (100 - WRONG)
    frame = load_records(tmp_path)
    assert set(frame["data_source"]) == {
        "unofficial",
        "generated-unofficial",
    }  # fixture files, noise from them
    iterative = frame["perturbation"].isin(["ifgsm", "pgd"])
    assert (frame.loc[iterative, "params"] == '{"alpha_255":2.0,"steps":20}').all()
    assert (frame.loc[~iterative, "params"] == "{}").all()


def test_zero_radius_attacks_equal_clean(synthetic_root, tmp_path):
    defense = resnet8_defense(tmp_path)
    run(defense, EvalConfig(radii_255=(0.0,), n_test=64, steps=3), synthetic_root, tmp_path)
    clean = load_correct(tmp_path, perturbation="clean")
    assert 0 < clean.sum() < 64
    for kind in ("fgsm", "ifgsm", "pgd"):
        assert np.array_equal(load_correct(tmp_path, perturbation=kind), clean), kind


def test_protocol_cells_and_presets():
    cells = protocol_cells(EvalConfig(radii_255=(1.0, 2.0), iterative_radii_255=(2.0,)))
    assert cells[0] == Cell("clean") and len(cells) == 1 + 20 + 2 + 2
    assert [c for c in cells if c.perturbation == "pgd"] == [Cell("pgd", 2.0)]
    work = engine.cell_groups(cells)
    assert len(work) == 1 + 20 + 1 + 2 and work[21] == [Cell("fgsm", 1.0), Cell("fgsm", 2.0)]
    assert engine.cell_groups([Cell("clean"), Cell("pgd", 2.0)]) == [[Cell("clean")], [Cell("pgd", 2.0)]]
    assert EvalConfig().alpha * 255 == pytest.approx(2.0)
    assert EvalConfig(preset="authors-code").alpha * 255 == pytest.approx(1.0)
    assert EvalConfig(alpha_255=0.5).alpha * 255 == pytest.approx(0.5)
    with pytest.raises(
        Exception,
        match=r"EvalConfig.steps \(the iterations of IFGSM and PGD\) must be an integer at least 1, got 0",
    ):
        EvalConfig(steps=0)


# --- attacks -------------------------------------------------------------------------------------


def test_fgsm_radii_share_one_gradient_and_equal_torchattacks(images):
    model = create_model("resnet8").eval().requires_grad_(False)
    y = torch.tensor([0, 1, 2, 3])
    radii = [1 / 255, 2 / 255, 4 / 255]
    ours = fgsm(model, images, y, radii)
    for eps, adv in zip(radii, ours, strict=True):
        assert torch.equal(adv, torchattacks.FGSM(model, eps=eps)(images, y))
        assert (adv - images).abs().max() <= eps + 1e-7


def test_iterative_attacks_are_torchattacks_and_seeded(images):
    model = create_model("resnet8").eval().requires_grad_(False)
    y = torch.tensor([0, 1, 2, 3])
    pgd = perturbation("pgd").attack(model, 2 / 255, 0.5 / 255, 3)
    first, again, other = (run_seeded(pgd, images, y, s) for s in (7, 7, 8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(7)
    assert torch.equal(first, torchattacks.PGD(model, eps=2 / 255, alpha=0.5 / 255, steps=3)(images, y))
    state = torch.get_rng_state()
    run_seeded(pgd, images, y, 9)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left as it was
    ifgsm = perturbation("ifgsm").attack(model, 2 / 255, 0.5 / 255, 3)
    assert torch.equal(
        ifgsm(images, y), torchattacks.BIM(model, eps=2 / 255, alpha=0.5 / 255, steps=3)(images, y)
    )
    assert type(pgd).__name__ == "PGD" and pgd.random_start and type(ifgsm).__name__ == "BIM"
    with pytest.raises(ValueError, match="ifgsm needs at least one step"):
        perturbation("ifgsm").attack(model, 2 / 255, 1 / 255, 0)


def test_audit_rejects_out_of_ball_and_out_of_range(images):
    x = images * 0.9 + 0.05  # room for +-2/255 inside [0, 1]
    audit(x + 2 / 255, x, 2 / 255, "ok")
    with pytest.raises(
        AttackAuditError,
        match=r"cell: adversarial batch fails the audit \(max \|x_adv - x\| = 3\.0000\d*/255 for a reach of 2/255",
    ):
        audit(x + 3 / 255, x, 2 / 255, "cell")
    with pytest.raises(AttackAuditError, match=r"range \[-0.001000, "):
        audit(torch.where(images == images.min(), -0.001, images), images, 2 / 255, "cell")
    with pytest.raises(AttackAuditError, match=r"range \[.*, 1.001000\]"):
        audit(torch.where(images == images.max(), 1.001, images), images, 2 / 255, "cell")


def test_a_cell_failing_the_audit_is_reported_not_recorded(grey_root, grey_defense, tmp_path, monkeypatch):
    def leaky(model, x, y, eps, space=None):
        return [(x + 2 * e).clamp(0, 1) for e in eps]

    monkeypatch.setattr(perturbations, "fgsm", leaky)  # where the FGSM perturbation calls it
    ran, cached, errors = run(grey_defense, EvalConfig(radii_255=(2.0,), steps=1), grey_root, tmp_path)
    assert ran == 23 and len(errors) == 1 and "fgsm@2" in errors[0] and "fails the audit" in errors[0]
    recorded = set(load_records(tmp_path)["perturbation"])
    assert "fgsm" not in recorded and {"clean", "ifgsm", "pgd"} <= recorded


# --- ensembles --------------------------------------------------------------------------------------


def test_ensemble_of_identical_members_equals_the_member(synthetic_root, tmp_path):
    member = resnet8_defense(tmp_path, seed=3)
    twin = resnet8_defense(tmp_path, seed=3, name="twin")
    ensemble = ensemble_defense([member, twin], name="pair")
    x = torch.rand(8, 3, 32, 32)
    assert torch.allclose(ensemble.model(x), torch.log_softmax(member.model(x), 1), atol=1e-6)
    config = EvalConfig(radii_255=(2.0,), n_test=64, steps=5)
    run(member, config, synthetic_root, tmp_path / "member")
    run(ensemble, config, synthetic_root, tmp_path / "ensemble", seed=-1, members=2)
    for cell in protocol_cells(config):
        key = {"perturbation": cell.perturbation, "eps_255": cell.eps_255, "severity": cell.severity}
        assert np.array_equal(
            load_correct(tmp_path / "member", **key), load_correct(tmp_path / "ensemble", **key)
        )
    assert ensemble.info.checkpoint_sha256 not in (member.info.checkpoint_sha256, twin.info.checkpoint_sha256)
    with pytest.raises(Exception, match="at least 2 members"):
        ensemble_defense([member])


# --- records and resume -----------------------------------------------------------------------------


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_resume_skips_finished_cells(grey_root, grey_defense, tmp_path):
    counted = Defense(Counting(grey_defense.model), grey_defense.info)
    config = EvalConfig(radii_255=(1.0,), steps=4, batch_size=50)  # 100 images: 2 batches per cell
    assert run(counted, config, grey_root, tmp_path)[:2] == (24, 0)
    first = counted.model.calls
    assert first == 1 + 2 * (1 + 20 + (1 + 1) + 2 * (4 + 1))  # the probe batch, then 2 batches per cell
    assert run(counted, config, grey_root, tmp_path)[:2] == (0, 24)
    assert counted.model.calls == first  # nothing recomputed
    wider = EvalConfig(radii_255=(1.0, 3.0), steps=4, batch_size=50)
    assert run(counted, wider, grey_root, tmp_path)[:2] == (3, 24)
    assert counted.model.calls - first == 1 + 2 * (
        (1 + 1) + 2 * (4 + 1)
    )  # the probe; fgsm@3, ifgsm@3, pgd@3 only
    assert len(load_records(tmp_path)) == 27


def test_same_seed_same_numbers(synthetic_root, tmp_path):
    defense = resnet8_defense(tmp_path)
    config = EvalConfig(radii_255=(8.0,), n_test=64, steps=2)
    for name in ("a", "b"):
        run(defense, config, synthetic_root, tmp_path / name)
    a, b = load_records(tmp_path / "a"), load_records(tmp_path / "b")
    assert a["correct"].tolist() == b["correct"].tolist()
    assert np.array_equal(
        load_correct(tmp_path / "a", perturbation="pgd"), load_correct(tmp_path / "b", perturbation="pgd")
    )


def test_records_schema_types_and_stale_rows(grey_root, grey_defense, tmp_path):
    config = EvalConfig(radii_255=(1.0,), steps=1)
    run(grey_defense, config, grey_root, tmp_path)
    frame = load_records(tmp_path, include_stale=True)
    assert list(frame.columns) == [*COLUMNS, "stale"]
    assert len(frame) == 24 and not frame["stale"].any()
    row = frame[frame["perturbation"] == "clean"].iloc[0]
    assert (row["n"], row["correct"], row["accuracy"], row["seed"], row["members"]) == (100, 70, 0.7, 0, 1)
    assert (
        row["checkpoint_sha256"] == grey_defense.info.checkpoint_sha256
        and row["torchattacks_version"] == "3.5.1"
    )
    numeric = ["seed", "members", "eps_255", "severity", "n", "correct", "accuracy", "seconds"]
    (tmp_path / "records.csv").write_text(load_records(tmp_path, include_stale=True).to_csv(index=False))
    snapshot = pd.read_csv(tmp_path / "records.csv")  # as the report writes it: numbers stay numbers
    assert all(pd.api.types.is_numeric_dtype(snapshot[c]) for c in numeric)
    pooled = with_pooled_noise(frame)
    shot = pooled[(pooled["perturbation"] == "shot_noise") & (pooled["severity"] == 0)].iloc[0]
    assert (
        shot["n"] == 500
        and shot["correct"] == frame.loc[frame["perturbation"] == "shot_noise", "correct"].sum()
    )
    # retrained: a new checkpoint digest makes the old cells stale, never mixed with new ones
    retrained = Defense(
        grey_defense.model,
        grey_defense.info.__class__(**{**grey_defense.info.__dict__, "checkpoint_sha256": "f" * 64}),
    )
    run(retrained, config, grey_root, tmp_path)
    frame = load_records(tmp_path, include_stale=True)
    assert len(frame) == 48 and frame["stale"].sum() == 24
    assert set(load_records(tmp_path)["checkpoint_sha256"]) == {"f" * 64}


RELEASE_PGD = {
    "authors-code": '{"alpha_255":1.0,"ball":"start","steps":1}',
    "release-2020-06": '{"alpha_255":2.0,"ball":"start","steps":1,"units":"normalised"}',
}


@pytest.mark.parametrize("preset", list(RELEASE_PGD))
def test_release_presets_normalise_noise_files_by_their_own_statistics(
    grey_root, grey_defense, tmp_path, preset
):
    config = EvalConfig(preset=preset, radii_255=(1.0,), steps=1)
    data = EvalData("cifar10", grey_root, config)
    mean, std = data.file_stats("impulse_noise")
    images = data.noise("impulse_noise").images.astype(np.float64) / 255
    assert np.allclose(mean, images.mean(axis=(0, 1, 2))) and np.allclose(std, images.std(axis=(0, 1, 2)))
    net = create_model("resnet8")
    remap = engine._file_normalization(net, mean, std)
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float32
    ).view(1, 3, 1, 1)
    assert torch.allclose(net.normalize(remap(x)), expected, atol=1e-5)
    ran, _, errors = run(grey_defense, config, grey_root, tmp_path)
    frame = load_records(tmp_path)
    assert errors == [] and (frame["preset"] == preset).all()
    pgd = frame[frame["perturbation"] == "pgd"]  # the release's ball: recorded, audited to 2 eps
    assert pgd["params"].tolist() == [RELEASE_PGD[preset]]
    if preset == "authors-code":
        assert pgd["accuracy"].item() == 0.7


def test_noise_cells_cover_every_group_and_severity(grey_root, grey_defense, tmp_path):
    run(grey_defense, EvalConfig(radii_255=(1.0,), steps=1), grey_root, tmp_path)
    frame = load_records(tmp_path)
    noise = frame[frame["perturbation"].isin(NOISE_GROUPS)]
    assert sorted(set(zip(noise["perturbation"], noise["severity"], strict=True))) == sorted(
        (g, s) for g in NOISE_GROUPS for s in range(1, 6)
    )
    assert (noise["n"] == 100).all()


def test_evaluate_protocol_is_the_one_call_for_any_adapter_and_a_protocol_of_ones_own(
    grey_root, grey_defense, tmp_path
):
    from bench import evaluate_defense, evaluate_protocol

    config = EvalConfig(radii_255=(2.0,), steps=2)
    with pytest.raises(UserError, match=r"^results_dir must be a folder's path, got EvalConfig$"):
        evaluate_defense(grey_defense, config)  # a protocol of one's own is evaluate_protocol's
    assert not (tmp_path / "records.sqlite").exists()
    frame = evaluate_protocol(grey_defense, config, tmp_path, grey_root, progress=False)
    assert len(frame) == 24 and set(frame["model"]) == {"grey"} and set(frame["family"]) == {"external"}
    assert frame.loc[frame["perturbation"] == "pgd", "accuracy"].item() == 0.7
    assert len(evaluate_protocol(grey_defense, config, tmp_path, grey_root, progress=False)) == 24  # cached
    from bench.reports.writer import write_reports

    write_reports(tmp_path)  # the defense gets its leaderboard row with no other change
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert board[["name", "dataset", "clean", "pgd@2"]].values.tolist() == [["grey", "cifar10", 70.0, 70.0]]


def test_a_metric_names_its_radius_in_one_way_and_reads_it_back_the_same():
    for name, eps_255 in (("pgd", 2.0), ("pgd50", 64.0), ("fgsm", 0.5), ("worst", 4.0)):
        assert metric_radius(metric_name(name, eps_255)) == (name, eps_255)
    assert parse_metric("pgd@2.0") == "pgd@2" and parse_metric("pgd@1e0") == "pgd@1"
    assert [parse_metric(m) for m in ("clean", "noise", "gaussian_noise")] == [
        "clean",
        "noise",
        "gaussian_noise",
    ]
    assert [parse_metric(m) for m in ("pgd", "pgd@x", "pgd@-1", "pgd@inf", "nope@2", "clean@2")] == [None] * 6
    for bad in ("clean", "pgd@x"):
        with pytest.raises(ValueError):
            metric_radius(bad)


# --- L2 (RobustBench's second threat model) ---------------------------------------------------------


def test_pgd_l2_is_torchattacks_pgdl2_at_a_radius_in_pixel_units(images):
    model = create_model("resnet8").eval().requires_grad_(False)
    y = torch.tensor([0, 1, 2, 3])
    pgd = perturbation("pgd-l2")
    assert (pgd.norm, metric_name("pgd-l2", 127.5), pgd.radius_text(127.5)) == ("L2", "pgd-l2@0.5", "0.5")
    assert pgd.params(EvalConfig(), 127.5) == {"alpha_255": 15.9375, "steps": 20}  # 2.5 eps / 20, in 1/255
    ours = run_seeded(lambda a, b: pgd.perturb(model, a, b, [0.5], EvalConfig()), images, y, 3)[0]
    torch.manual_seed(3)
    theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.5 * 2.5 / 20, steps=20, random_start=True)(images, y)
    assert torch.equal(ours, theirs)
    assert (ours - images).flatten(1).norm(dim=1).max() <= 0.5 + 1e-6 and not torch.equal(ours, images)
    audit(ours, images, pgd.reach(EvalConfig(), 0.5), "pgd-l2", pgd.norm)


def test_the_l2_audit_measures_each_image_over_all_its_values(images):
    step = torch.zeros_like(images)
    step[:, 0, 0, :4] = 0.25  # L2 0.5 per image, L-infinity 0.25 (64/255)
    audit(images.clamp(0, 0.75) + step, images.clamp(0, 0.75), 0.5, "ok", "L2")
    with pytest.raises(AttackAuditError, match=r"max \|\|x_adv - x\|\|_2 = 0\.5.* for a reach of 0\.49"):
        audit(images.clamp(0, 0.75) + step, images.clamp(0, 0.75), 0.49, "cell", "L2")
    with pytest.raises(
        AttackAuditError, match="for a reach of 2/255"
    ):  # the same step, measured in L-infinity
        audit(images.clamp(0, 0.75) + step, images.clamp(0, 0.75), 2 / 255, "cell")


def test_an_l2_cell_is_measured_audited_and_never_joins_the_worst_case_of_an_linf_radius(
    synthetic_root, tmp_path
):
    """L-infinity attacks at 127.5/255 and PGD-L2 at 0.5 (eps_255 127.5): one column, two
    threat models; the worst case of that radius is over the L-infinity ones alone."""
    assert metric_radius("autoattack-l2@0.5") == ("autoattack-l2", 127.5)
    assert parse_metric("pgd-l2@0.50") == "pgd-l2@0.5" and parse_metric("pgd-l2@127.5") == "pgd-l2@127.5"
    config = EvalConfig(radii_255=(127.5,), steps=1, n_test=4, extra=(("pgd-l2", (127.5,)),))
    ran, _, errors = run(resnet8_defense(tmp_path), config, synthetic_root, tmp_path / "r")
    assert not errors
    frame = load_records(tmp_path / "r")
    l2 = frame[frame["perturbation"] == "pgd-l2"]
    assert list(l2["eps_255"]) == [127.5] and list(l2["params"]) == ['{"alpha_255":15.9375,"steps":20}']
    worst = with_worst_case(frame, load_bits(tmp_path / "r"))
    assert list(worst.loc[worst["perturbation"] == "worst", "params"]) == ['{"of":["fgsm","ifgsm","pgd"]}']


@pytest.mark.slow
def test_autoattack_l2_is_the_official_code_seeded_the_same(images):
    """Through the registry, as the engine runs it, against the official AutoAttack called
    directly with the seed our perturbation draws from the engine's seeded generator."""
    from pyautoattack import AutoAttack as Official

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval().requires_grad_(False)
    y = model(images).argmax(1)  # every image classified right: AutoAttack attacks them all
    attack = perturbation("autoattack-l2")
    ours = run_seeded(lambda a, b: attack.perturb(model, a, b, [0.5], EvalConfig()), images, y, 5)[0]
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    official = Official(model, device=images.device, eps=0.5, norm="L2", seed=seed, version="standard")
    official.verbose = False
    assert torch.equal(ours, official.run_standard_evaluation(images.contiguous(), y, batch_size=4)[0])
    audit(ours, images, attack.reach(EvalConfig(), 0.5), "autoattack-l2", attack.norm)
    assert not torch.equal(ours, images) and metric_name("autoattack-l2", 127.5) == "autoattack-l2@0.5"


def test_the_cpu_stand_in_of_autoattack_l2_stays_in_its_ball(images):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval().requires_grad_(False)
    y = model(images).argmax(1)
    lite = perturbation("apgd-ce-lite-l2")
    adv = run_seeded(lambda a, b: lite.perturb(model, a, b, [0.5], EvalConfig()), images, y, 1)[0]
    again = run_seeded(lambda a, b: lite.perturb(model, a, b, [0.5], EvalConfig()), images, y, 1)[0]
    audit(adv, images, lite.reach(EvalConfig(), 0.5), "apgd-ce-lite-l2", lite.norm)
    assert torch.equal(adv, again) and (model(adv).argmax(1) != y).any()  # seeded, and it finds some
    assert (lite.norm, lite.reference_for, metric_name(lite.name, 127.5)) == (
        "L2",
        "pgd-l2",
        "apgd-ce-lite-l2@0.5",
    )
