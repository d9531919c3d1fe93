"""Frontier evaluation of exact paths: every point of a chunk advances together from one site to the next.

The graph route (``exact.Refiner.run_chunk``) runs each new breakpoint from the site that made it to the end of the
network in one pass, and keeps its unit inputs at every later site until that site is scanned: per point the unit
inputs of all later sites (6.16 M values for EfficientNet-Lite0), and one pass per site over only that site's new
points. Here the model's forward pass is an FX graph cut at its sites, and all points advance together: the scan of
site k needs the unit inputs of site k at every point, so the graph runs from site k - 1 to site k once over all of
them. A point holds only the values live across the cut (a site's input, a residual branch's input: the tensors made
before the site and read after it), and a breakpoint that site k makes gets them by interpolation between the ends
of its interval, on which everything before site k is affine in t; its unit inputs at site k are exact, with the
crossed unit on its kink (``exact._inputs_at_new``). Every breakpoint runs each later segment of the network once,
and nothing before its site runs again. A point's values keep their row in the order the points were made (new
points after the others; the scans visit rows in path order), and a clamp site writes its output for the old and
the new rows into one array, so a site's unit inputs are never copied to make room for new points
(``APPEND_NEW_POINTS``; the copies were more traffic than the passes, docs/benchmarks.md, stop 25).

``FrontierProgram.build`` traces the model with ``torch.fx`` (activation modules are leaves), folds batch norm and
zero padding into the convolutions where it can (``fold_into_convolutions``), and refuses, with the reason, models
it cannot follow this way: not traceable, an in-place operation (other than a site's) on a tensor that another node
reads, a value carried across a cut that is neither one row per point, the number of points, nor the same for every
batch, sites other than the capture's, or unit inputs or class scores that differ from a plain forward pass at three
points of the first path (a folded graph that fails a check gives way to the model's own). For paths and rays at a
named site, the network before that site runs once per path on the paths' real inputs, and what it carries past the
site is taken per point from its path's row.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode

from .. import _conv64
from ..capture import ACTIVATION_MODULE_CLASSES, _is_inplace
from ..kinks import ScalarKinks, as_pair, get_activation, resolve_call
from .exact import _lerp_rows, _merge
from .runner import Runner, index_inputs, logits_of, same_values

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul, operator.setitem}


class _Tracer(fx.Tracer):
    def __init__(self, activation_classes: dict[str, str]):
        super().__init__()
        self.activation_classes = activation_classes

    def is_leaf_module(self, m, qualname) -> bool:
        return type(m).__name__ in self.activation_classes or super().is_leaf_module(m, qualname)


# ------------------------------------------------------------------------------ folding into convolutions
FOLD_INTO_CONVOLUTIONS = True  # False: the frontier's graph keeps batch norm and padding as the model has them
# True: a chunk's values keep their rows in the order the points were made, new points after the others (no merge into
# path order; a clamp site writes old and new rows into one array); False: merged into path order at every site
APPEND_NEW_POINTS = True
# device types where a clamp site and the depthwise or 1 x 1 convolution after it run as one Triton kernel
# (``_conv64.clamp_conv2d``; float64): an opt-in until the engine measures it on a GPU
FUSE_SITE_CONVOLUTIONS: set[str] = set()
_CONVOLUTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}  # ``F.conv2d`` is ``torch.conv2d``
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_PARAMETERS = {"input": None, "weight": None, "bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_into_convolutions(gm: fx.GraphModule) -> tuple[int, int]:
    """Fold eval-mode batch norm into the convolution before it and symmetric zero padding into the convolution
    after it, in ``gm``'s graph; returns how many of each were folded.

    Both are exact in real arithmetic (the same affine map; batch norm's weights are combined in float64 by
    ``torch.nn.utils.fusion``, then rounded to the model's dtype), and they spare the frontier's passes two of the
    operators that move the most memory per multiply-add (docs/benchmarks.md). Only a convolution whose output
    nothing else reads takes a batch norm, only a padding nothing else reads is folded, modules with hooks are left
    alone, and so are the model's own modules and tensors: the convolutions read buffers of ``gm`` (the folded
    weights, or the model's tensors themselves where only padding is folded). A folded convolution runs where its
    padding ran, so an in-place change of the padding's input between the two cannot reach it."""
    if _global_hooks():
        return 0, 0
    graph, n_norms, n_pads = gm.graph, 0, 0
    for node in list(graph.nodes):
        conv = _convolution(gm, node)
        if conv is None or _weights_read_elsewhere(gm, node):
            continue
        dims, call = conv
        pad_node, padded = call["input"], None
        if isinstance(pad_node, fx.Node) and len(pad_node.users) == 1 and not isinstance(call["padding"], str):
            padded = _symmetric_zero_padding(gm, pad_node, dims)
        norm_node = next(iter(node.users)) if len(node.users) == 1 else None
        norm = _eval_batch_norm(gm, norm_node, node, call["weight"]) if norm_node is not None else None
        if padded is None and norm is None:
            continue
        if padded is not None:
            call["input"] = padded[0]
            call["padding"] = tuple(a + b for a, b in zip(call["padding"], padded[1]))
            n_pads += 1
        weight, bias = call["weight"], call["bias"]
        if norm is not None:
            f64 = [None if v is None else v.detach().double() for v in (weight, bias, norm.running_mean,
                                                                        norm.running_var, norm.weight, norm.bias)]
            w, b = fuse_conv_bn_weights(*f64[:4], norm.eps, *f64[4:])
            weight, bias = w.detach().to(weight.dtype), b.detach().to(weight.dtype)
            n_norms += 1
        names = []
        for role, value in (("weight", weight), ("bias", bias)):
            if value is None:
                names.append(None)
                continue
            k = 0
            while hasattr(gm, f"_folded_{k}_{role}"):
                k += 1
            gm.register_buffer(f"_folded_{k}_{role}", value.detach())
            names.append(f"_folded_{k}_{role}")
        padding = call["padding"] if isinstance(call["padding"], str) else list(call["padding"])
        with graph.inserting_before(pad_node if padded is not None else node):
            w_node, b_node = (None if n is None else graph.get_attr(n) for n in names)
            new = graph.call_function({1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}[dims], (
                call["input"], w_node, b_node, call["stride"], padding, call["dilation"], call["groups"]))
        old_args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        (norm_node if norm is not None else node).replace_all_uses_with(new)
        for dead in ([norm_node] if norm is not None else []) + [node] + ([pad_node] if padded is not None else []):
            graph.erase_node(dead)
        for a in old_args:
            if a.op == "get_attr" and not a.users:
                graph.erase_node(a)
    if n_norms or n_pads:
        graph.lint()
        gm.recompile()
    return n_norms, n_pads


def _weights_read_elsewhere(gm: fx.GraphModule, conv: fx.Node) -> bool:
    """Whether a node other than ``conv`` reads its weight or bias (which might change them in place before the
    convolution runs; shared weights are left unfolded too)."""
    if conv.op == "call_module":
        targets = {f"{conv.target}.weight", f"{conv.target}.bias"}
        return any(n.op == "get_attr" and n.target in targets for n in gm.graph.nodes)
    return any(isinstance(a, fx.Node) and a.op == "get_attr" and set(a.users) != {conv}
               for a in (*conv.args[1:3], conv.kwargs.get("weight"), conv.kwargs.get("bias")))


def _global_hooks() -> bool:
    """Whether forward hooks registered for every module are in place (a folded module's would no longer run)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _nodes_in(value) -> bool:
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _convolution(gm: fx.GraphModule, node: fx.Node) -> tuple[int, dict] | None:
    """(spatial dimensions, the call's arguments with the weight and bias as tensors) of a zero-padded convolution
    whose weight and bias are the model's own tensors and whose other arguments are constants, else None. Its
    ``padding`` is one int per spatial dimension, or a string ("same", "valid")."""
    if node.op == "call_function" and node.target in _CONVOLUTIONS:
        names = list(_CONV_PARAMETERS)
        if len(node.args) > len(names) or set(node.kwargs) - set(names):
            return None
        call = {**_CONV_PARAMETERS, **dict(zip(names, node.args)), **node.kwargs}
        if any(_nodes_in(v) for k, v in call.items() if k not in ("input", "weight", "bias")):
            return None
        for role in ("weight", "bias"):
            v = call[role]
            if v is None and role == "bias":
                continue
            if not (isinstance(v, fx.Node) and v.op == "get_attr"):
                return None
            call[role] = _attribute(gm, v.target)
            if not isinstance(call[role], torch.Tensor):
                return None
        dims = _CONVOLUTIONS[node.target]
    elif node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        m = gm.get_submodule(node.target)
        if type(m) not in _CONV_MODULES or m.padding_mode != "zeros" or _hooked(m):
            return None
        dims = _CONV_MODULES[type(m)]
        call = dict(input=node.args[0], weight=m.weight, bias=m.bias, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, groups=m.groups)
    else:
        return None
    padding = call["padding"]
    if isinstance(padding, (tuple, list)) and len(padding) == 1:
        padding = padding[0]  # torch repeats a single value over the dimensions
    if type(padding) is int:
        padding = (padding,) * dims
    if not isinstance(padding, str) and not (isinstance(padding, (tuple, list)) and len(padding) == dims
                                             and all(type(p) is int for p in padding)):
        return None
    call["padding"] = padding if isinstance(padding, str) else tuple(padding)
    return dims, call


def _symmetric_zero_padding(gm: fx.GraphModule, node: fx.Node, dims: int) -> tuple[fx.Node, tuple[int, ...]] | None:
    """The input of a zero-padding node and, per spatial dimension (first to last), what it adds on each side of
    the last ``dims`` dimensions, if it adds as much on both sides of each; else None."""
    padded = _zero_padding(gm, node, dims)
    if padded is None or any(padded[1][i] != padded[1][i + 1] for i in range(0, 2 * dims, 2)):
        return None
    return padded[0], tuple(padded[1][::2][::-1])


def _zero_padding(gm: fx.GraphModule, node: fx.Node, dims: int) -> tuple[fx.Node, tuple[int, ...]] | None:
    """The input of a node that pads the last ``dims`` dimensions with zeros (a padding module without hooks, or
    ``F.pad``), and what it adds in ``F.pad``'s order (last dimension first, before and after: 2 x ``dims``
    numbers); else None."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        m = gm.get_submodule(node.target)
        if not isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d,
                              nn.ZeroPad3d)) or getattr(m, "value", 0) != 0 or _hooked(m):
            return None
        source, pad = node.args[0], m.padding
    elif node.op == "call_function" and node.target is F.pad:
        names = ["input", "pad", "mode", "value"]
        call = {"mode": "constant", "value": None, **dict(zip(names, node.args)), **node.kwargs}
        if len(node.args) > 4 or set(call) - set(names) or call["mode"] != "constant" or call["value"] not in (None, 0):
            return None
        source, pad = call["input"], call["pad"]
    else:
        return None
    if not isinstance(source, fx.Node) or not isinstance(pad, (tuple, list)) or not all(
            type(p) is int and p >= 0 for p in pad) or len(pad) % 2 or len(pad) > 2 * dims:
        return None
    return source, tuple(pad) + (0,) * (2 * dims - len(pad))


def _attribute(gm: fx.GraphModule, target: str):
    """What a get_attr node reads."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _eval_batch_norm(gm: fx.GraphModule, node: fx.Node, conv: fx.Node, weight: torch.Tensor) -> nn.Module | None:
    """The batch norm module ``node`` calls on ``conv``'s output alone, if it normalises that convolution's channels
    (``weight``'s outputs) with running statistics."""
    if node.op != "call_module" or node.args != (conv,) or node.kwargs:
        return None
    m = gm.get_submodule(node.target)
    if type(m) not in _BATCH_NORMS or m.training or m.running_mean is None or m.running_var is None or _hooked(m) \
            or m.num_features != weight.shape[0]:
        return None
    return m


class FrontierProgram:
    """A model's FX graph with its sites, the values carried across each cut, and how to advance points."""

    def __init__(self, gm: fx.GraphModule, sites: list[int], per_point: set[str], free_after: list[list[str]]):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        self.sites = sites  # node index of each site, in order
        self.per_point = per_point  # names of values with one row per point (the others are the same for any batch)
        self.batch_sizes: set[str] = set()  # names of ints that are the number of points
        self.live_values = 0  # values per point carried across the busiest cut
        self.live_per_site: list[int] = []  # values per point carried across each processed site's cut
        self.path_site: int | None = None  # node index of the site whose output the paths replace (site paths)
        self.free_after = free_after  # per node index: values last read by it
        self.device = torch.device("cpu")  # where the points are
        self.folded = (0, 0)  # batch norms and zero paddings folded into convolutions (``fold_into_convolutions``)
        self.clamps: dict[int, tuple] = {}  # site node index -> (min, max) of a site that is a clamp (``_clamp_form``)
        # site node index -> the convolution that alone reads a clamp site's output (``_site_convolution``)
        self.site_convolutions: dict[int, _SiteConv] = {}
        self.point_shapes: dict[str, tuple] = {}  # one point's shape of each value with one row per point

    # ------------------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, runner: Runner) -> tuple["FrontierProgram | None", str]:
        """The program for ``runner``'s model, or None and the reason it cannot run this way. With batch norm and
        padding folded into the convolutions where it can (``FOLD_INTO_CONVOLUTIONS``); a folded graph that fails
        any check is dropped for the model's own."""
        prog, why, folded = cls._build(runner, FOLD_INTO_CONVOLUTIONS)
        if prog is None and folded != (0, 0):  # the graph was changed (or the fold raised): the model's own graph
            prog, why, _ = cls._build(runner, False)
        return prog, why

    @classmethod
    def _build(cls, runner: Runner, fold: bool) -> tuple["FrontierProgram | None", str, tuple[int, int] | None]:
        """``build``'s work with or without the fold; also what was folded (None: the fold raised)."""
        spec = runner.spec
        if spec.site is not None and not (isinstance(spec.base, torch.Tensor) or isinstance(spec.base, Mapping) and all(
                isinstance(v, torch.Tensor) for v in spec.base.values())):
            return None, "the model's inputs are neither a tensor nor a mapping of tensors", (0, 0)
        if not getattr(runner.fwd, "plain_call", False):
            return None, "a custom forward function", (0, 0)
        classes = {**ACTIVATION_MODULE_CLASSES, **(runner.ckw.get("activation_modules") or {})}
        if runner.ckw.get("declared_sites") or runner.ckw.get("suppress"):
            return None, "declared or suppressed sites", (0, 0)
        try:
            graph = _Tracer(classes).trace(runner.model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: not this way
            return None, f"torch.fx cannot trace the model ({type(e).__name__}: {str(e)[:80]})", (0, 0)
        gm = fx.GraphModule(runner.model, graph)
        folded = (0, 0)
        if fold:
            try:
                folded = fold_into_convolutions(gm)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a pattern the fold misjudged: the model's own graph instead
                return None, f"folding into convolutions failed ({type(e).__name__}: {str(e)[:80]})", None
        nodes = list(gm.graph.nodes)
        index = {node.name: i for i, node in enumerate(nodes)}
        last = {node.name: max([index[u.name] for u in node.users], default=i) for i, node in enumerate(nodes)}
        free_after: list[list[str]] = [[] for _ in nodes]
        for name, i in last.items():
            free_after[i].append(name)
        prog = cls(gm, [], set(), free_after)
        prog.device = runner.device
        prog.folded = folded
        # two probe batches of different sizes: which values scale with the batch, which nodes are sites
        t = torch.linspace(0.2, 0.8, 3, dtype=runner.dtype, device=runner.device)
        pid = torch.zeros(3, dtype=torch.long, device=runner.device)
        x = spec.points(pid, t)
        names = [site.name for site in runner.all_sites]
        seen = []
        try:
            for n in (2, 3):
                if spec.site is None:
                    values, sites = prog._probe(x[:n], classes)
                else:  # the first path's real input n times; the path's site gives the path points
                    base = index_inputs(spec.base, torch.zeros(n, dtype=torch.long, device=runner.device))
                    values, sites = prog._probe(base, classes, (names.index(spec.site), x[:n]))
                seen.append((values, sites))
        except torch.OutOfMemoryError:  # the device's limit, not a reason to refuse the model
            raise
        except Exception as e:  # noqa: BLE001
            return None, f"the FX graph does not run on the path's points ({type(e).__name__}: {str(e)[:80]})", folded
        (v2, s2), (v3, s3) = seen
        prog.point_shapes = {name: v.shape[1:] for name, v in v2.items()
                             if isinstance(v, _Made) and v.values is None and isinstance(v3[name], _Made)
                             and v3[name].values is None}
        if s2 != s3 or len(s2) != len(runner.all_sites) or any(
                act.name != site.activation.name for (_, act), site in zip(s2, runner.all_sites)):
            return None, "its activation calls differ from the capture's sites", folded
        first = 0 if spec.site is None else names.index(spec.site) + 1  # the first processed site
        if runner.names != names[first:first + len(runner.processed)]:
            return None, "a site between the processed ones does not depend on the path (a clamp of parameters)", \
                folded
        if spec.site is not None:
            prog.path_site = s2[first - 1][0]
        prog.sites = [i for i, _ in s2][first:first + len(runner.processed)]
        prog.clamps = {i: form for i, act in s2 if (form := _clamp_form(prog, nodes[i], act)) is not None}
        bounds = sorted({i for i, _ in s2} | ({prog.path_site} if prog.path_site is not None else set()))
        prog.site_convolutions = {i: plan for i in prog.clamps if (plan := _site_convolution(prog, i, v2, index,
                                                                                              bounds)) is not None}
        cuts = ([] if prog.path_site is None else [prog.path_site + 1]) + prog.sites
        for c, cut in enumerate(cuts):  # values made before a cut and read at or after it
            live = 0
            for name, i in index.items():
                if i >= cut or last[name] < cut or nodes[i].op == "get_attr":
                    continue
                a, b = v2[name], v3[name]
                if isinstance(a, _Made) and isinstance(b, _Made):
                    if a.values is None and b.values is None and a.shape[1:] == b.shape[1:] and \
                            a.dtype.is_floating_point:
                        prog.per_point.add(name)
                        live += math.prod(a.shape[1:])
                        continue
                    if a.values is not None and b.values is not None and a.shape == b.shape and \
                            torch.equal(a.values, b.values):
                        continue
                elif not isinstance(a, _Made) and not isinstance(b, _Made) and type(a) is type(b):
                    if _same_constant(a, b):
                        continue
                    if type(a) is int and (a, b) == (2, 3):  # the batch size (``x.size(0)`` read at the end)
                        prog.batch_sizes.add(name)
                        continue
                why = f"{nodes[i].format_node()[:60]} is carried across a site and is not one row per point"
                return None, why, folded
            prog.live_values = max(prog.live_values, live)
            if c >= len(cuts) - len(prog.sites):
                prog.live_per_site.append(live)
        # the unit inputs at every processed site, and the class scores after the last, equal a plain forward pass's
        want = runner.eval_points(pid, t, runner.names, want_output=True)
        state = prog.start(x, None if spec.site is None else index_inputs(spec.base, pid[:1]), pid)
        for k, name in enumerate(runner.names):
            z = state.run_to(k).reshape(len(x), -1)
            if not same_values(z, want[name], runner.tol):
                return None, f"its unit inputs at {name} differ from a plain forward pass", folded
        scores = state.output()
        if (scores is None) != (want["output"] is None) or scores is not None and not same_values(
                scores, want["output"], runner.tol):
            return None, "its class scores differ from a plain forward pass", folded
        return prog, "", folded

    def site_input(self, k: int) -> str | None:
        """The name of the value site ``k`` reads (its unit inputs), if a node makes it."""
        src = self.nodes[self.sites[k]].args[0]
        return src.name if isinstance(src, fx.Node) else None

    def _probe(self, x, classes: dict[str, str], replace: tuple | None = None) -> tuple[dict, list]:
        """What each node makes on batch ``x`` (a tensor's shape, with its values where its first dimension is not
        the batch's; other values as they are), and the sites: (node index, activation) in order. Values are freed
        once read for the last time, as in a frontier pass. ``replace``: (k, points), site k's output is the
        points (site paths)."""
        env: dict = {}
        made: dict = {}
        sites = []
        batch = len(next(iter(x.values())) if isinstance(x, Mapping) else x)
        with self._modes():
            for i, node in enumerate(self.nodes):
                if node.op == "output":
                    break
                act = self._activation(node, env, classes)
                if act is not None:
                    sites.append((i, act))
                elif self._inplace(node, *self._args(node, env)) and not self._private_target(node, env):
                    raise ValueError(f"an in-place operation on a tensor read elsewhere ({node.format_node()[:60]})")
                if act is not None and replace is not None and len(sites) - 1 == replace[0]:
                    v = self._replace_site(node, env, replace[1])
                else:
                    v = env[node.name] = self._exec(node, env, x, site=act is not None)
                if isinstance(v, torch.Tensor):
                    per_row = v.dim() > 0 and v.shape[0] == batch
                    made[node.name] = _Made(tuple(v.shape), v.dtype, None if per_row else v.clone())
                else:
                    made[node.name] = v
                for name in self.free_after[i]:
                    env.pop(name, None)
        return made, sites

    def _activation(self, node: fx.Node, env: dict, classes: dict[str, str]):
        """The registry entry of a site node (the capture's rules), else None."""
        if node.op == "call_module":
            mod = self.modules[node.target]
            name = type(mod).__name__
            if name in classes:
                return get_activation(classes[name])
            args, kwargs = self._args(node, env)
            if args and isinstance(args[0], torch.Tensor):  # a copy: an in-place module would change its input
                args = (args[0].clone(), *args[1:])
            with _Spy() as spy:  # a leaf module (torch.nn's): the capture sees the activation call inside it
                mod(*args, **kwargs)
            if len(spy.found) > 1:
                raise ValueError(f"module {node.target!r} applies {len(spy.found)} activations")
            return spy.found[0] if spy.found else None
        func = self._func(node)
        if func is None:
            return None
        args, kwargs = self._args(node, env)
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        return resolve_call(func, args, kwargs)

    def _private_target(self, node: fx.Node, env: dict) -> bool:
        """Whether an in-place call's target is read by nothing else: this node is its only user and its storage is
        no other value's (not a view), so running the call as it comes changes nothing another node sees."""
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or len(target.users) != 1 or not isinstance(env.get(target.name),
                                                                                        torch.Tensor):
            return False
        ptr = env[target.name].untyped_storage().data_ptr()
        return not any(isinstance(v, torch.Tensor) and k != target.name and v.untyped_storage().data_ptr() == ptr
                       for k, v in env.items())

    @contextlib.contextmanager
    def _modes(self):
        """No autograd; float64 convolutions and max pooling the capture's faster ways (``_conv64``) on the CPU and
        on the devices in ``POINTWISE_AS_MATMUL`` (elsewhere a mode that sees every call would only add host time)."""
        fast = self.device.type == "cpu" or self.device.type in _conv64.POINTWISE_AS_MATMUL
        with torch.no_grad(), (_conv64.FastConv64() if fast else contextlib.nullcontext()):
            yield

    def _inplace(self, node: fx.Node, args: tuple, kwargs: dict) -> bool:
        """Whether a node's call writes into its first argument (``args``, ``kwargs``: the call's values)."""
        if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
            return True
        if node.op == "call_module":
            return bool(args) and bool(getattr(self.modules[node.target], "inplace", False))
        func = self._func(node)
        return func is not None and bool(args) and _is_inplace(func, args, kwargs)

    # -------------------------------------------------------------------------------------------- running
    @staticmethod
    def _func(node: fx.Node):
        """The function a call_function or call_method node calls (a Tensor method for the latter), else None."""
        if node.op == "call_function":
            return node.target
        return getattr(torch.Tensor, node.target, None) if node.op == "call_method" else None

    def _args(self, node: fx.Node, env: dict):
        def get(n):
            return env[n.name]
        return fx.node.map_arg(node.args, get), fx.node.map_arg(node.kwargs, get)

    def _exec(self, node: fx.Node, env: dict, x, site: bool = False):
        """Run one node on the values in ``env`` (``x``: the model's input); a site's in-place call runs on a copy
        of its input, and the nodes after it read what it wrote."""
        if node.op == "placeholder":  # the input: one tensor (the first argument) or keyword arguments
            if isinstance(x, Mapping) and node.target in x:
                return x[node.target]
            if not isinstance(x, Mapping) and not env:
                return x
            if node.args:
                return node.args[0]  # a default argument
            raise TypeError(f"the forward pass needs argument {node.target!r}")
        if node.op == "get_attr":
            return _attribute(self.gm, node.target)
        args, kwargs = self._args(node, env)
        inplace = site and self._inplace(node, args, kwargs)
        if inplace:
            args = (args[0].clone(), *args[1:])
        if node.op == "call_module":
            out = self.modules[node.target](*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
        if inplace and isinstance(node.args[0], fx.Node):
            # a site's unit inputs are kept (the scan reads them); the nodes after it read what the call wrote
            env[node.args[0].name] = out
        return out

    def _replace_site(self, node: fx.Node, env: dict, points: torch.Tensor) -> torch.Tensor:
        """Site paths: the path's site outputs the path points (an in-place site also writes them into its
        input, as the call would have)."""
        env[node.name] = points
        if self._inplace(node, *self._args(node, env)) and isinstance(node.args[0], fx.Node):
            env[node.args[0].name] = points
        return points

    def start(self, x: torch.Tensor, base=None, path_of_point: torch.Tensor | None = None, first: dict | None = None,
              keep_last: bool = False) -> "FrontierState":
        """The state at the start of a chunk: the points ``x`` (input space), or for site paths the real inputs
        ``base`` of the chunk's paths (one row each: a tensor or keyword tensors) run to the path's site, whose
        output is then ``x``; what is carried across that cut is taken per point from its path's row
        (``path_of_point``). ``first``: the values of a first point that ``x`` leaves out, kept by the piece before
        (``FrontierState``)."""
        state = FrontierState(self, x if base is None else base, first, keep_last)
        if base is not None:
            state.enter_paths(x, path_of_point)
        return state


@dataclass
class _Made:
    """A tensor a probe node made: its shape and dtype, and its values unless its first dimension is the batch's."""

    shape: tuple
    dtype: torch.dtype
    values: torch.Tensor | None


class _Spy(TorchFunctionMode):
    """The registry entries of the activation calls made inside a ``with`` block (the capture's rule: a call on a
    floating-point tensor that ``resolve_call`` knows)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            act = resolve_call(func, args, kwargs)
            if act is not None:
                self.found.append(act)
        return func(*args, **kwargs)


def _same_constant(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _clamp_form(prog: FrontierProgram, node: fx.Node, act) -> tuple | None:
    """(min, max) (max None: no upper bound) where a site node is torch's own ReLU, ReLU6, Hardtanh or two-bound
    clamp, whose output ``torch.clamp`` writes exactly, also into part of a larger array (``FrontierState``); else
    None. Custom activation modules, one-bound clamps and other activations are left to their own call."""
    if not isinstance(act, ScalarKinks) or node.kwargs.get("out") is not None:
        return None
    if node.op == "call_module":
        kind = type(prog.modules[node.target])
        known = kind in (nn.ReLU, nn.ReLU6, nn.Hardtanh)
    else:
        known = prog._func(node) in _CLAMP_CALLS
    if not known or not node.args or not isinstance(node.args[0], fx.Node) or any(
            isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return None
    if act.name == "relu" and act.kinks == (0.0,):
        return 0.0, None
    if act.name in ("relu6", "hardtanh", "clamp") and len(act.kinks) == 2:
        return act.kinks
    return None


@dataclass
class _SiteConv:
    """A clamp site whose output only a 2-D convolution reads (after zero padding, maybe), with a residual added to
    a 1 x 1 convolution's output, maybe: run as one kernel (``_conv64.clamp_conv2d``) on the devices in
    ``FUSE_SITE_CONVOLUTIONS``."""

    limits: tuple  # the clamp's (min, max or None)
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # zero padding of the site's output: left, right, top, bottom
    out_shape: tuple[int, ...]  # one point's output
    residual: str | None  # the value added to the convolution's output
    output: str  # the node that gives the result (the convolution or the addition)
    covered: tuple[int, ...]  # node indices the kernel runs besides the site's (padding, convolution, addition)


def _site_convolution(prog: FrontierProgram, i: int, made: dict, index: dict[str, int],
                      bounds: list[int]) -> _SiteConv | None:
    """The convolution after clamp site ``i`` that one kernel can run with it (``_SiteConv``), else None: the site's
    input and output have no other reader, the convolution is depthwise (any stride and zero padding) or 1 x 1
    (stride 1, no padding) without dilation, and a residual, added to a 1 x 1 convolution's output alone, is made
    before the site and has its shape. Every node the kernel runs comes before the next site (``bounds``: the sites
    and the path's site), so no value the kernel skips is ever carried across a cut. ``made``: a probe's values."""
    node = prog.nodes[i]
    src = node.args[0]
    if len(node.users) != 1 or len(src.users) != 1 or not isinstance(made.get(src.name), _Made) or \
            made[src.name].values is not None:
        return None
    shape = made[src.name].shape
    if len(shape) != 4:
        return None
    nxt, covered, pads = next(iter(node.users)), [], (0, 0, 0, 0)
    padded = _zero_padding(prog.gm, nxt, 2)
    if padded is not None and padded[0] is node and len(nxt.users) == 1:
        covered.append(nxt)
        pads, nxt = padded[1], next(iter(nxt.users))
    conv = _convolution(prog.gm, nxt)
    if conv is None or conv[0] != 2 or conv[1]["input"] is not (covered[-1] if covered else node):
        return None
    call = conv[1]
    covered.append(nxt)
    weight, bias, groups, padding = call["weight"], call["bias"], call["groups"], call["padding"]
    if padding == "valid":
        padding = (0, 0)
    if isinstance(padding, str) or as_pair(call["dilation"]) != (1, 1) or not isinstance(made.get(nxt.name), _Made):
        return None
    pads = (pads[0] + padding[1], pads[1] + padding[1], pads[2] + padding[0], pads[3] + padding[0])
    c = shape[1]
    depthwise = groups == c > 1 and tuple(weight.shape[:2]) == (c, 1)
    pointwise = groups == 1 and tuple(weight.shape[1:]) == (c, 1, 1) and as_pair(call["stride"]) == (1, 1) and \
        not any(pads)
    if not (depthwise or pointwise):
        return None
    residual = None
    add = next(iter(nxt.users)) if len(nxt.users) == 1 else None
    if pointwise and add is not None and add.op == "call_function" and add.target in (operator.add, torch.add) \
            and not add.kwargs and len(add.args) == 2 and nxt in add.args:
        other = add.args[1] if add.args[0] is nxt else add.args[0]
        if isinstance(other, fx.Node) and other is not nxt and index[other.name] < i and isinstance(
                made.get(other.name), _Made) and made[other.name].shape == made[nxt.name].shape and \
                made[other.name].dtype == made[nxt.name].dtype and made[other.name].values is None and \
                isinstance(made.get(add.name), _Made):
            residual = other.name
            covered.append(add)
    nxt_bound = min([b for b in bounds if b > i], default=len(prog.nodes))
    covered_at = tuple(index[n.name] for n in covered)
    if max(covered_at) >= nxt_bound:
        return None
    return _SiteConv(prog.clamps[i], weight, bias, as_pair(call["stride"]), pads,
                     made[covered[-1].name].shape[1:], residual, covered[-1].name, covered_at)


_CLAMP_CALLS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, torch.clamp, torch.clip,
                torch.Tensor.relu, torch.Tensor.relu_, torch.Tensor.clamp, torch.Tensor.clip, torch.Tensor.clamp_,
                torch.Tensor.clip_}


class FrontierState:
    """The values live at the current cut, one row per point for those in ``per_point``.

    Consecutive pieces of a path share a point: a piece's values there at every cut (and its output) are kept
    (``keep_last``: ``last``), and the next piece takes them (``first``) instead of running that point again; its
    passes then run on the other points and the shared point's row is put back in front after each."""

    def __init__(self, prog: FrontierProgram, x, first: dict | None = None, keep_last: bool = False):
        self.prog, self.x, self.env, self.next = prog, x, {}, 0
        self.site_set = set(prog.sites)
        self.first, self.keep_last, self.last = first, keep_last, {}
        self.holds_first = False  # the shared point's row is in front of every per-point value
        self.appends = APPEND_NEW_POINTS  # new points' rows go after the others (``append``), else ``insert``
        self.pending: dict[str, torch.Tensor] = {}  # new points' rows of a value, not yet put after its rows (append)
        self.last_row = -1  # the row of the piece's last point (``keep_last``): -1 in path order
        self.ran: set[int] = set()  # node indices after the current one that a site's kernel has run

    def _without_first(self) -> None:
        if self.holds_first:
            self._each_row(lambda v: v[1:], -1)
            self.holds_first = False

    def _with_first(self, key) -> None:
        """After a pass: the shared point's values at this cut in front; this piece's last point's noted."""
        if self.first is not None:
            rows = self.first[key]
            self._each_row(lambda v, name: torch.cat([rows[name], v]), 1, named=True)
            self.holds_first = True
        if self.keep_last:
            self.last[key] = {name: v[self.last_row:][:1].clone() for name, v in self.env.items()
                              if name in self.prog.per_point}

    def _each_row(self, fn, change: int, named: bool = False) -> None:
        for name in list(self.env):
            if name in self.prog.batch_sizes:
                self.env[name] += change
            elif name in self.prog.per_point:
                self.env[name] = fn(self.env[name], name) if named else fn(self.env[name])

    def _advance(self, stop: int) -> None:
        p = self.prog
        with p._modes():
            for i in range(self.next, stop):
                node = p.nodes[i]
                if i in self.ran:  # run by a site's kernel (``_site_conv``)
                    self.ran.discard(i)
                elif not (i in p.site_convolutions and self._site_conv(i, node)) and not (
                        self.pending and self._clamp_rows(i, node)):
                    self._join(n.name for n in node.all_input_nodes)
                    if node.op == "output":
                        self.env["__output__"] = fx.node.map_arg(node.args, lambda n: self.env[n.name])[0]
                        break
                    self.env[node.name] = p._exec(node, self.env, self.x, site=i in self.site_set)
                for name in p.free_after[i]:
                    self.env.pop(name, None)
                    self.pending.pop(name, None)
        self.next = stop
        self.x = None  # the input is read once, by the first node

    def _join(self, names) -> None:
        """Values ``names`` with their new points' rows put after the others (``append``)."""
        for name in names:
            new = self.pending.pop(name, None)
            if new is not None:
                self.env[name] = torch.cat([self.env[name], new])

    def _site_conv(self, i: int, node: fx.Node) -> bool:
        """A clamp site and the convolution that reads its output (``FrontierProgram.site_convolutions``), run as
        one kernel on each of the old and the new rows into one array, where the device is in
        ``FUSE_SITE_CONVOLUTIONS`` and the kernel can take the values (``_conv64.site_conv_ready``); the site's
        output is never written, its unit inputs never copied. False: not run (nothing done)."""
        plan = self.prog.site_convolutions[i]
        src = node.args[0].name
        z = self.env[src]
        if z.device.type not in FUSE_SITE_CONVOLUTIONS or not _conv64.site_conv_ready(
                z, plan.weight, plan.bias, plan.stride, plan.pads):
            return False
        if _global_hooks() or node.op == "call_module" and _hooked(self.prog.modules[node.target]):
            return False  # hooks may change what the module gives: the module's own call
        parts = [z] + ([self.pending[src]] if src in self.pending else [])
        if any(tuple(v.shape[1:]) != tuple(z.shape[1:]) or not v.is_contiguous() for v in parts):
            return False
        rows = sum(len(v) for v in parts)
        residuals = [None] * len(parts)
        if plan.residual is not None:  # its rows as the site's: its new rows may wait while the site's do not
            residuals = [self.env[plan.residual]] + ([self.pending[plan.residual]] if plan.residual in self.pending
                                                     else [])
            sizes = [len(v) for v in parts]
            if [len(v) for v in residuals] != sizes:
                whole = torch.cat(residuals) if len(residuals) > 1 else residuals[0]
                if len(whole) != rows:
                    return False
                residuals = list(whole.split(sizes))
            if any(tuple(v.shape[1:]) != plan.out_shape or not v.is_contiguous() or v.dtype != z.dtype
                   for v in residuals):
                return False
        out = z.new_empty((rows, *plan.out_shape))
        start = 0
        for part, residual in zip(parts, residuals):
            if len(part) and not _conv64.clamp_conv2d(part, plan.limits, plan.weight, plan.bias, plan.stride,
                                                      plan.pads, residual, out[start:start + len(part)]):
                return False  # the kernel failed (warned): torch's steps from here on
            start += len(part)
        self.pending.pop(src, None)
        self.env[plan.output] = out
        self.ran.update(plan.covered)
        return True

    def _clamp_rows(self, i: int, node: fx.Node) -> bool:
        """A clamp site (``FrontierProgram.clamps``) whose input waits for its new points' rows and is read by
        nothing after it: its output written for the old rows and then the new ones into one array, so that the
        site's unit inputs are never copied (the copy the path-order insert makes of them is most of what the
        frontier moves besides its passes, docs/benchmarks.md). False: not such a site (nothing done)."""
        form = self.prog.clamps.get(i)
        src = node.args[0] if node.args else None
        if form is None or not isinstance(src, fx.Node) or src.name not in self.pending:
            return False
        if _global_hooks() or node.op == "call_module" and _hooked(self.prog.modules[node.target]):
            return False  # hooks may change what the module gives: the module's own call
        inplace = self.prog._inplace(node, *self.prog._args(node, self.env))
        if not inplace and src.name not in self.prog.free_after[i]:
            return False  # the input itself is read again later: it must hold every row
        old, new = self.env[src.name], self.pending.pop(src.name)
        out = old.new_empty((len(old) + len(new), *old.shape[1:]))
        lo, hi = form
        for part, rows in ((old, out[:len(old)]), (new, out[len(old):])):
            if hi is None:
                torch.clamp_min(part, lo, out=rows)
            else:
                torch.clamp(part, lo, hi, out=rows)
        self.env[node.name] = out
        if inplace:  # the nodes after it read what the call wrote
            self.env[src.name] = out
        return True

    def enter_paths(self, points: torch.Tensor, path_of_point: torch.Tensor) -> None:
        """Site paths: run the paths' real inputs to the path's site, take each carried value per point from its
        path's row, and make the path points the site's output."""
        p = self.prog
        self._advance(p.path_site)
        node = p.nodes[p.path_site]
        for name in list(self.env):
            if name in p.batch_sizes:
                self.env[name] = len(points)
            elif name in p.per_point:
                self.env[name] = self.env[name][path_of_point]
        p._replace_site(node, self.env, points)
        for name in p.free_after[p.path_site]:
            self.env.pop(name, None)
        self.next = p.path_site + 1

    def run_to(self, k: int) -> torch.Tensor:
        """Run up to site ``k`` (not into it); its unit inputs at every point."""
        cut = self.prog.sites[k]
        self._without_first()
        self._advance(cut)
        self._join(n.name for n in self.prog.nodes[cut].all_input_nodes)
        self._with_first(k)
        return self.prog._args(self.prog.nodes[cut], self.env)[0][0]

    def output(self) -> torch.Tensor:
        """Run to the end of the graph; the model's class scores (``logits_of``) at every point."""
        self._without_first()
        self._advance(len(self.prog.nodes))
        out = logits_of(self.env.pop("__output__"))
        if self.first is not None:
            out = torch.cat([self.first["output"], out])
        if self.keep_last:
            self.last["output"] = out[self.last_row:][:1].clone()
        return out

    def insert(self, k: int, old_pos: torch.Tensor, new_pos: torch.Tensor, left: torch.Tensor, u: torch.Tensor,
               z_new: torch.Tensor) -> None:
        """Add the breakpoints site ``k`` made: interval ``left[i]`` (between points ``left[i]`` and ``left[i] + 1``)
        at relative position ``u[i]``; their unit inputs at site ``k`` are ``z_new`` (exact), every other value
        carried across the cut is interpolated between the interval's ends."""
        n_new = len(old_pos) + len(new_pos)
        site_input = self.prog.site_input(k)
        for name in list(self.env):
            if name in self.prog.batch_sizes:
                self.env[name] = n_new
            if name not in self.prog.per_point:
                continue
            v = self.env[name]
            new = (z_new.reshape(len(new_pos), *v.shape[1:]) if name == site_input
                   else _lerp_rows(v, left, u.to(v.dtype)))
            self.env[name] = _merge(v, new, old_pos, new_pos)

    def append(self, k: int, left: torch.Tensor, u: torch.Tensor, order: torch.Tensor, z_new: torch.Tensor) -> None:
        """``insert`` with the values' rows in the order the points were made (``APPEND_NEW_POINTS``): path order
        visits rows ``order``, and the new points, in interval ``left[i]`` (between path points ``left[i]`` and
        ``left[i] + 1``) at ``u[i]``, become the last rows. They wait in ``pending`` until a node reads the value,
        which a clamp site does without copying the old rows (``_clamp_rows``); every other reader gets them put
        after the old rows first (one copy, as a merge into path order would make)."""
        n_new = len(u)
        if not n_new:  # nothing to add: no value waits
            return
        site_input = self.prog.site_input(k)
        for name in list(self.env):
            if name in self.prog.batch_sizes:
                self.env[name] += n_new
            if name not in self.prog.per_point:
                continue
            self._join([name])  # interpolation reads the rows of every point made so far
            v = self.env[name]
            self.pending[name] = (z_new.reshape(n_new, *v.shape[1:]) if name == site_input
                                  else _lerp_rows(v, left, u.to(v.dtype), order))
