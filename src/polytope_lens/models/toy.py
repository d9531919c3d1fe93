"""Random toy MLPs from a spec string, e.g. ``toy:2-64-64-2``, ``toy:2-32-2:gelu:seed=3``.

Weights are drawn N(0, 2 / fan_in) (He init, so activations keep their scale through ReLU layers) and biases
N(0, 0.25) (std 0.5, so that region boundaries do not all pass through the origin). Everything is drawn from
one `torch.Generator` seeded with ``seed`` (default 0), so a spec always gives the same network.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polytope_lens.errors import InvalidInputError
from polytope_lens.models._bundle import ModelBundle

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "relu6": nn.ReLU6,
    "hardtanh": nn.Hardtanh,
    "abs": None,  # filled below: |x| has no nn module
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}
"""Activation names accepted after the widths; each hidden layer gets one fresh module of this class."""

BIAS_STD = 0.5

TOY_FORM = "toy:W0-W1-...-WL[:ACTIVATION][:seed=N]"


class Abs(nn.Module):
    """Elementwise absolute value, a two-piece linear activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


ACTIVATIONS["abs"] = Abs


def parse_toy(spec: str) -> tuple[list[int], str, int]:
    """Parse ``toy:2-64-64-2[:act][:seed=N]`` into (widths, activation, seed); options may come in any order."""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1]:
        raise InvalidInputError(f"Toy model spec {spec!r} has no widths; write it as {TOY_FORM}, e.g. 'toy:2-64-2'.")
    try:
        widths = [int(w) for w in parts[1].split("-")]
    except ValueError:
        raise InvalidInputError(
            f"Toy model widths {parts[1]!r} must be positive ints separated by '-', e.g. 'toy:2-64-64-2'."
        ) from None
    if len(widths) < 2 or min(widths) < 1:
        raise InvalidInputError(
            f"Toy model widths {parts[1]!r} need at least an input and an output width, all >= 1, e.g. 'toy:2-64-2'."
        )
    activation, seed = "relu", 0
    for option in parts[2:]:
        if option.startswith("seed="):
            try:
                seed = int(option[5:])
            except ValueError:
                raise InvalidInputError(f"Toy model seed {option[5:]!r} in {spec!r} must be an int.") from None
            if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
                raise InvalidInputError(f"Toy model seed {option[5:]!r} in {spec!r} must be in [-2**63, 2**64).")
        elif option in ACTIVATIONS:
            activation = option
        else:
            raise InvalidInputError(
                f"Unknown toy model option {option!r} in {spec!r}; use 'seed=N' or an activation: "
                f"{', '.join(ACTIVATIONS)}."
            )
    return widths, activation, seed


def build_mlp(widths: list[int], activation: str = "relu", seed: int = 0) -> nn.Sequential:
    """An MLP Linear, act, Linear, ..., Linear (no activation after the last layer), seeded random init."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) * math.sqrt(2.0 / fan_in))
            linear.bias.copy_(torch.randn(fan_out, generator=gen) * BIAS_STD)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def load_toy(spec: str, device: str) -> ModelBundle:
    """A toy MLP bundle (modality "vector", input_shape (W0,))."""
    widths, activation, seed = parse_toy(spec)
    canonical = f"toy:{'-'.join(map(str, widths))}:{activation}:seed={seed}"
    module = build_mlp(widths, activation, seed).float().eval().to(device)
    provenance = {
        "model": "random MLP",
        "widths": widths,
        "activation": activation,
        "seed": seed,
        "init": f"weights N(0, 2/fan_in), biases N(0, {BIAS_STD ** 2}) (std {BIAS_STD}), torch.Generator({seed})",
        "n_parameters": sum(p.numel() for p in module.parameters()),
    }
    return ModelBundle(canonical, module, "vector", (widths[0],), None, None, provenance)
