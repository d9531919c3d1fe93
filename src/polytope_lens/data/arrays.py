"""Array data from ``.npy`` and ``.npz`` files: rows are examples, already in the model's input space.

Files are read with ``allow_pickle=False`` so that loading data never runs code. Float arrays must be finite.
An ``.npz`` may carry integer labels beside the data under the key ``labels``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polytope_lens.data._source import DataSource, check_finite, existing_file, first
from polytope_lens.errors import InvalidInputError

LABEL_KEY = "labels"
"""Key of an optional int label array (N,) inside an ``.npz`` beside the data array."""


def _check_array(array: np.ndarray, path: Path, what: str) -> None:
    if array.ndim < 1 or len(array) == 0:
        raise InvalidInputError(
            f"{what} in {str(path)!r} has shape {array.shape}; it needs at least one row (N, ...)."
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InvalidInputError(f"{what} in {str(path)!r} has dtype {array.dtype}; a numeric array is needed.")
    check_finite(array, f"{what} in {str(path)!r}")


def _load(path: Path, **kwargs):
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise InvalidInputError(f"Cannot read {str(path)!r} without pickle ({exc}); save a numeric array.") from None
    except (OSError, EOFError) as exc:
        raise InvalidInputError(f"Cannot read {str(path)!r} as a NumPy file: {exc}.") from None


def load_npy(path_text: str, spec: str, limit: int | None) -> DataSource:
    """One ``.npy`` array (N, ...)."""
    path = existing_file(path_text, spec)
    array = _load(path)
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"{str(path)!r} is not a .npy array file; use the 'npz:' spec for .npz archives.")
    _check_array(array, path, "Array")
    items = first(array, limit)
    provenance = {"source": "npy file", "file": str(path.resolve()), "shape": list(array.shape),
                  "dtype": str(array.dtype), "n_items": len(items)}
    return DataSource(f"npy:{path}", "array", items, None, None, provenance)


def load_npz(path_text: str, key: str | None, spec: str, limit: int | None) -> DataSource:
    """One array of an ``.npz`` archive: the named `key`, or the only array; ``labels`` is used as labels."""
    path = existing_file(path_text, spec)
    archive = _load(path)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidInputError(f"{str(path)!r} is not a .npz archive; use the 'npy:' spec for .npy files.")
    with archive:
        keys = list(archive.files)
        data_keys = [k for k in keys if k != LABEL_KEY]
        if key is None:
            if len(data_keys) != 1:
                raise InvalidInputError(
                    f"{str(path)!r} holds arrays {', '.join(keys) or '(none)'}; name one as 'npz:{path}:KEY'."
                )
            key = data_keys[0]
        elif key not in keys:
            raise InvalidInputError(f"{str(path)!r} has no array {key!r}; it holds {', '.join(keys)}.")
        array = archive[key]
        labels = archive[LABEL_KEY] if LABEL_KEY in keys and key != LABEL_KEY else None
    _check_array(array, path, f"Array {key!r}")
    if labels is not None:
        if labels.shape != (len(array),) or not np.issubdtype(labels.dtype, np.integer):
            raise InvalidInputError(
                f"{str(path)!r}: '{LABEL_KEY}' must be an int array of shape ({len(array)},); "
                f"got {labels.dtype} {labels.shape}."
            )
        labels = first(labels.astype(np.int64), limit)
    items = first(array, limit)
    provenance = {"source": "npz file", "file": str(path.resolve()), "key": key, "shape": list(array.shape),
                  "dtype": str(array.dtype), "n_items": len(items), "labels_key": LABEL_KEY if labels is not None
                  else None}
    return DataSource(f"npz:{path}:{key}", "array", items, labels, None, provenance)
