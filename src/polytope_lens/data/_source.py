"""The `DataSource` container and the small checks every data adapter shares.

Adapters (`text`, `images`, `arrays`) import from here rather than from the package ``__init__`` so that the
package can re-export them without an import cycle.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from polytope_lens.errors import InvalidInputError

MODALITIES = ("image", "text", "array")

INSTALL_MODELS_EXTRA = "pip install 'polytope-lens[models]'"


@dataclass(frozen=True)
class DataSource:
    """A loaded data set: items of one modality, optional integer labels and where it came from.

    Parameters
    ----------
    spec : str
        Canonical spec that reloads the same data with `load_data` (e.g. ``"fashion-mnist:test"``).
    modality : {"image", "text", "array"}
        ``"text"``: `items` is a list of passages (str). ``"image"``: a list of float32 arrays (C, H, W) in [0, 1],
        sizes may differ, or one float32 array (N, C, H, W). ``"array"``: one `numpy.ndarray` (N, ...).
    items : Sequence
        The examples, indexed along the first axis.
    labels : numpy.ndarray or None
        Integer label per item, (N,) int64, when known.
    label_names : list of str or None
        Name of each label value (``label_names[labels[i]]``).
    provenance : dict
        JSON-safe record of the source (package and version or file path), item count and any transform.

    Examples
    --------
    >>> src = load_data("digits", limit=20)          # doctest: +SKIP
    >>> len(src), src.items.shape                    # doctest: +SKIP
    (20, (20, 1, 8, 8))
    """

    spec: str
    modality: str
    items: Sequence
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise InvalidInputError(
                f"DataSource modality must be one of {', '.join(MODALITIES)}; got {self.modality!r}."
            )
        if self.labels is not None and len(self.labels) != len(self.items):
            raise InvalidInputError(
                f"DataSource has {len(self.items)} items but {len(self.labels)} labels; they must match."
            )

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, index: Any) -> "DataSource":
        """Return the rows selected by `index` (an int array, a list of ints or a slice); provenance records it.

        Parameters
        ----------
        index : slice, sequence of int or numpy.ndarray of int
            Rows to keep, in the order given (negative indices count from the end).

        Returns
        -------
        DataSource
            Same spec and modality, fewer items; ``provenance["subsets"]`` gains one entry.
        """
        n = len(self)
        rows = _as_rows(index, n)
        if isinstance(self.items, np.ndarray):
            items: Sequence = self.items[rows]
        else:
            items = [self.items[i] for i in rows]
        labels = None if self.labels is None else self.labels[rows]
        provenance = copy.deepcopy(self.provenance)
        provenance.setdefault("subsets", []).append(_describe_rows(rows, n))
        provenance["n_items"] = len(rows)
        return DataSource(self.spec, self.modality, items, labels, self.label_names, provenance)


def _as_rows(index: Any, n: int) -> np.ndarray:
    """Turn a slice or an integer index into an int64 row array, checking bounds."""
    if isinstance(index, slice):
        return np.arange(n, dtype=np.int64)[index]
    rows = np.asarray(index)
    if rows.dtype == bool:
        raise InvalidInputError("DataSource.subset takes integer rows or a slice, not a boolean mask; "
                                "use numpy.flatnonzero(mask).")
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise InvalidInputError(
            f"DataSource.subset takes a 1-D array of ints or a slice; got shape {rows.shape} dtype {rows.dtype}."
        )
    rows = rows.astype(np.int64)
    if rows.size and (rows.max() >= n or rows.min() < -n):
        raise InvalidInputError(
            f"DataSource.subset index out of range for {n} items: min {int(rows.min())}, max {int(rows.max())}."
        )
    return np.where(rows < 0, rows + n, rows)


def _describe_rows(rows: np.ndarray, n_before: int) -> dict:
    """JSON-safe note of a row selection: the rows themselves when short, else their count and a digest."""
    note: dict = {"from_items": int(n_before), "n_items": int(len(rows))}
    if len(rows) <= 1000:
        note["rows"] = [int(r) for r in rows]
    else:
        note["rows_sha1"] = hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()
    return note


def check_limit(limit: int | None) -> None:
    """Raise unless `limit` is None or a positive int."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise InvalidInputError(f"The 'limit' parameter of load_data must be a positive int or None; got {limit!r}.")


def first(items: Sequence, limit: int | None) -> Sequence:
    """Keep the first `limit` items (all of them when `limit` is None)."""
    return items if limit is None else items[:limit]


def stratified_rows(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Pick `limit` rows so that classes are as balanced as possible, seeded, returned in ascending order.

    Each class is shuffled with ``numpy.random.default_rng(seed)``; rows are then taken by rank inside their class
    (all rank-0 rows first, then rank-1, ...), so any prefix is balanced to within one item per class.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rank = np.empty(n, dtype=np.int64)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rank[rng.permutation(members)] = np.arange(len(members))
    order = np.lexsort((labels, rank))  # by rank, then class
    return np.sort(order[:limit]).astype(np.int64)


def check_finite(array: np.ndarray, what: str) -> None:
    """Raise `InvalidInputError` if a float array holds NaN or infinity, naming the first bad position."""
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.complexfloating):
        return
    if np.isfinite(np.sum(array)):  # cheap check first; the diagnosis only on failure
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    kind = "NaN" if np.isnan(array).any() else "infinite"
    raise InvalidInputError(
        f"{what} holds {int(bad.sum())} {kind} value(s) (first at index {where}); remove or impute them first."
    )


def package_version(name: str) -> str | None:
    """Installed version of distribution `name`, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def data_dir() -> Path:
    """Folder for downloaded data sets: env ``POLYTOPE_LENS_DATA``, default ``~/.local/share/polytope-lens``."""
    return Path(os.environ.get("POLYTOPE_LENS_DATA") or Path.home() / ".local" / "share" / "polytope-lens")


def existing_file(path_text: str, spec: str) -> Path:
    """Resolve the path in a spec, raising `InvalidInputError` if it is empty or not an existing file."""
    if not path_text:
        raise InvalidInputError(f"Data spec {spec!r} names no file; write it as e.g. 'npy:/path/to/x.npy'.")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"Data spec {spec!r}: no such file {str(path)!r}.")
    return path
