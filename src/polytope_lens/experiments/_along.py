"""Model outputs at points of a site path (private helper of predictions 2 and 3).

``outputs_along(module, forward, inputs, layer, points)`` replaces the output of site ``layer`` with ``points``
(P, G, *site_shape) and returns the model output for every (path, point): the probabilities and top class the
crossing engine's trace does not keep.
"""

from __future__ import annotations

import torch

from ..capture import list_sites, run, select_sites
from ..errors import InvalidInputError


def resolve_site(module, forward, inputs, layer: str):
    first = {k: v[:1] for k, v in inputs.items()}
    chosen = select_sites(list_sites(module, lambda: forward(first)), layer)
    if len(chosen) != 1:
        raise InvalidInputError(f"The 'layer' parameter must name one site; {layer!r} matches {len(chosen)}.")
    return chosen[0]


def outputs_along(module, forward, inputs: dict, layer: str, points: torch.Tensor, *, batch: int = 256):
    """Output (P, G, ...) of ``forward`` with site ``layer``'s output replaced by ``points`` (P, G, *site_shape)."""
    site = resolve_site(module, forward, inputs, layer)
    P, G = points.shape[:2]
    flat = points.reshape(P * G, *points.shape[2:]).to(torch.float32)
    rows = torch.arange(P).repeat_interleave(G)
    outs = []
    for s in range(0, P * G, batch):
        idx = rows[s:s + batch]
        sub = {k: v[idx] for k, v in inputs.items()}
        rep = flat[s:s + batch]

        def handler(st, z, rep=rep):
            if st.name == site.name:
                return rep.to(z.dtype)
            return None
        o = run(module, lambda: forward(sub), handler)
        o = getattr(o, "last_hidden_state", o)
        if isinstance(o, (tuple, list)):
            o = o[0]
        outs.append(o.detach().to(torch.float64))
    out = torch.cat(outs)
    return out.reshape(P, G, *out.shape[1:])
