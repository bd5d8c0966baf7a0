"""RobustBench's threat models beside the paper's (the suite `robustbench`): its protocol as
data, the released corruption files it needs, its cells kept apart from the paper's, its
report section and leaderboard files (read by RobustBench's own code), and parity with
RobustBench's evaluation functions, example for example."""

import importlib.util
import json
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench import EvalConfig, UserError, evaluate_protocol
from bench.attacks.perturbations import perturbation
from bench.data.cifar import write_batch
from bench.data.noise import CORRUPTIONS, NOISE_GROUPS, SEVERITIES
from bench.data.noise_files import check_released
from bench.data.splits import FIRST, subset_indices
from bench.eval.adapters import module_defense
from bench.eval.protocol import protocol_cells
from bench.records.load import load_correct, load_records
from bench.reports.robustbench import THREATS
from bench.run.options import RunOptions
from bench.run.plan import Job, eval_config
from bench.run.suites import find_suite
from run_bench import main

REPO = Path(__file__).resolve().parents[1]
needs_robustbench = pytest.mark.skipif(
    importlib.util.find_spec("robustbench") is None, reason="robustbench extra"
)
# a learnable data set: each class a colour, each image that colour plus Gaussian noise
COLOURS = np.array([[40 + 20 * k, 200 - 15 * k, 60 + 17 * (k % 5) * 2] for k in range(10)], np.float64)


def coloured(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = COLOURS[labels][:, None, None, :] + rng.normal(0, 25, (n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def corrupted(images: np.ndarray, corruption: int, severity: int) -> np.ndarray:
    """A stand-in corruption, deterministic: noise that grows with the severity."""
    rng = np.random.default_rng([corruption, severity])
    noise = rng.normal(0, 6 * severity * (1 + corruption % 3), images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def cifar10_root(root: Path, n_test: int, corruptions: tuple[str, ...] = CORRUPTIONS) -> Path:
    """A data dir in CIFAR-10's released formats: the python batches (5 x 100 training
    images), and CIFAR-10-C/<corruption>.npy (5 n_test rows: severity s in rows
    (s-1) n_test .. s n_test - 1) with labels.npy, as the released tar extracts them."""
    folder = root / "cifar-10-batches-py"
    for i in range(5):
        write_batch(folder / f"data_batch_{i + 1}", *coloured(100, seed=i))
    test, labels = coloured(n_test, seed=99)
    write_batch(folder / "test_batch", test, labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(k) for k in range(10)]}))
    c_folder = root / "CIFAR-10-C"
    c_folder.mkdir(parents=True, exist_ok=True)
    np.save(c_folder / "labels.npy", np.tile(labels, len(SEVERITIES)).astype(np.uint8))
    for name in corruptions:
        index = CORRUPTIONS.index(name)
        np.save(c_folder / f"{name}.npy", np.concatenate([corrupted(test, index, s) for s in SEVERITIES]))
    return root


TINY = '''
import torch
from torch import nn
from torch import nn
from torch.nn import functional as F


class Tiny(nn.Module):
    """A colour classifier: one convolution, global pooling, a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))
'''


def tiny_class(folder: Path) -> type:
    """tiny.py, written into `folder`, and its Tiny."""
    (folder / "tiny.py").write_text(TINY)
    spec = importlib.util.spec_from_file_location(f"tiny_{abs(hash(folder))}", folder / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Tiny


def tiny_defense(folder: Path, steps: int = 150) -> tuple[Path, Path]:
    """tiny.py and tiny.pt: Tiny trained for `steps` steps on the fixture's training images."""
    torch.manual_seed(0)
    net = tiny_class(folder)()
    x = (
        torch.from_numpy(np.concatenate([coloured(100, seed=i)[0] for i in range(5)])).permute(0, 3, 1, 2)
        / 255
    )
    y = torch.from_numpy(np.concatenate([coloured(100, seed=i)[1] for i in range(5)]))
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(net.state_dict(), folder / "tiny.pt")
    return folder / "tiny.py", folder / "tiny.pt"


# --- the protocol as data ---------------------------------------------------------------------


def test_the_suite_measures_robustbench_threat_models_on_the_first_images():
    config = eval_config(Job("tiny", "cifar10", None, (8.0,)), find_suite("robustbench"), RunOptions(), "cpu")
    assert (config.subset_rule, config.noise_source, config.noise_groups) == (FIRST, "released", CORRUPTIONS)
    cells = protocol_cells(config)
    files = [c for c in cells if c.severity]
    assert len(files) == 15 * 5 and {c.perturbation for c in files} == set(CORRUPTIONS)
    attacks = sorted(
        (c.perturbation, c.eps_255) for c in cells if not c.severity and c.perturbation != "clean"
    )
    assert attacks == [
        ("autoattack", 8.0),
        ("autoattack-l2", 127.5),  # L2 0.5 in pixel units
        ("fgsm", 8.0),
        ("ifgsm", 8.0),
        ("pgd", 8.0),
        ("pgd-l2", 127.5),
        ("pgd50", 64.0),
        ("pgd50-l2", 16.0 * 255),
        ("uniform", 8.0),
        ("uniform-l2", 127.5),
    ]
    assert config.subsets == ()  # AutoAttack on every test image of the run, as benchmark()
    sized = eval_config(
        Job("tiny", "cifar10", None, (8.0,)), find_suite("robustbench"), RunOptions(n_autoattack=30), "cpu"
    )
    assert dict(sized.subsets) == dict.fromkeys(  # --n-autoattack: both norms, both versions
        ("autoattack", "autoattack-l2", "autoattack-rand", "autoattack-rand-l2"), 30
    )
    assert config.randomized_extra == (("autoattack-rand", (8.0,)), ("autoattack-rand-l2", (127.5,)))
    assert len(protocol_cells(config, randomized=True)) == len(cells) + 2
    assert [t.metric for t in THREATS] == ["autoattack@8", "autoattack-l2@0.5", "corruptions"]


def test_the_first_n_rule_is_recorded_and_draws_the_first_images():
    labels = np.array([3, 3, 3, 1, 2, 0])
    assert subset_indices(labels, 3).tolist() == [0, 1, 2]  # RobustBench's n_examples
    assert subset_indices(labels, 4, balanced=True).tolist() == [0, 3, 4, 5]  # ours
    assert EvalConfig(subset_rule=FIRST).subset_params == {"subset": "first"}
    assert EvalConfig().subset_params == {}  # the paper protocol's keys stay as they were
    with pytest.raises(UserError, match="subset_rule must be one of balanced, first"):
        EvalConfig(subset_rule="random")
    with pytest.raises(UserError, match="fog cannot be generated.*give released"):
        EvalConfig(noise_groups=("fog",), noise_source="generated")
    with pytest.raises(UserError, match="unknown: speckle"):
        EvalConfig(noise_groups=("speckle",))


def test_l2_noise_lies_on_the_sphere_of_its_radius():
    """uniform-l2 (the L2 noise-vs-pgd gate): each image moved by exactly eps in L2 where
    no value clips, in a direction that differs between images; never further after clipping."""
    torch.manual_seed(0)
    x = torch.full((4, 3, 32, 32), 0.5)
    noise = perturbation("uniform-l2")
    for eps, moved in zip(
        (0.5, 2.0), noise.perturb(None, x, torch.zeros(4), [0.5, 2.0], EvalConfig()), strict=True
    ):
        distances = (moved - x).flatten(1).norm(dim=1)
        assert torch.allclose(distances, torch.full((4,), eps), atol=1e-4)
    assert not torch.allclose(moved[0], moved[1])
    corner = torch.zeros(2, 3, 32, 32)  # half of every move clips away at 0
    assert (
        (noise.perturb(None, corner, torch.zeros(2), [0.5], EvalConfig())[0] - corner).flatten(1).norm(dim=1)
        < 0.5
    ).all()
    assert (noise.norm, noise.noise_check_of) == ("L2", "pgd-l2")


def test_missing_corruption_files_name_the_archive_and_where_it_goes(tmp_path):
    root = tmp_path / "data"
    cifar10_root(root, 20, corruptions=CORRUPTIONS[:2])
    with pytest.raises(UserError) as error:
        check_released("cifar10", root, CORRUPTIONS)
    line = str(error.value)
    assert "\n" not in line
    assert f"{root}/CIFAR-10-C lacks snow.npy, pixelate.npy, gaussian_noise.npy and 10 more" in line
    assert "CIFAR-10-C.tar: download it from https://zenodo.org/record/2535967/files/CIFAR-10-C.tar" in line
    assert f"extract it into {root}" in line
    check_released("cifar10", root, CORRUPTIONS[:2])  # the ones there


def test_the_cli_refuses_a_run_without_the_corruptions_before_any_work(tmp_path, capsys):
    root = tmp_path / "data"
    cifar10_root(root, 20, corruptions=())
    code, weights = tiny_defense(tmp_path)
    args = ["--defense", f"{code}:Tiny", "--weights", str(weights)]
    args += ["--dataset", "cifar10", "--suite", "robustbench", "--device", "cpu", "--n-test", "10"]
    args += ["--data-dir", str(root), "--results-dir", str(tmp_path / "results")]
    for dry in ([], ["--dry-run"]):
        assert main([*args, *dry]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "CIFAR-10-C lacks shot_noise.npy" in lines[0], lines
        assert "CIFAR-10-C.tar" in lines[0]
    assert not (tmp_path / "results" / "records.sqlite").exists()


# --- the acceptance run: every field, RobustBench's reader --------------------------------------


@pytest.mark.slow
@needs_robustbench
def test_a_defense_is_ranked_under_robustbench_threat_models(tmp_path, monkeypatch):
    """The issue's command on a data dir in CIFAR-10's released formats: every RobustBench
    field, its files read back by RobustBench's own generate_leaderboard, the gates run,
    and the paper protocol's outputs free of RobustBench's names."""
    import jinja2

    root = cifar10_root(tmp_path / "data", 60)
    code, weights = tiny_defense(tmp_path)
    results = tmp_path / "results"
    args = ["--defense", f"{code}:Tiny", "--weights", str(weights)]
    args += ["--dataset", "cifar10", "--suite", "robustbench", "--device", "cpu", "--n-test", "50"]
    args += ["--data-dir", str(root), "--results-dir", str(results), "--no-progress", "--no-figures"]
    assert main(args) == 0
    cells = load_records(results)
    assert (
        set(cells["n"]) == {50}
        and (cells["params"].map(json.loads).map(lambda p: p["subset"]) == "first").all()
    )

    board = (results / "leaderboard.md").read_text()
    assert "## RobustBench threat models (accuracy in %)" in board
    row = next(line for line in board.splitlines() if line.startswith("| 1 ") and "tiny" in line)
    fields = [c.strip() for c in row.strip("|").split("|")]
    assert fields[2:5] == ["CIFAR-10", "1", "first 50"] and all(f != "-" for f in fields[5:9]), fields
    assert "## RobustBench threat models" in (results / "REPORT.md").read_text()
    assert "tiny" not in pd.read_csv(results / "leaderboard.csv")["name"].tolist()  # no paper-protocol row

    entries = {
        t.folder: json.loads((results / "leaderboard" / "cifar10" / t.folder / "tiny.json").read_text())
        for t in THREATS
    }
    assert (entries["Linf"]["eps"], entries["L2"]["eps"], entries["corruptions"]["eps"]) == (
        "8/255",
        "0.5",
        None,
    )
    measured = cells.set_index(["perturbation", "eps_255", "severity"])["accuracy"]
    assert float(entries["Linf"]["autoattack_acc"]) == pytest.approx(
        100 * measured[("autoattack", 8.0, 0)], abs=0.006
    )
    assert float(entries["L2"]["autoattack_acc"]) == pytest.approx(
        100 * measured[("autoattack-l2", 127.5, 0)], abs=0.006
    )
    corruptions = np.mean([measured[(c, 0.0, s)] for c in CORRUPTIONS for s in SEVERITIES]) * 100
    assert float(entries["corruptions"]["corruptions_acc"]) == pytest.approx(corruptions, abs=0.006)
    for entry in entries.values():
        assert entry["reported"] == "" and entry["inres_bench"]["n_test"] == 50
        assert entry["inres_bench"]["subset"] == "first" and entry["clean_acc"] == fields[5].split()[0]

    if importlib.util.find_spec("autoattack") is None:  # robustbench imports AutoAttack under that name
        monkeypatch.setitem(sys.modules, "autoattack", importlib.import_module("pyautoattack"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robustbench.leaderboard import template
    # robustbench 1.1.1's wheel lacks the template generate_leaderboard loads: one that reads
    # every field the upstream template reads, strictly (a field missing fails)
    shown = ["link", "name", "footnote", "clean_acc", "additional_data", "architecture", "venue"]
    text = (
        "{% for model in models %}"
        + "|".join(f"{{{{ model.{f} }}}}" for f in shown)
        + "|{{ model[acc_field] }}\n{% endfor %}"
    )
    loader = jinja2.DictLoader({"leaderboard.html.j2": text})
    monkeypatch.setattr(template, "PackageLoader", lambda *args: loader)
    monkeypatch.setattr(template, "select_autoescape", lambda *args: False)
    real = template.Environment
    monkeypatch.setattr(template, "Environment", lambda **kw: real(**kw, undefined=jinja2.StrictUndefined))
    for threat in THREATS:
        html = template.generate_leaderboard(
            "cifar10", threat.folder, models_folder=str(results / "leaderboard")
        )
        assert (
            html.strip().endswith(f"|{entries[threat.folder][threat.field]}") and "|tiny|inres-bench" in html
        )


@pytest.mark.slow
def test_no_robustbench_file_holds_a_paper_protocol_number(smoke_run):
    """The smoke suite (the paper's protocol) writes no file in RobustBench's layout, and
    none of its records is a RobustBench-protocol cell."""
    results, _ = smoke_run
    assert not list(results.glob("leaderboard/**/*.json"))  # the folder may stand, empty
    assert "RobustBench" not in (results / "leaderboard.md").read_text()
    params = load_records(results)["params"].map(json.loads)
    assert not params.map(lambda p: "subset" in p).any()
    assert set(load_records(results).query("severity > 0")["perturbation"]) == set(NOISE_GROUPS)


# --- parity with RobustBench's own evaluation -------------------------------------------------


@pytest.mark.slow
@needs_robustbench
def test_parity_with_robustbench_evaluation_example_for_example(tmp_path, monkeypatch):
    """RobustBench's load_clean_dataset and clean_accuracy, load_cifar10c, and the AutoAttack
    branch of benchmark() (both norms) against our cells on the same model and images,
    example for example. RobustBench's CIFAR-C loader assumes the full 10,000 test images
    (severity s at rows (s-1) x 10,000): the data dir has 10,000 and two corruptions, and
    both sides test the first 16.

    AutoAttack: robustbench 1.1.1's benchmark() calls the official code with arguments
    (`log_path=`, `bs=`) that its PyPI packaging (pyautoattack, which this project runs)
    renamed, so the test makes benchmark()'s calls itself: AutoAttack(model, norm, eps,
    version="standard"), run_standard_evaluation on all n images at one batch size, the
    accuracy of what it returns. Its seed: benchmark() leaves it to the clock (seed=None:
    time.time()); the test records the seed our engine gave AutoAttack (drawn from the
    cell's per-batch seed) and gives RobustBench's call the same. One batch of all 16
    images on both sides, and no channels-last layout on ours: the same gradients."""
    import torchvision.datasets.cifar

    # our files are not the official ones, whose md5s torchvision checks before reading
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)
    if importlib.util.find_spec("autoattack") is None:  # robustbench imports AutoAttack under that name
        monkeypatch.setitem(sys.modules, "autoattack", importlib.import_module("pyautoattack"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pyautoattack
        from robustbench.data import get_preprocessing, load_cifar10c, load_clean_dataset
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import clean_accuracy

    n, two = 16, ("fog", "gaussian_noise")
    root = cifar10_root(tmp_path / "data", 10_000, corruptions=two)
    _, weights = tiny_defense(tmp_path, steps=10)  # half-trained: AutoAttack breaks some images, not all
    defense = module_defense("tiny", tiny_class(tmp_path), weights, mean=None, std=None)
    seeds = []
    official = pyautoattack.AutoAttack.__init__

    def recorded(self, *args, **kw):
        seeds.append(kw["seed"])
        official(self, *args, **kw)

    monkeypatch.setattr(pyautoattack.AutoAttack, "__init__", recorded)
    config = EvalConfig(
        radii_255=(8.0,),
        steps=2,
        n_test=n,
        subset_rule=FIRST,
        noise_source="released",
        noise_groups=two,
        extra=(("autoattack", (8.0,)), ("autoattack-l2", (127.5,))),
        batch_size=n,
        channels_last=False,
    )
    results = tmp_path / "results"
    evaluate_protocol(defense, config, results, root, progress=False)
    monkeypatch.setattr(pyautoattack.AutoAttack, "__init__", official)
    assert len(seeds) == 2  # one batch per AutoAttack cell

    model = defense.model.eval()
    cifar10 = BenchmarkDataset("cifar10")
    prepr = get_preprocessing(cifar10, ThreatModel("Linf"), None, None)
    x, y = load_clean_dataset(cifar10, n, str(root), prepr)
    ours = load_correct(results, perturbation="clean")
    with torch.no_grad():
        assert np.array_equal((model(x).argmax(1) == y).numpy(), ours)
    assert clean_accuracy(model, x, y, batch_size=n) == ours.mean() and ours.mean() > 0.5
    for corruption in two:
        for severity in SEVERITIES:
            xc, yc = load_cifar10c(n, severity, str(root), shuffle=False, corruptions=[corruption])
            ours = load_correct(results, perturbation=corruption, severity=severity)
            with torch.no_grad():
                assert np.array_equal((model(xc).argmax(1) == yc).numpy(), ours), (corruption, severity)
            assert clean_accuracy(model, xc, yc, batch_size=n) == ours.mean()

    clean = load_correct(results, perturbation="clean").mean()
    for seed, (name, norm, eps, eps_255) in zip(
        seeds, (("autoattack", "Linf", 8 / 255, 8.0), ("autoattack-l2", "L2", 0.5, 127.5)), strict=True
    ):
        adversary = pyautoattack.AutoAttack(model, norm=norm, eps=eps, version="standard", seed=seed)
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=n)
        ours = load_correct(results, perturbation=name, eps_255=eps_255)
        with torch.no_grad():
            assert np.array_equal((model(x_adv).argmax(1) == y).numpy(), ours), name
        assert clean_accuracy(model, x_adv, y, batch_size=n) == ours.mean()
        assert 0 < ours.mean() < clean  # AutoAttack broke some images, not all: the comparison has teeth


class Noisy(nn.Module):
    """A randomized defense: Gaussian noise on the input before a fixed colour classifier."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x + 0.02 * torch.randn_like(x))


@pytest.mark.slow
def test_a_randomized_defense_gets_autoattack_rand_version_labelled(tmp_path, pipeline):
    """A defense whose forward passes differ is measured with AutoAttack's rand version
    (EOT) too, as RobustBench measures one; its RobustBench numbers are that version's,
    labelled in the table and its files; the randomized gate still flags the row."""
    root = cifar10_root(tmp_path / "data", 20)
    _, weights = tiny_defense(tmp_path)
    tiny = tiny_class(tmp_path)

    def noisy() -> nn.Module:
        return Noisy(tiny())

    state = {f"net.{k}": v for k, v in torch.load(weights, weights_only=True).items()}
    torch.save(state, tmp_path / "noisy.pt")
    defense = module_defense("noisy", noisy, tmp_path / "noisy.pt", mean=None, std=None)
    results = tmp_path / "results"
    cells = pipeline(defense, results, root, suite="robustbench", device="cpu", n_test=10, progress=False)
    rand = cells[cells["perturbation"].isin(["autoattack-rand", "autoattack-rand-l2"])]
    assert sorted(zip(rand["perturbation"], rand["eps_255"], strict=True)) == [
        ("autoattack-rand", 8.0),
        ("autoattack-rand-l2", 127.5),
    ]
    assert set(rand["params"]) == {'{"subset":"first","version":"rand"}'}
    linf = json.loads((results / "leaderboard" / "cifar10" / "Linf" / "noisy.json").read_text())
    assert linf["inres_bench"]["version"] == "rand" and "rand version" in linf["footnote"]
    assert float(linf["autoattack_acc"]) == pytest.approx(
        100 * rand.query("eps_255 == 8.0")["accuracy"].iloc[0], abs=0.006
    )
    assert "randomized" in linf["inres_bench"]["flags"]
    row = next(
        line for line in (results / "leaderboard.md").read_text().splitlines() if line.startswith("| 1 ")
    )
    assert row.count("(rand version)") == 2


@pytest.mark.slow
def test_a_robustbench_rehearsal_runs_on_stand_ins_of_the_released_files(tmp_path):
    """Without CIFAR-10 or CIFAR-10-C, `--rehearse` writes stand-ins of both (the corruption
    files: the stand-in test images at every severity) and runs the whole plan; its
    RobustBench files say they are a rehearsal's."""
    code, weights = tiny_defense(tmp_path)
    args = ["--defense", f"{code}:Tiny", "--weights", str(weights), "--dataset", "cifar10"]
    args += ["--suite", "robustbench", "--rehearse", "--device", "cpu", "--no-progress", "--no-figures"]
    args += ["--data-dir", str(tmp_path / "data"), "--results-dir", str(tmp_path / "results")]
    assert main(args) == 0
    stand_ins = tmp_path / "data" / "rehearsal" / "CIFAR-10-C"
    assert sorted(p.stem for p in stand_ins.glob("*.npy")) == sorted([*CORRUPTIONS, "labels"])
    cells = load_records(tmp_path / "results" / "rehearsal")
    sizes = cells.groupby("perturbation")["n"].first()
    assert sizes["clean"] == 4 and sizes["autoattack"] == sizes["autoattack-l2"] == 2  # the rehearsal's sizes
    entry = json.loads(
        (tmp_path / "results" / "rehearsal" / "leaderboard" / "cifar10" / "L2" / "tiny.json").read_text()
    )
    assert (
        entry["footnote"].startswith("REHEARSAL, not a measurement: ") and entry["inres_bench"]["rehearsal"]
    )
