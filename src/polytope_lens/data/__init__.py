"""Data sets that load offline, behind one spec string.

`load_data` turns a spec such as ``"pydoc"``, ``"austen:emma"``, ``"skimage"``, ``"digits"``,
``"fashion-mnist:test"`` or ``"npz:codes.npz:x"`` into a `DataSource`. `list_data` says which sources are
available on this machine and, for the others, how to install them. Nothing is ever downloaded at run time.

Spec forms
----------
========================  ==========================================================================
``pydoc``                 CPython's ``pydoc_data.topics`` help text, ~200-word passages (text)
``austen[:NOVEL]``        Jane Austen's novels from Debian r-cran-janeaustenr, passages (text)
``text:PATH``             a UTF-8 text file, passages (text); a bare ``PATH.txt`` also works
``skimage``               scikit-image's real photos + matplotlib's grace_hopper.jpg (image)
``images:DIR``            jpg/png files under DIR, labelled by sub-folder (image)
``digits``                sklearn's 8x8 digits, (N, 1, 8, 8) (image)
``fashion-mnist[:SPLIT]`` Debian dataset-fashion-mnist, ``train`` or ``test`` (default), (N, 1, 28, 28)
``npy:PATH``              a ``.npy`` array (array); a bare ``PATH.npy`` also works
``npz:PATH[:KEY]``        one array of a ``.npz`` (array); a bare ``PATH.npz`` also works
========================  ==========================================================================
"""

from __future__ import annotations

import importlib.util

from polytope_lens.data._source import DataSource, check_limit
from polytope_lens.errors import InvalidInputError, MissingDependencyError

__all__ = ["DataSource", "load_data", "list_data", "DATA_SPEC_FORMS"]

DATA_SPEC_FORMS = (
    "pydoc", "austen", "austen:NOVEL", "text:PATH", "skimage", "images:DIR", "digits",
    "fashion-mnist", "fashion-mnist:train|test", "npy:PATH", "npz:PATH[:KEY]", "PATH.txt|.npy|.npz",
)
"""Every accepted spec form, as listed in error messages."""


def _split_npz(rest: str) -> tuple[str, str | None]:
    """Split ``PATH[:KEY]``: a key is only taken when what precedes the last ':' ends with '.npz'."""
    if rest.lower().endswith(".npz") or ":" not in rest:
        return rest, None
    head, key = rest.rsplit(":", 1)
    if head.lower().endswith(".npz"):
        return head, key
    return rest, None


def load_data(spec: str, *, limit: int | None = None, seed: int = 0) -> DataSource:
    """Load the data set named by `spec`.

    Parameters
    ----------
    spec : str
        One of the spec forms in `DATA_SPEC_FORMS` (see the module docstring).
    limit : int, optional
        Keep at most this many items: the first ones, except for ``digits`` and ``fashion-mnist``, where a
        class-stratified, seeded sample is taken (returned in data-set order).
    seed : int
        Seed of that stratified sample; ignored by the other sources.

    Returns
    -------
    DataSource
        Items, labels where known, and a JSON-safe provenance record.

    Raises
    ------
    InvalidInputError
        Unknown spec, missing or empty file, NaN in an array, bad `limit`.
    MissingDependencyError
        An optional package or data set is not installed; the message gives the install command.

    Examples
    --------
    >>> src = load_data("digits", limit=50)           # doctest: +SKIP
    >>> src.items.shape, src.modality, src.labels[:3]  # doctest: +SKIP
    ((50, 1, 8, 8), 'image', array([9, 7, 2]))
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"Data spec must be a non-empty string; got {spec!r}. Valid forms: "
                                f"{', '.join(DATA_SPEC_FORMS)}.")
    check_limit(limit)
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    lowered = spec.lower()
    from polytope_lens.data import arrays, images, text

    if spec == "pydoc":
        return text.load_pydoc(limit)
    if kind == "austen":
        return text.load_austen(rest or None, limit)
    if kind == "text":
        return text.load_text_file(rest, spec, limit)
    if spec == "skimage":
        return images.load_skimage(limit)
    if kind == "images":
        return images.load_image_dir(rest, spec, limit)
    if spec == "digits":
        return images.load_digits_data(limit, seed)
    if kind == "fashion-mnist":
        return images.load_fashion(rest or None, limit, seed)
    if kind == "npy":
        return arrays.load_npy(rest, spec, limit)
    if kind == "npz":
        path, key = _split_npz(rest)
        return arrays.load_npz(path, key, spec, limit)
    if lowered.endswith(".txt"):
        return text.load_text_file(spec, spec, limit)
    if lowered.endswith(".npy"):
        return arrays.load_npy(spec, spec, limit)
    if lowered.endswith(".npz"):
        return arrays.load_npz(spec, None, spec, limit)
    raise InvalidInputError(f"Unknown data spec {spec!r}; valid forms are: {', '.join(DATA_SPEC_FORMS)}.")


def list_data() -> list[tuple[str, bool, str]]:
    """Which data sources are available here.

    Returns
    -------
    list of (name, available, reason)
        `reason` describes the source when available and says how to install it when not. Cheap: nothing is
        loaded, packages are only located.
    """
    from polytope_lens.data import images, text

    def have(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    rows: list[tuple[str, bool, str]] = [("pydoc", True, "CPython pydoc_data.topics help text, always present")]
    austen = text.find_austen()
    if austen is None:
        rows.append(("austen", False, f"Debian r-cran-janeaustenr not found; get it with: {text.AUSTEN_INSTALL}"))
    elif not have("rdata"):
        rows.append(("austen", False, "needs the 'rdata' package: pip install 'polytope-lens[models]'"))
    else:
        rows.append(("austen", True, f"Jane Austen's six novels from {austen}"))
    rows.append(("text:PATH", True, "any UTF-8 text file, cut into ~200-word passages"))
    try:
        photos = images.skimage_photo_paths()
        rows.append(("skimage", True, f"{len(photos)} real photos: {', '.join(photos)}"))
    except MissingDependencyError as exc:
        rows.append(("skimage", False, str(exc)))
    pil = have("PIL")
    rows.append(("images:DIR", pil, "jpg/png files in a folder" if pil
                 else "needs Pillow: pip install 'polytope-lens[models]'"))
    sk = have("sklearn")
    rows.append(("digits", sk, "sklearn load_digits, 1797 images 8x8, 10 classes" if sk
                 else "needs scikit-learn: pip install 'polytope-lens[models]'"))
    fashion = images.find_fashion_mnist()
    rows.append(("fashion-mnist", fashion is not None,
                 f"Fashion-MNIST 60k train + 10k test 28x28 from {fashion}" if fashion is not None
                 else f"Debian dataset-fashion-mnist not installed; install it with: {images.FASHION_INSTALL}"))
    rows.append(("npy:PATH", True, "a .npy array, rows are examples"))
    rows.append(("npz:PATH[:KEY]", True, "one array of a .npz archive; 'labels' is used as labels"))
    return rows
