"""Chunked zarr stores of packed spline codes, written atomically.

Layout of a store (a zarr v3 group)::

    attrs                 format, polytope-lens version, model, data provenance, selection, exact, layers[...]
    rows                  int64 (n_rows, 2): [example index, token position or -1]
    codes/site_000 ...    uint8 (n_rows, bytes_per_row) per site, in execution order (names in attrs["layers"])
    soft/site_000 ...     float16 (n_rows, n_units) soft codes, when requested

A store is written into a hidden temporary folder beside its destination and renamed into place only when complete,
so an interrupted or failed run never leaves a half-written store at the destination.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .codes import LayerCodes, SplineCodes
from .errors import InvalidInputError, PolytopeLensError

__all__ = ["CodeStoreWriter", "read_codes", "write_codes", "FORMAT"]

FORMAT = "polytope-lens/codes/1"


def _zarr():
    import zarr

    return zarr


class CodeStoreWriter:
    """Append batches of ``SplineCodes`` (same sites, same selection) to a new store; ``close()`` publishes it.

    Use as a context manager: on an exception the temporary folder is removed and the destination is untouched.

    Parameters
    ----------
    path : str or Path
        Destination folder (conventionally ``*.zarr``).
    meta : dict
        JSON-safe metadata stored in the group attributes (model spec, data provenance, ...).
    overwrite : bool
        Replace an existing store at ``path``; otherwise an existing path is an error.
    chunk_rows : int
        Rows per zarr chunk.
    """

    def __init__(self, path, *, meta: dict | None = None, overwrite: bool = False, chunk_rows: int = 4096):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise InvalidInputError(f"The output {str(self.path)!r} already exists; pass overwrite (--overwrite) "
                                    "to replace it or choose another path.")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise InvalidInputError(f"The output folder {str(parent)!r} does not exist.")
        if not os.access(parent, os.W_OK):
            raise InvalidInputError(f"The output folder {str(parent)!r} is not writable.")
        self.tmp = parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.meta = dict(meta or {})
        self.overwrite = overwrite
        self.chunk_rows = chunk_rows
        self.group = None
        self.names: list[str] = []
        self.n_rows = 0
        self.layer_meta: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _open(self, first: SplineCodes) -> None:
        zarr = _zarr()
        try:
            self.group = zarr.open_group(str(self.tmp), mode="w")
        except OSError as e:
            raise PolytopeLensError(f"Cannot create the store beside {str(self.path)!r}: {e.strerror or e}.") from None
        self.names = list(first.layers)
        self.group.create_array("rows", shape=(0, 2), chunks=(self.chunk_rows, 2), dtype="int64")
        for i, lc in enumerate(first.layers.values()):
            key = f"site_{i:03d}"
            self.group.create_array(f"codes/{key}", shape=(0, lc.packed.shape[1]),
                                    chunks=(self.chunk_rows, lc.packed.shape[1]), dtype="uint8")
            if lc.soft is not None:
                self.group.create_array(f"soft/{key}", shape=(0, lc.n_units),
                                        chunks=(self.chunk_rows, lc.n_units), dtype="float16")
            self.layer_meta.append({"key": key, "site": lc.site, "alias": lc.alias, "activation": lc.activation,
                                    "n_units": lc.n_units, "unit_shape": list(lc.unit_shape),
                                    "bits_per_unit": lc.bits_per_unit, "exact": lc.exact,
                                    "soft": lc.soft is not None})
        self.selection, self.dtype = first.selection, first.dtype

    def append(self, codes: SplineCodes, *, row_offset: int = 0) -> None:
        """Append rows; ``row_offset`` is added to the example index of each row (for batch-wise extraction)."""
        if self.group is None:
            self._open(codes)
        if list(codes.layers) != self.names:
            raise InvalidInputError(f"Cannot append codes of sites {list(codes.layers)} to a store of {self.names}.")
        rows = codes.rows + np.array([row_offset, 0])
        try:
            self.group["rows"].append(rows, axis=0)
            for m, lc in zip(self.layer_meta, codes.layers.values()):
                self.group[f"codes/{m['key']}"].append(lc.packed, axis=0)
                if m["soft"]:
                    self.group[f"soft/{m['key']}"].append(lc.soft.astype(np.float16), axis=0)
        except OSError as e:
            raise PolytopeLensError(f"Writing the store failed: {e.strerror or e}.") from None
        self.n_rows += len(codes)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> Path:
        """Write the metadata and move the store into place; returns its path."""
        if self.group is None:
            self.abort()
            raise InvalidInputError("No codes were written; the store was not created.")
        exact = all(m["exact"] for m in self.layer_meta)
        self.group.attrs.update({
            "format": FORMAT, "version": _version(), "n_rows": self.n_rows, "exact": exact, "dtype": self.dtype,
            "selection": self.selection, "layers": self.layer_meta, **self.meta,
        })
        if self.path.exists() and self.overwrite:
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path


def _version() -> str:
    from . import __version__

    return __version__


def write_codes(codes: SplineCodes, path, *, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``codes`` to a new zarr store at ``path`` (atomically); returns the path."""
    with CodeStoreWriter(path, meta=meta, overwrite=overwrite) as w:
        w.append(codes)
    return Path(path)


def read_codes(path) -> SplineCodes:
    """Read a store written by ``write_codes`` / ``CodeStoreWriter`` back into ``SplineCodes``."""
    zarr = _zarr()
    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception:
        raise InvalidInputError(f"{str(path)!r} is not a polytope-lens code store.") from None
    attrs = dict(g.attrs)
    if attrs.get("format") != FORMAT:
        raise InvalidInputError(f"{str(path)!r} is not a polytope-lens code store (format {attrs.get('format')!r}).")
    layers = {}
    for m in attrs["layers"]:
        soft = np.asarray(g[f"soft/{m['key']}"][:], dtype=np.float32) if m["soft"] else None
        layers[m["site"]] = LayerCodes(m["site"], m["alias"], m["activation"], m["n_units"], tuple(m["unit_shape"]),
                                       np.asarray(g[f"codes/{m['key']}"][:]), soft)
    keep = {k: v for k, v in attrs.items() if k not in ("layers", "selection", "dtype", "format")}
    return SplineCodes(layers, np.asarray(g["rows"][:]), attrs["selection"], attrs["dtype"], keep)
