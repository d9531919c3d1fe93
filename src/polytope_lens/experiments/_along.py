"""Model outputs at points of a site path (private helper of predictions 2 and 3).

``outputs_along(module, forward, inputs, layer, points)`` replaces the output of site ``layer`` with ``points``
(P, G, *site_shape) and returns the model output for every (path, point): the probabilities and top class the
crossing engine's trace does not keep.
"""

from __future__ import annotations

import torch

from ..capture import SharedPrefix, list_sites, run, select_sites
from ..errors import InvalidInputError
from ..paths.runner import affine_tol, same_values


def resolve_site(module, forward, inputs, layer: str):
    first = {k: v[:1].clone() for k, v in inputs.items()}  # a model may write into its input
    chosen = select_sites(list_sites(module, lambda: forward(first)), layer)
    if len(chosen) != 1:
        raise InvalidInputError(f"The 'layer' parameter must name one site; {layer!r} matches {len(chosen)}.")
    return chosen[0]


def outputs_along(module, forward, inputs: dict, layer: str, points: torch.Tensor, *, batch: int = 256):
    """Output (P, G, ...) of ``forward`` with site ``layer``'s output replaced by ``points`` (P, G, *site_shape).

    The network before the site runs once per path and batch, not once per point (``SharedPrefix``), when that gives
    the plain pass's outputs at a few points to float32 rounding (a model whose later code reuses early tensors in
    ways the expansion does not see runs every point the plain way)."""
    site = resolve_site(module, forward, inputs, layer)
    P, G = points.shape[:2]
    flat = points.reshape(P * G, *points.shape[2:]).to(torch.float32)
    rows = torch.arange(P).repeat_interleave(G)

    def evaluate(pick: torch.Tensor, shared_prefix: bool) -> torch.Tensor:
        outs = []
        for s in range(0, len(pick), batch):
            sel = pick[s:s + batch]
            idx, rep = rows[sel], flat[sel]
            shared = None
            if shared_prefix:
                idx, inv = torch.unique(idx, return_inverse=True)
            sub = {k: v[idx] for k, v in inputs.items()}
            if shared_prefix:
                shared = SharedPrefix(inv, sub)

            def handler(st, z, rep=rep):
                if st.name == site.name:
                    return rep.to(z.dtype)
                return None
            o = run(module, lambda: forward(sub), handler, shared=shared)
            o = getattr(o, "last_hidden_state", o)
            if isinstance(o, (tuple, list)):
                o = o[0]
            outs.append(o.detach().to(torch.float64))
        return torch.cat(outs)

    everything = torch.arange(P * G)
    probe = torch.cat([torch.tensor([0, G // 2, G - 1]) + p * G for p in range(min(P, 2))])
    try:
        shared_prefix = same_values(evaluate(probe, True), evaluate(probe, False), affine_tol(torch.float32))
    except Exception:  # noqa: BLE001 - any failure of the shortcut means: do not use it
        shared_prefix = False
    out = evaluate(everything, shared_prefix)
    return out.reshape(P, G, *out.shape[1:])
