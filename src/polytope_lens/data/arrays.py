"""Array data from ``.npy`` and ``.npz`` files: rows are examples, already in the model's input space.

Files are read with ``allow_pickle=False`` so that loading data never runs code. Float arrays must be finite.
An ``.npz`` may carry integer labels beside the data under the key ``labels``.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from polytope_lens.data._source import DataSource, check_finite, existing_file, first
from polytope_lens.errors import InvalidInputError, first_line

LABEL_KEY = "labels"
"""Key of an optional int label array (N,) inside an ``.npz`` beside the data array."""


_DAMAGED = (OSError, EOFError, zipfile.BadZipFile, zlib.error)
"""What reading a truncated or corrupted ``.npy`` / ``.npz`` raises (besides ValueError)."""


def real_array(array: np.ndarray, what: str) -> np.ndarray:
    """`array` in native byte order (the same values: torch refuses other byte orders), or a one-line
    `InvalidInputError` "WHAT must hold real numbers; it holds DTYPE." when it holds anything but bool, int or float
    values: complex (whose imaginary part a cast drops), strings, dates, records and objects are no model input.

    Every reader of user arrays (``npy:``/``npz:`` data, `DataSource` items, the CLI's point files, NumPy inputs
    of the API through ``capture.input_tensors``, ray directions) goes through here."""
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what} must hold real numbers; it holds {array.dtype}.")
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def unreadable(exc: Exception, subject: str) -> InvalidInputError:
    """The one-line error for `exc`, met reading `subject` (``"'x.npy'"``, ``"array 'x' of 'd.npz'"``) with NumPy."""
    if isinstance(exc, ValueError) and "pickle" in str(exc):  # object arrays need pickle, which we refuse
        return InvalidInputError(f"Cannot read {subject} without pickle ({first_line(exc)}); save a numeric array.")
    damaged = "" if isinstance(exc, OSError) else "; the file is damaged or cut short"
    return InvalidInputError(f"Cannot read {subject}: {first_line(exc)}{damaged}.")


def npz_member(archive, key: str, where: str) -> np.ndarray:
    """``archive[key]`` of an open ``.npz``, or a one-line `InvalidInputError` naming the array and `where` (the
    archive, e.g. ``"'data.npz'"``): members are read lazily, so a bad CRC, a truncated member or an object array
    (which needs pickle, refused) shows only here, not at ``np.load``."""
    try:
        return archive[key]
    except (ValueError, *_DAMAGED) as exc:
        raise unreadable(exc, f"array {key!r} of {where}") from None


def _check_array(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """`array` in native byte order, once it is a non-empty, finite array of real numbers."""
    if array.ndim < 1 or len(array) == 0:
        raise InvalidInputError(
            f"{what} in {str(path)!r} has shape {array.shape}; it needs at least one row (N, ...)."
        )
    array = real_array(array, f"{what} in {str(path)!r}")
    check_finite(array, f"{what} in {str(path)!r}")
    return array


def _load(path: Path, **kwargs):
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except (ValueError, *_DAMAGED) as exc:
        raise unreadable(exc, repr(str(path))) from None


def load_npy(path_text: str, spec: str, limit: int | None) -> DataSource:
    """One ``.npy`` array (N, ...)."""
    path = existing_file(path_text, spec)
    array = _load(path)
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"{str(path)!r} is not a .npy array file; use the 'npz:' spec for .npz archives.")
    array = _check_array(array, path, "Array")
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
        array = npz_member(archive, key, repr(str(path)))
        labels = npz_member(archive, LABEL_KEY, repr(str(path))) if LABEL_KEY in keys and key != LABEL_KEY else None
    array = _check_array(array, path, f"Array {key!r}")
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
