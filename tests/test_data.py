"""Data: CIFAR archives, downloads, noise groups, layouts, subsets, batches."""

import dataclasses
import hashlib
import json
import logging
import math
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data import cifar, datasets, noise, noise_files
from bench.data import splits as data
from bench.data.cifar import read_batch, write_batch
from bench.data.datasets import CIFAR10, CIFAR100, Release, load_split
from models import UserError

RNG = np.random.default_rng(7)


def fixture_images(n: int, low: int = 0, high: int = 256) -> np.ndarray:
    return RNG.integers(low, high, (n, 32, 32, 3), dtype=np.uint8)


def write_cifar10(folder: Path, n_train: int = 10, n_test: int = 12) -> tuple[np.ndarray, np.ndarray]:
    images, labels = fixture_images(5 * n_train + n_test), RNG.integers(0, 10, 5 * n_train + n_test)
    for i in range(5):
        part = slice(i * n_train, (i + 1) * n_train)
        write_batch(folder / f"data_batch_{i + 1}", images[part], labels[part])
    write_batch(folder / "test_batch", images[5 * n_train :], labels[5 * n_train :])
    return images, labels


def make_tar(tar: Path, folder: Path, arcdir: str, names: list[str]) -> None:
    with tarfile.open(tar, "w:gz" if tar.suffix == ".gz" else "w") as archive:
        for name in names:
            archive.add(folder / name, arcname=f"{arcdir}/{name}")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def unofficial(spec):
    return dataclasses.replace(spec, archive_md5=None)


# --- clean archives --------------------------------------------------------------------------


def test_batch_format_is_read_row_major_rgb(tmp_path):
    """A batch written by hand (as the official pickles are): row = R(1024) G(1024) B(1024)."""
    rows = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 251
    batch = {"data": rows.astype(np.uint8), "labels": [3, 7], "batch_label": "x"}
    (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = read_batch(tmp_path / "b", "labels", 10)
    assert images.shape == (2, 32, 32, 3) and images.flags.c_contiguous
    assert labels.tolist() == [3, 7] and labels.dtype == np.int64
    for i, r, c, ch in [(0, 0, 0, 0), (0, 5, 7, 1), (1, 31, 31, 2), (1, 2, 30, 0)]:
        assert images[i, r, c, ch] == rows[i, ch * 1024 + r * 32 + c]


def test_cifar10_round_trip_extracted_and_targz(tmp_path):
    folder = tmp_path / "plain" / CIFAR10.folder
    images, labels = write_cifar10(folder)
    spec = unofficial(CIFAR10)
    train, test = load_split(spec, "train", tmp_path / "plain"), load_split(spec, "test", tmp_path / "plain")
    assert np.array_equal(train.images, images[:50]) and np.array_equal(test.labels, labels[50:])
    assert (train.dataset, train.official, len(test)) == ("cifar10", False, 12)

    archived = tmp_path / "archived"
    archived.mkdir()
    make_tar(
        archived / CIFAR10.archive,
        folder,
        CIFAR10.folder,
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
    )
    test = load_split(spec, "test", archived)
    assert np.array_equal(test.images, images[50:])
    assert sorted(p.name for p in archived.iterdir()) == sorted(
        [CIFAR10.archive, CIFAR10.folder]
    )  # no staging


def test_cifar100_key_names(tmp_path):
    folder = tmp_path / CIFAR100.folder
    images, fine = fixture_images(30), RNG.integers(0, 100, 30)
    write_batch(folder / "train", images[:20], fine[:20], label_key="fine_labels")
    write_batch(folder / "test", images[20:], fine[20:], label_key="fine_labels")
    test = load_split(unofficial(CIFAR100), "test", tmp_path)
    assert np.array_equal(test.images, images[20:]) and np.array_equal(test.labels, fine[20:])
    with pytest.raises(UserError, match=r"test is not a readable CIFAR batch \(KeyError: 'labels'\)"):
        load_split(dataclasses.replace(unofficial(CIFAR100), label_key="labels"), "test", tmp_path)


def test_official_archive_checksum_mismatch_is_refused(tmp_path):
    write_cifar10(tmp_path / "src")
    make_tar(tmp_path / CIFAR10.archive, tmp_path / "src", CIFAR10.folder, ["test_batch"])
    with pytest.raises(UserError, match=r"cifar-10-python.tar.gz does not have the official md5 c58f3010"):
        load_split(CIFAR10, "test", tmp_path)
    assert not (tmp_path / CIFAR10.folder).exists()


def test_download_verifies_and_leaves_nothing_on_failure(tmp_path):
    src = tmp_path / "server"
    write_cifar10(src / CIFAR10.folder)
    make_tar(
        src / "c10.tgz",
        src / CIFAR10.folder,
        CIFAR10.folder,
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
    )
    good = dataclasses.replace(CIFAR10, url=(src / "c10.tgz").as_uri(), archive_md5=md5(src / "c10.tgz"))
    root = tmp_path / "root"
    assert len(load_split(good, "test", root)) == 12
    assert (root / CIFAR10.archive).is_file()

    for spec, message in [
        (
            dataclasses.replace(good, archive_md5="0" * 32),
            r"arrived with md5 [0-9a-f]{32}, expected 0{32}: nothing was kept",
        ),
        (
            dataclasses.replace(good, url=(tmp_path / "nowhere.tgz").as_uri()),
            r"cannot download file://.*nowhere.tgz \(.*\): put cifar-10-python.tar.gz \(md5 [0-9a-f]{32}\) in .*empty, "
            r"or the extracted folder .*cifar-10-batches-py",
        ),
    ]:
        empty = tmp_path / "empty"
        with pytest.raises(UserError, match=message) as err:
            load_split(spec, "test", empty)
        assert "\n" not in str(err.value)
        assert list(empty.iterdir()) == []  # no partial download, no folder


def test_bad_files_are_one_line_errors(tmp_path):
    folder = tmp_path / CIFAR10.folder
    write_cifar10(folder)
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="test_batch is not a readable CIFAR batch"):
        load_split(CIFAR10, "test", tmp_path)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo hacked",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to load posix.system"):
        load_split(CIFAR10, "test", tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(UserError, match="cannot download"):  # no network in tests: offline fallback
        load_split(dataclasses.replace(CIFAR10, url=(tmp_path / "none").as_uri()), "test", tmp_path)


def test_protocol_5_batches_load_and_bad_labels_are_refused(tmp_path):
    images = fixture_images(3)
    rows = images.transpose(0, 3, 1, 2).reshape(3, 3072)
    (tmp_path / "b5").write_bytes(pickle.dumps({"data": rows, "labels": [1, 2, 3]}, protocol=5))
    loaded, labels = read_batch(tmp_path / "b5", "labels", 10)
    assert np.array_equal(loaded, images) and labels.tolist() == [1, 2, 3]
    for bad, shown in (([1, 2.5, 3], "float64"), ([1, 2, 2**70], "object"), ([True, False, True], "bool")):
        (tmp_path / "bad").write_bytes(pickle.dumps({"data": rows, "labels": bad}, protocol=2))
        with pytest.raises(
            UserError, match=rf"labels under 'labels' must be integers in \[0, 10\), got {shown}"
        ):
            read_batch(tmp_path / "bad", "labels", 10)


def test_unofficial_files_are_reported_once_per_run(tmp_path, caplog):
    write_cifar10(tmp_path / CIFAR10.folder)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            load_split(CIFAR10, "test", tmp_path)
    assert caplog.text.count("cifar10 test files in") == 1


def test_a_placed_release_tar_is_checked_by_md5_once(tiny_cifar10, tmp_path, monkeypatch):
    """A fake tar of the right size is refused; the real one is hashed once, then trusted
    while its size and mtime stay (a 2.9 GB file is not hashed on every run)."""
    root = tiny_cifar10[0]
    server = tmp_path / "zenodo"
    server.mkdir()
    names = [f"{g}.npy" for g in noise.NOISE_GROUPS] + ["labels.npy"]
    for name in names:
        np.save(server / name, np.tile(tiny_cifar10[2], 5) if name == "labels.npy" else fixture_images(200))
    make_tar(server / "real.tar", server, "CIFAR-10-C", names)
    size, digest = (server / "real.tar").stat().st_size, md5(server / "real.tar")
    release = Release((tmp_path / "offline.tar").as_uri(), "CIFAR-10-C.tar", size, digest)
    monkeypatch.setitem(
        datasets.DATASETS, "cifar10", dataclasses.replace(datasets.DATASETS["cifar10"], noise_release=release)
    )
    placed = root / "CIFAR-10-C.tar"
    placed.write_bytes(b"\0" * size)  # right size, wrong content
    with pytest.raises(
        UserError,
        match=rf"CIFAR-10-C.tar is not the published CIFAR-10-C.tar \({size} bytes; expected {size} bytes with md5 {digest}\)",
    ):
        noise_files.load_noise("cifar10", "shot_noise", root, source="released")
    assert not (root / "CIFAR-10-C").exists()
    shutil.copy(server / "real.tar", placed)
    hashed = []
    monkeypatch.setattr(cifar, "md5_of", lambda path: hashed.append(path) or md5(path))
    assert noise_files.load_noise("cifar10", "shot_noise", root, source="released").source == "released"
    shutil.rmtree(root / "CIFAR-10-C")  # extracted again from the same tar: no second hash
    assert noise_files.load_noise("cifar10", "shot_noise", root, source="released").source == "released"
    assert hashed.count(placed) == 1
    assert json.loads((root / "CIFAR-10-C.tar.md5.json").read_text())["md5"] == digest


# --- noise generation ------------------------------------------------------------------------


def reference_chunks(images: np.ndarray, group: str, severity: int, seed: int):
    """The published formula in float64, fed with the same torch normals as ours."""
    c, stream = noise.NOISE_PARAMS[group][severity - 1], noise.NoiseStream(seed, group, severity)
    out = []
    for start in range(0, len(images), noise.CHUNK):
        x = images[start : start + noise.CHUNK] / 255.0
        n = torch.randn(x.shape, generator=stream.torch).double().numpy() * c
        y = x + n if group == "gaussian_noise" else x + x * n
        out.append(np.uint8(np.clip(y, 0, 1) * 255))
    return np.concatenate(out)


@pytest.mark.parametrize("group", ["gaussian_noise", "speckle_noise"])
def test_gaussian_and_speckle_are_the_published_formula(group):
    images = fixture_images(600)  # two chunks
    ours, ref = noise.corrupt(images, group, 4, seed=3), reference_chunks(images, group, 4, seed=3)
    differ = ours != ref
    assert differ.mean() < 1e-4  # float32 vs float64 rounding at a truncation edge, at most
    assert np.abs(ours.astype(int) - ref).max() <= 1
    assert not np.array_equal(ours, images)


def test_shot_noise_inverts_the_poisson_cdf_of_the_same_uniforms():
    images, c = fixture_images(40), noise.NOISE_PARAMS["shot_noise"][1]
    ours = noise.corrupt(images, "shot_noise", 2, seed=5)
    u = noise.NoiseStream(5, "shot_noise", 2).numpy.random(images.size)  # one chunk: same stream
    expected = np.empty(images.size, dtype=np.uint8)
    for v in np.unique(images):
        lam, k = v / 255 * c, np.arange(2000)
        log_pmf = np.array([kk * math.log(lam) - lam - math.lgamma(kk + 1) for kk in k]) if v else None
        cdf = np.cumsum(np.exp(log_pmf)) if v else np.ones(len(k))
        where = images.reshape(-1) == v
        counts = np.searchsorted(cdf, u[where], side="right")
        expected[where] = np.uint8(np.clip(counts / c, 0, 1) * 255)
    assert (ours.reshape(-1) != expected).mean() < 1e-4


def test_shot_noise_has_poisson_moments():
    c = 75.0
    v = np.full((400, 32, 32, 3), 200, dtype=np.uint8)
    counts = noise.corrupt(v, "shot_noise", 4, seed=1).astype(float)  # level = floor(255 k / c)
    lam = 200 / 255 * c
    assert abs(counts.mean() - np.floor(255 * np.arange(300) / c) @ poisson_pmf(lam, 300)) < 0.2


def poisson_pmf(lam, n):
    return np.array([math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in range(n)])


def test_impulse_flip_rate_and_even_odds():
    images = fixture_images(300, low=1, high=255)  # neither 0 nor 255: every flip shows
    for severity, c in enumerate(noise.NOISE_PARAMS["impulse_noise"], start=1):
        out = noise.corrupt(images, "impulse_noise", severity, seed=2)
        flipped = out != images
        n = images.size
        assert abs(flipped.mean() - c) < 4 * math.sqrt(c * (1 - c) / n)
        assert abs((out[flipped] == 255).mean() - 0.5) < 0.02
        assert set(np.unique(out[flipped])) <= {0, 255}


def test_generation_is_deterministic_and_clipped():
    images = fixture_images(50)
    one = noise.corrupt_groups(images, seed=9, workers=1)
    three = noise.corrupt_groups(images, seed=9, workers=3)
    assert all(np.array_equal(one[g], three[g]) for g in noise.NOISE_GROUPS)
    other = noise.corrupt_groups(images, ("gaussian_noise",), seed=10)
    assert not np.array_equal(one["gaussian_noise"], other["gaussian_noise"])
    white = np.full((10, 32, 32, 3), 255, np.uint8)
    assert noise.corrupt(white, "gaussian_noise", 5).max() == 255  # clipped, not wrapped


# --- layouts and sources ---------------------------------------------------------------------


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    """A 40-image CIFAR-10 data dir, its spec registered without official checksums."""
    images, labels = write_cifar10(tmp_path / CIFAR10.folder, n_train=4, n_test=40)
    monkeypatch.setitem(datasets.DATASETS, "cifar10", unofficial(CIFAR10))
    return tmp_path, images[20:], labels[20:]


def test_generated_layout_and_reuse(tiny_cifar10, monkeypatch, caplog):
    root, test_images, test_labels = tiny_cifar10
    with caplog.at_level(logging.INFO):
        group = noise_files.load_noise("cifar10", "speckle_noise", root, source="auto", seed=4)
    assert "no released files" in caplog.text
    folder = root / "generated" / "CIFAR-10-C"
    assert group.source == "generated" and group.path == folder / "speckle_noise.npy"
    assert group.images.shape == (200, 32, 32, 3) and group.n_per_severity == 40
    assert np.array_equal(group.labels, np.tile(test_labels, 5))
    for s in noise.SEVERITIES:
        rows = noise_files.severity_rows(np.arange(40), 40, s)
        assert np.array_equal(group.images[rows], noise.corrupt(test_images, "speckle_noise", s, seed=4))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{g}.npy" for g in noise.NOISE_GROUPS] + ["labels.npy", "generated.json"]
    )

    def no_regeneration(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(noise_files, "corrupt_groups", no_regeneration)
    assert noise_files.load_noise("cifar10", "shot_noise", root, seed=4).source == "generated"
    with pytest.raises(AssertionError, match="regenerated"):  # another seed is another set
        noise_files.load_noise("cifar10", "shot_noise", root, seed=5)


def test_released_source_extracts_only_the_noise_groups(tiny_cifar10, tmp_path, monkeypatch):
    root, test_images, test_labels = tiny_cifar10
    server = tmp_path / "zenodo"
    server.mkdir()
    names = [f"{g}.npy" for g in noise.NOISE_GROUPS] + ["labels.npy", "fog.npy"]
    for name in names:
        array = np.tile(test_labels, 5) if name == "labels.npy" else fixture_images(200)
        np.save(server / name, array)
    make_tar(server / "CIFAR-10-C.tar", server, "CIFAR-10-C", names)
    release = Release(
        (server / "CIFAR-10-C.tar").as_uri(),
        "CIFAR-10-C.tar",
        (server / "CIFAR-10-C.tar").stat().st_size,
        md5(server / "CIFAR-10-C.tar"),
    )
    monkeypatch.setitem(
        datasets.DATASETS, "cifar10", dataclasses.replace(datasets.DATASETS["cifar10"], noise_release=release)
    )
    group = noise_files.load_noise("cifar10", "impulse_noise", root, source="released")
    assert group.source == "released" and np.array_equal(group.images, np.load(server / "impulse_noise.npy"))
    assert not (root / "CIFAR-10-C" / "fog.npy").exists()
    assert noise_files.load_noise("cifar10", "shot_noise", root).source == "released"  # auto prefers it

    np.save(root / "CIFAR-10-C" / "labels.npy", np.zeros(200, dtype=np.int64))
    with pytest.raises(UserError, match=r"labels.npy is not the test labels repeated 5 times"):
        noise_files.load_noise("cifar10", "shot_noise", root)
    np.save(root / "CIFAR-10-C" / "shot_noise.npy", np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(
        UserError, match=r"shot_noise.npy: expected uint8 \(200, 32, 32, 3\), got uint8 \(10, 32, 32, 3\)"
    ):
        noise_files.load_noise("cifar10", "shot_noise", root)


def test_source_errors(tiny_cifar10, monkeypatch, tmp_path):
    root = tiny_cifar10[0]
    offline = Release((tmp_path / "missing.tar").as_uri(), "CIFAR-10-C.tar", 1, "0" * 32)
    monkeypatch.setitem(
        datasets.DATASETS, "cifar10", dataclasses.replace(datasets.DATASETS["cifar10"], noise_release=offline)
    )
    with pytest.raises(
        UserError, match=r"cannot download .*missing.tar .* or the extracted CIFAR-10-C/ folder"
    ):
        noise_files.load_noise("cifar10", "shot_noise", root, source="released")
    with pytest.raises(UserError, match="unknown noise group 'fogg'"):
        noise_files.load_noise("cifar10", "fogg", root)
    with pytest.raises(
        UserError, match=r"CIFAR-10-C lacks fog.npy, labels.npy of the released CIFAR-10-C.tar"
    ):
        noise_files.load_noise("cifar10", "fog", root)  # RobustBench's corruptions: released files only
    with pytest.raises(UserError, match="fog cannot be generated"):
        noise_files.load_noise("cifar10", "fog", root, source="generated")
    with pytest.raises(UserError, match="unknown noise source 'best'"):
        noise_files.load_noise("cifar10", "shot_noise", root, source="best")
    with pytest.raises(UserError, match="unknown dataset 'svhn'"):
        data.load_test("svhn", root)


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("robustbench") is None, reason="robustbench not installed"
)
def test_robustbench_reads_the_generated_folder(tmp_path, monkeypatch):
    write_cifar10(tmp_path / CIFAR10.folder, n_train=2, n_test=10_000)  # robustbench assumes 10,000
    monkeypatch.setitem(datasets.DATASETS, "cifar10", unofficial(CIFAR10))
    ours = noise_files.load_noise("cifar10", "gaussian_noise", tmp_path, source="generated")
    from bench.eval.adapters import _robustbench

    _robustbench()  # the autoattack alias robustbench needs to import
    from robustbench.data import load_cifar10c

    x, y = load_cifar10c(
        100, severity=3, data_dir=str(tmp_path / "generated"), shuffle=False, corruptions=["gaussian_noise"]
    )
    rows = np.array(ours.images[20_000:20_100])
    assert torch.equal(x, torch.from_numpy(rows).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == ours.labels[20_000:20_100].tolist()


# --- subsets, views, batches -----------------------------------------------------------------


def test_subsets():
    labels = np.array([2, 0, 0, 1, 0, 2, 1, 1, 2, 0])
    assert data.subset_indices(labels).tolist() == list(range(10))
    assert data.subset_indices(labels, 4).tolist() == [0, 1, 2, 3]
    assert data.subset_indices(labels, 50).tolist() == list(range(10))
    # balanced: 5 over 3 classes -> 2 of class 0, 2 of class 1, 1 of class 2, first ones
    assert data.subset_indices(labels, 5, balanced=True).tolist() == [0, 1, 2, 3, 6]


def test_severity_rows():
    assert noise_files.severity_rows(np.array([1, 3]), 10, 2).tolist() == [11, 13]
    assert noise_files.severity_rows(np.array([1, 3]), 10).tolist() == [1, 3, 11, 13, 21, 23, 31, 33, 41, 43]
    with pytest.raises(UserError, match="severity must be one of"):
        noise_files.severity_rows(np.array([1]), 10, 6)


def test_batches_stream_uint8_to_unit_floats():
    images, labels = fixture_images(10), np.arange(10)
    out = list(data.batches(images, labels, 4, "cpu", rows=np.array([9, 0, 5, 1, 2])))
    assert [len(y) for _, y in out] == [4, 1]
    x, y = out[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.tolist() == [9, 0, 5, 1]
    assert torch.equal(x[1], torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255)
    assert 0 <= x.min() and x.max() <= 1


# --- synthetic -------------------------------------------------------------------------------


def test_synthetic_set_is_cifar_format_balanced_and_seeded(tmp_path):
    test = data.load_test("synthetic", tmp_path)
    assert (test.dataset, test.official, len(test)) == ("synthetic", False, 2000)
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert (tmp_path / "synthetic" / "cifar-10-batches-py" / "batches.meta").is_file()
    train = data.load_train("synthetic", tmp_path)
    assert len(train) == 10_000
    from bench.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "again", seed=0)
    again, _ = read_batch(tmp_path / "again" / "test_batch", "labels", 10)
    assert np.array_equal(again, test.images)
    group = noise_files.load_noise("synthetic", "gaussian_noise", tmp_path)
    assert (
        group.source == "generated"
        and group.path.parent == tmp_path / "generated" / "synthetic" / "CIFAR-10-C"
    )


@pytest.mark.slow
def test_resnet8_learns_the_synthetic_set(tmp_path):
    """Learnable in CPU-seconds: two epochs of plain SGD take a ResNet-8 far above chance."""
    from models import create_model

    torch.manual_seed(0)
    train, test = data.load_train("synthetic", tmp_path), data.load_test("synthetic", tmp_path)
    model = create_model("resnet8")
    steps = 2 * len(train) // 128
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).repeat(2).numpy()
    for x, y in data.batches(train.images, train.labels, 128, rows=order[: steps * 128]):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(x).argmax(1) == y).sum().item() for x, y in data.batches(test.images, test.labels, 500)
        )
    assert correct / len(test) >= 0.6
