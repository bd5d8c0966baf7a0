"""The data set registry: one entry per data set holds everything the harness knows of it.

An entry gives the classes, the normalisation statistics, the image size, how the
train / test splits are loaded (and where their files come from), the noise release and
its files, whose training recipe it uses, and its label in reports. Every other module
asks the registry; none branches on a data set's name. Adding a data set is one
`register_dataset(DatasetInfo(...))` plus, when its files are not in the CIFAR python
format, its loader (`load(info, split, data_dir) -> ImageSet`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.data.cifar import ImageSet, data_root, download, extract_members, md5_of, read_batch
from bench.data.synthetic import make_synthetic
from models import CIFAR10_MEAN, CIFAR10_STD, UserError

log = logging.getLogger(__name__)

# Image statistics of the CIFAR-100 training set (the CIFAR-10 ones are the zoo's defaults).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

Loader = Callable[["DatasetInfo", str, "str | os.PathLike | None"], ImageSet]


# --- a registered data set's files: the default loader, fetched or made when missing ---------


_WARNED: set[tuple[str, str, Path]] = set()  # (data set, split, folder): said once per process


def load_split(info: DatasetInfo, split: str, data_dir: str | os.PathLike | None = None) -> ImageSet:
    """The `split` ("train" or "test") of `info`, fetching or building it when missing."""
    root = data_root(data_dir)
    folder = ensure_folder(info, root)
    images, labels = [], []
    for name, _ in info.files[split]:
        data, targets = read_batch(folder / name, info.label_key, info.num_classes, info.image_size)
        images.append(data)
        labels.append(targets)
    official = is_official(info, split, root)
    if not official and info.archive_md5 and (info.name, split, folder) not in _WARNED:
        _WARNED.add((info.name, split, folder))
        log.warning("%s %s files in %s are not the official release", info.name, split, folder)
    return ImageSet(np.concatenate(images), np.concatenate(labels), info.name, official)


def is_official(info: DatasetInfo, split: str, root: Path) -> bool:
    """Whether the `split` files under `root` are the official release (md5 of each file);
    files not there yet count as official: they will be downloaded and checked."""
    folder = root / info.folder
    return all(
        md5 is not None and (not (folder / name).is_file() or md5_of(folder / name) == md5)
        for name, md5 in info.files[split]
    )


def ensure_folder(info: DatasetInfo, root: Path) -> Path:
    """The folder with all batch files: as found, else extracted from the local archive,
    else downloaded, else made by `info.make`."""
    folder = root / info.folder
    if complete(info, folder):
        return folder
    check_file_places(info, root)
    archive = root / info.archive if info.archive else None
    if archive is not None and not archive.is_file() and info.url:
        download(info.url, archive, info.archive_md5, hint=f"or the extracted folder {folder}")
    if archive is not None and archive.is_file():
        extract(info, archive, root)
    elif info.make is not None:
        info.make(folder)
    if not complete(info, folder):
        raise UserError(f"{info.name}: {folder} lacks {', '.join(_missing(info, folder))}")
    return folder


def check_file_places(info: DatasetInfo, root: Path) -> None:
    """One error line when something other than a file stands where one of the data set's
    files goes (a folder named test_batch): it is no file to read, and no download can
    replace it."""
    folder = root / info.folder
    for name in (n for names in info.files.values() for n, _ in names):
        if (folder / name).exists() and not (folder / name).is_file():
            raise UserError(
                f"{info.name}: {folder / name} is a folder, not the data set's file {name}: move it aside "
                "and run again"
            )


def extract(info: DatasetInfo, archive: Path, root: Path) -> None:
    """Check the archive's md5, then extract only the batch files, atomically."""
    if info.archive_md5 is not None and md5_of(archive) != info.archive_md5:
        raise UserError(
            f"{archive} does not have the official md5 {info.archive_md5}: it is truncated or "
            "another file; delete it and run again to download it"
        )
    names = [name for names in info.files.values() for name, _ in names]
    extract_members(archive, root, info.folder, names)


def complete(info: DatasetInfo, folder: Path) -> bool:
    return not _missing(info, folder)


def is_present(info: DatasetInfo, data_dir: str | os.PathLike | None) -> bool:
    """Whether the data dir holds the data set's files (one with its own loader: assumed)."""
    return not info.files or complete(info, data_root(data_dir) / info.folder)


def _missing(info: DatasetInfo, folder: Path) -> list[str]:
    return [n for names in info.files.values() for n, _ in names if not (folder / n).is_file()]


@dataclass(frozen=True)
class Release:
    """A published tar of noise groups in the CIFAR-C layout (Zenodo), checked by size and md5."""

    url: str
    tar: str
    size: int  # bytes
    md5: str


@dataclass(frozen=True)
class DatasetInfo:
    """One data set. Images are RGB, `image_size` = (H, W) pixels, labels in [0, num_classes).

    The fields `folder` .. `make` describe files in the CIFAR python format, read by the
    default loader: `files` maps a split to (file name, official md5 or None) pairs inside
    `folder`; `make` builds the folder when there is nothing to download (synthetic data).
    """

    name: str
    label: str  # how reports and figures name it
    num_classes: int
    mean: tuple[float, float, float]  # per channel, of pixels in [0, 1]; models normalise inside
    std: tuple[float, float, float]
    image_size: tuple[int, int] = (32, 32)
    load: Loader = field(default=load_split, compare=False)  # (info, split, data dir) -> ImageSet
    recipe: str = "cifar10"  # whose training recipe it uses: a data-set key of bench.train.recipes
    sizes: tuple[int, int] = (50_000, 10_000)  # (train, test) images, for plans and estimates
    paper: bool = False  # the paper reports on it: tables and claims compare with its numbers
    synthetic: bool = False  # made up to check the pipeline: never compared with anything
    noise_folder: str = ""  # its noise groups under the data dir, in the CIFAR-C layout
    noise_release: Release | None = None  # where the published noise groups are downloaded from
    folder: str = ""  # CIFAR python format: the batch files' folder, relative to the data dir
    files: dict[str, tuple[tuple[str, str | None], ...]] = field(default_factory=dict)
    label_key: str = "labels"
    archive: str | None = None  # file name of the .tar.gz, relative to the data dir
    url: str | None = None
    archive_md5: str | None = None
    make: Callable[[Path], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.noise_folder:  # generated groups need a folder of their own
            object.__setattr__(self, "noise_folder", f"{self.name}-C")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C x H x W of one model input."""
        return (3, *self.image_size)

    def not_compared(self) -> str:
        """Why its numbers are never set against the paper's ('' when they are)."""
        if self.paper:
            return ""
        return f"{self.label} data" if self.synthetic else f"{self.name} is not in the paper"


CIFAR10 = DatasetInfo(
    name="cifar10",
    label="CIFAR-10",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    paper=True,
    folder="cifar-10-batches-py",
    files={
        "train": (
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        "test": (("test_batch", "40351d587109b95175f43aff81a1287e"),),
    },
    archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    noise_folder="CIFAR-10-C",
    noise_release=Release(
        "https://zenodo.org/record/2535967/files/CIFAR-10-C.tar",
        "CIFAR-10-C.tar",
        2_918_471_680,
        "56bf5dcef84df0e2308c6dcbcbbd8499",
    ),
)
CIFAR100 = DatasetInfo(
    name="cifar100",
    label="CIFAR-100",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    recipe="cifar100",
    paper=True,
    folder="cifar-100-python",
    files={
        "train": (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        "test": (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    },
    label_key="fine_labels",
    archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    noise_folder="CIFAR-100-C",
    noise_release=Release(
        "https://zenodo.org/record/3555552/files/CIFAR-100-C.tar",
        "CIFAR-100-C.tar",
        2_918_473_216,
        "11f0ed0f1191edbf9fa23466ae6021d3",
    ),
)
# The synthetic stand-in lives in its own root, in CIFAR-10's layout, made on first use;
# it trains like CIFAR-10 and only has to be roughly centred by CIFAR-10's statistics.
SYNTHETIC = DatasetInfo(
    name="synthetic",
    label="synthetic",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    sizes=(10_000, 2_000),  # make_synthetic's defaults
    synthetic=True,
    noise_folder="synthetic/CIFAR-10-C",
    folder="synthetic/cifar-10-batches-py",
    files={split: tuple((name, None) for name, _ in files) for split, files in CIFAR10.files.items()},
    make=make_synthetic,
)
DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add a data set to the registry (its name must be new)."""
    if info.name in DATASETS:
        raise ValueError(f"data set {info.name!r} is registered twice")
    DATASETS[info.name] = info
    return info


def dataset_info(name: str) -> DatasetInfo:
    """The registry's entry; one error line naming the registered data sets for another name."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_label(name: str) -> str:
    """How reports name a data set (its registered label, else the name)."""
    return DATASETS[name].label if name in DATASETS else name


def paper_datasets() -> tuple[str, ...]:
    """The registered data sets the paper reports on, in registration order."""
    return tuple(name for name, info in DATASETS.items() if info.paper)


for _info in (CIFAR10, CIFAR100, SYNTHETIC):
    register_dataset(_info)
