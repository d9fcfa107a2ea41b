"""Locating well-known data sets on this machine by name.

``build_shards fashion-mnist OUT`` resolves the name to a directory by looking, in order, in

1. ``$SSL_DATASETS_DIR/<name>`` (a user's own data root),
2. ``/usr/share/datasets/<name>`` (Debian's ``dataset-<name>`` packages install there),
3. ``~/.cache/datasets/<name>``,
4. ``./data/<name>`` (relative to the current directory).

When none holds the files, :class:`DatasetNotFoundError` explains where to get them. Nothing is
ever downloaded here (tests and CI must not touch the network).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_DATA_DIR = "SSL_DATASETS_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """A known data set is not present in any of the searched places."""


@dataclass(frozen=True)
class KnownDataset:
    """A data set this project knows how to find and read.

    Attributes:
        name: the name users type (``fashion-mnist``).
        kind: the source kind that reads it (see :mod:`data_pipelines.sources`).
        required: files (any of the listed alternatives per entry) that must exist in the directory.
        classes: class names in label order.
        get_it: human instructions for obtaining the files.
    """

    name: str
    kind: str
    required: tuple[tuple[str, ...], ...]
    classes: tuple[str, ...]
    get_it: str


def _idx_files(prefix: str) -> tuple[tuple[str, ...], ...]:
    return tuple(
        (f"{prefix}-{part}", f"{prefix}-{part}.gz") for part in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

KNOWN_DATASETS: dict[str, KnownDataset] = {
    "fashion-mnist": KnownDataset(
        name="fashion-mnist",
        kind="idx",
        required=_idx_files("train") + _idx_files("t10k"),
        classes=FASHION_MNIST_CLASSES,
        get_it=(
            "On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs into "
            "/usr/share/datasets/fashion-mnist). Elsewhere: download the four files "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz from the Fashion-MNIST project "
            "(github.com/zalandoresearch/fashion-mnist, 'Get the Data') into one of the searched "
            "directories, or pass that directory as SOURCE."
        ),
    ),
    "mnist": KnownDataset(
        name="mnist",
        kind="idx",
        required=_idx_files("train") + _idx_files("t10k"),
        classes=tuple(str(i) for i in range(10)),
        get_it=(
            "Download the four files {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz of the MNIST "
            "database (the mirror torchvision uses serves them) into one of the searched "
            "directories, or pass that directory as SOURCE."
        ),
    ),
}


def normalize_name(name: str) -> str:
    """Canonical spelling of a data set name (``Fashion_MNIST`` -> ``fashion-mnist``).

    Args:
        name: user-typed name.

    Returns:
        Lower-case name with ``_`` replaced by ``-``.
    """
    return name.strip().lower().replace("_", "-")


def search_dirs(name: str) -> list[Path]:
    """Directories searched for data set ``name``, in order.

    Args:
        name: a data set name.

    Returns:
        Candidate directories (they need not exist).
    """
    name = normalize_name(name)
    dirs = []
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        dirs.append(Path(env) / name)
    dirs += [
        Path("/usr/share/datasets") / name,
        Path.home() / ".cache" / "datasets" / name,
        Path.cwd() / "data" / name,
    ]
    return dirs


def has_files(directory: Path, dataset: KnownDataset) -> bool:
    """Whether ``directory`` holds every required file of ``dataset``.

    Args:
        directory: a candidate directory.
        dataset: the data set.

    Returns:
        True when each required entry has one of its alternatives present.
    """
    return directory.is_dir() and all(
        any((directory / alt).is_file() for alt in alternatives) for alternatives in dataset.required
    )


def is_known(name: str) -> bool:
    """Whether ``name`` names a data set in :data:`KNOWN_DATASETS`.

    Args:
        name: a string that may be a data set name or a path.

    Returns:
        True for a known name.
    """
    return normalize_name(name) in KNOWN_DATASETS


def locate_dataset(name: str, *, search: Sequence[str | os.PathLike[str]] | None = None) -> Path:
    """Find the directory holding a known data set.

    Args:
        name: a known data set name (see :data:`KNOWN_DATASETS`).
        search: directories to try instead of :func:`search_dirs` (tests use this).

    Returns:
        The first directory that holds all of the data set's files.

    Raises:
        KeyError: ``name`` is not a known data set.
        DatasetNotFoundError: no searched directory holds the files; the message says where it
            looked and how to get the data.
    """
    key = normalize_name(name)
    if key not in KNOWN_DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(KNOWN_DATASETS))}")
    dataset = KNOWN_DATASETS[key]
    candidates = [Path(p) for p in search] if search is not None else search_dirs(key)
    for directory in candidates:
        if has_files(directory, dataset):
            return directory
    looked = "\n  ".join(str(d) for d in candidates)
    needed = ", ".join(alts[-1] for alts in dataset.required)
    raise DatasetNotFoundError(
        f"data set {key!r} not found. Looked for {needed} in:\n  {looked}\n"
        f"To get it: {dataset.get_it} You can also set ${ENV_DATA_DIR} to a directory holding "
        f"'{key}/'."
    )


def known_for_directory(directory: str | os.PathLike[str]) -> KnownDataset | None:
    """The known data set a directory holds, judged by the directory's name (for class names).

    Args:
        directory: a source directory.

    Returns:
        The matching :class:`KnownDataset`, or ``None``.
    """
    path = Path(directory)
    name = normalize_name(path.name)
    for dataset in KNOWN_DATASETS.values():
        if name in (dataset.name, dataset.name.replace("-", "")):
            return dataset
    return None
