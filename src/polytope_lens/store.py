"""Chunked zarr stores of packed spline codes, written atomically.

Layout of a store (a zarr v3 group)::

    attrs                 format, polytope-lens version, model, data provenance, selection, exact, layers[...]
    rows                  int64 (n_rows, 2): [example index, token position or -1]
    codes/site_000 ...    uint8 (n_rows, bytes_per_row) per site, in execution order (names in attrs["layers"])
    soft/site_000 ...     float16 (n_rows, n_units) soft codes, when requested

A store is written into a hidden folder beside its destination (``.NAME.partial``, with a manifest of completed
chunks and their checksums) and renamed into place only when complete, so an interrupted or failed run never leaves
a half-written store at the destination, and ``resume=True`` continues an interrupted run exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ._outputs import check_destination as _check_output
from ._outputs import canonical, publish
from .codes import LayerCodes, SplineCodes, active_counts, check_unit_shape
from .errors import InvalidInputError, PolytopeLensError, first_line, is_int

__all__ = ["CodeStoreWriter", "read_codes", "write_codes", "FORMAT"]

FORMAT = "polytope-lens/codes/1"
RESERVED = ("format", "version", "n_rows", "exact", "dtype", "selection", "layers", "fingerprint", "chunks")


def _json_value(value):
    """``json.dumps``' fallback: a NumPy scalar as its Python value; anything else is not stored."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _plain(value):
    """``value`` as JSON holds it (tuples as lists, other objects as their text), to compare with a manifest's."""
    return json.loads(json.dumps(value, default=str))


def _non_finite(value):
    """The first NaN or infinity in a JSON-parsed ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        bad = _non_finite(item)
        if bad is not None:
            return bad
    return None


def _rows_sha256(arrays, start: int, n: int) -> str:
    """SHA-256 (hex) of rows ``start`` to ``start + n`` of each of ``arrays`` in turn (a chunk's checksum: the writer
    records it, ``read_codes`` checks it)."""
    h = hashlib.sha256()
    for arr in arrays:
        h.update(np.ascontiguousarray(arr[start:start + n]).tobytes())
    return h.hexdigest()


def check_meta(meta, owner: str) -> dict:
    """``meta`` as stored: a dict of JSON values (NumPy scalars become Python numbers; NaN and infinities, which
    are not JSON numbers, are refused) without the store's own attribute names (``RESERVED``), or a one-line
    ``InvalidInputError``."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InvalidInputError(f"The 'meta' parameter of {owner} must be a dict or None. Got {type(meta).__name__}.")
    clash = [k for k in RESERVED if k in meta]
    if clash:
        raise InvalidInputError(f"The 'meta' parameter of {owner} must not set the store's own attributes "
                                f"({', '.join(RESERVED)}). Got {', '.join(map(repr, clash))}; rename them.")
    out = {}
    for key, value in meta.items():
        try:
            if not isinstance(key, str):
                raise TypeError(f"key of type {type(key).__name__}")
            out[key] = json.loads(json.dumps(value, default=_json_value))
            bad = _non_finite(out[key])
            if bad is not None:  # json writes it as a bare NaN / Infinity token: zarr.json would not be JSON
                raise ValueError(f"{bad!r} is not a JSON number (store a missing value as None)")
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"The 'meta' parameter of {owner} must hold JSON values (str, number, bool, None, "
                                    f"lists and dicts of them; NumPy scalars). Got {key!r}: {e}.") from None
    return out


def _check_codes(codes, owner: str) -> None:
    if not isinstance(codes, SplineCodes):
        hint = (" (one site's codes, without their rows): write the SplineCodes it came from, or code that site "
                "alone with layers=" + repr(codes.site)) if isinstance(codes, LayerCodes) else ""
        raise InvalidInputError(f"The 'codes' parameter of {owner} must be a SplineCodes (from spline_codes or "
                                f"extract_codes). Got {type(codes).__name__}{hint}.")


def _zarr():
    import zarr

    return zarr


def _settle_zarr_writes(timeout: float = 10.0) -> None:
    """Wait until zarr's I/O thread has finished the writes in flight. An interrupt (Ctrl-C) stops the call that
    waits for a write, not the write: its chunk files can appear after a removal of the store has begun."""
    try:
        from zarr.core.sync import loop as zarr_loop  # zarr 3's I/O event loop, a list of one (not public API)

        io_loop = zarr_loop[0]
    except (ImportError, AttributeError, IndexError, TypeError):
        return
    if io_loop is None or not io_loop.is_running():
        return

    async def idle():
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)
    try:
        asyncio.run_coroutine_threadsafe(idle(), io_loop).result(timeout + 1.0)
    except Exception:  # noqa: BLE001 - a loop that closed meanwhile has nothing left to write
        pass


def _remove_partial(folder: Path, quiet_s: float = 0.05, tries: int = 40) -> None:
    """Remove a partial store, again if a write still in flight recreated a file of it."""
    _settle_zarr_writes()
    for _ in range(tries):
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(quiet_s)
        if not folder.exists():
            return


class CodeStoreWriter:
    """Write ``SplineCodes`` chunk by chunk into a new store; ``close()`` publishes it at ``path``.

    The store grows in a hidden folder beside ``path`` (``.NAME.partial``) with a manifest of completed chunks and
    their SHA-256 checksums, rewritten atomically after each chunk. A run killed at any moment (even SIGKILL) leaves
    a partial store that ``resume=True`` continues exactly: rows written after the last manifest entry are cut
    off, every recorded chunk is verified, and the first corrupt chunk and everything after it are redone. Use as a
    context manager: on an exception the partial folder is removed, unless ``resume`` is set (then it is kept so
    that the run can be resumed).

    Parameters
    ----------
    path : str or Path
        Destination folder (conventionally ``*.zarr``).
    meta : dict
        Metadata stored in the group attributes (model spec, data provenance, ...): JSON values, NumPy scalars
        stored as Python numbers; the store's own attribute names (``RESERVED``) are refused.
    fingerprint : dict
        What the store is made of (model, data, sites, selection, batching); a partial store made with another
        fingerprint is never continued.
    overwrite : bool
        Replace an existing code store at ``path`` (never a file, another folder, the current folder or a parent
        of it: those are errors, see ``_outputs.check_replaceable``); otherwise an existing path is an error.
    resume : bool
        Continue a partial store left by an interrupted run with the same fingerprint.
    chunk_rows : int
        Rows per zarr chunk (>= 1).
    """

    MANIFEST = "manifest.json"

    def __init__(self, path, *, meta: dict | None = None, fingerprint: dict | None = None, overwrite: bool = False,
                 resume: bool = False, chunk_rows: int = 4096):
        if not is_int(chunk_rows) or chunk_rows < 1:
            raise InvalidInputError(f"The 'chunk_rows' parameter of CodeStoreWriter must be an int >= 1. "
                                    f"Got {chunk_rows!r}.")
        self.meta = check_meta(meta, "CodeStoreWriter")
        self.path = canonical(path)
        check_destination(self.path, overwrite=overwrite)
        self.tmp = self.path.parent / f".{self.path.name}.partial"
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, default=str))
        self.overwrite, self.resume, self.chunk_rows = overwrite, resume, int(chunk_rows)
        self.group = None
        self.names: list[str] = []
        self.layer_meta: list[dict] = []
        self.chunks: list[dict] = []
        self.selection = self.dtype = None
        if resume and (self.tmp / self.MANIFEST).exists():
            self._reopen()
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- state
    @property
    def n_rows(self) -> int:
        return sum(c["n_rows"] for c in self.chunks)

    @property
    def next_example(self) -> int:
        """Index of the first example not yet in the store (where a resumed run starts)."""
        return sum(c["n_examples"] for c in self.chunks)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif not self.resume:
            self.abort()
        return False

    def _manifest(self) -> dict:
        return {"fingerprint": self.fingerprint, "layers": self.layer_meta, "selection": self.selection,
                "dtype": self.dtype, "chunks": self.chunks}

    def _write_manifest(self) -> None:
        tmp = self.tmp / (self.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self._manifest()))
        os.replace(tmp, self.tmp / self.MANIFEST)

    def _reopen(self) -> None:
        manifest = json.loads((self.tmp / self.MANIFEST).read_text())
        if manifest["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in set(manifest["fingerprint"]) | set(self.fingerprint)
                          if manifest["fingerprint"].get(k) != self.fingerprint.get(k))
            raise InvalidInputError(
                f"The partial store {str(self.tmp)!r} was made with a different {', '.join(diff)}; refusing to "
                "append to it. Run without --resume to start again.")
        self.group = _zarr().open_group(str(self.tmp), mode="r+")
        self.layer_meta, self.selection, self.dtype = manifest["layers"], manifest["selection"], manifest["dtype"]
        self.names = [m["site"] for m in self.layer_meta]
        self.chunks = manifest["chunks"]
        self._truncate(self.n_rows)  # rows written after the last completed chunk are dropped
        for i, chunk in enumerate(self.chunks):
            try:
                intact = self._checksum(chunk["row_start"], chunk["n_rows"]) == chunk["sha256"]
            except Exception:  # noqa: BLE001 - bytes that no longer decode (a truncated file) are corrupt too
                intact = False
            if not intact:
                self.chunks = self.chunks[:i]  # corrupt: redo this chunk and everything after it
                self._truncate(self.n_rows)
                self._write_manifest()
                break

    def _arrays(self):
        yield self.group["rows"]
        for m in self.layer_meta:
            yield self.group[f"codes/{m['key']}"]
            if m["soft"]:
                yield self.group[f"soft/{m['key']}"]

    def _truncate(self, n: int) -> None:
        for arr in self._arrays():
            arr.resize((n, *arr.shape[1:]))

    def _checksum(self, start: int, n: int) -> str:
        return _rows_sha256(self._arrays(), start, n)

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

    def _check_like_store(self, codes: SplineCodes) -> None:
        """Refuse, in one line and before anything of it is written, a chunk unlike the store's first one: another
        dtype, unit selection, activation or unit shape of a site, or soft codes where the store has none (or none
        where it has them); the store's attributes describe its first chunk only."""
        for what, got, want in (("dtype", codes.dtype, self.dtype),
                                ("unit selection", codes.selection, self.selection)):
            if _plain(got) != _plain(want):
                raise InvalidInputError(f"Cannot append codes of {what} {_plain(got)!r} to a store of {what} "
                                        f"{_plain(want)!r}.")
        for m, lc in zip(self.layer_meta, codes.layers.values()):
            if (lc.soft is not None) != bool(m["soft"]):
                with_ = "with" if lc.soft is not None else "without"
                raise InvalidInputError(f"Cannot append codes {with_} soft codes (site {lc.site!r}) to a store "
                                        f"{'with' if m['soft'] else 'without'} them; code every chunk with the "
                                        "same soft setting.")
            if _plain(lc.activation) != _plain(m["activation"]) or lc.bits_per_unit != m["bits_per_unit"]:
                raise InvalidInputError(f"Cannot append codes of site {lc.site!r} with activation "
                                        f"{_plain(lc.activation)!r} to a store where it has {m['activation']!r}.")
            check_unit_shape(lc.site, lc.unit_shape, m["unit_shape"], (self.selection or {}).get("kind", ""))

    # -------------------------------------------------------------------------------------------- writing
    def append(self, codes: SplineCodes, *, row_offset: int | None = None, n_examples: int | None = None) -> None:
        """Append one chunk of rows and record it in the manifest.

        ``row_offset`` (default: the next example index) is added to each row's example index; ``n_examples`` is
        the number of examples the chunk covers (default: ``codes.meta["n_examples"]``).
        """
        _check_codes(codes, "CodeStoreWriter.append")
        if self.group is None:
            self._open(codes)
        if list(codes.layers) != self.names:
            raise InvalidInputError(f"Cannot append codes of sites {list(codes.layers)} to a store of {self.names}.")
        self._check_like_store(codes)
        start = self.next_example if row_offset is None else row_offset
        n_ex = int(codes.meta.get("n_examples", len(codes)) if n_examples is None else n_examples)
        r0, n = self.n_rows, len(codes)
        rows = codes.rows + np.array([start, 0])
        parts = [rows]
        for m, lc in zip(self.layer_meta, codes.layers.values()):
            parts.append(lc.packed)
            if m["soft"]:
                parts.append(lc.soft.astype(np.float16))
        try:
            for arr, data in zip(self._arrays(), parts):
                arr.resize((r0 + n, *arr.shape[1:]))
                arr[r0:r0 + n] = data
            active = {lc.site: list(active_counts(lc)) for lc in codes.layers.values()}
            self.chunks.append({"start_example": start, "n_examples": n_ex, "row_start": r0, "n_rows": n,
                                "sha256": self._checksum(r0, n), "active": active})
            self._write_manifest()
        except OSError as e:
            if not self.resume:
                self.abort()
            raise PolytopeLensError(f"Writing the store failed: {e.strerror or e}"
                                    + (" (the partial store is kept; run again with --resume)." if self.resume
                                       else "; nothing was written.")) from None

    def abort(self) -> None:
        _remove_partial(self.tmp)

    def close(self) -> Path:
        """Write the metadata and move the store into place; returns its path. Closing twice is harmless."""
        if getattr(self, "_closed", False):
            return self.path
        if self.group is None:
            self.abort()
            raise InvalidInputError("No codes were written; the store was not created.")
        exact = all(m["exact"] for m in self.layer_meta)
        try:  # the manifest stays until the store is in place: a refused publish leaves a resumable partial store
            self.group.attrs.update({
                **self.meta, "format": FORMAT, "version": _version(), "n_rows": self.n_rows, "exact": exact,
                "dtype": self.dtype, "selection": self.selection, "layers": self.layer_meta,
                "fingerprint": self.fingerprint, "chunks": self.chunks,
            })
            publish(self.tmp, self.path, "codes", overwrite=self.overwrite)
        except BaseException:
            if not self.resume and os.path.lexists(self.tmp):
                self.abort()
            raise
        (self.path / self.MANIFEST).unlink(missing_ok=True)
        self._closed = True
        return self.path


def check_destination(path, *, overwrite: bool = False, inputs=()) -> None:
    """Raise the one-line error a new code store at ``path`` would meet (``_outputs.check_destination``)."""
    _check_output(path, "codes", overwrite=overwrite, inputs=inputs)


def _version() -> str:
    from . import __version__

    return __version__


def write_codes(codes: SplineCodes, path, *, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``codes`` (a ``SplineCodes``) to a new zarr store at ``path`` (atomically); returns the path.

    ``meta``: extra JSON attributes, read back in ``read_codes(path).meta`` (see ``CodeStoreWriter``)."""
    _check_codes(codes, "write_codes")
    meta = check_meta(meta, "write_codes")
    with CodeStoreWriter(path, meta=meta, overwrite=overwrite) as w:
        w.append(codes)
    return Path(path)


def _damaged(path, what: str) -> InvalidInputError:
    return InvalidInputError(f"{str(path)!r} is a damaged polytope-lens code store: {what}.")


def _stored_array(group, key: str, path) -> np.ndarray:
    """The array ``key`` of an open store, or a one-line error naming the store and the array missing or damaged."""
    try:
        return np.asarray(group[key][:])
    except KeyError:  # zarr: no such array (its folder or its zarr.json removed)
        raise _damaged(path, f"its array {key!r} is missing") from None
    except (RuntimeError, ValueError, OSError) as e:  # a cut or altered chunk (codec errors), unreadable metadata
        raise _damaged(path, f"its array {key!r} cannot be read ({type(e).__name__}: {first_line(e)})") from None


def read_codes(path) -> SplineCodes:
    """Read a store written by ``write_codes`` / ``CodeStoreWriter`` back into ``SplineCodes``.

    A store that is not one is refused in one line; so is a damaged one (an array, a chunk or an attribute missing or
    unreadable), naming the store and the damage."""
    zarr = _zarr()
    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception:
        raise InvalidInputError(f"{str(path)!r} is not a polytope-lens code store.") from None
    attrs = dict(g.attrs)
    if attrs.get("format") != FORMAT:
        raise InvalidInputError(f"{str(path)!r} is not a polytope-lens code store (format {attrs.get('format')!r}).")
    missing = [k for k in ("layers", "selection", "dtype") if k not in attrs]
    if missing:
        raise _damaged(path, f"its zarr.json attributes lack {', '.join(map(repr, missing))}")
    try:
        sites = [(m["site"], m["alias"], m["activation"], m["n_units"], tuple(m["unit_shape"]), m["key"],
                  bool(m["soft"])) for m in attrs["layers"]]
    except (KeyError, TypeError) as e:
        raise _damaged(path, f"its zarr.json attribute 'layers' is malformed ({type(e).__name__}: {first_line(e)})") \
            from None
    rows = _stored_array(g, "rows", path)
    stored = [rows]  # in the order the writer's checksums read them (``CodeStoreWriter._arrays``)
    layers = {}
    for site, alias, activation, n_units, unit_shape, key, has_soft in sites:
        codes = _stored_array(g, f"codes/{key}", path)
        stored.append(codes)
        soft = None
        if has_soft:
            stored.append(_stored_array(g, f"soft/{key}", path))
            soft = np.asarray(stored[-1], dtype=np.float32)
        layers[site] = LayerCodes(site, alias, activation, n_units, unit_shape, codes, soft)
    _check_chunks(attrs.get("chunks"), stored, path)
    keep = {k: v for k, v in attrs.items() if k not in ("layers", "selection", "dtype", "format", "chunks")}
    return SplineCodes(layers, rows, attrs["selection"], attrs["dtype"], keep)


def _check_chunks(chunks, stored: list[np.ndarray], path) -> None:
    """The store's rows against the checksums its writer recorded per chunk: a chunk file deleted or replaced reads
    as zeros or as other codes without any error from zarr (a missing chunk is its fill value)."""
    if not isinstance(chunks, list):
        raise _damaged(path, "its zarr.json attribute 'chunks' (the checksums of its rows) is missing or malformed")
    covered = 0
    for i, c in enumerate(chunks):
        try:
            start, n, want = int(c["row_start"]), int(c["n_rows"]), str(c["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(path, f"its zarr.json attribute 'chunks' is malformed ({type(e).__name__}: "
                                 f"{first_line(e)})") from None
        if start != covered or _rows_sha256(stored, start, n) != want:
            raise _damaged(path, f"rows {start} to {start + n - 1} (chunk {i}) do not match the checksum its writer "
                                 "recorded (a chunk file deleted, cut or replaced)")
        covered = start + n
    if covered != len(stored[0]):
        raise _damaged(path, f"its checksums cover {covered:,} of its {len(stored[0]):,} rows")
