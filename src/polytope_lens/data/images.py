"""Image data: bundled real photos, image folders, sklearn digits and Debian's Fashion-MNIST.

Every image comes out as float32 in [0, 1], channels first. Photos keep their own sizes (a list of (3, H, W)
arrays: the model adapter resizes them its own way); digits and Fashion-MNIST come as one (N, 1, H, W) array.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

from polytope_lens.data._source import (
    INSTALL_MODELS_EXTRA,
    DataSource,
    data_dir,
    first,
    package_version,
    stratified_rows,
)
from polytope_lens.errors import InvalidInputError, MissingDependencyError

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")
"""Real colour photos shipped inside the scikit-image wheel (``skimage/data/NAME.png|jpg``)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

FASHION_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
"""Folders searched for the idx.gz files (then ``$POLYTOPE_LENS_DATA/fashion-mnist``, then ``dpkg -L``)."""

FASHION_INSTALL = "apt-get install dataset-fashion-mnist"

_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_image(path: Path) -> np.ndarray:
    """Read a jpg/png as RGB float32 (3, H, W) in [0, 1] (greyscale and RGBA are converted to RGB)."""
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(
            f"Reading image files needs Pillow; install it with {INSTALL_MODELS_EXTRA}."
        ) from None
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    except OSError as exc:
        raise InvalidInputError(f"Cannot read image {str(path)!r}: {exc}.") from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1) / 255.0, dtype=np.float32)


def skimage_photo_paths() -> dict[str, Path]:
    """Files of the bundled photos: scikit-image's six plus matplotlib's ``grace_hopper.jpg`` if installed.

    Located with `importlib.util.find_spec`, without importing either package.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The 'skimage' photos need scikit-image; install it with {INSTALL_MODELS_EXTRA}."
        )
    folder = Path(spec.submodule_search_locations[0]) / "data"
    paths = {}
    for name in SKIMAGE_PHOTOS:
        found = [folder / f"{name}{suffix}" for suffix in (".png", ".jpg") if (folder / f"{name}{suffix}").is_file()]
        if not found:
            raise MissingDependencyError(
                f"scikit-image's photo {name!r} is missing from {str(folder)!r}; reinstall it with "
                f"{INSTALL_MODELS_EXTRA}."
            )
        paths[name] = found[0]
    mpl = importlib.util.find_spec("matplotlib")
    if mpl is not None and mpl.submodule_search_locations:
        hopper = Path(mpl.submodule_search_locations[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        if hopper.is_file():
            paths["grace_hopper"] = hopper
    return paths


def load_skimage(limit: int | None) -> DataSource:
    """The bundled real photos, one label per photo (label_names are the photo names)."""
    paths = skimage_photo_paths()
    names = list(first(list(paths), limit))
    items = [read_image(paths[name]) for name in names]
    provenance = {
        "source": "scikit-image sample photos" + (" + matplotlib grace_hopper.jpg" if "grace_hopper" in paths else ""),
        "packages": {"scikit-image": package_version("scikit-image"), "matplotlib": package_version("matplotlib")},
        "files": {name: str(paths[name]) for name in names},
        "n_items": len(items),
        "transform": "RGB, float32 in [0, 1], (3, H, W), original sizes",
    }
    if "grace_hopper" not in paths:
        provenance["note"] = "grace_hopper omitted: matplotlib is not installed"
    return DataSource("skimage", "image", items, np.arange(len(items), dtype=np.int64), names, provenance)


def load_image_dir(dir_text: str, spec: str, limit: int | None) -> DataSource:
    """jpg/png files under a folder, sorted by path; labelled by sub-folder when every image sits in one."""
    if not dir_text:
        raise InvalidInputError(f"Data spec {spec!r} names no folder; write it as 'images:/path/to/folder'.")
    root = Path(dir_text).expanduser()
    if not root.is_dir():
        raise InvalidInputError(f"Data spec {spec!r}: no such folder {str(root)!r}.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInputError(f"Folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images.")
    files = list(first(files, limit))
    parts = [p.relative_to(root).parts for p in files]
    labels = names = None
    if all(len(part) > 1 for part in parts):
        names = sorted({part[0] for part in parts})
        labels = np.asarray([names.index(part[0]) for part in parts], dtype=np.int64)
    items = [read_image(p) for p in files]
    provenance = {
        "source": "image folder",
        "folder": str(root.resolve()),
        "files": [str(p.relative_to(root)) for p in files],
        "n_items": len(items),
        "labels_from": "sub-folder names" if names else None,
        "transform": "RGB, float32 in [0, 1], (3, H, W), original sizes",
    }
    return DataSource(f"images:{root}", "image", items, labels, names, provenance)


def load_digits_data(limit: int | None, seed: int) -> DataSource:
    """sklearn's 1797 handwritten digits, (N, 1, 8, 8) float32 in [0, 1] (pixel counts 0..16 divided by 16)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError(
            f"The 'digits' data set needs scikit-learn; install it with {INSTALL_MODELS_EXTRA}."
        ) from None
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    rows = stratified_rows(labels, limit, seed)
    provenance = {
        "source": "sklearn.datasets.load_digits (UCI optical digits, 8x8)",
        "package": f"scikit-learn {package_version('scikit-learn')}",
        "n_items": len(rows),
        "transform": "pixel / 16, float32, (N, 1, 8, 8)",
    }
    if limit is not None:
        provenance["sample"] = f"stratified by class, seed {seed}, {len(rows)} of {len(labels)}"
    return DataSource("digits", "image", images[rows], labels[rows], [str(d) for d in range(10)], provenance)


def find_fashion_mnist() -> Path | None:
    """Folder holding the four Fashion-MNIST idx.gz files, or None."""
    folders = list(FASHION_DIRS) + [data_dir() / "fashion-mnist"]
    for folder in folders:
        if all((folder / name).is_file() for pair in _FASHION_FILES.values() for name in pair):
            return folder
    if shutil.which("dpkg") is None:
        return None
    try:
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        if line.endswith(_FASHION_FILES["test"][0]):
            folder = Path(line).parent
            if all((folder / name).is_file() for pair in _FASHION_FILES.values() for name in pair):
                return folder
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd idx file (the MNIST container format) as a uint8 array."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4: 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_arrays(split: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """Raw Fashion-MNIST split: uint8 images (N, 28, 28), int64 labels (N,), and the folder they came from."""
    folder = find_fashion_mnist()
    if folder is None:
        raise MissingDependencyError(
            "Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed; "
            f"install it with: {FASHION_INSTALL}"
        )
    image_file, label_file = _FASHION_FILES[split]
    return read_idx(folder / image_file), read_idx(folder / label_file).astype(np.int64), folder


def load_fashion(split: str | None, limit: int | None, seed: int) -> DataSource:
    """Fashion-MNIST, (N, 1, 28, 28) float32 in [0, 1]; the default split is the balanced 10k test set."""
    split = split or "test"
    if split not in _FASHION_FILES:
        raise InvalidInputError(f"Unknown Fashion-MNIST split {split!r}; choose one of {', '.join(_FASHION_FILES)}.")
    images, labels, folder = load_fashion_arrays(split)
    rows = stratified_rows(labels, limit, seed)
    items = (images[rows].astype(np.float32) / 255.0)[:, None]
    provenance = {
        "source": "Fashion-MNIST (Zalando, MIT) from Debian dataset-fashion-mnist",
        "folder": str(folder),
        "split": split,
        "n_items": len(rows),
        "transform": "pixel / 255, float32, (N, 1, 28, 28)",
    }
    if limit is not None:
        provenance["sample"] = f"stratified by class, seed {seed}, {len(rows)} of {len(labels)}"
    return DataSource(f"fashion-mnist:{split}", "image", items, labels[rows], list(FASHION_CLASSES), provenance)
