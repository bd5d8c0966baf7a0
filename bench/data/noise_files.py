"""The noise groups and corruptions on disk, as the cells read them, with where their images came from.

Sources:
- "released": the published CIFAR-10-C / CIFAR-100-C files in `<root>/<CIFAR-10-C>/`,
  downloaded from Zenodo (only the needed members extracted) when missing.
- "generated": built from the clean test set with the published parameters, in the same
  layout under `<root>/generated/<CIFAR-10-C>/`, with `generated.json` recording how.
- "auto": released when present, else generated; never a 2.9 GB download unasked.
Each cell records its data source (`cell_sources`) and the digest of the file it read.
RobustBench's other corruptions (CORRUPTIONS beyond the noise groups: blur, weather, digital)
cannot be generated: they are read from the released files alone, which `check_released`
asks for before any work (a 2.9 GB archive is never downloaded unasked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.core.files import atomic_write, check_file_target
from bench.data.cifar import ImageSet, data_root, download, extract_members, file_md5, verified_md5
from bench.data.datasets import DATASETS, DatasetInfo, dataset_info, is_official
from bench.data.noise import CORRUPTIONS, NOISE_GROUPS, NOISE_PARAMS, SEVERITIES, corrupt_groups
from bench.data.splits import images_digest
from models import UserError

log = logging.getLogger(__name__)

NOISE_SOURCES = ("auto", "released", "generated")
GENERATOR_VERSION = 1  # bump when generation changes, so that old files are rebuilt


@dataclass(frozen=True)
class NoiseImages:
    """One noise group's images as read, all severities: images uint8 (5 N, H, W, 3), severity s in rows
    (s-1) N .. s N - 1, labels int64 (5 N,) = the test labels repeated 5 times."""

    group: str
    images: np.ndarray
    labels: np.ndarray
    source: str  # "released" or "generated"
    path: Path

    @property
    def n_per_severity(self) -> int:
        return len(self.labels) // len(SEVERITIES)


def load_noise(
    dataset: str,
    group: str,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    seed: int = 0,
    test: ImageSet | None = None,
) -> NoiseImages:
    """The noise group `group` of `dataset` from `source` (see the module docstring);
    `test` is the clean test set when already loaded."""
    info, root = dataset_info(dataset), data_root(data_dir)
    if group not in (*NOISE_GROUPS, *CORRUPTIONS):
        raise UserError(
            f"unknown noise group {group!r}; choose one of {', '.join(dict.fromkeys(NOISE_GROUPS + CORRUPTIONS))}"
        )
    if source not in NOISE_SOURCES:
        raise UserError(f"unknown noise source {source!r}; choose one of {', '.join(NOISE_SOURCES)}")
    test = test if test is not None else info.load(info, "test", root)
    released = root / info.noise_folder
    if group not in NOISE_GROUPS:  # released files only
        if source == "generated":
            raise UserError(f"{group} cannot be generated: it is read from the released files")
        check_released(dataset, data_dir, (group,))
        return _read_group(released, group, test, "released")
    if source == "released" or (source == "auto" and _has_groups(released)):
        if not _has_groups(released, (group,)):
            fetch_release(info, root)
        return _read_group(released, group, test, "released")
    folder = root / "generated" / info.noise_folder
    ensure_generated(folder, test, seed)
    if source == "auto":
        log.info(
            "%s noise groups: no released files in %s, using generated ones in %s", dataset, released, folder
        )
    return _read_group(folder, group, test, "generated")


def noise_source(dataset: str, data_dir: str | os.PathLike | None = None, source: str = "auto") -> str:
    """Where `load_noise(dataset, ..., source=source)` takes the groups from: "released" or
    "generated" (auto: released when its files are present)."""
    if source not in NOISE_SOURCES:
        raise UserError(f"unknown noise source {source!r}; choose one of {', '.join(NOISE_SOURCES)}")
    root = data_root(data_dir)
    if source == "auto":
        return "released" if _has_groups(root / dataset_info(dataset).noise_folder) else "generated"
    return source


def clean_source(dataset: str, official: bool) -> str:
    """The `data_source` label of clean images (and of attacks on them): "released" for the
    official files, "unofficial" for other files in their place, or the name of a data set
    without a release (the synthetic one)."""
    if dataset_info(dataset).noise_release is None:
        return dataset
    return "released" if official else "unofficial"


def cell_sources(dataset: str, data_dir: str | os.PathLike | None, noise_option: str) -> tuple[str, str]:
    """(clean, noise) `data_source` labels of a data set's cells, without loading images
    (only the md5 of its test files): noise generated from unofficial test files is
    "generated-unofficial", so no cell hides where its images came from."""
    info = dataset_info(dataset)
    if info.noise_release is None:
        return dataset, dataset
    root = data_root(data_dir)
    clean = clean_source(dataset, is_official(info, "test", root))
    noise = noise_source(dataset, data_dir, noise_option)
    return clean, noise if noise == "released" or clean == "released" else f"{noise}-unofficial"


def noise_digest(path: Path, remember: bool = True) -> str:
    """The data digest of a noise group file and the labels beside it (their md5s, kept
    by size and mtime: a 150 MB file is read once, not every run)."""
    parts = [f"{p.name} {file_md5(p, remember)}" for p in (path, path.parent / "labels.npy")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def current_noise_file(path: Path, generated: bool, test_digest: str) -> bool:
    """Whether a noise group file is there to be read as it is: a released one, or one
    generated from the test set of `test_digest` (else load_noise makes it again first)."""
    if not (path.is_file() and (path.parent / "labels.npy").is_file()):
        return False
    record = _read_record(path.parent / "generated.json") if generated else {"test_sha256": test_digest}
    return isinstance(record, dict) and record.get("test_sha256") == test_digest


def noise_file(dataset: str, data_dir: str | os.PathLike | None, option: str, group: str) -> Path:
    """Where the group's file of `option`'s source is (or will be)."""
    info, root = dataset_info(dataset), data_root(data_dir)
    folder = (
        root / info.noise_folder
        if noise_source(dataset, data_dir, option) == "released"
        else root / "generated" / info.noise_folder
    )
    return folder / f"{group}.npy"


def data_folders() -> tuple[str, ...]:
    """The folders of a data dir this project writes (each registered data set's batch and
    noise folders, the generated groups): the only ones its cleanup looks into."""
    folders = {f for info in DATASETS.values() for f in (info.folder, info.noise_folder) if f}
    return tuple(sorted(folders | {"generated"}))


def generation_folder(dataset: str, data_dir: str | os.PathLike | None, source: str) -> Path | None:
    """The folder `load_noise` will write generated groups into, or None when it will only
    read (released groups, or generated ones already there)."""
    info, root = dataset_info(dataset), data_root(data_dir)
    if info.noise_release is not None and noise_source(dataset, data_dir, source) == "released":
        return None
    folder = root / "generated" / info.noise_folder
    return (
        None if _has_groups(folder) and isinstance(_read_record(folder / "generated.json"), dict) else folder
    )


def fetch_release(info: DatasetInfo, root: Path) -> None:
    """Download the published tar (md5-checked) and extract the four groups and labels."""
    release = info.noise_release
    if release is None:
        raise UserError(f"{info.name} has no released noise groups: use --noise-source generated")
    tar = root / release.tar
    if not tar.is_file():
        download(release.url, tar, release.md5, hint=f"or the extracted {info.noise_folder}/ folder")
    elif tar.stat().st_size != release.size or not verified_md5(tar, release.md5):
        raise UserError(
            f"{tar} is not the published {release.tar} ({tar.stat().st_size} bytes; expected "
            f"{release.size} bytes with md5 {release.md5}): delete it and run again to download it"
        )
    names = [f"{g}.npy" for g in NOISE_GROUPS] + ["labels.npy"]
    extract_members(tar, root, info.noise_folder, names)


def check_released(dataset: str, data_dir: str | os.PathLike | None, groups: tuple[str, ...]) -> None:
    """One error line unless the released files of `groups` and their labels are in the
    data set's CIFAR-C folder: what is missing, the archive to download and where it goes."""
    info, root = dataset_info(dataset), data_root(data_dir)
    folder = root / info.noise_folder
    missing = [n for n in (*(f"{g}.npy" for g in groups), "labels.npy") if not (folder / n).is_file()]
    if not missing:
        return
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    release = info.noise_release
    if release is None:
        raise UserError(
            f"{folder} lacks {shown}, and {info.label} has no released corruption files: "
            "RobustBench's corruptions are those of CIFAR-10-C and CIFAR-100-C; choose one of those data sets"
        )
    raise UserError(
        f"{folder} lacks {shown} of the released {release.tar}: download it from {release.url} "
        f"(md5 {release.md5}, {release.size / 1e9:.1f} GB) and extract it into {root} "
        f"(the run reads {folder}/<corruption>.npy and labels.npy)"
    )


def ensure_generated(folder: Path, test: ImageSet, seed: int) -> None:
    """Generate the four groups from `test` unless `folder` already holds them for the same
    test set, seed and generator version (recorded in generated.json, written last)."""
    provenance = {
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "test_sha256": images_digest(test.images, test.labels),
        "params": {g: list(NOISE_PARAMS[g]) for g in NOISE_GROUPS},
    }
    record = folder / "generated.json"
    if _has_groups(folder) and _read_record(record) == provenance:
        return
    log.info("generating noise groups (seed %d) into %s", seed, folder)
    check_file_target(record)
    record.unlink(missing_ok=True)
    _save_npy(folder / "labels.npy", np.tile(test.labels, len(SEVERITIES)))
    for group, images in corrupt_groups(test.images, NOISE_GROUPS, seed).items():
        _save_npy(folder / f"{group}.npy", images)
    text = json.dumps(provenance, indent=2, sort_keys=True) + "\n"
    atomic_write(record, lambda f: f.write(text.encode()))


def _read_record(path: Path) -> object:
    """generated.json's provenance; None when it is missing or unreadable (the groups
    are then generated again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _has_groups(folder: Path, groups: tuple[str, ...] = NOISE_GROUPS) -> bool:
    return all((folder / f"{name}.npy").is_file() for name in (*groups, "labels"))


def _read_group(folder: Path, group: str, test: ImageSet, source: str) -> NoiseImages:
    path, n = folder / f"{group}.npy", len(SEVERITIES) * len(test)
    shape = (n, *test.images.shape[1:])
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable .npy file ({err}); delete it and run again") from None
    if images.dtype != np.uint8 or images.shape != shape:
        raise UserError(f"{path}: expected uint8 {shape}, got {images.dtype} {images.shape}")
    if labels.shape != (n,) or not np.array_equal(labels, np.tile(test.labels, len(SEVERITIES))):
        raise UserError(
            f"{folder / 'labels.npy'} is not the test labels repeated 5 times: files of another data set?"
        )
    return NoiseImages(group, images, labels.astype(np.int64), source, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def severity_rows(indices: np.ndarray, n_per_severity: int, severity: int | None = None) -> np.ndarray:
    """Rows of a noise group for test `indices` at one severity, or at all five (None)."""
    severities = SEVERITIES if severity is None else (severity,)
    if any(s not in SEVERITIES for s in severities):
        raise UserError(f"severity must be one of {SEVERITIES}, got {severity}")
    return np.concatenate([(s - 1) * n_per_severity + indices for s in severities])
