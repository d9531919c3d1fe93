"""Find every nonlinearity a model applies, by intercepting the calls themselves, and name it by where it runs.

A ``torch.overrides.TorchFunctionMode`` sees each ``F.relu``, ``torch.relu``, ``F.gelu``, ``F.max_pool2d`` ... call,
whether it comes from an ``nn.ReLU`` module or from a functional call inside a custom module (Lucent's InceptionV1,
Hugging Face's ``GELUActivation``). Global module hooks keep a stack of the module paths that are running, so a
call is named ``<module path>.<op>``, with ``#k`` for the k-th further call of the same op in the same module within
one forward pass (EfficientNet's ``_swish`` runs twice per block: ``_blocks.3._swish.relu6`` and
``_blocks.3._swish.relu6#1``).

Two extensions cover activations that are not a single torch call:

* *activation modules*: a module whose class composes an activation from primitives (``NewGELUActivation``'s tanh
  formula) is one site whose unit input is the module's input; the calls inside it are not sites.
* *declared sites*: a module whose **output** is the pre-activation of a known activation (TransformerLens'
  ``blocks.0.mlp.hook_pre`` in a SoLU model); calls inside ``suppress`` module paths are then not sites.

Modules that are TransformerLens hook points give aliases: a call whose input is exactly a hook point's output is
also known by that hook name (``blocks.3.mlp.hook_pre``).

Everything is scoped: hooks and the mode are removed in ``finally`` even when the forward pass fails. Inside, float64
convolutions on the CPU take faster ways than ATen's fallback (``_conv64``).
"""

from __future__ import annotations

import fnmatch
import functools
import difflib
import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from ._conv64 import conv_call
from .data.arrays import real_array
from .errors import InvalidInputError, PolytopeLensError, UnsupportedActivationError, first_line
from .kinks import BENDING_OPS, VALUE_READS, Activation, get_activation, resolve_call

__all__ = ["CallSite", "BendTracker", "capture", "list_sites", "select_sites", "StopForward", "SharedPrefix",
           "PrefixRead", "PrefixReplay", "ReplayMismatch", "ACTIVATION_MODULE_CLASSES", "eval_mode",
           "as_module", "float_dtype", "check_eager", "is_batched", "input_tensors", "call_forward", "default_forward",
           "encoded_forward", "batched_values",
           "check_capture_kwargs", "CAPTURE_OPTIONS"]

# composite activation modules, by class name: their input is the unit input, their inner calls are not sites
ACTIVATION_MODULE_CLASSES: dict[str, str] = {
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "SiLUActivation": "silu",
}


@dataclass(frozen=True)
class CallSite:
    """One application of a nonlinearity during a forward pass.

    Attributes
    ----------
    name : str
        Canonical name: ``<module path>.<op>`` plus ``#k`` for repeated calls (``encoder.layer.0.intermediate.
        intermediate_act_fn.gelu``), or the module path of a declared site.
    module_path : str
        Dotted path of the innermost running module ("" for the root).
    activation : Activation
        Registry entry describing the units' pieces and kinks.
    alias : str or None
        TransformerLens hook name whose output is this site's unit input, when there is one.
    order : int
        Position in execution order within the forward pass.
    shape : tuple
        Shape of the unit input when the site was seen (batch first).
    apply : callable or None
        ``apply(z)`` computes this nonlinearity's output for a new unit input ``z`` (same op, same arguments, never
        in place); call it outside ``capture``. None for declared sites, whose activation the model applies later.
    """

    name: str
    module_path: str
    activation: Activation
    alias: str | None
    order: int
    shape: tuple = ()
    apply: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def op(self) -> str:
        return self.activation.name

    def matches(self, pattern: str) -> bool:
        """True when ``pattern`` (a glob) matches the name or the alias."""
        return fnmatch.fnmatchcase(self.name, pattern) or (
            self.alias is not None and fnmatch.fnmatchcase(self.alias, pattern)
        )


class StopForward(Exception):
    """Raised by a handler to end the forward pass early (everything it needs has been seen)."""


Handler = Callable[[CallSite, torch.Tensor], "torch.Tensor | None"]


class PrefixRead(Exception):
    """Raised when the part of a forward pass after a replaced site reads a tensor made before it, which the
    ``SharedPrefix`` in use cannot supply."""


class SharedPrefix:
    """Run the part of a forward pass before a replaced site on fewer rows than the part after it.

    The model is fed ``U`` rows; a handler replaces one site's output with ``N`` rows. Tensors computed before that
    replacement (and the ``inputs``) hold ``U`` rows; when a later operation uses one of them it gets ``rows(t)``
    instead, so everything after the site runs on ``N`` rows as if the model had been fed them. Two uses:

    * ``SharedPrefix(index)``: ``U`` distinct examples, row i of the ``N`` belongs to example ``index[i]``
      (``rows(t) = t[index]``); the replacement is the first one with a number of rows other than ``U``.
    * ``SharedPrefix(rows=fn, at=name)``: the replacement at site ``name``, with any expansion ``fn`` (the
      interpolation between two prefix rows when every prefix tensor is affine between them, or raising
      ``PrefixRead`` when the rest of the pass must not read the prefix).

    Only tensors that operations produced are expanded (never parameters or buffers); callers check equivalence on
    their model before relying on it.
    """

    def __init__(self, index: torch.Tensor | None = None, inputs=(), *, rows=None, at: str | None = None):
        self.index = index
        self.rows = rows if rows is not None else (lambda t: t.index_select(0, index))
        self.at = at
        self.active = False
        self.pre: dict[int, weakref.ref] = {}
        self.register(inputs)

    def register(self, obj) -> None:
        for t in tree_leaves(obj):
            if isinstance(t, torch.Tensor):
                self.pre[id(t)] = weakref.ref(t)

    def expand(self, obj):
        def one(t):
            if isinstance(t, torch.Tensor):
                ref = self.pre.get(id(t))
                if ref is not None and ref() is t:
                    return self.rows(t)
            return t
        return tree_map(one, obj)

    def fired(self, site_name: str, z: torch.Tensor, replacement) -> None:
        if self.at is not None:
            self.active = self.active or site_name == self.at
        elif isinstance(replacement, torch.Tensor) and replacement.shape[:1] == self.index.shape[:1] \
                and z.shape[:1] != replacement.shape[:1]:
            self.active = True


class ReplayMismatch(Exception):
    """A replayed forward pass made a call other than the one recorded at that position."""


class PrefixReplay:
    """The torch calls a forward pass makes before site ``site``, recorded in one pass and replayed in later passes
    on the same inputs: each replayed call returns its recorded output instead of computing it, so the network before
    a path's site runs once per set of paths, not once per batch of points. Module hooks run as usual, the tracker's
    site counters are restored after each replayed call that fired a site, and everything from ``site`` on runs as
    usual. A replayed pass must make the recorded calls in the recorded order (``ReplayMismatch`` otherwise); callers
    check once that a replayed pass reproduces a plain one on their model before relying on it."""

    def __init__(self, site: str):
        self.site = site
        self.calls: list[tuple] = []  # (func, output, tracker counters after the call or None)
        self.recorded = False  # the site fired in the recording pass
        self.position = 0  # next call to replay in the current pass
        self.made: dict[int, list] = {}  # id of a recorded output tensor -> the calls that returned it (recording)
        self.read: set[int] = set()  # calls whose outputs the site or a call after it read (recording pass only)
        self.versions: dict[int, tuple] | None = None  # id -> (tensor, version) of the outputs kept, once the site ran
        self.pending = False  # the site fired: the versions are taken before the next call
        self.spoiled = False  # a kept output was changed in place after the site: the recording must not be used

    def note_read(self, obj) -> None:
        """Mark the recorded outputs among the tensors in ``obj`` as read from the site on (recording pass)."""
        for t in tree_leaves(obj):
            if isinstance(t, torch.Tensor) and id(t) in self.made:
                self.read.update(self.made[id(t)])

    def take_versions(self) -> None:
        """The in-place version of every recorded output, once the site's own call is over (in every pass: an in-place
        site writes its output into its input, which is recorded)."""
        self.pending = False
        self.versions = {id(t): (t, t._version) for _, out, _ in self.calls for t in tree_leaves(out)
                         if isinstance(t, torch.Tensor)}

    def check_versions(self) -> None:
        """At the end of a pass: a recorded output changed in place after the site (a later ``x += ...`` on a tensor
        made before it) would hand the next replayed pass this pass's values, so the recording is spoiled."""
        with torch._C.DisableTorchFunction():  # ``_version`` is a property the capture mode would see as a call
            if self.pending:
                self.take_versions()
            if self.versions is not None and any(t._version != v for t, v in self.versions.values()):
                self.spoiled = True

    def compact(self) -> None:
        """After the recording pass: outputs that neither the site nor anything after it read are only passed from
        one replayed call to the next (which ignores its inputs) or looked at for their shape, so each becomes a
        stride-0 expansion of one zero (the shape, dtype and device, none of the memory)."""
        def placeholder(t):
            if isinstance(t, torch.Tensor) and t.numel() > 1:
                return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
            return t
        self.calls = [(f, out if i in self.read else tree_map(placeholder, out), c)
                      for i, (f, out, c) in enumerate(self.calls)]
        self.made.clear()
        kept = {id(t) for i in self.read for t in tree_leaves(self.calls[i][1]) if isinstance(t, torch.Tensor)}
        self.versions = {k: v for k, v in (self.versions or {}).items() if k in kept}

    def nbytes(self) -> int:
        """Bytes of the recorded outputs (each storage once)."""
        seen = {}
        for _, out, _ in self.calls:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in ``obj`` (nested tuples, lists, dicts, torch's named tuples of results)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


class BendTracker:
    """Which values of one pass depend on the path, and the operations that bend them without being sites.

    A value depends on the path when it is computed from the seeded inputs (``seed``: the model's input for paths
    in input space) or from the output of site ``source`` (paths at a site), or is written with such values (in
    place, through a view, ``out=``, ``__setitem__``). An operation bends such a value when its name is in
    ``kinks.BENDING_OPS``, when it turns floating unit values into integers or booleans (a comparison, a cast,
    argmax; not the ``*_like`` factories or the finiteness checks, whose results do not depend on finite values), or
    when it divides with rounding; everything computed from a bent value is bent. Calls inside an activation module
    (or a declared site's suppressed formula) are the site's, no bend. Reading a path-dependent value into Python or
    numpy (``kinks.VALUE_READS``: ``bool()``, ``item``, ``numpy``, ``equal``) may steer the pass or hide its values,
    and counts as a bend of the next site. ``found`` gets ``(description, site order)`` for each bent unit input of a
    site and, from ``reaches(output, math.inf)``, for a bent output. Values computed from parameters and buffers
    alone (``seed_static``: a pruning mask, quantised weights, a clamped scale) are static: a site whose unit input
    is static is in ``constant`` (it has no crossings on any path)."""

    def __init__(self, source: str | None = None):
        self.source = source
        self.found: list[tuple[str, float]] = []
        self.constant: set[str] = set()  # sites whose unit input is static (computed from parameters alone)
        self.in_hook = 0  # inside a module hook that may fire sites (calls there are the handler's, not the site's)
        self._path: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive, so ids are not reused in the pass)
        self._bent: dict[int, str] = {}
        self._static: dict[int, torch.Tensor] = {}
        self._site_call = False  # a site fired inside the call now ending: the call is the site, no bend
        self._seed_next = False  # the source site fired: its output is the path's

    def seed(self, obj) -> None:
        for t in _tensors(obj):
            self._path[id(t)] = t

    def seed_static(self, tensors) -> None:
        for t in tensors:
            self._static[id(t)] = t

    def _targets(self, func, args, kwargs, out) -> list[torch.Tensor]:
        """The tensors a call writes: its outputs, and what it changes in place (with the tensors they view)."""
        name = getattr(func, "__name__", "")
        written = _tensors(out) + _tensors(kwargs.get("out"))
        if (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))) and args \
                and isinstance(args[0], torch.Tensor):
            written.append(args[0])
        for t in list(written):
            while t._base is not None:
                t = t._base
                written.append(t)
        return written

    def after_call(self, func, args, kwargs, out, where: str, order: int, inside_site: bool = False) -> None:
        site_call = self._site_call and not self.in_hook
        if site_call:
            self._site_call = False
            if self._seed_next:  # the source site's own call
                self._seed_next = False
                self.seed(out)
                return
        name = getattr(func, "__name__", "")
        tensors = _tensors((args, kwargs))
        ins = [t for t in tensors if id(t) in self._path]
        written = self._targets(func, args, kwargs, out)
        if not ins:
            if tensors and all(id(t) in self._static for t in tensors) and not name.endswith("_like"):
                for t in _tensors(out):
                    self._static[id(t)] = t
            else:  # a static tensor written with something else is not static any more
                for t in written:
                    self._static.pop(id(t), None)
            return
        if name in _VALUE_INDEPENDENT:  # factories and finiteness checks: their results do not follow the path
            return
        at = f"called in {f'module {where!r}' if where else 'the model itself'}"
        if name in VALUE_READS:  # whatever the dtype: a branch on a comparison's result is control flow too
            self.found.append((f"{name} on a value that depends on the path ({at}: control flow on it, or its "
                               "values leave torch)", order))
            return
        bend = next((self._bent[id(t)] for t in ins if id(t) in self._bent), None)
        if bend is None and not site_call and not inside_site and any(t.is_floating_point() for t in ins):
            if (name.strip("_") in BENDING_OPS or kwargs.get("rounding_mode") is not None
                    or any(not t.is_floating_point() for t in _tensors(out))):
                bend = f"{name.strip('_') or name} ({at})"
        for t in written:
            self._path[id(t)] = t
            self._static.pop(id(t), None)
            if bend is not None:
                self._bent.setdefault(id(t), bend)

    def fired(self, site, z: torch.Tensor) -> None:
        self.reaches(z, site.order)
        if id(z) in self._static:
            self.constant.add(site.name)
        self._site_call, self._seed_next = True, site.name == self.source

    def after_module(self, output) -> None:
        """A module's output: the source site's when that module was the site (module and declared sites)."""
        if self._site_call and not self.in_hook:
            self._site_call = False
            if self._seed_next:
                self._seed_next = False
                self.seed(output)

    def reaches(self, obj, order: float) -> None:
        bend = next((self._bent[id(t)] for t in _tensors(obj) if id(t) in self._bent), None)
        if bend is not None:
            self.found.append((bend, order))

    def release(self) -> None:
        """Forget the pass's tensors (``found`` and ``constant`` stay)."""
        self._path.clear()
        self._bent.clear()
        self._static.clear()


_VALUE_INDEPENDENT = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "new_tensor", "isfinite", "isnan", "isinf", "isposinf", "isneginf",
    "isreal", "is_floating_point", "is_complex", "size", "dim", "numel", "stride", "is_contiguous",
})


class _SiteMode(TorchFunctionMode):
    def __init__(self, tracker: "_Tracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tr = self.tracker
        sp = tr.shared
        if tr.replay is not None and tr.replay.pending:  # the first call after a site fired by a module's hook
            tr.replay.take_versions()
        rp = tr.replay if tr.replaying else None
        if rp is not None and rp.recorded:
            if rp.position < len(rp.calls):
                out = self._replayed(rp, func)
                if sp is not None and not sp.active:
                    sp.register(out)
                return out
            tr.replaying = False  # the site's call, or one after it: run as usual from here
        if tr.replay is not None and tr.replay.recorded and tr.replay.made:  # recording, after the site fired
            tr.replay.note_read((args, kwargs))
        if sp is not None and sp.active:
            args, kwargs = sp.expand((args, kwargs))
        order = tr.order
        out = self._call(func, args, kwargs)
        if tr.bends is not None:
            tr.bends.after_call(func, args, kwargs, out, tr.current_path(), tr.order, inside_site=tr.suppressed > 0)
        if sp is not None and not sp.active:
            sp.register(out)
        if rp is not None and tr.replaying:  # recording, and the site has not fired yet
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    rp.made.setdefault(id(t), []).append(len(rp.calls))
            rp.calls.append((func, out, (dict(tr.counts), tr.order) if tr.order != order else None))
        elif rp is not None and rp.pending:  # the site's own call is over (an in-place one has written its output)
            rp.take_versions()
        return out

    def _replayed(self, rp: PrefixReplay, func):
        recorded, out, counters = rp.calls[rp.position]
        if recorded is not func and recorded != func:  # property getters come as fresh, equal method-wrappers
            raise ReplayMismatch(f"call {rp.position} before {rp.site!r}: recorded {recorded}, replayed {func}")
        rp.position += 1
        if counters is not None:
            counts, order = counters
            self.tracker.counts, self.tracker.order = dict(counts), order
        return out

    def _call(self, func, args, kwargs):
        tr = self.tracker
        # integer tensors (positions, bucket indices: T5's relative-position clamp) are not units of the function
        if tr.suppressed == 0 and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            try:
                act = resolve_call(func, args, kwargs)
            except UnsupportedActivationError as e:
                where = tr.stack[-1] if tr.stack else "<root>"
                raise UnsupportedActivationError(f"{e} (called in module {where!r})") from None
            if act is not None:
                inplace = _is_inplace(func, args, kwargs)
                # torch.clamp(h, lo, hi, out=h): the caller reads ``out``, so a replaced value is written there too;
                # the site's own function runs without it (it would write into the caller's tensor)
                target = kwargs.get("out") if isinstance(kwargs.get("out"), torch.Tensor) else None
                own = {k: v for k, v in kwargs.items() if k != "out"} if target is not None else kwargs
                out = tr.fire(act, args[0], tr.current_path(), apply=_CallApply(func, args[1:], own, inplace),
                              inplace=inplace or target is not None)
                if out is not None:
                    # the caller may read the mutated input, not the return value (F.relu(x, inplace=True); use x);
                    # not where the input holds a reduced pass's prefix rows (``SharedPrefix(at=...)``), as many as
                    # the points only by chance: later reads of it are the prefix's, and would get the points' values
                    written = args[0] if inplace else target
                    if written is not None and not tr.fewer_rows:
                        if written is target and out.shape != target.shape:  # torch resizes ``out`` to the result:
                            conv_call(func, args, kwargs)  # the call itself does, as in a plain pass (or fails)
                        if out.shape == written.shape:
                            written.copy_(out)
                            return written
                    return out
        return conv_call(func, args, kwargs)  # float64 CPU convolutions and max pooling the faster way (``_conv64``)


@functools.lru_cache(maxsize=None)
def _inplace_position(func) -> int | None:
    """Position of an ``inplace`` parameter in ``func``'s signature (``F.relu(input, inplace)``), if any."""
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _is_inplace(func, args, kwargs) -> bool:
    """Whether an activation call overwrites its input: ``inplace=True`` (by keyword or position) or a trailing
    underscore (``torch.relu_``, ``Tensor.clamp_``)."""
    if kwargs.get("inplace"):
        return True
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    pos = _inplace_position(func)
    return pos is not None and len(args) > pos and bool(args[pos])


class _Tracker:
    """Per-forward state: running module paths, call counters, hook-point outputs for aliases."""

    def __init__(self, model: nn.Module, handler: Handler, activation_modules: dict[str, str],
                 declared: dict[str, Activation], suppress: tuple[str, ...], aliases: dict[int, str]):
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.handler = handler
        self.activation_modules = activation_modules
        self.declared = declared
        self.suppress = suppress
        self.aliases = aliases
        self.stack: list[str] = []
        self.suppressed = 0
        self.shared: SharedPrefix | None = None
        self.fewer_rows = False  # the last site fired was replaced with rows for the points of a reduced pass
        self.replay: PrefixReplay | None = None
        self.bends: BendTracker | None = None  # a probe pass's path-dependent values and their bends
        self.reset()

    def reset(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.order = 0
        self.hook_outputs: dict[tuple, str] = {}
        self.replaying = self.replay is not None  # recording or replaying the calls before the replay's site
        if self.replay is not None:
            if not self.replay.recorded:
                self.replay.calls.clear()
                self.replay.made.clear()
                self.replay.read.clear()
                self.replay.versions, self.replay.pending = None, False
            self.replay.position = 0

    def current_path(self) -> str:
        return self.stack[-1] if self.stack else ""

    def site_name(self, path: str, op: str) -> str:
        k = self.counts.get((path, op), 0)
        self.counts[(path, op)] = k + 1
        base = f"{path}.{op}" if path else op
        return base if k == 0 else f"{base}#{k}"

    def fire(self, act: Activation, z: torch.Tensor, path: str, name: str | None = None,
             apply: Callable[[torch.Tensor], torch.Tensor] | None = None,
             inplace: bool = False) -> torch.Tensor | None:
        alias = self.hook_outputs.get(_key(z))
        site = CallSite(name or self.site_name(path, act.name), path, act, alias, self.order, tuple(z.shape), apply)
        self.order += 1
        if self.replay is not None and site.name == self.replay.site:
            if self.replaying:  # the recording pass reached the site
                self.replay.recorded, self.replaying = True, False
                self.replay.note_read(z)
            self.replay.pending = True  # versions of the recorded outputs once this call is over
        if self.bends is not None:
            self.bends.fired(site, z)
        # an in-place call overwrites z after the handler returns: a handler that keeps z gets a copy
        out = self.handler(site, z.clone() if inplace else z)
        self.fewer_rows = out is not None and self.shared is not None and self.shared.at == site.name
        if self.shared is not None and out is not None:
            self.shared.fired(site.name, z, out)
        return out

    # global module hooks -------------------------------------------------------------------------------
    def pre_hook(self, module, args):
        path = self.paths.get(id(module))
        if path is None:
            return None
        self.stack.append(path)
        cls = type(module).__name__
        if cls in self.activation_modules and self.suppressed == 0 and args and isinstance(args[0], torch.Tensor):
            self.suppressed += 1  # inner primitive calls are part of this activation
            module._pl_activation_site = True  # type: ignore[attr-defined]
        elif any(fnmatch.fnmatchcase(path, s) for s in self.suppress):
            self.suppressed += 1
            module._pl_suppressing = True  # type: ignore[attr-defined]
        return None

    def post_hook(self, module, args, output):
        path = self.paths.get(id(module))
        if path is None:
            return None
        replaced = None
        if self.bends is not None:
            self.bends.in_hook += 1
        if getattr(module, "_pl_activation_site", False):
            del module._pl_activation_site
            self.suppressed -= 1
            act = get_activation(self.activation_modules[type(module).__name__])
            replaced = self.fire(act, args[0], path, apply=module.forward)
        elif getattr(module, "_pl_suppressing", False):
            del module._pl_suppressing
            self.suppressed -= 1
        if path in self.aliases and isinstance(output, torch.Tensor):
            self.hook_outputs[_key(output)] = self.aliases[path]
        if path in self.declared and isinstance(output, torch.Tensor):
            replaced = self.fire(self.declared[path], output, path, name=self.aliases.get(path, path))
        if self.bends is not None:
            self.bends.in_hook -= 1
            self.bends.after_module(output if replaced is None else replaced)
        if self.stack and self.stack[-1] == path:
            self.stack.pop()
        return replaced


class _CallApply:
    """The intercepted call with a new unit input: ``func(z, *rest, **kwargs)``, on a copy of ``z`` when the call is
    in place, through ``conv_call`` (its float64 CPU fast paths)."""

    __slots__ = ("func", "rest", "kwargs", "inplace")

    def __init__(self, func, rest: tuple, kwargs: dict, inplace: bool):
        self.func, self.rest, self.kwargs, self.inplace = func, tuple(rest), dict(kwargs), inplace

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return conv_call(self.func, (z.clone() if self.inplace else z, *self.rest), self.kwargs)


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _tl_aliases(model: nn.Module) -> dict[str, str]:
    """Module path -> preferred TransformerLens hook name, for models that expose ``hook_dict``."""
    hook_dict = getattr(model, "hook_dict", None)
    if not isinstance(hook_dict, dict):
        return {}
    paths = {id(m): p for p, m in model.named_modules()}
    best: dict[str, str] = {}
    for name, mod in hook_dict.items():
        path = paths.get(id(mod))
        if path is None:
            continue
        prev = best.get(path)
        # prefer the canonical TransformerLens names (hook_pre, hook_resid_*) over component-internal ones
        rank = (not name.endswith(("hook_pre", "hook_post", "hook_mid")), name.count("."), len(name))
        if prev is None or rank < (not prev.endswith(("hook_pre", "hook_post", "hook_mid")), prev.count("."),
                                   len(prev)):
            best[path] = name
    return best


# TransformerLens act_fn values that are formulas, not single torch calls: declared at blocks.L.mlp.hook_pre
_TL_COMPOSITE_ACTS = {"solu": "solu", "solu_ln": "solu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh"}


def _tl_declared(model: nn.Module, aliases: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Declared sites and suppressed paths for TransformerLens models whose activation is a formula (SoLU...)."""
    act = str(getattr(getattr(model, "cfg", None), "act_fn", "") or "").lower()
    if act not in _TL_COMPOSITE_ACTS or not aliases:
        return {}, ()
    declared, suppress = {}, []
    for path, name in aliases.items():
        if name.endswith("mlp.hook_pre"):
            declared[name] = _TL_COMPOSITE_ACTS[act]
        if name.endswith("mlp.hook_in"):
            suppress.append(path.rsplit(".", 1)[0] + "*")  # the MLP component: its inner calls form the formula
    return declared, tuple(suppress)


CAPTURE_OPTIONS = ("activation_modules", "declared_sites", "suppress")


def check_capture_kwargs(owner: Callable, kwargs: dict) -> None:
    """A one-line error for a keyword that is neither a parameter of the public function ``owner`` nor one of
    ``capture``'s options (which those functions pass on), with the closest name (``layer=`` for ``layers=``)."""
    params = [p for p in inspect.signature(owner).parameters if p not in ("capture_kwargs", "slice_kwargs")]
    check_kwargs(owner.__name__, kwargs, params + list(CAPTURE_OPTIONS))


def check_kwargs(owner: str, kwargs, params: list[str]) -> None:
    """A one-line error for a keyword of ``owner`` not in ``params``, with the closest name."""
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInputError(f"{owner} got an unexpected keyword argument {key!r}{hint}. Its "
                                    f"parameters: {', '.join(params)}.")


def is_batched(v) -> bool:
    """Whether a model input holds one row per example: a tensor with a first axis. A mapping's other values (a
    flag, a 0-d temperature) go to every batch as they are."""
    return isinstance(v, torch.Tensor) and v.dim() > 0


def float_dtype(module: nn.Module, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter or buffer: what its inputs are cast to; ``default``
    when it has none."""
    tensors = (*module.parameters(), *module.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), default)


def unwrap_encoded(v):
    """A bundle's encoded inputs (``ModelInputs``) as points the functions take: its one tensor (an image model's
    ``{"x": images}``), or the mapping of several (a text model's ids and masks); anything else unchanged."""
    tensors = getattr(v, "tensors", None)
    if not isinstance(tensors, Mapping):
        return v
    return next(iter(tensors.values())) if len(tensors) == 1 else dict(tensors)


def input_tensors(inputs, float_dtype: torch.dtype | None = None):
    """``inputs`` (a tensor, a NumPy array, a mapping of them, or a bundle's ``Inputs``: its tensors) with arrays
    as tensors; floating-point arrays in ``float_dtype`` when given (the model's: NumPy's default is float64)."""
    def tensor(a):
        # torch takes native byte order and positive strides only; complex, strings and objects are no model input
        t = torch.from_numpy(np.ascontiguousarray(real_array(a, "A NumPy input")))
        return t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t

    tensors = getattr(inputs, "tensors", inputs)
    if isinstance(tensors, np.ndarray):
        return tensor(tensors)
    if isinstance(tensors, Mapping):
        return {k: tensor(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    return tensors


def call_forward(module: nn.Module, tensors: Mapping):
    """``module`` called on the named ``tensors`` (a bundle's encoded inputs): by keyword where a key names a parameter
    of its ``forward`` (``{"x": t}`` is ``x`` of ``forward(self, mask=None, x=None)``), by position where it must be
    (a positional-only parameter; the one tensor of a ``forward(*args)``). A key that names no parameter of a forward
    without ``**kwargs`` is a one-line error."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no signature to read (a compiled forward): keywords, as given
        return module(**tensors)
    P, params = inspect.Parameter, sig.parameters
    kinds = {n: p.kind for n, p in params.items() if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)}
    only = [n for n, k in kinds.items() if k == P.POSITIONAL_ONLY]
    only = only[:max((i + 1 for i, n in enumerate(only) if n in tensors), default=0)]  # up to the last one given
    missing = [n for n in only if n not in tensors and params[n].default is P.empty]
    if missing:
        raise InvalidInputError(f"The inputs lack {missing[0]!r}, which comes by position before the ones they give "
                                f"in {type(module).__name__}.forward{sig}; give it too.")
    args = [tensors[n] if n in tensors else params[n].default for n in only]
    kwargs = {k: v for k, v in tensors.items() if k in kinds and kinds[k] != P.POSITIONAL_ONLY}
    rest = [k for k in tensors if k not in kinds]
    has = {p.kind for p in params.values()}
    if P.VAR_KEYWORD in has:
        kwargs.update((k, tensors[k]) for k in rest)
    elif len(rest) == 1 and P.VAR_POSITIONAL in has and all(k == P.KEYWORD_ONLY for k in kinds.values()):
        args.append(tensors[rest[0]])  # forward(*args): its one tensor by position
    elif rest:
        raise InvalidInputError(f"The input {rest[0]!r} names no parameter of {type(module).__name__}.forward{sig}; "
                                "key each tensor by the parameter it is for.")
    return module(*args, **kwargs)


def positional_parameters(module: nn.Module) -> list[str] | None:
    """The parameters of ``module.forward`` that ``module(a, b, ...)`` binds by position, in order ("*" for a
    ``*args``, which takes the rest); None where the signature cannot be read."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return names + ["*"]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names


def _binds_first(module: nn.Module, key: str) -> bool:
    """Whether ``module(x)`` gives ``x`` to the parameter ``key`` (its forward's first positional parameter is
    ``key``, or it takes ``*args`` first); True where the signature cannot be read (a plain call, as always)."""
    names = positional_parameters(module)
    return names is None or bool(names) and names[0] in (key, "*")


def default_forward(model: nn.Module, key: str | None = None) -> Callable[[object], object]:
    """How paths, slices and codes call ``model`` on a batch: ``model(x)``, or ``call_forward`` for a mapping of named
    inputs. With ``key`` (the one name of a bundle's encoded inputs, ``encoded_forward``), a tensor goes to the forward
    parameter of that name, by keyword where a plain call would give it to another parameter."""
    if key is not None and not _binds_first(model, key):
        def keyed(x):
            return call_forward(model, x if isinstance(x, Mapping) else {key: x})
        return keyed

    def forward(x):
        return call_forward(model, x) if isinstance(x, Mapping) else model(x)
    forward.plain_call = True  # model(x): what an FX graph of the model reproduces (``paths.frontier``)
    return forward


def encoded_forward(forward: Callable | None, *points) -> Callable | None:
    """The ``forward=`` option (a function of the prepared model) of a function given ``points``: as given, or, when
    None and the points are a bundle's encoded inputs of one tensor (``unwrap_encoded`` drops their name), one that
    passes the tensor under that name (``default_forward(model, key)``)."""
    if forward is not None:
        return forward
    for v in points:
        tensors = getattr(v, "tensors", None)
        if isinstance(tensors, Mapping) and len(tensors) == 1:
            return functools.partial(default_forward, key=next(iter(tensors)))
    return None


def batched_values(tensors, owner: str) -> list[torch.Tensor]:
    """The tensors of model inputs (``input_tensors``) that hold one row per example, all with the same number of
    rows; a one-line error when there are none or their numbers differ."""
    if isinstance(tensors, torch.Tensor):
        values = [tensors] if tensors.dim() else []
    elif isinstance(tensors, Mapping):
        values = [v for v in tensors.values() if is_batched(v)]
    else:
        raise InvalidInputError(f"The inputs of {owner} must be a tensor, a NumPy array or a mapping of them, batch "
                                f"first. Got {type(tensors).__name__}.")
    if not values:
        raise InvalidInputError(f"The inputs of {owner} hold no tensor with a batch dimension (one row per example).")
    if any(v.shape[0] != values[0].shape[0] for v in values):
        raise InvalidInputError(f"The inputs of {owner} hold different numbers of examples: "
                                f"{[tuple(v.shape) for v in values]}.")
    if any(v.is_meta for v in values):
        raise InvalidInputError(f"The inputs of {owner} are on the 'meta' device, which holds shapes but no values; "
                                "give real tensors.")
    return values


def as_module(model, owner: str = "the model") -> nn.Module:
    """``model`` itself, or the module of a ``ModelBundle`` (``load_model``'s result: the only way to get an embedded
    model in Python); anything else is a one-line error."""
    module = getattr(model, "module", None)
    if not isinstance(model, nn.Module) and isinstance(module, nn.Module) and isinstance(getattr(model, "spec", None),
                                                                                         str):
        return module
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"The 'model' parameter of {owner} must be a torch.nn.Module or a ModelBundle "
                                f"(polytope_lens.models.load_model). Got {type(model).__name__}.")
    return model


def _code_names(code) -> set[str]:
    """Global and attribute names a code object reads, its nested functions' and comprehensions' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


@functools.lru_cache(maxsize=None)
def _script_functions(cls: type) -> tuple[str, ...]:
    """TorchScript functions (``@torch.jit.script``) that the ``forward`` of ``cls`` (or a base class) names: a
    global (``fused_gelu(x)``) or an attribute of an imported module (``ops.fused_gelu(x)``)."""
    def attribute(module, name):
        try:  # a lazy module (transformers') may raise anything for a name it cannot import
            return getattr(module, name, None)
        except Exception:  # noqa: BLE001
            return None

    found = []
    for klass in cls.__mro__:
        forward = klass.__dict__.get("forward")
        try:
            forward = inspect.unwrap(forward) if forward is not None else None  # under a functools.wraps decorator
        except ValueError:
            pass
        code = getattr(forward, "__code__", None)
        if code is None:
            continue
        names, scope = _code_names(code), getattr(forward, "__globals__", {})
        for name in sorted(names):
            value = scope.get(name)
            if isinstance(value, torch.jit.ScriptFunction):
                found.append(name)
            elif inspect.ismodule(value) and value.__name__.split(".")[0] != "torch":
                found += [f"{name}.{a}" for a in sorted(names) if isinstance(attribute(value, a),
                                                                           torch.jit.ScriptFunction)]
    return tuple(found)


def check_eager(model: nn.Module) -> None:
    """A one-line error when ``model`` or one of its modules is TorchScript, or calls a TorchScript function from
    its ``forward``: those calls run inside TorchScript, where no nonlinearity can be seen."""
    scripted = next((n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise InvalidInputError(f"{'Module ' + repr(scripted) if scripted else 'The model'} is TorchScript "
                                "(torch.jit.script or trace): what it computes inside cannot be seen, so any "
                                "nonlinearity there would be missed; give the eager module it was made from.")
    for path, module in model.named_modules():
        called = _script_functions(type(module))
        if called:
            where = f"module {path!r}" if path else "the model"
            raise InvalidInputError(f"The forward of {where} ({type(module).__name__}) calls the TorchScript function "
                                    f"{called[0]!r} (torch.jit.script): what it computes inside cannot be seen, so any "
                                    "nonlinearity there would be missed; call the plain Python function instead.")


def _declared_paths(model: nn.Module, declared_sites, by_alias: dict[str, str]) -> dict:
    """``declared_sites`` keyed by module path (a TransformerLens hook name becomes its hook point's path); a key
    that names no module of ``model`` is a one-line error with the closest name."""
    if not declared_sites:
        return {}
    if not isinstance(declared_sites, Mapping):
        raise InvalidInputError(f"The 'declared_sites' parameter must be a dict {{module path or hook name: activation "
                                f"name}}. Got {type(declared_sites).__name__}.")
    ids = {id(m): p for p, m in model.named_modules()}
    paths, hooks = set(ids.values()), getattr(model, "hook_dict", None)
    hooks = {k: ids[id(m)] for k, m in hooks.items() if id(m) in ids} if isinstance(hooks, dict) else {}
    out = {}
    for key, act in declared_sites.items():
        if key in by_alias or key in paths:
            out[key] = act
        elif key in hooks:
            out[hooks[key]] = act
        else:
            names = sorted(p for p in paths | set(hooks) if p)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "see model.named_modules()"
            raise InvalidInputError(f"The 'declared_sites' parameter names {key!r}, which is not a module path"
                                    f"{' or hook name' if hooks else ''} of the model ({hint}).")
    return out


@contextmanager
def capture(model: nn.Module, handler: Handler, *, activation_modules: dict[str, str] | None = None,
            declared_sites: dict[str, str | Activation] | None = None,
            suppress: tuple[str, ...] = (), shared: SharedPrefix | None = None,
            replay: PrefixReplay | None = None, bends: "BendTracker | None" = None) -> Iterator[Callable[[], None]]:
    """Call ``handler(site, unit_input)`` for every nonlinearity ``model`` applies inside the ``with`` block.

    The handler runs *before* the nonlinearity; returning a tensor replaces the nonlinearity's output (used by
    interventions such as activation scaling), returning None lets it run. Raise ``StopForward`` to end the pass.

    Parameters
    ----------
    model : nn.Module
        The model whose module tree names the sites.
    handler : callable
        ``handler(site: CallSite, z: Tensor) -> Tensor | None``.
    activation_modules : dict, optional
        Extra ``{class name: registry name}`` for composite activation modules (added to
        ``ACTIVATION_MODULE_CLASSES``).
    declared_sites : dict, optional
        ``{module path or TransformerLens hook name: registry name}``: the module's output is a site's unit input.
        TransformerLens models whose ``cfg.act_fn`` is a formula (SoLU, gelu_new) get theirs automatically.
    suppress : tuple of str
        Module path globs inside which intercepted calls are not sites (used with ``declared_sites``).
    shared : SharedPrefix, optional
        Run the part before a replaced site on fewer rows (once per distinct example, or at a few points).
    replay : PrefixReplay, optional
        Record the calls before its site in the first pass, return the recorded outputs in later passes.
    bends : BendTracker, optional
        Follows which values depend on the path and records the operations that bend them without being sites.

    Yields
    ------
    reset : callable
        Call between forward passes to restart the per-pass call counters (``run`` does it for you).
    """
    model = as_module(model, "capture")
    check_eager(model)
    aliases = _tl_aliases(model)
    by_alias = {v: k for k, v in aliases.items()}
    tl_declared, tl_suppress = _tl_declared(model, aliases)
    suppress = tuple(suppress) + tl_suppress
    declared: dict[str, Activation] = {}
    for key, act in {**tl_declared, **_declared_paths(model, declared_sites, by_alias)}.items():
        path = by_alias.get(key, key)
        declared[path] = act if isinstance(act, Activation) else get_activation(act)
    tracker = _Tracker(model, handler, {**ACTIVATION_MODULE_CLASSES, **(activation_modules or {})}, declared,
                       tuple(suppress), aliases)
    tracker.shared, tracker.replay, tracker.bends = shared, replay, bends
    pre = nn.modules.module.register_module_forward_pre_hook(tracker.pre_hook)
    post = nn.modules.module.register_module_forward_hook(tracker.post_hook, always_call=True)
    try:
        with _SiteMode(tracker):
            yield tracker.reset
    finally:
        pre.remove()
        post.remove()


def run(model: nn.Module, forward: Callable[[], object], handler: Handler, *, shared: SharedPrefix | None = None,
        replay: PrefixReplay | None = None, **capture_kwargs) -> object | None:
    """Run ``forward()`` under ``capture``; returns its result, or None when a handler stopped it early.

    ``shared``: run the part before a replaced site on fewer rows (see ``SharedPrefix``); ``replay``: record or
    replay the calls before a site (see ``PrefixReplay``)."""
    with capture(model, handler, shared=shared, replay=replay, **capture_kwargs) as reset, torch.no_grad():
        reset()
        try:
            return forward()
        except StopForward:
            return None
        finally:
            if replay is not None and replay.recorded:  # calls after the pass (``no_grad``'s own exit) run as usual
                replay.position = len(replay.calls)
                replay.check_versions()


def check_model_runs(fwd: Callable, x, owner: str, what: str) -> None:
    """Run the model (``fwd``) on ``x``, one row of ``what``; a model that raises on it gives a one-line
    ``InvalidInputError`` naming the row's shape and the model's error (inputs of a shape the model does not take,
    most often) instead of a traceback from inside the model. Errors of the library and running out of memory pass
    through as they are."""
    try:
        with torch.no_grad():
            fwd(x)
    except (torch.OutOfMemoryError, PolytopeLensError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's model on these inputs
        shape = {k: tuple(v.shape[1:]) for k, v in x.items() if is_batched(v)} if isinstance(x, Mapping) else \
            tuple(x.shape[1:])
        first = first_line(e, 200, empty="")
        hint = " Rows of shape () are entries of a 1-D tensor: one example is x[None]." if shape == () else ""
        raise InvalidInputError(f"The model raised {type(e).__name__} on the {what} of {owner} (one row of shape "
                                f"{shape}): {first}. Are they of the shape the model takes?{hint}") from e


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside (dropout off, BatchNorm on its running statistics, which are left as they are);
    every module's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def model_errors(fwd: Callable, x, owner: str, what: str):
    """Inside it, an error from a run of the model on a batch like ``x`` becomes ``check_model_runs``'s one line
    where a plain pass of the model on ``x`` (one row of ``what``) fails too; errors of the library, and ones the
    model alone does not make, pass through as they are. The plain pass runs only after a failure: nothing is added
    to a run that works."""
    try:
        yield
    except (torch.OutOfMemoryError, PolytopeLensError):
        raise
    except Exception:  # noqa: BLE001 - whose error it is, the plain pass decides
        check_model_runs(fwd, x, owner, what)
        raise


def list_sites(model: nn.Module, forward: Callable[[], object], **capture_kwargs) -> list[CallSite]:
    """The call sites of one forward pass, in execution order."""
    sites: list[CallSite] = []
    run(model, forward, lambda site, z: sites.append(site), **capture_kwargs)
    return sites


def select_sites(sites: list[CallSite], layers: str | list[str] | None) -> list[CallSite]:
    """Sites whose name or alias matches any glob in ``layers`` (comma-separated string or list; None = all).

    Raises
    ------
    InvalidInputError
        If a pattern matches no site; the message lists the first available names.
    """
    if layers is None:
        return list(sites)
    try:
        given = layers.split(",") if isinstance(layers, str) else list(layers)
    except TypeError:
        given = [None]
    if not all(isinstance(p, str) for p in given):
        raise InvalidInputError(f"The 'layers' parameter must be a site name or glob (comma-separated string), a list "
                                f"of them, or None. Got {layers!r}.")
    patterns = [p.strip() for p in given if p.strip()]
    if not patterns:
        raise InvalidInputError("The 'layers' parameter is empty; give a glob such as '*relu*' or a site name.")
    chosen = []
    for p in patterns:
        hits = [s for s in sites if s.matches(p)]
        if not hits:
            every = [n for st in sites for n in (st.name, st.alias) if n]
            close = difflib.get_close_matches(p, every, n=1, cutoff=0.6)
            names = ", ".join(st.alias or st.name for st in sites[:8]) + (" ..." if len(sites) > 8 else "")
            raise InvalidInputError(
                f"The layer pattern {p!r} matches none of the model's {len(sites)} activation sites"
                + (f" (did you mean {close[0]!r}?)" if close else f" ({names or 'none found'})")
                + "; run 'polytope-lens sites' to list them.")
        chosen.extend(s for s in hits if s not in chosen)
    return sorted(chosen, key=lambda s: s.order)
