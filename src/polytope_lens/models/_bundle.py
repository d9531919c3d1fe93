"""`ModelBundle` (a model plus what it takes to feed it) and `ModelInputs` (one encoded batch).

The bundle owns the model-specific input conventions: image size and pixel normalisation, tokenizer and
truncation, the keyword its ``forward`` expects, and which output is "the" output (logits of a classifier,
last hidden state of a text encoder). Analyses never need to know these details.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from polytope_lens.capture import call_forward, float_dtype, positional_parameters
from polytope_lens.data.arrays import real_array
from polytope_lens.errors import InvalidInputError, first_line

MODEL_MODALITIES = ("image", "text", "vector")


@dataclass
class ModelInputs:
    """One encoded batch, ready for `ModelBundle.forward`.

    Parameters
    ----------
    tensors : dict of str to torch.Tensor
        The module's arguments by parameter name, e.g. ``{"x": images}`` (batch, C, H, W; the key is the forward's
        argument, ``ModelBundle.input_name``) or
        ``{"input_ids": ..., "attention_mask": ...}`` (batch, pos).
    attention_mask : torch.Tensor or None
        (batch, pos) bool, True at content tokens (not padding, not special tokens such as [CLS]/[SEP]): the
        positions token protocols may pick. None for non-text inputs.
    tokens : list of list of str or None
        Token strings per sequence, one per position including padding; None for non-text inputs.
    """

    tensors: dict[str, torch.Tensor]
    attention_mask: torch.Tensor | None = None
    tokens: list[list[str]] | None = None

    def to(self, device: Any) -> "ModelInputs":
        """A copy with every tensor moved to `device`."""
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return ModelInputs({k: v.to(device) for k, v in self.tensors.items()}, mask, self.tokens)

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def __getitem__(self, rows) -> "ModelInputs":
        """The examples ``rows``, always as a batch: a slice (``x[:1]``), an int (a batch of one), integer indices or a
        boolean mask of ``len(x)`` entries."""
        n = len(self)
        if isinstance(rows, slice):
            pick = list(range(n)[rows])
        else:
            a = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
            if a.dtype == bool:
                if a.shape != (n,):
                    raise IndexError(f"a boolean mask of ModelInputs needs {n} entries; got shape {a.shape}")
                pick = np.flatnonzero(a).tolist()
            elif a.dtype.kind in "iu":
                pick = a.reshape(-1).tolist()
                bad = [i for i in pick if not -n <= i < n]
                if bad:
                    raise IndexError(f"row {bad[0]} out of range for ModelInputs of {n} examples")
                pick = [i % n for i in pick]
            else:
                raise IndexError(f"ModelInputs take a slice, integer rows or a boolean mask; got {a.dtype} {rows!r}")
        index = torch.as_tensor(pick, dtype=torch.long)

        def take(v):
            return v[index.to(v.device)]
        mask = None if self.attention_mask is None else take(self.attention_mask)
        tokens = None if self.tokens is None else [self.tokens[i] for i in pick]
        return ModelInputs({k: take(v) for k, v in self.tensors.items()}, mask, tokens)


def _position_offset(module: torch.nn.Module) -> int:
    """``padding_idx + 1`` for RoBERTa-style embeddings (a module with ``padding_idx`` and ``position_embeddings``,
    wherever it sits: a classifier holds it in ``roberta.embeddings``), which number positions from there; else 0."""
    for sub in module.modules():
        pad = getattr(sub, "padding_idx", None)
        if (isinstance(getattr(sub, "position_embeddings", None), torch.nn.Embedding) and isinstance(pad, int)
                and not isinstance(pad, bool) and pad >= 0):
            return pad + 1
    return 0


def forward_input_name(module: torch.nn.Module) -> str:
    """Name of the first parameter of ``module.forward`` (the keyword its main input goes by)."""
    names = positional_parameters(module) or ["*"]
    return "input" if names[0] == "*" else names[0]


def resize_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (C, H, W) so that it covers `size` (shorter side to the target, aspect kept), then centre-crop.

    Bilinear with antialiasing; an image already of the target size is returned unchanged.
    """
    th, tw = size
    h, w = image.shape[-2:]
    if (h, w) == (th, tw):
        return image
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)[0]
    top, left = (nh - th) // 2, (nw - tw) // 2
    return image[:, top: top + th, left: left + tw]


@dataclass
class ModelBundle:
    """A model in eval mode with its input conventions and provenance.

    Parameters
    ----------
    spec : str
        Canonical spec that reloads this model with `load_model`.
    module : torch.nn.Module
        The network, eval mode, float32.
    modality : {"image", "text", "vector"}
        What it reads.
    input_shape : tuple of int or None
        Per-example input shape for image/vector models, e.g. (3, 224, 224); None for text or when unknown.
    class_names : list of str or None
        Output class names when the model is a classifier.
    tokenizer : object or None
        Hugging Face tokenizer of a text model.
    provenance : dict
        JSON-safe: package, version, weights file, training details.
    normalize : callable or None
        Maps image pixels in [0, 1], (batch, C, H, W), to the model's input scale; None means identity.
    input_name : str
        Keyword under which the main input tensor is passed to ``module`` (``"input_ids"`` for HF text models).
    example_data : str or None
        Data spec the model is meant to read (what it was trained on), used where a command needs an example
        input and none is given; None: any data of its modality.
    """

    spec: str
    module: torch.nn.Module
    modality: str
    input_shape: tuple | None = None
    class_names: list[str] | None = None
    tokenizer: Any = None
    provenance: dict = field(default_factory=dict)
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    input_name: str = ""
    example_data: str | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODEL_MODALITIES:
            raise InvalidInputError(
                f"ModelBundle modality must be one of {', '.join(MODEL_MODALITIES)}; got {self.modality!r}."
            )
        if not self.input_name:
            self.input_name = "input_ids" if self.modality == "text" else forward_input_name(self.module)

    @property
    def device(self) -> torch.device:
        """Device of the module's first parameter (CPU for a parameter-free module)."""
        for param in self.module.parameters():
            return param.device
        return torch.device("cpu")

    def encode(self, data: Any, index: Any = None, *, max_length: int = 128) -> ModelInputs:
        """Turn items of a `DataSource` (all, or the rows in `index`) into model inputs on the CPU.

        Images are resized (shorter side) and centre-cropped to `input_shape`, a 1-channel image is repeated to
        3 channels when the model wants 3, then `normalize` is applied. Arrays are taken as model inputs as they
        are (cast to float32) and must match `input_shape`. Text is tokenised with truncation to `max_length` tokens
        and padding on the right, whatever side the tokenizer pads by default (a text's tokens are at positions 0, 1,
        ... in any batch).

        Parameters
        ----------
        data : DataSource
            The items to encode.
        index : int array, list of int or slice, optional
            Rows of `data` to encode; all rows by default.
        max_length : int
            Longest token sequence kept (text models only).

        Returns
        -------
        ModelInputs
            Tensors of batch size ``len(rows)``.
        """
        n_items = len(data)  # the error for a wrong item shape counts the data's items, not the batch's
        if index is not None:
            data = data.subset(index)
        if len(data) == 0:
            raise InvalidInputError(f"Nothing to encode: data {data.spec!r} selects 0 items.")
        if self.modality == "text":
            return self._encode_text(data, max_length)
        if data.modality == "text":
            raise InvalidInputError(
                f"Model {self.spec!r} reads {self.modality} inputs but data {data.spec!r} is text; "
                "choose an image or array data set."
            )
        if data.modality == "image" and self.modality == "image" and self.input_shape is not None:
            batch = torch.stack([self._prepare_image(item) for item in data.items])
            if self.normalize is not None:
                batch = self.normalize(batch)
            return ModelInputs({self.input_name: batch.contiguous()})
        return ModelInputs({self.input_name: self._as_array_batch(data, n_items)})

    def _prepare_image(self, item: Any) -> torch.Tensor:
        image = torch.as_tensor(np.asarray(item), dtype=torch.float32)
        channels = self.input_shape[0]
        if image.ndim != 3:
            raise InvalidInputError(
                f"Model {self.spec!r} expects images (C, H, W); got an item of shape {tuple(image.shape)}."
            )
        if image.shape[0] == 1 and channels == 3:
            image = image.expand(3, -1, -1)
        elif image.shape[0] != channels:
            raise InvalidInputError(
                f"Model {self.spec!r} expects {channels}-channel images {self.input_shape}; "
                f"got {image.shape[0]} channels (shape {tuple(image.shape)})."
            )
        return resize_crop(image, tuple(self.input_shape[1:]))

    def _as_array_batch(self, data: Any, n_items: int | None = None) -> torch.Tensor:
        items = data.items
        if not isinstance(items, np.ndarray):
            shapes = {np.shape(item) for item in items}
            if len(shapes) != 1:
                raise InvalidInputError(
                    f"Data {data.spec!r} has items of different shapes {sorted(shapes)[:3]}; model {self.spec!r} "
                    f"needs one shape {self.input_shape}."
                )
            items = np.stack([np.asarray(item) for item in items])
        items = real_array(items, f"Data {data.spec!r}")  # native byte order: torch refuses others
        if self.input_shape is not None and tuple(items.shape[1:]) != tuple(self.input_shape):
            guessed = ("; that shape was guessed from its first Linear layer: a model that reshapes its input first "
                       "needs ':input_shape=...' in its spec" if self.provenance.get("input_shape_from") ==
                       "first Linear" else "")
            raise InvalidInputError(
                f"Model {self.spec!r} expects inputs of shape {tuple(self.input_shape)} per example; data "
                f"{data.spec!r} has {len(items) if n_items is None else n_items} items of shape "
                f"{tuple(items.shape[1:])} (its first axis counts the examples){guessed}."
            )
        return torch.as_tensor(np.ascontiguousarray(items), dtype=self.float_dtype())

    def float_dtype(self) -> torch.dtype:
        """The dtype of the module's floating-point parameters or buffers (float32 when it has none): encoded arrays
        get it."""
        return float_dtype(self.module, torch.float32)

    def position_limit(self) -> int | None:
        """The most tokens a text model's position embeddings hold (Hugging Face ``max_position_embeddings`` or
        ``n_positions``, TransformerLens ``n_ctx``); None when it does not say. RoBERTa-style embeddings number
        positions from ``padding_idx + 1``, which that many fewer tokens fit."""
        n_ctx = getattr(getattr(self.module, "cfg", None), "n_ctx", None)  # TransformerLens: the offset counted
        if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
            return n_ctx
        config = getattr(self.module, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return max(1, value - _position_offset(self.module))
        return None

    def _encode_text(self, data: Any, max_length: int) -> ModelInputs:
        if data.modality != "text":
            raise InvalidInputError(
                f"Model {self.spec!r} reads text but data {data.spec!r} is {data.modality}; choose a text data set."
            )
        if self.tokenizer is None:
            raise InvalidInputError(f"Model {self.spec!r} has no tokenizer, so it cannot encode text.")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise InvalidInputError(f"The 'max_length' parameter of encode must be a positive int; got {max_length!r}.")
        limit = self.position_limit()
        max_length = max_length if limit is None else min(max_length, limit)  # longer text would index past them
        try:  # padded on the right whatever the tokenizer's default: each text's tokens keep positions 0, 1, ...,
            # so its codes, outputs and row positions do not depend on the other texts in its batch (models given
            # no position_ids number a left-padded text from its padding on)
            enc = self.tokenizer(list(data.items), padding=True, truncation=True, max_length=max_length,
                                 return_tensors="pt", return_special_tokens_mask=True, padding_side="right")
        except Exception as exc:  # noqa: BLE001 - tokenizers raise plain Exceptions (a word outside a vocabulary)
            raise InvalidInputError(f"The tokenizer of {self.spec!r} cannot encode {data.spec!r}: "
                                    f"{first_line(exc)}") from None
        # rows of token protocols are content tokens: padding and special tokens ([CLS], [SEP]) are left out
        mask = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
        tensors = {self.input_name: enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc and self.input_name == "input_ids":
            tensors["token_type_ids"] = enc["token_type_ids"]
        tokens = [self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in enc["input_ids"]]
        return ModelInputs(tensors, mask, tokens)

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        """Run the module on `inputs` (moved to the module's device), each tensor as the ``forward`` parameter its key
        names (``capture.call_forward``).

        Gradients are left on: wrap the call in `torch.no_grad` when they are not needed.

        Returns
        -------
        torch.Tensor
            Logits (batch, class) for classifiers and language-model heads, the last hidden state
            (batch, pos, d_model) for text encoders, or the module's plain tensor output.
        """
        out = call_forward(self.module, inputs.to(self.device).tensors)
        return select_output(out)


def select_output(out: Any) -> torch.Tensor:
    """The main tensor of a model output: itself, ``.logits``, ``.last_hidden_state``, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InvalidInputError(f"Cannot find the output tensor in a model output of type {type(out).__name__}.")
