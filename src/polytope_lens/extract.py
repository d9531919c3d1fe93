"""Spline codes of a model over a data set, chunk by chunk, in memory or streamed into a code store.

This is the glue between model/data specs (``models``, ``data``) and ``codes``: it encodes the data a chunk at a
time with the model's own conventions, codes each chunk with one ``CodeExtractor`` (sites resolved once), and
either concatenates the chunks or appends them to a ``CodeStoreWriter`` (published only when complete).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Callable, Iterator

import numpy as np
import torch

from .capture import check_kwargs, model_errors
from .codes import CodeExtractor, SplineCodes, UnitSelection, check_unit_shape, fraction_active, no_rows_error
from .errors import InvalidInputError, is_int
from .store import CodeStoreWriter

__all__ = ["extract_codes", "extract_to_store", "default_units", "chunk_coder"]


def _bundle(model):
    from .models import ModelBundle, load_model

    if isinstance(model, str):
        return load_model(model)
    if not isinstance(model, ModelBundle):
        raise InvalidInputError(f"The 'model' parameter takes a model spec (e.g. 'toy:mlp', 'file:PATH') or a "
                                f"ModelBundle from load_model; got {type(model).__name__}. For a module and tensors, "
                                "use polytope_lens.spline_codes.")
    return model


def _source(data, limit):
    """The data (a spec, or a DataSource) as a DataSource of at most ``limit`` items; a one-line error when it has
    none."""
    from .data import DataSource, check_limit, load_data

    if isinstance(data, str):
        data = load_data(data, limit=limit)
    elif not isinstance(data, DataSource):
        raise InvalidInputError(f"The 'data' parameter takes a data spec (e.g. 'digits', 'npy:PATH') or a DataSource "
                                f"from load_data; got {type(data).__name__}. For a module and tensors, use "
                                "polytope_lens.spline_codes.")
    elif limit is not None:
        check_limit(limit)  # as load_data does for a spec
        data = data.subset(slice(0, limit))
    if len(data) == 0:
        raise InvalidInputError(f"The data {getattr(data, 'spec', '?')!r} has no items.")
    return data


def content_digest(bundle, source) -> dict:
    """SHA-256 of the model's parameters and buffers and of the data's items and labels: a resumed store checks them,
    since a spec names a file, not what it holds (a ``file:`` model or ``npy:`` data replaced under the same path was
    appended to, mixing two models' codes in one store)."""
    data = hashlib.sha256(_values_bytes(source.items))
    if source.labels is not None:
        data.update(b"labels" + _values_bytes(np.asarray(source.labels)))
    return {"model_sha256": model_digest(bundle.module), "data_sha256": data.hexdigest()}


def model_digest(module) -> str:
    """SHA-256 (hex) of a module's parameters and buffers: the store fingerprint's ``model_sha256``, and what each
    Ray worker checks the model it loaded from the spec against (``distributed``)."""
    model = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        model.update(name.encode() + _state_bytes(value))
    return model.hexdigest()


def _state_bytes(value) -> bytes:
    """A state-dict entry as bytes: a tensor's values, a tuple's entries (a quantized layer's packed weight and
    bias), anything else (a dtype) by its repr."""
    if isinstance(value, torch.Tensor):
        return _tensor_bytes(value)
    if isinstance(value, (tuple, list)):
        return len(value).to_bytes(8, "little") + b"".join(_state_bytes(v) for v in value)
    raw = repr(value).encode()
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(t) -> bytes:
    """A tensor's values as bytes: sparse and compressed layouts densified, conjugate and negative views resolved;
    a tensor without values here (meta, nested) by its kind alone."""
    try:
        t = t.detach()
        head = f"{tuple(t.shape)}{t.dtype}{t.layout}".encode()
        if t.is_meta:
            return head + b"meta"
        if t.is_quantized:  # the integers and how they map to values
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scale = repr((t.q_scale(), t.q_zero_point())).encode()
            else:
                scale = (_tensor_bytes(t.q_per_channel_scales()) + _tensor_bytes(t.q_per_channel_zero_points())
                         + str(t.q_per_channel_axis()).encode())
            return head + scale + _tensor_bytes(t.int_repr())
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        return head + t.view(torch.uint8).numpy().tobytes()
    except Exception:  # noqa: BLE001 - nested tensors and other layouts: their kind stands for them
        return repr((type(t).__name__, getattr(t, "layout", None))).encode()


def _values_bytes(values) -> bytes:
    """Data items or labels as bytes that do not depend on the process: a numeric array whole (shape, dtype, values),
    else entry by entry (text as UTF-8, arrays as numeric arrays, anything else by its repr)."""
    if isinstance(values, str):
        raw = values.encode("utf-8", "surrogatepass")
        return len(raw).to_bytes(8, "little") + raw
    if isinstance(values, np.ndarray) and values.dtype != object:
        return f"{values.shape}{values.dtype}".encode() + np.ascontiguousarray(values).tobytes()
    if isinstance(values, (list, tuple, np.ndarray)):
        return len(values).to_bytes(8, "little") + b"".join(_values_bytes(v) for v in values)
    a = np.asarray(values)
    if a.dtype != object:
        return _values_bytes(a)
    raw = repr(values).encode()
    return len(raw).to_bytes(8, "little") + raw



def default_units(bundle) -> str:
    """Text models use the paper's token protocol; every other model codes all units of each example."""
    return "tokens" if bundle.modality == "text" else "all"


def _selection(bundle, units, k, skip, position) -> UnitSelection:
    if isinstance(units, UnitSelection):
        return units
    kind = default_units(bundle) if units in (None, "auto") else units
    return UnitSelection(kind, position=position, k=k, skip=skip)


def iter_code_chunks(model, data, *, layers=None, units="auto", k: int = 6, skip: int = 100,
                     position=(0.5, 0.5), soft: bool = False, batch_size: int = 32, max_length: int = 256,
                     limit: int | None = None, start: int = 0, progress: Callable[[int], None] | None = None,
                     ) -> Iterator[tuple[int, SplineCodes, object, object]]:
    """Yield ``(first example index, codes of the chunk, bundle, data)`` for consecutive chunks of ``data``.

    Chunks are ``batch_size`` examples each, starting at example ``start`` (a resumed run starts mid-way).
    """
    if not is_int(batch_size) or batch_size < 1:
        raise InvalidInputError(f"The 'batch_size' parameter must be an int >= 1. Got {batch_size!r}.")
    bundle, source = _bundle(model), _source(data, limit)
    selection = _selection(bundle, units, k, skip, position)
    code_chunk = chunk_coder(bundle, source, layers=layers, selection=selection, soft=soft, batch_size=batch_size,
                             max_length=max_length)
    for first in range(start, len(source), batch_size):
        yield first, code_chunk(first, progress), bundle, source


def data_errors(bundle, source, inputs):
    """``capture.model_errors`` for a bundle's encoded ``inputs`` of ``source``: a model that cannot take the data
    fails in one line naming the items' shape, not a traceback from inside it."""
    from .models import ModelInputs

    return model_errors(lambda t: bundle.forward(ModelInputs(t)), inputs.tensors,
                        f"the data {getattr(source, 'spec', '?')!r}", "items")


def chunk_coder(bundle, source, *, layers, selection: UnitSelection, soft: bool, batch_size: int, max_length: int,
                ) -> Callable[[int, Callable[[int], None] | None], SplineCodes]:
    """``code(first, progress)``: the codes of examples ``first .. first + batch_size - 1`` of ``source``.

    One ``CodeExtractor`` serves every chunk (sites resolved once). Single-process extraction and each Ray worker
    (``distributed``) code chunks with this same function, so their stores are identical.
    """
    from .models import ModelInputs

    extractor = CodeExtractor(bundle.module, layers=layers, units=selection, soft=soft, batch_size=batch_size,
                              forward=lambda t: bundle.forward(ModelInputs(t)))
    extractor.model_errors = False  # data_errors names the data set

    def code(first: int, progress: Callable[[int], None] | None = None) -> SplineCodes:
        idx = np.arange(first, min(first + batch_size, len(source)))
        inputs = bundle.encode(source, idx, max_length=max_length)
        with data_errors(bundle, source, inputs):
            return extractor(inputs, progress=progress, allow_empty=True, first=first)

    return code


def extract_codes(model, data, **kwargs) -> SplineCodes:
    """Spline codes of ``model`` (spec or ``ModelBundle``) over ``data`` (spec or ``DataSource``), in memory.

    Keyword arguments are those of ``extract_to_store`` except ``out``, ``overwrite``, ``resume``, ``ray_address``
    and ``ray_workers`` (in memory, in this process).
    """
    check_kwargs("extract_codes", kwargs, list(inspect.signature(iter_code_chunks).parameters))
    parts, offsets = [], []
    bundle = source = None
    for first, codes, bundle, source in iter_code_chunks(model, data, **kwargs):
        parts.append(codes)
        offsets.append(first)
    codes = _concat(parts, offsets, _meta(bundle, source))
    if not len(codes):  # a chunk may select no rows (short sequences); the whole data must select some
        raise no_rows_error(codes.selection)
    return codes


def extract_to_store(model, data, out, *, overwrite: bool = False, resume: bool = False, layers=None,
                     units="auto", k: int = 6, skip: int = 100, position=(0.5, 0.5), soft: bool = False,
                     batch_size: int = 32, max_length: int = 256, limit: int | None = None,
                     progress: Callable[[int], None] | None = None, ray_address: str | None = None,
                     ray_workers: int | None = None) -> dict:
    """Stream the spline codes of ``model`` over ``data`` into a new zarr store at ``out``; returns its summary.

    Parameters
    ----------
    model : str or ModelBundle
        Model spec (``"efficientnet-lite0"``, ``"minilm"``, ``"toy:2-64-2"`` ...) or a loaded bundle.
    data : str or DataSource
        Data spec (``"skimage"``, ``"pydoc"``, ``"digits"`` ...) or a loaded source.
    out : str or Path
        Destination folder; published only when complete (nothing appears there if the run fails).
    overwrite : bool
        Replace an existing code store (only a code store: anything else at ``out`` is an error).
    resume : bool
        Continue the partial store of an interrupted run with the same model, data, sites and batching (the result
        is identical to an uninterrupted run); without it a stale partial store is discarded.
    layers, units, k, skip, position, soft, batch_size, max_length, limit, progress
        As in ``spline_codes`` / ``UnitSelection``; ``units="auto"`` picks the token protocol for text models
        and all units otherwise; ``limit`` keeps N items of the data (``load_data``'s: the first N, for digits and
        fashion-mnist a class-balanced seeded sample).
    ray_address : str, optional
        Code the chunks on Ray workers (``pip install 'polytope-lens[scale]'``): ``"local"`` starts Ray on this
        machine, ``"auto"`` joins the running cluster, ``"HOST:PORT"`` / ``"ray://HOST:PORT"`` a given one (an
        already connected session is reused). Each worker loads the model from its spec (on a GPU when the
        cluster has them); this process writes the chunks in order through the same ``CodeStoreWriter``, so the
        store equals a single-process run's (on the same kind of device). See ``distributed``.
    ray_workers : int, optional
        Ray workers (default: one per GPU if the cluster has GPUs, else one per CPU); only with ``ray_address``.
        A model edited in memory after loading is refused with Ray (the workers load the spec's).
    """
    from .distributed import check_ray_options

    check_ray_options(ray_address, ray_workers, "codes")
    bundle, source = _bundle(model), _source(data, limit)  # an empty source refused before the writer, Ray or not
    selection = _selection(bundle, units, k, skip, position)
    fingerprint = {"model": bundle.spec, "data": source.spec, "n_items": len(source), "layers": layers,
                   "selection": selection.to_dict(), "soft": soft, "batch_size": batch_size,
                   "max_length": max_length, **content_digest(bundle, source)}
    writer = CodeStoreWriter(out, overwrite=overwrite, resume=resume, fingerprint=fingerprint,
                             meta=_meta(bundle, source))
    with writer:
        if progress is not None and writer.next_example:
            progress(writer.next_example)
        if ray_address is not None:
            from .distributed import ray_code_chunks

            chunks = ray_code_chunks(ray_address, bundle, source, layers=layers, selection=selection, soft=soft,
                                     batch_size=batch_size, max_length=max_length, start=writer.next_example,
                                     workers=ray_workers, progress=progress,
                                     model_sha256=fingerprint["model_sha256"])
        else:
            chunks = ((first, codes) for first, codes, _, _ in iter_code_chunks(
                bundle, source, layers=layers, units=selection, soft=soft, batch_size=batch_size,
                max_length=max_length, start=writer.next_example, progress=progress))
        try:
            for first, codes in chunks:
                writer.append(codes, row_offset=first)
        finally:  # an error here (the writer, progress, Ctrl-C) stops the Ray actors now, not when the
            chunks.close()  # traceback holding this frame is dropped (never, in a notebook)
        if not writer.n_rows:  # a chunk may select no rows (short sequences); the whole data must select some
            raise no_rows_error(selection.to_dict())
        path = writer.close()
    active = {m["site"]: [0, 0] for m in writer.layer_meta}
    for chunk in writer.chunks:
        for site, (on, total) in chunk["active"].items():
            active[site][0] += on
            active[site][1] += total
    return {
        "store": str(path), "rows": writer.n_rows, "exact": all(m["exact"] for m in writer.layer_meta),
        "dtype": writer.dtype, "selection": writer.selection, **writer.meta,
        "layers": [{**{key: m[key] for key in ("site", "alias", "n_units", "bits_per_unit", "exact")},
                    "activation": m["activation"]["name"],
                    "fraction_active": fraction_active(m["activation"]["name"], *active[m["site"]])}
                   for m in writer.layer_meta],
    }


def _meta(bundle, source) -> dict:
    return {"model": getattr(bundle, "spec", None), "model_provenance": getattr(bundle, "provenance", {}),
            "data": getattr(source, "spec", None), "data_provenance": getattr(source, "provenance", {})}


def _concat(parts: list[SplineCodes], offsets: list[int], meta: dict) -> SplineCodes:
    first = parts[0]
    layers = {}
    for name, lc in first.layers.items():
        for p in parts[1:]:
            check_unit_shape(name, p.layers[name].unit_shape, lc.unit_shape, first.selection.get("kind", ""))
        packed = np.concatenate([p.layers[name].packed for p in parts])
        soft = None if lc.soft is None else np.concatenate([p.layers[name].soft for p in parts])
        layers[name] = type(lc)(lc.site, lc.alias, lc.activation, lc.n_units, lc.unit_shape, packed, soft)
    rows = np.concatenate([p.rows + np.array([o, 0]) for p, o in zip(parts, offsets)])
    return SplineCodes(layers, rows, first.selection, first.dtype,
                       {"n_examples": sum(p.meta.get("n_examples", 0) for p in parts), **meta})
