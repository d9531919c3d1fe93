"""Spline codes: the piece every unit is in, for chosen layers, packed into bits; and distances between codes.

``spline_codes(model, inputs, layers=...)`` runs the model under ``capture`` and asks the kink registry which piece
each unit of each selected site is in. Codes are packed per row:

* ordered pieces (ReLU family, ReLU6/Hardtanh, threshold codes of smooth activations) use a *thermometer* code,
  ``n_pieces - 1`` bits per unit (1 bit for ReLU, 2 bits for ReLU6): bit j is set when the unit is above kink j, so
  the Hamming distance between two codes is the number of kinks that separate them, unit by unit;
* categorical pieces (argmax of a max-pool window) use ``ceil(log2(n_pieces))`` bits of the piece index.

Bits are *planar*: a site's row holds bit 0 of every unit, then bit 1 of every unit, and so on (bit j of unit u is
bit ``j * units + u``), little-endian within each byte; each site starts on a byte boundary and padding bits are
zero, so concatenating sites byte-wise keeps Hamming and Jaccard distances exact. Planes let each kink be coded by one
contiguous comparison.

What a *row* is comes from the unit selection (``units=``): one example with every unit (``"all"``), the channel
vector at one spatial position per image (``"position"``, the paper's CNN protocol), k evenly spaced tokens per
sequence after the first m (``"tokens"``, the paper's token protocol), or every real token (``"all-tokens"``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ._transfer import to_host, wait_for_copies
from .capture import (CallSite, StopForward, as_module, batched_values, check_capture_kwargs, default_forward,
                      eval_mode, float_dtype, input_tensors, is_batched, list_sites, model_errors, run, select_sites)
from .errors import InvalidInputError, is_int, is_real
from .kinks import Activation, ScalarKinks

__all__ = [
    "LayerCodes",
    "SplineCodes",
    "UnitSelection",
    "spline_codes",
    "CodeExtractor",
    "pack_pieces",
    "pack_bits",
    "pack_unit_inputs",
    "unpack_pieces",
    "hamming",
    "jaccard",
    "token_positions",
]


# ------------------------------------------------------------------------------------------------ packing
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (rows, n_bits) into uint8 (rows, ceil(n_bits / 8)), little-endian within each byte."""
    if bits.device.type == "cpu":
        return torch.from_numpy(np.packbits(bits.numpy(), axis=1, bitorder="little"))
    return _pack_bits_words(bits)


_GATHER_BYTES = 0x0102040810204080  # times 8 bytes of 0/1, its top byte is sum_i byte_i << i (no carries)


def _pack_bits_words(bits: torch.Tensor) -> torch.Tensor:
    """``pack_bits`` on any device: every 8 bools read as one int64 word and gathered into its top byte by one
    multiplication (two elementwise passes over the words, about 3 bytes of memory traffic per bit; the weighted
    sum over a trailing axis of 8 it replaces ran at a tenth of a GPU's bandwidth)."""
    pad = (-bits.shape[1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.contiguous()
    if bits.storage_offset() % 8 or (len(bits) and bits.stride(0) != bits.shape[1]):
        # int64 words must start on 8-byte boundaries; a one-row view counts as contiguous whatever its row stride
        bits = torch.empty(bits.shape, dtype=bits.dtype, device=bits.device).copy_(bits)
    words = bits.view(torch.uint8).view(torch.int64)
    return (words * _GATHER_BYTES).bitwise_right_shift_(56).to(torch.uint8)


def pack_pieces(pieces: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Pack integer pieces (rows, units) into uint8 bytes (rows, ceil(units * bits / 8)), planar, on the pieces'
    device."""
    bits = activation.bits_from_pieces(pieces.reshape(len(pieces), math.prod(pieces.shape[1:])))  # rows, units, bits
    return pack_bits(bits.transpose(1, 2).reshape(pieces.shape[0], bits.shape[1] * bits.shape[2]))


def pack_unit_inputs(activation: Activation, z: torch.Tensor, buffer: torch.Tensor | None = None):
    """Packed codes of unit inputs ``z`` (rows, ...) of an elementwise activation, as ``pack_pieces`` would give
    them, without forming pieces: one contiguous comparison per kink into a bit plane of ``buffer`` (rows, kinks,
    units; reused when its shape fits, so no fresh pages are faulted in). Returns ``(packed, buffer)``."""
    kinks = getattr(activation, "kinks", None)
    z2 = z.reshape(len(z), math.prod(z.shape[1:]))  # also a batch without rows
    if kinks is None or not activation.ordered:
        return pack_pieces(activation.pieces(z2), activation), buffer
    if buffer is None or buffer.shape != (len(z2), len(kinks), z2.shape[1]) or buffer.device != z.device:
        buffer = torch.empty(len(z2), len(kinks), z2.shape[1], dtype=torch.bool, device=z.device)
    if z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64):
        zn, bn = z2.detach().numpy(), buffer.numpy()  # numpy's contiguous comparison is the fastest on the CPU
        for j, k in enumerate(kinks):
            np.greater(zn, k, out=bn[:, j])
    else:
        for j, k in enumerate(kinks):
            torch.gt(z2, k, out=buffer[:, j])
    return pack_bits(buffer.reshape(len(z2), buffer.shape[1] * buffer.shape[2])), buffer


def unpack_pieces(packed: np.ndarray, n_units: int, activation: Activation | Mapping) -> np.ndarray:
    """Inverse of ``pack_pieces``: int64 pieces (rows, n_units) from packed (planar) bytes."""
    desc = activation.describe() if isinstance(activation, Activation) else activation
    n_pieces, ordered = int(desc["n_pieces"]), bool(desc["ordered"])
    bpu = n_pieces - 1 if ordered else max(1, math.ceil(math.log2(n_pieces)))
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, bitorder="little")[:, : n_units * bpu]
    bits = bits.reshape(len(packed), bpu, n_units).astype(np.int64)
    if ordered:
        return bits.sum(1)
    return (bits << np.arange(bpu)[:, None]).sum(1)


# ------------------------------------------------------------------------------------------- unit selection
@dataclass(frozen=True)
class UnitSelection:
    """Which units of a site make up a code, and what a row is.

    Parameters
    ----------
    kind : {"all", "position", "tokens", "all-tokens"}
        ``all``: one row per example, every unit flattened. ``position``: one row per image, the channel vector at
        ``position`` (fractions of height and width, the paper's CNN protocol). ``tokens``: ``k`` evenly spaced
        content tokens per sequence, skipping the first ``skip`` of them (the paper's token protocol: k=6,
        skip=100). ``all-tokens``: every content token. Content tokens are those the attention mask marks (a
        ``ModelInputs`` mask also leaves out special tokens such as [CLS] and [SEP]).
    """

    kind: str = "all"
    position: tuple[float, float] = (0.5, 0.5)
    k: int = 6
    skip: int = 100

    KINDS = ("all", "position", "tokens", "all-tokens")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise InvalidInputError(f"The 'units' parameter must be one of {', '.join(self.KINDS)}. Got {self.kind!r}.")
        if not (is_int(self.k) and is_int(self.skip)) or self.k < 1 or self.skip < 0:
            raise InvalidInputError(f"Token protocol needs ints k >= 1 and skip >= 0. Got k={self.k!r}, "
                                    f"skip={self.skip!r}.")
        pos = self.position
        if not (isinstance(pos, (tuple, list, np.ndarray)) and len(pos) == 2
                and all(is_real(p) and 0.0 <= p <= 1.0 for p in pos)):
            raise InvalidInputError(f"The 'position' must be two fractions in [0, 1]. Got {self.position}.")
        object.__setattr__(self, "position", tuple(float(p) for p in pos))  # a list or array given: a tuple kept

    def fits(self, site: CallSite) -> bool:
        """Whether the site's unit tensor has the layout this selection needs (any, 4-D images, 3-D tokens)."""
        need = {"all": None, "position": 4, "tokens": 3, "all-tokens": 3}[self.kind]
        return need is None or len(site.shape) == need

    def rows(self, batch: int, mask: torch.Tensor | None) -> np.ndarray:
        """(n_rows, 2) int64: [example index within batch, token position or -1]."""
        if self.kind in ("all", "position"):
            return np.stack([np.arange(batch), np.full(batch, -1)], axis=1)
        if mask is None:
            raise InvalidInputError(f"The {self.kind!r} unit selection needs a text model (token sequences).")
        if self.kind == "all-tokens":  # every content position, example by example: one pass, not a Python loop
            return torch.nonzero(mask.cpu()).numpy().astype(np.int64).reshape(-1, 2)
        out = []
        for i in range(batch):
            valid = torch.nonzero(mask[i]).flatten().tolist()  # content positions, in order
            chosen = token_positions(len(valid), self.k, self.skip) if self.kind == "tokens" else range(len(valid))
            out.extend((i, valid[j]) for j in chosen)
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)

    def apply(self, site: CallSite, t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Units of tensor ``t`` (batch first) for the given rows: (n_rows, n_units)."""
        if self.kind == "all":
            return t.reshape(t.shape[0], -1)
        if self.kind == "position":
            if t.dim() != 4:
                raise InvalidInputError(
                    f"The 'position' unit selection needs (batch, channels, height, width) activations; site "
                    f"{site.name!r} has shape {tuple(t.shape)}. Use units='all' for it."
                )
            h = round(self.position[0] * (t.shape[2] - 1))
            w = round(self.position[1] * (t.shape[3] - 1))
            return t[:, :, h, w]
        if t.dim() != 3:
            raise InvalidInputError(
                f"Token unit selections need (batch, pos, units) activations; site {site.name!r} has shape "
                f"{tuple(t.shape)}."
            )
        if self.kind == "all-tokens" and len(rows) == t.shape[0] * t.shape[1]:  # every position, in order: a view
            return t.reshape(len(rows), *t.shape[2:])
        idx = torch.as_tensor(rows, device=t.device)
        return t[idx[:, 0], idx[:, 1]]

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == "position":
            d["position"] = list(self.position)
        if self.kind == "tokens":
            d.update(k=self.k, skip=self.skip)
        return d


def site_unit_indices(site: CallSite, shape: tuple, units, owner: str) -> torch.Tensor:
    """Flat indices of the units of ``site`` (unit tensor ``shape``, batch excluded) that a path or slice follows:
    distinct indices in the order given, or ``"position"``: the channel vector at the centre position of a (C, H, W)
    site, the same units as the codes' ``UnitSelection("position")`` (the paper's CNN protocol).

    Raises
    ------
    InvalidInputError
        Not an elementwise (scalar-kink) site, an unknown string, or indices out of range or repeated.
    """
    if not isinstance(site.activation, ScalarKinks):
        raise InvalidInputError(f"The 'units' parameter of {owner} needs an elementwise last site; {site.name!r} is "
                                f"{site.activation.name}.")
    d = math.prod(shape)
    if isinstance(units, str):
        if units != "position" or len(shape) != 3:
            raise InvalidInputError(f"The 'units' parameter of {owner} must be unit indices or 'position' (for a site "
                                    f"of shape (C, H, W)). Got {units!r} for {site.name!r} of shape {tuple(shape)}.")
        flat = torch.arange(d).reshape(1, *shape)
        return UnitSelection("position").apply(site, flat, None)[0]
    arr = np.asarray(units)
    if arr.dtype.kind not in "iu" and arr.size:  # 1.9 or True would have been read as unit 1
        raise InvalidInputError(f"The 'units' parameter of {owner} must hold integer unit indices of {site.name!r}. "
                                f"Got {arr.dtype} values ({arr.ravel()[0]!r} ...).")
    idx = torch.as_tensor(arr.astype(np.int64)).flatten()
    bad = idx[(idx < 0) | (idx >= d)]
    if not len(idx) or len(bad) or len(torch.unique(idx)) != len(idx):
        why = ("none" if not len(idx) else f"{bad[0].item()} (out of range)" if len(bad) else
               f"{len(idx) - len(torch.unique(idx))} repeated")
        raise InvalidInputError(f"The 'units' parameter of {owner} must hold distinct indices in [0, {d}) of "
                                f"{site.name!r}'s units. Got {len(idx)} indices: {why}.")
    return idx


def token_positions(length: int, k: int = 6, skip: int = 100) -> list[int]:
    """k evenly spaced positions in [skip, length - 1] (rounded); fewer (or none) when the sequence is short."""
    if length <= skip:
        return []
    return sorted({int(round(p)) for p in np.linspace(skip, length - 1, k)})


def _as_selection(units) -> UnitSelection:
    if isinstance(units, UnitSelection):
        return units
    if isinstance(units, str):
        return UnitSelection(units)
    raise InvalidInputError(f"The 'units' parameter must be a UnitSelection or one of {UnitSelection.KINDS}. "
                            f"Got {units!r}.")


# -------------------------------------------------------------------------------------------------- results
@dataclass
class LayerCodes:
    """Packed codes of one call site.

    Attributes
    ----------
    site, alias : str
        Canonical site name and TransformerLens alias (or None).
    activation : dict
        Registry description (name, n_pieces, kinks, exact, ordered).
    n_units : int
        Units per row.
    unit_shape : tuple
        Shape of one row's units before flattening (e.g. (C, H, W) or (C,)).
    packed : np.ndarray, uint8 (rows, n_bytes)
    soft : np.ndarray or None, float32 (rows, n_units)
        Soft codes in (0, 1) for smooth activations, when requested.
    """

    site: str
    alias: str | None
    activation: dict
    n_units: int
    unit_shape: tuple
    packed: np.ndarray
    soft: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        return bool(self.activation["exact"])

    def __repr__(self) -> str:
        return (f"LayerCodes({self.site!r}, {self.activation['name']}, {len(self.packed)} rows x {self.n_units} units, "
                f"{'exact' if self.exact else 'threshold codes'}{', soft' if self.soft is not None else ''})")

    @property
    def bits_per_unit(self) -> int:
        n, ordered = self.activation["n_pieces"], self.activation["ordered"]
        return n - 1 if ordered else max(1, math.ceil(math.log2(n)))

    def pieces(self) -> np.ndarray:
        """Unpacked piece index per unit, int64 (rows, n_units)."""
        return unpack_pieces(self.packed, self.n_units, self.activation)


@dataclass
class SplineCodes:
    """Codes of several sites over the same rows.

    Attributes
    ----------
    layers : dict[str, LayerCodes]
        In execution order.
    rows : np.ndarray, int64 (n_rows, 2)
        [example index, token position or -1] of each row.
    selection : dict
        The unit selection used.
    exact : bool
        True when every site is piecewise linear (codes name true polytopes); False when any is a threshold code
        of a smooth activation.
    """

    layers: dict[str, LayerCodes]
    rows: np.ndarray
    selection: dict
    dtype: str
    meta: dict = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return all(lc.exact for lc in self.layers.values())

    def __repr__(self) -> str:
        return (f"SplineCodes({len(self)} rows, {len(self.layers)} sites: {', '.join(list(self.layers)[:4])}"
                f"{', ...' if len(self.layers) > 4 else ''}; {'exact' if self.exact else 'not exact'}, {self.dtype})")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> LayerCodes:
        return self.layers[name]

    def concat(self, names: list[str] | None = None) -> np.ndarray:
        """Packed codes of several sites side by side (rows, sum of n_bytes): the network code of each row."""
        names = list(self.layers) if names is None else names
        return np.concatenate([self.layers[n].packed for n in names], axis=1)

    def summary(self) -> dict:
        """JSON-safe description without the codes themselves."""
        return {
            "rows": len(self),
            "exact": self.exact,
            "dtype": self.dtype,
            "selection": self.selection,
            "layers": [
                {"site": lc.site, "alias": lc.alias, "activation": lc.activation["name"], "exact": lc.exact,
                 "n_units": lc.n_units, "unit_shape": list(lc.unit_shape), "bits_per_unit": lc.bits_per_unit,
                 "bytes_per_row": int(lc.packed.shape[1]),
                 "fraction_active": fraction_active(lc.activation["name"], *active_counts(lc))}
                for lc in self.layers.values()
            ],
            **self.meta,
        }

    def _repr_html_(self) -> str:
        from .report.html import rows_table, summary_html

        d = self.summary()
        kind = "exact: every site piecewise linear" if d["exact"] else "threshold codes of smooth sites (not exact)"
        return summary_html(
            f"SplineCodes: {d['rows']} rows, {len(d['layers'])} sites ({kind})",
            {"dtype": d["dtype"], "units": ", ".join(f"{k}={v}" for k, v in d["selection"].items())},
            rows_table(["site", "alias", "activation", "exact", "units", "bits per unit", "bytes per row",
                        "share off the first piece"],
                       [[x["site"], x["alias"], x["activation"], x["exact"], x["n_units"], x["bits_per_unit"],
                         x["bytes_per_row"], x["fraction_active"]] for x in d["layers"]]))


def active_counts(lc: LayerCodes) -> tuple[int, int]:
    """(units off their first piece, units) over the rows of ``lc``."""
    on = lc.pieces() > 0
    return int(on.sum()), int(on.size)


def fraction_active(activation: str, on: int, total: int) -> float | None:
    """The share of units off their first piece (a ReLU's: on), or None for max pooling, whose pieces are window
    entries (no piece is 'active')."""
    return None if activation.startswith("max_pool") else on / max(1, total)


# ------------------------------------------------------------------------------------------------ extraction
Inputs = "torch.Tensor | Mapping[str, torch.Tensor]"


def _batches(inputs, batch_size: int) -> Iterator[tuple[object, torch.Tensor | None, int]]:
    """Yield (model inputs, attention mask or None, batch length) slices along dim 0 (a mapping's values without a
    batch axis go to every batch as they are)."""
    mask_all = getattr(inputs, "attention_mask", None)
    tensors = getattr(inputs, "tensors", inputs)
    n = batched_values(tensors, "spline_codes")[0].shape[0]
    if isinstance(tensors, torch.Tensor):
        tokens = tensors.dim() == 2 and not tensors.is_floating_point()  # token ids: every position is real
        for s in range(0, n, batch_size):
            part = tensors[s:s + batch_size]
            yield part, (torch.ones(part.shape, dtype=torch.bool) if tokens else None), min(batch_size, n - s)
        return
    if mask_all is None and "attention_mask" in tensors:
        mask_all = tensors["attention_mask"]
    for s in range(0, n, batch_size):
        part = {k: v[s:s + batch_size] if is_batched(v) else v for k, v in tensors.items()}
        mask = None if mask_all is None else mask_all[s:s + batch_size].bool()
        yield part, mask, min(batch_size, n - s)


def _joined(parts: list[torch.Tensor]) -> np.ndarray:
    """The batches' rows as one array; a single batch is returned as is (a copy of millions of code bytes costs
    as much as a page-faulting pass over them)."""
    return parts[0].numpy() if len(parts) == 1 else torch.cat(parts).numpy()


def _check_inputs(inputs) -> int:
    values = batched_values(getattr(inputs, "tensors", inputs), "spline_codes")
    n = values[0].shape[0]
    if n == 0:
        raise InvalidInputError("The inputs are empty (batch size 0); give at least one example.")
    for v in values:
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise InvalidInputError(f"The inputs contain {bad} NaN or infinite values; codes are undefined there.")
    return n


class CodeExtractor:
    """Spline codes of chosen sites of one model, for any number of input batches.

    Sites are resolved once (on the first example seen) and reused, so a data set can be coded chunk by chunk.
    Parameters are those of ``spline_codes``.
    """

    def __init__(self, model: nn.Module, *, layers: str | list[str] | None = None,
                 units: str | UnitSelection = "all", soft: bool = False, batch_size: int = 64,
                 forward: Callable[[object], object] | None = None, **capture_kwargs):
        check_capture_kwargs(CodeExtractor, capture_kwargs)
        if not is_int(batch_size) or batch_size < 1:
            raise InvalidInputError(
                f"The 'batch_size' parameter of spline_codes must be an int >= 1. Got {batch_size!r}.")
        self.model, self.layers, self.soft, self.batch_size = as_module(model, "spline_codes"), layers, soft, batch_size
        self.selection = _as_selection(units)
        self.forward = forward or default_forward(self.model)
        self.capture_kwargs = capture_kwargs
        self.sites: list[CallSite] | None = None
        self.model_errors = True  # the model's errors on the inputs as one line (off where a caller says it better)
        self._bit_buffers: dict[str, torch.Tensor] = {}

    def resolve_sites(self, inputs) -> list[CallSite]:
        """The selected sites, found with forward passes of the first example of ``inputs`` repeated twice and three
        times: a site whose unit input has no row per example in both (a nonlinearity of parameters alone,
        ``softplus(raw_scale)``, or of rows regrouped across examples, ``relu(stack([a, b]))``) has no codes to give;
        it is left out of all sites, and an error when ``layers`` names it."""
        if self.sites is None:
            first, _, _ = next(_batches(inputs, 1))

            def repeated(n):
                batch = {k: torch.cat([v] * n) if is_batched(v) else v for k, v in first.items()} if isinstance(
                    first, Mapping) else torch.cat([first] * n)
                return list_sites(self.model, lambda: self.forward(batch), **self.capture_kwargs)

            found = repeated(2)
            rows_of_3 = {s.name for s in repeated(3) if len(s.shape) and s.shape[0] == 3} if found else set()
            per_example = [s for s in found if len(s.shape) and s.shape[0] == 2 and s.name in rows_of_3]
            if not found:
                raise InvalidInputError(
                    "The model applies no nonlinearity the kink registry knows; there is nothing to code.")
            if self.layers is None:  # all sites that fit the selection (a BERT pooler has no token axis)
                found = [s for s in per_example if self.selection.fits(s)] or per_example
                if not found:
                    raise InvalidInputError("No nonlinearity of the model has one row per example along its first axis "
                                            "(they apply to parameters alone, or to rows stacked or regrouped "
                                            "across examples); there is nothing to code.")
            self.sites = select_sites(found, self.layers)
            stray = [s for s in self.sites if s not in per_example]
            if stray:
                raise InvalidInputError(
                    f"Site {stray[0].name!r} has no row per example (its unit input of shape {tuple(stray[0].shape)} "
                    "is computed from parameters alone, or stacks or regroups rows across examples): it has no spline "
                    "codes; leave it out of 'layers'.")
        return self.sites

    def __call__(self, inputs, progress: Callable[[int], None] | None = None, allow_empty: bool = False,
                 first: int = 0) -> SplineCodes:
        """The codes of ``inputs``; ``allow_empty``: a chunk of a larger data set may select no rows (its short
        sequences), which is then the caller's to check over the whole set (``no_rows_error``); ``first``: the data
        set's index of ``inputs``' first example (named in errors). The model runs in eval mode (``eval_mode``)."""
        if progress is not None and not callable(progress):
            raise InvalidInputError(f"The 'progress' parameter of spline_codes must be None or a callable taking the "
                                    f"number of rows just coded. Got {progress!r}.")
        if not hasattr(inputs, "tensors"):  # a bundle's Inputs keep their attention mask
            inputs = input_tensors(inputs, float_dtype(self.model))
        n_total = _check_inputs(inputs)
        one, _, _ = next(_batches(inputs, 1))
        guard = model_errors(self.forward, one, "spline_codes", "inputs") if self.model_errors else nullcontext()
        with eval_mode(self.model), guard:
            return self._code(inputs, n_total, progress, allow_empty, first)

    def _code(self, inputs, n_total: int, progress, allow_empty: bool, first: int) -> SplineCodes:
        wanted = {s.name: s for s in self.resolve_sites(inputs)}
        selection, soft = self.selection, self.soft
        chunks: dict[str, list] = {n: [] for n in wanted}
        softs: dict[str, list] = {n: [] for n in wanted}
        shapes: dict[str, tuple] = {}
        all_rows, offset, dtype = [], 0, None
        for batch, mask, blen in _batches(inputs, self.batch_size):
            rows = selection.rows(blen, mask)
            done = set()

            def handler(site: CallSite, z: torch.Tensor):
                nonlocal dtype
                if site.name not in wanted:
                    return None
                dtype = dtype or str(z.dtype).replace("torch.", "")
                act = site.activation
                if act.elementwise:  # select units first, then code only those
                    units = selection.apply(site, z, rows)
                    shape = z.shape[1:] if selection.kind == "all" else units.shape[1:]
                    packed, buf = pack_unit_inputs(act, units, self._bit_buffers.get(site.name))
                    self._bit_buffers[site.name] = buf  # reused by the next batch
                else:
                    full = act.pieces(z)
                    units = selection.apply(site, full, rows)
                    shape = full.shape[1:] if selection.kind == "all" else units.shape[1:]
                    packed = pack_pieces(units, act)
                check_unit_shape(site.name, shape, shapes.setdefault(site.name, tuple(shape)), selection.kind)
                chunks[site.name].append(to_host(packed))
                if soft:
                    s = act.soft(z)
                    if s is not None:
                        softs[site.name].append(selection.apply(site, s, rows).flatten(1).float().cpu())
                done.add(site.name)
                if len(done) == len(wanted):
                    raise StopForward  # every wanted site has been coded: skip the rest of the network
                return None

            run(self.model, lambda: self.forward(batch), handler, **self.capture_kwargs)
            wait_for_copies(parts[-1] for parts in chunks.values() if parts)
            if len(done) != len(wanted):
                raise InvalidInputError(
                    f"Sites {sorted(set(wanted) - done)} did not run on examples {first + offset}.."
                    f"{first + offset + blen - 1}; the "
                    "model's call graph depends on its input, which spline codes do not support.")
            all_rows.append(rows + np.array([offset, 0]))
            offset += blen
            if progress is not None:
                progress(blen)

        rows = np.concatenate(all_rows)
        if len(rows) == 0 and not allow_empty:
            raise no_rows_error(selection.to_dict())
        layers_out = {}
        for name, site in wanted.items():
            layers_out[name] = LayerCodes(
                name, site.alias, site.activation.describe(), int(np.prod(shapes[name])), shapes[name],
                _joined(chunks[name]), _joined(softs[name]) if softs[name] else None)
        return SplineCodes(layers_out, rows, selection.to_dict(), dtype or "unknown", {"n_examples": n_total})


def check_unit_shape(site: str, shape: tuple, before: tuple, selection: str) -> None:
    """Rows of one site must have one unit shape across batches and chunks; with ``units="all"`` a text model's
    token-level site is as long as each batch's longest sequence, so it does not."""
    if tuple(shape) != tuple(before):
        hint = (" With units='all' a token-level site is as long as each batch's longest sequence: use units='tokens' "
                "or 'all-tokens' (one row per token)." if selection == "all" else "")
        raise InvalidInputError(f"Site {site!r} gives units of shape {tuple(shape)} in one batch and {tuple(before)} "
                                f"in an earlier one, so its codes cannot be rows of one width.{hint}")


def no_rows_error(selection: dict) -> InvalidInputError:
    """The error for a unit selection (``UnitSelection.to_dict``) that found no rows in the whole data."""
    return InvalidInputError(f"No rows were selected: the {selection.get('kind')!r} selection found no positions (are "
                             f"all sequences shorter than skip={selection.get('skip')} tokens?).")


def spline_codes(model: nn.Module, inputs, *, layers: str | list[str] | None = None,
                 units: str | UnitSelection = "all", soft: bool = False, batch_size: int = 64,
                 forward: Callable[[object], object] | None = None, progress: Callable[[int], None] | None = None,
                 **capture_kwargs) -> SplineCodes:
    """Spline codes of ``model`` at ``inputs`` for the sites matching ``layers``.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model; its nonlinearities are found by intercepting their calls.
    inputs : Tensor (batch, ...) or mapping of tensors, or an object with ``.tensors`` and ``.attention_mask``
        Model inputs with a batch dimension (a mapping is passed as keyword arguments). Integer 2-D tensors are
        token ids (every position real).
    layers : str or list of str, optional
        Globs over site names or TransformerLens aliases (``"*relu*"``, ``"blocks.*.mlp.hook_pre"``); None = every
        site whose layout fits ``units`` (e.g. only token-level sites for the token protocol).
    units : {"all", "position", "tokens", "all-tokens"} or UnitSelection
        What a row is (see ``UnitSelection``).
    soft : bool
        Also return soft codes in (0, 1) for smooth activations.
    batch_size : int
        Examples per forward pass.
    forward : callable, optional
        ``forward(batch_inputs)`` to run instead of ``model(x)`` / ``model(**x)``.
    progress : callable, optional
        Called with the number of examples done in each batch.
    **capture_kwargs
        Passed to ``capture`` (``activation_modules``, ``declared_sites``, ``suppress``).

    Returns
    -------
    SplineCodes

    Raises
    ------
    InvalidInputError
        Empty or non-finite inputs, a layer pattern that matches nothing, a selection that does not fit a site.
    UnsupportedActivationError
        The model calls a nonlinearity the registry does not describe.

    Examples
    --------
    >>> mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> codes = spline_codes(mlp, torch.randn(5, 2))
    >>> codes["1.relu"].packed.shape   # 5 rows, 8 units of 1 bit
    (5, 1)
    """
    check_capture_kwargs(spline_codes, capture_kwargs)
    extractor = CodeExtractor(model, layers=layers, units=units, soft=soft, batch_size=batch_size, forward=forward,
                              **capture_kwargs)
    return extractor(inputs, progress=progress)


# ------------------------------------------------------------------------------------------------ distances
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _pairwise(a: np.ndarray, b: np.ndarray | None, fn, memory_bytes: int, owner: str) -> np.ndarray:
    from .cluster import _as_packed  # the clusterers' check: packed uint8 codes only (cluster imports this module)

    a = _as_packed(a, owner)
    b = a if b is None else _as_packed(b, owner)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InvalidInputError(f"Packed codes must be 2-D with the same number of bytes. Got {a.shape} and {b.shape}.")
    out = np.empty((len(a), len(b)), dtype=np.float64)
    step = max(1, memory_bytes // max(1, len(b) * a.shape[1] * 2))
    for s in range(0, len(a), step):
        out[s:s + step] = fn(a[s:s + step, None, :], b[None, :, :])
    return out


def hamming(a: np.ndarray, b: np.ndarray | None = None, *, memory_bytes: int = 256 << 20) -> np.ndarray:
    """Pairwise Hamming distances (number of differing bits) between packed codes: (len(a), len(b)).

    ``a``, ``b``: packed uint8 codes (rows, bytes), a ``SplineCodes`` (its ``concat()``) or a ``LayerCodes``; other
    arrays (unpacked pieces, ints, floats) are refused rather than cast.

    For thermometer-coded sites this is the number of kinks separating the two codes, summed over units.
    """
    return _pairwise(a, b, lambda x, y: _POPCOUNT[x ^ y].sum(-1, dtype=np.int64), memory_bytes, "hamming")


def jaccard(a: np.ndarray, b: np.ndarray | None = None, *, memory_bytes: int = 256 << 20) -> np.ndarray:
    """Pairwise Jaccard distances 1 - |x & y| / |x | y| between packed codes (0 when both are all-zero); inputs as
    in ``hamming``."""
    def fn(x, y):
        inter = _POPCOUNT[x & y].sum(-1, dtype=np.int64)
        union = _POPCOUNT[x | y].sum(-1, dtype=np.int64)
        return np.where(union > 0, 1.0 - inter / np.maximum(union, 1), 0.0)
    return _pairwise(a, b, fn, memory_bytes, "jaccard")
