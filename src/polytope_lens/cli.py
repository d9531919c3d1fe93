"""The ``polytope-lens`` command: a thin typer layer over the Python API.

Each command parses its options, calls one library function and prints or writes its result. Library errors
(``PolytopeLensError``) become one red line on stderr and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from typer.core import TyperGroup

from .errors import InvalidInputError, PolytopeLensError, RandomWeightsWarning

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

out = Console()
err = Console(stderr=True)


# Click's UsageError, whether typer uses click or (newer typer) its own copy of click: a base of typer.BadParameter
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_NoArgsIsHelp = getattr(sys.modules[_UsageError.__module__], "NoArgsIsHelpError", ())


def _usage_error(e):
    """A usage error (an option's value of the wrong type, a missing value or option, an unknown option or command)
    as one line on stderr with Click's own message, and exit code 1, as the commands' own errors (Click would print
    the usage and a box, and exit 2). Without arguments the help is shown as before."""
    if isinstance(e, _NoArgsIsHelp):
        raise e
    message = " ".join(e.format_message().split())
    message += "" if message.endswith((".", "?", "!")) else "."
    hint = "" if e.ctx is None else f" Try '{e.ctx.command_path} --help' for help."
    err.print(f"[red]error:[/red] {escape(message + hint)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


class _Group(TyperGroup):
    """The app's command group: usage errors of the group and of every command become ``_usage_error``'s line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _UsageError as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)  # a command's own options are parsed here
        except _UsageError as e:
            _usage_error(e)


app = typer.Typer(help="Look at any PyTorch network through the polytope lens.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, cls=_Group)


def _version_callback(value: bool):
    if value:
        import torch

        from . import __version__

        out.print(f"polytope-lens {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
        raise typer.Exit()


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """polytope-lens' own warnings (``RandomWeightsWarning``) as one line on stderr; others as Python shows them."""
    if issubclass(category, RandomWeightsWarning):
        err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _default(message, category, filename, lineno, file, line)


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True,
                                                         help="Print versions and exit.")] = None):
    """Spline codes, polytope boundaries and the paper's predictions for PyTorch models."""
    warnings.showwarning = _show_warning


# what an out-of-memory error advises, per command: the options that command has which lower its memory
_OOM_ADVICE = {
    "sites_cmd": "the model does not fit in memory here (it runs one example); use a smaller model",
    "codes_cmd": "lower --batch-size or use a smaller model",
    "path_cmd": "lower --memory-mib, the number of pairs or the model size",
    "scale_cmd": "lower --memory-mib or the model size",
    "slice_cmd": "lower --memory-mib, slice fewer sites (--until) or use a smaller model",
    "complexity_cmd": "lower --limit, --n-dirs or the model size",
    "cluster_cmd": "lower --limit or --n-neighbors, or cluster fewer sites (--layers)",
    "reproduce_cmd": "use --quick or fewer --models",
}


def _user_errors(fn):
    """Turn library errors into one line on stderr and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PolytopeLensError as e:
            err.print(f"[red]error:[/red] {escape(_in_flags(str(e), kwargs))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as e:  # a file that cannot be read or written: the system's reason, on one line
            what = f"{e.strerror}: {e.filename!r}" if e.strerror and e.filename else str(e)
            err.print(f"[red]error:[/red] {escape(what)}.", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if kwargs.get("resume"):  # a code store's partial folder is kept for --resume
                err.print("[red]interrupted[/red]: the partial store is kept; run the same command again to continue.")
            else:
                err.print("[red]interrupted[/red]: nothing was written.")
            raise typer.Exit(130) from None
        except (MemoryError, RuntimeError) as e:  # torch's CPU and CUDA allocation failures are RuntimeErrors
            text = str(e)
            if not isinstance(e, MemoryError) and "allocate" not in text and "out of memory" not in text:
                raise
            asked = re.search(r"tried to allocate ([0-9.]+) ?([KMGT]?i?B|bytes)", text)
            what = f"tried to allocate {asked.group(1)} {asked.group(2)}" if asked else type(e).__name__
            advice = _OOM_ADVICE.get(fn.__name__, "use fewer inputs or a smaller model")
            err.print(f"[red]error:[/red] out of memory ({escape(what)}); {advice}.", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


def _in_flags(message: str, options: dict) -> str:
    """An API error about a parameter the command takes as an option of the same name, said with the option's flag
    ("The 'limit' parameter of load_data must ..." -> "--limit must ...", "The 'device' parameter is ..." ->
    "--device is ...")."""
    def flag(m: re.Match) -> str:
        return f"--{m.group(1).replace('_', '-')}" if m.group(1) in options else m.group(0)
    return re.sub(r"The '(\w+)' parameter(?: of [\w.]+)?", flag, message)


def _progress(total: int, what: str) -> Progress:
    # the percentage moves while one long path is refined piece by piece (fractions of a path), M/N when items end
    return _bar(TextColumn(what), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn())


def _bar(*columns) -> Progress:
    """A transient progress display on stderr, only where stderr is a terminal (elsewhere a transient display
    would leave nothing but a blank line, before an error or the results)."""
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


def _two_floats(text: str, sep: str, option: str, form: str) -> tuple[float, float]:
    """Parse 'A<sep>B' into two floats; a one-line error naming the option otherwise."""
    try:
        a, b = (float(v) for v in text.split(sep))
    except ValueError:
        raise InvalidInputError(f"{option} must be {form}. Got {text!r}.") from None
    return a, b


def _position(text: str) -> tuple[float, float]:
    return _two_floats(text, ",", "--position", "two fractions 'ROW,COL' such as 0.5,0.5")


@app.command("models")
@_user_errors
def models_cmd():
    """List the model and data specs, whether each is available here, and why not."""
    from .data import list_data
    from .models import list_models

    for title, rows in (("models", list_models()), ("data", list_data())):
        table = Table(title=title, title_justify="left")
        table.add_column("spec")
        table.add_column("available")
        table.add_column("notes")
        for name, ok, reason in rows:
            table.add_row(name, "[green]yes[/green]" if ok else "[red]no[/red]", reason)
        out.print(table)


@app.command("sites")
@_user_errors
def sites_cmd(
    model: Annotated[str, typer.Option(help="Model spec, e.g. efficientnet-lite0, minilm, toy:2-64-64-2.")],
    data: Annotated[Optional[str], typer.Option(
        help="Data spec for the example run (default: the model's own).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated globs over site names or aliases.")] = None,
):
    """List the activation sites a model applies (one forward pass on one example), in execution order."""
    from .capture import list_sites, select_sites
    from .extract import data_errors
    from .models import load_model

    bundle = load_model(model)
    source = _example_data(bundle, data)
    inputs = bundle.encode(source, [0])
    with data_errors(bundle, source, inputs):
        found = list_sites(bundle.module, lambda: bundle.forward(inputs))
    sites = select_sites(found, layers)
    table = Table(title=f"{len(sites)} activation sites of {bundle.spec}", title_justify="left")
    for col in ("#", "site", "alias", "activation", "exact"):
        table.add_column(col, overflow="fold")
    for s in sites:
        table.add_row(str(s.order), s.name, s.alias or "", s.op, "yes" if s.activation.exact else "no (threshold)")
    out.print(table)


def _example_data(bundle, data: str | None):
    from .data import load_data

    if data is not None:
        return load_data(data, limit=1)
    default = bundle.example_data or {"text": "pydoc", "image": "skimage"}.get(bundle.modality)
    if default is None:
        import numpy as np

        from .data import DataSource

        if bundle.input_shape is None:
            raise InvalidInputError("The model's input shape is unknown here (no Linear layer reads its input first); "
                                    "give --data with an example it takes (e.g. --data npy:x.npy) or the shape in "
                                    "the spec (file:PATH:input_shape=1x8x8).")
        return DataSource("zeros", "array", np.zeros((1, *bundle.input_shape), np.float32), None, None,
                          {"source": "zeros"})
    return load_data(default, limit=1)


@app.command("codes")
@_user_errors
def codes_cmd(
    model: Annotated[str, typer.Option(help="Model spec (see 'polytope-lens models').")],
    data: Annotated[str, typer.Option(help="Data spec: pydoc, austen, skimage, digits, fashion-mnist, "
                                           "text:PATH, images:DIR, npy:PATH ...")],
    out_path: Annotated[Path, typer.Option("--out", help="Destination zarr store (written atomically).")],
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated globs over site names or aliases "
                                                       "(default: every site).")] = None,
    units: Annotated[str, typer.Option(help="auto | all | position | tokens | all-tokens. auto: the paper's "
                                            "token protocol for text models, all units otherwise.")] = "auto",
    k: Annotated[int, typer.Option(help="Token protocol: positions per sequence.")] = 6,
    skip: Annotated[int, typer.Option(help="Token protocol: leading tokens skipped.")] = 100,
    position: Annotated[str, typer.Option(help="CNN protocol: spatial position as fractions ROW,COL.")] = "0.5,0.5",
    limit: Annotated[Optional[int], typer.Option(help="Use only N items of the data: the first N (for digits and "
                                                      "fashion-mnist a class-balanced seeded sample).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass and per resumable chunk (as "
                                                 "extract_to_store; the in-memory API spline_codes defaults to 64).")
                          ] = 32,
    max_length: Annotated[int, typer.Option(help="Longest token sequence (text models).")] = 256,
    soft: Annotated[bool, typer.Option(help="Also store soft codes in (0,1) for smooth activations.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing code store (never a file, a folder that is "
                                                 "not a code store, or the current folder).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (same model, data, layers and "
                                              "batching) from its partial store.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary as JSON here.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Code chunks on Ray workers: local | auto | HOST:PORT "
                                                             "| ray://HOST:PORT (needs polytope-lens\\[scale]); the "
                                                             "store is the same as without it.")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="Ray workers (default: one per GPU, else per CPU).")
                           ] = None,
):
    """Extract packed spline codes of a model over a data set into a chunked zarr store, and summarise them."""
    from .data import load_data
    from .extract import extract_to_store
    from .models import load_model

    from .store import check_destination

    if json_out is not None:
        _check_json_target(json_out)
        store, summary_file = out_path.resolve(), json_out.resolve()
        if summary_file == store or store in summary_file.parents:  # the JSON would replace the store, or land in it
            where = "names the --out store {!r} itself" if summary_file == store else "is inside the --out store {!r}"
            raise InvalidInputError(f"--json {str(json_out)!r} {where.format(str(out_path))}; give the JSON summary a "
                                    "path outside the store.")
    _check_ray(ray, ray_workers)
    check_destination(out_path, overwrite=overwrite)  # before the model loads; the writer checks again
    bundle = load_model(model)
    source = load_data(data, limit=limit)
    with _progress(len(source), f"codes {bundle.spec} on {source.spec}") as bar:
        task = bar.add_task("codes", total=len(source))
        summary = extract_to_store(bundle, source, out_path, overwrite=overwrite, resume=resume, layers=layers,
                                   units=units, k=k, skip=skip, position=_position(position), soft=soft,
                                   batch_size=batch_size, max_length=max_length,
                                   progress=lambda n: bar.advance(task, n),
                                   **({"ray_address": ray, "ray_workers": ray_workers} if ray is not None else {}))
    _print_summary(summary)
    if json_out is not None:
        _write_json(json_out, summary)


def _np_load(path: Path, what: str):
    """``np.load`` of an existing file (no pickles), or a one-line error naming the option."""
    import numpy as np

    if not path.is_file():
        raise InvalidInputError(f"{what} {str(path)!r} does not exist.")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise InvalidInputError(f"{what} {str(path)!r} is not a readable numpy file ({type(e).__name__}).") from None


def _load_npy(path: Path, what: str):
    """The array in an existing .npy file, or a one-line error naming the option."""
    import numpy as np

    if path.suffix != ".npy" or not path.is_file():
        raise InvalidInputError(f"{what} {str(path)!r} must be an existing .npy file.")
    arr = _np_load(path, what)
    if not isinstance(arr, np.ndarray):
        raise InvalidInputError(f"{what} {str(path)!r} holds an .npz archive, not one .npy array.")
    return arr


def _item(bundle, ref: str, what: str, max_tokens: int | None = None):
    """(model input(s), description) for ``DATA_SPEC@KEY`` (KEY: row index or label name, e.g. skimage@chelsea) or a
    .npy file; the description says which row and label a reference resolved to (for the JSON). Text is refused
    unless ``max_tokens`` is given: then the encoded mapping (token ids, attention mask) comes back, for analyses of
    one text's activations (scaling rays); a path between two texts is not defined."""
    import numpy as np
    import torch

    from .data import load_data

    if "@" in ref and not (ref.endswith(".npy") and Path(ref).is_file()):  # an existing .npy named x@0.npy is a file
        spec, key = ref.rsplit("@", 1)
        source = load_data(spec)
        names = list(source.label_names or [])
        if key.isdigit():
            row = int(key)
        elif source.labels is not None and key in names:
            row = int(np.flatnonzero(np.asarray(source.labels) == names.index(key))[0])
        else:
            named = [str(n) for n in names if not str(n).isdigit()]  # digit strings always read as row indices
            if named:
                raise InvalidInputError(f"{what} {ref!r}: {key!r} is neither a row index (0 to {len(source) - 1}) "
                                        f"nor one of the labels ({', '.join(named[:12])}"
                                        f"{', ...' if len(named) > 12 else ''}).")
            raise InvalidInputError(f"{what} {ref!r}: {key!r} is not a row index (0 to {len(source) - 1})"
                                    + ("; this data's labels are numbers, which always read as row indices, so "
                                       "pick a row." if names else "; this data has no label names."))
        if not 0 <= row < len(source):
            raise InvalidInputError(f"{what} {ref!r}: row {row} is out of range (the data has {len(source)} items).")
        inputs = (bundle.encode(source, [row], max_length=max_tokens)
                  if bundle.modality == "text" and max_tokens is not None else bundle.encode(source, [row]))
        if source.modality == "array":  # npy:/npz: rows
            _keep_float64(inputs, bundle, np.asarray(source.items[row:row + 1]))
        label = None if source.labels is None else np.asarray(source.labels)[row].item()
        if label is not None and names and isinstance(label, int) and 0 <= label < len(names):
            label = str(names[label])
        info = {"data": spec, "row": row, "label": label}
    else:
        path = Path(ref)
        if path.suffix != ".npy" or not path.is_file():
            raise InvalidInputError(f"{what} {ref!r} must be DATA_SPEC@INDEX (e.g. skimage@chelsea, digits@0) or an "
                                    "existing .npy file.")
        from .data import DataSource
        from .data.arrays import real_array

        arr = real_array(_load_npy(path, what), f"{what} {ref!r}")
        arr = arr if bundle.input_shape is None or arr.shape != tuple(bundle.input_shape) else arr[None]
        inputs = bundle.encode(DataSource(str(path), "array", arr.astype(np.float32), None, None, {}))
        _keep_float64(inputs, bundle, arr)
        info = {"file": str(path)}
    if bundle.modality == "text":
        if max_tokens is None:
            raise InvalidInputError(f"Paths between text inputs are not defined (token sequences differ); use the "
                                    f"Python API with layer= on {bundle.spec!r}, or 'scale' for one text's rays.")
        return dict(inputs.tensors), info
    return next(iter(inputs.tensors.values())).to(torch.float64), info


def _keep_float64(inputs, bundle, arr) -> None:
    """Arrays are model inputs as they are, and ``encode`` casts them to float32: float64 values (any byte order) are
    put back, so an endpoint keeps the values --pairs keeps (a path between close float64 points was refused)."""
    import numpy as np
    import torch

    if arr.dtype.kind == "f" and arr.dtype.itemsize >= 8:
        encoded = inputs.tensors[bundle.input_name]
        inputs.tensors[bundle.input_name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).reshape(
            encoded.shape)


def _pairs(bundle, path: Path):
    import numpy as np
    import torch

    from .data.arrays import npz_member, real_array

    z = _np_load(path, "The pairs file")
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InvalidInputError(f"The pairs file {str(path)!r} must be an .npz holding arrays 'start' and 'end'.")
    with z:
        if "start" not in z or "end" not in z:
            raise InvalidInputError(f"The pairs file {str(path)!r} must hold arrays 'start' and 'end'; it has "
                                    f"{', '.join(z.files)}.")
        start, end = (npz_member(z, k, f"the pairs file {str(path)!r}") for k in ("start", "end"))
    start, end = (real_array(arr, f"The pairs file's {name!r} array") for name, arr in (("start", start), ("end", end)))
    want = None if bundle.input_shape is None else tuple(bundle.input_shape)
    for name, arr in (("start", start), ("end", end)):
        if want is not None and tuple(arr.shape[1:]) != want:
            raise InvalidInputError(f"The pairs file's {name!r} array has shape {arr.shape}; model {bundle.spec!r} "
                                    f"needs (P, {', '.join(map(str, want))}).")
    return torch.from_numpy(start).double(), torch.from_numpy(end).double()


def _dtype(name: str):
    import torch

    if name not in ("float64", "float32"):
        raise InvalidInputError(f"--dtype must be float64 or float32. Got {name!r}.")
    return getattr(torch, name)


def _write_json(path: Path, payload: dict, *pictures: tuple) -> None:
    """Write the JSON (and ``pictures``: (path, write(tmp_path)) pairs) all or none: each to a temporary file beside
    it, then every one renamed into place; a failure leaves none of them."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"The JSON output folder {str(parent)!r} does not exist.")
    from ._outputs import json_text, plain_mode

    items = [*pictures, (path, lambda tmp: Path(tmp).write_text(json_text(payload)))]
    written = []
    mode = plain_mode(folder=False)
    try:
        for target, write in items:
            fd, tmp = tempfile.mkstemp(prefix=".polytope-lens-", suffix=".tmp",
                                       dir=target.parent if str(target.parent) else ".")
            os.close(fd)
            os.chmod(tmp, mode)
            written.append((tmp, target))
            write(tmp)
        for tmp, target in written:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _check_json_target(path: Path, what: str = "The JSON output") -> None:
    """One-line error unless ``path`` can be written as a file (``what`` names the option in the message)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise InvalidInputError(f"{what} folder {str(parent)!r} does not exist or is not writable.")
        longest = os.pathconf(parent, "PC_NAME_MAX")
        if len(path.name.encode()) > longest:
            raise InvalidInputError(f"{what} file name is {len(path.name.encode())} bytes long; this file system "
                                    f"takes at most {longest}.")
        if path.is_dir():
            raise InvalidInputError(f"{what} {str(path)!r} is a folder; give a file name.")
    except OSError as e:
        raise InvalidInputError(f"{what} {str(path)!r} cannot be written: {e.strerror or e}.") from None


def _print_paths(result, what: str) -> None:
    kind = "exact" if result.exact else f"approximate ({result.method}, counts are lower bounds)"
    table = Table(title=f"{what}: {kind} crossings, {result.dtype}", title_justify="left")
    for col in ("path", "crossings", "regions", "density", "ties", "class changes"):
        table.add_column(col)
    for p in result.paths[:20]:
        changes = "" if p.trace is None else str(len(p.trace.class_changes))
        table.add_row(str(p.index), str(p.crossings), str(p.n_regions), f"{p.density:.4g}", str(p.ties), changes)
    out.print(table)
    if len(result.paths) > 20:
        out.print(f"... {len(result.paths) - 20} more paths in the JSON output")


Method = Annotated[str, typer.Option(help="auto | exact | sampled. auto: exact when every site is piecewise "
                                          "linear and the model is affine between sites, else sampled.")]
Dtype = Annotated[str, typer.Option(help="float64 (default, exact counts) or float32.")]
Device = Annotated[str, typer.Option(help="cpu or cuda.")]
Budget = Annotated[Optional[int], typer.Option(help="Memory budget in MiB; larger batches are chunked to fit. "
                                                    "Default: 1024 on the CPU, half the free GPU memory with "
                                                    "--device cuda.", show_default=False)]
Evaluator = Annotated[str, typer.Option(help="Exact mode: auto | affine | graph | frontier | local (see "
                                              "docs/paths.md). auto: Jacobian blocks where they fit, else the "
                                              "frontier evaluator where the model allows (paths through two or more "
                                              "sites), else forward passes (graph). local (an opt-in): convolutional "
                                              "networks, input-space paths; each position holds only the breakpoints "
                                              "of its own receptive field.")]
Samples = Annotated[int, typer.Option(help="Sampled mode: samples per path (a unit that changes piece and back "
                                           "between two samples is missed, so counts are lower bounds).")]
Tol = Annotated[float, typer.Option(help="Sampled mode: each crossing is located to this tolerance in t (one "
                                         "forward pass per crossing and step).")]


@app.command("path")
@_user_errors
def path_cmd(
    model: Annotated[str, typer.Option(help="Model spec (see 'polytope-lens models').")],
    json_out: Annotated[Path, typer.Option("--json", help="Write the result (one entry per path) here.")],
    from_ref: Annotated[Optional[str], typer.Option(
        "--from", help="Start: DATA_SPEC@INDEX or @LABEL (skimage@chelsea, digits@0) or an .npy file.")] = None,
    to_ref: Annotated[Optional[str], typer.Option("--to", help="End, same forms as --from.")] = None,
    pairs: Annotated[Optional[Path], typer.Option(help=".npz with arrays 'start' and 'end' (P, *input_shape): "
                                                       "one path per pair.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Site whose activation space the path is drawn in (between "
                                                      "the two inputs' activations; the --from input feeds the "
                                                      "other branches).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Globs of the sites whose crossings are reported.")] = None,
    method: Method = "auto", dtype: Dtype = "float64", device: Device = "cpu", memory_mib: Budget = None,
    n_samples: Samples = 1024, tol: Tol = 1e-9, evaluator: Evaluator = "auto",
    records: Annotated[bool, typer.Option(help="Include every crossing (t, site, unit, piece) in the JSON.")] = False,
    trace: Annotated[bool, typer.Option(help="Semantic trace: the output in every region (one model evaluation "
                                             "per region; turn off for paths with very many regions).")] = True,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Analyse blocks of pairs on Ray workers: local | auto | "
                                                             "HOST:PORT | ray://HOST:PORT (needs "
                                                             "polytope-lens\\[scale]); counts are the same as without "
                                                             "it, positions equal to rounding; --device cuda puts each "
                                                             "worker on a GPU.")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="Ray workers (default: one per GPU with --device cuda, "
                                                            "else one per CPU).")] = None,
):
    """Boundary crossings along straight paths between inputs (or between their activations at --layer)."""
    from .models import load_model
    from .paths import path_crossings, site_activations

    _check_json_target(json_out)
    _check_ray(ray, ray_workers)
    if (pairs is None) == (from_ref is None or to_ref is None) or (pairs is not None and (from_ref or to_ref)):
        raise InvalidInputError("Give either --from and --to, or --pairs FILE.npz (not both).")
    _path_options("path_crossings", method, evaluator, device)
    kw = dict(method=method, dtype=_dtype(dtype), device=device, layers=layers, evaluator=evaluator,
              memory_budget=_budget_bytes(memory_mib), trace=trace, ray_address=ray, ray_workers=ray_workers,
              **_sampling(n_samples, tol))  # the options' one-line errors come before the model is loaded
    bundle = load_model(model)
    if pairs is not None:
        start, end = _pairs(bundle, pairs)
    else:
        (start, from_item), (end, to_item) = _item(bundle, from_ref, "--from"), _item(bundle, to_ref, "--to")
    with _progress(len(start), f"crossings along {len(start)} path(s) of {bundle.spec}") as bar:
        task = bar.add_task("paths", total=len(start))
        kw["progress"] = lambda n: bar.advance(task, n)
        if layer is None:
            result = path_crossings(bundle, start, end, **kw)
        else:
            base = start
            import torch

            a = site_activations(bundle.module, torch.cat([start, end]), layer=layer, dtype=kw["dtype"],
                                 device=device)
            n = len(start)
            result = path_crossings(bundle, a[:n], a[n:], layer=layer, inputs=base, **kw)
    _print_paths(result, f"{bundle.spec} path")
    items = {} if pairs is not None else {"from_item": from_item, "to_item": to_item}  # the rows and labels resolved
    _write_json(json_out, {"model": bundle.spec, "from": from_ref, "to": to_ref, **items,
                           "pairs": None if pairs is None else str(pairs), **result.to_dict(records=records)})


def _path_options(owner: str, method: str, evaluator: str, device: str) -> None:
    """The API's checks of these options, before the model is loaded (a large model takes seconds to load); their
    errors name the flags (``_in_flags``)."""
    from .paths import check_choices
    from .paths.runner import check_device

    check_choices(owner, method, evaluator)
    check_device(device)


def _budget_bytes(memory_mib: int | None) -> int | None:
    if memory_mib is None:
        return None
    if memory_mib < 1:
        raise InvalidInputError(f"--memory-mib must be at least 1 (MiB). Got {memory_mib}.")
    return memory_mib << 20


def _sampling(n_samples: int, tol: float) -> dict:
    if n_samples < 2:
        raise InvalidInputError(f"--n-samples must be at least 2. Got {n_samples}.")
    if not 0 < tol < 1:
        raise InvalidInputError(f"--tol must be a number in (0, 1), a tolerance in t. Got {tol}.")
    return {"n_samples": n_samples, "tol": tol}


def _alphas(text: str) -> tuple[float, float]:
    a0, a1 = _two_floats(text, ":", "--alphas", "A0:A1, e.g. 0:4")
    if not (math.isfinite(a0) and math.isfinite(a1) and a0 < a1):
        raise InvalidInputError(f"--alphas must be A0:A1 with finite A0 < A1, e.g. 0:4. Got {text!r}.")
    return a0, a1


@app.command("scale")
@_user_errors
def scale_cmd(
    model: Annotated[str, typer.Option(help="Model spec.")],
    input_ref: Annotated[str, typer.Option("--input", help="DATA_SPEC@INDEX or @LABEL (a text too, e.g. "
                                                           "pydoc@0), or an .npy file.")],
    layer: Annotated[str, typer.Option(help="Site whose activation a is scaled: the ray is alpha * a (a + alpha * d "
                                            "with --direction).")],
    json_out: Annotated[Path, typer.Option("--json", help="Write the result here.")],
    alphas: Annotated[str, typer.Option(help="Scaling range A0:A1 (the API's ray_crossings defaults to 0:2).")
                      ] = "0:4",
    direction: Annotated[Optional[Path], typer.Option(
        help="A .npy of the site's activation shape: the ray is a + alpha * d instead of alpha * a.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Globs of the sites whose crossings are reported.")] = None,
    method: Method = "auto", dtype: Dtype = "float64", device: Device = "cpu", memory_mib: Budget = None,
    n_samples: Samples = 1024, tol: Tol = 1e-9, evaluator: Evaluator = "auto",
    max_tokens: Annotated[int, typer.Option(help="Text inputs: tokens kept (the ray scales every token's "
                                                 "activation at --layer).")] = 128,
    records: Annotated[bool, typer.Option(help="Include every crossing in the JSON.")] = False,
    trace: Annotated[bool, typer.Option(help="Semantic trace: the output in every region.")] = True,
):
    """Boundary crossings and the prediction along a scaling ray alpha * a (or a + alpha * d) of one site's
    activation."""
    from .models import load_model
    from .paths import ray_crossings

    _check_json_target(json_out)
    if max_tokens < 1:
        raise InvalidInputError(f"--max-tokens must be at least 1. Got {max_tokens}.")
    _path_options("ray_crossings", method, evaluator, device)
    kw = dict(alphas=_alphas(alphas), method=method, dtype=_dtype(dtype), device=device, layers=layers,
              evaluator=evaluator, memory_budget=_budget_bytes(memory_mib), trace=trace, **_sampling(n_samples, tol))
    bundle = load_model(model)
    x, input_item = _item(bundle, input_ref, "--input", max_tokens=max_tokens)
    d = None if direction is None else _load_npy(direction, "--direction")
    with err.status(f"crossings along the scaling ray of {layer}"):
        result = ray_crossings(bundle.module, x, layer=layer, direction=d, **kw)
    _print_paths(result, f"{bundle.spec} scaling ray at {result.layer}")
    _write_json(json_out, {"model": bundle.spec, "input": input_ref, "input_item": input_item,
                           **({} if direction is None else {"direction": str(direction)}),
                           **result.to_dict(records=records)})


def _check_ray(ray: str | None, ray_workers: int | None) -> None:
    if ray_workers is not None and ray is None:
        raise InvalidInputError("--ray-workers needs --ray (local | auto | HOST:PORT | ray://HOST:PORT).")


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, x1, y0, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise InvalidInputError(f"--box must be four numbers XMIN,XMAX,YMIN,YMAX such as -1,1,-1,1. Got {text!r}.") \
            from None
    if not (x0 < x1 and y0 < y1):
        raise InvalidInputError(f"--box must have XMIN < XMAX and YMIN < YMAX (a box of positive area). Got {text!r}.")
    return x0, x1, y0, y1


def _three_points(bundle, points: Path | None, through: str | None):
    import torch

    if points is not None:
        from .data.arrays import real_array

        arr = real_array(_load_npy(points, "--points"), f"--points {str(points)!r}")
        if arr.ndim < 2 or arr.shape[0] != 3:
            raise InvalidInputError(f"--points must hold three points, an array of shape (3, *input_shape). Got "
                                    f"{arr.shape}.")
        return torch.from_numpy(arr).double()
    refs = [r for r in through.split(",") if r]
    if len(refs) != 3:
        raise InvalidInputError(f"--through must name three inputs separated by commas. Got {through!r}.")
    return torch.cat([_item(bundle, r, "--through")[0] for r in refs])


def _slice_units(text: str | None):
    if text is None or text == "position":
        return text
    try:
        return [int(u) for u in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"--units must be 'position' or comma-separated unit indices. Got {text!r}.") from None


@app.command("slice")
@_user_errors
def slice_cmd(
    model: Annotated[str, typer.Option(help="Model spec.")],
    json_out: Annotated[Path, typer.Option("--json", help="Write num_regions, exact, dtype and every region's area "
                                                          "and code here.")],
    box: Annotated[Optional[str], typer.Option(help="XMIN,XMAX,YMIN,YMAX: the input box of a 2-input model.")] = None,
    points: Annotated[Optional[Path], typer.Option(help=".npy of shape (3, *input_shape): the plane through "
                                                        "three points.")] = None,
    through: Annotated[Optional[str], typer.Option(help="Three inputs A,B,C as DATA_SPEC@ROW or @LABEL (e.g. "
                                                        "skimage@chelsea,skimage@coffee,skimage@rocket).")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Slice the activation space of this site (the three points "
                                                      "are then the inputs' activations there).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Last site that cuts (regions of the network truncated "
                                                      "there).")] = None,
    units: Annotated[Optional[str], typer.Option(
        help="Cut with only these units of the last site: comma-separated flat indices, or 'position' (the channel "
             "vector at the centre of a (C, H, W) site).")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Write a picture (PNG).")] = None,
    svg: Annotated[Optional[Path], typer.Option(help="Write a picture (SVG).")] = None,
    color_by: Annotated[str, typer.Option(help="code | slope | class.")] = "code",
    memory_mib: Annotated[int, typer.Option(help="Memory budget in MiB, estimated before each site: a slice over it "
                                                 "stops with the estimate (raise it, or use --until / a smaller "
                                                 "box).")] = 1024,
):
    """Exact 2-D slice: the linear regions of a piecewise-linear model on a box or a plane through three points."""

    from .models import load_model
    from .paths import site_activations
    from .slices import Plane, slice_plane

    for target, what in ((json_out, "The JSON output"), (png, "The --png output"), (svg, "The --svg output")):
        if target is not None:
            _check_json_target(target, what)
    if color_by not in ("code", "slope", "class"):
        raise InvalidInputError(f"--color-by must be code, slope or class. Got {color_by!r}.")
    if sum(v is not None for v in (box, points, through)) != 1:
        raise InvalidInputError("Give exactly one of --box, --points or --through.")
    kw = dict(until=until, units=_slice_units(units), memory_budget=_budget_bytes(memory_mib))
    bundle = load_model(model)
    if box is not None:
        x0, x1, y0, y1 = _box(box)
        plane = Plane.box(x0, x1, ylo=y0, yhi=y1)
        if layer is not None:
            raise InvalidInputError("--layer goes with --points or --through (a plane through three inputs).")
    else:
        pts = _three_points(bundle, points, through)
        if layer is not None:
            kw.update(layer=layer, inputs=pts[:1])
            pts = site_activations(bundle.module, pts, layer=layer)
        plane = Plane.through(pts[0], pts[1], pts[2])
    with err.status(f"slicing {bundle.spec}"):
        result = slice_plane(bundle.module, plane, **kw)
    if color_by != "code" and result.slope is None and (png is not None or svg is not None):
        raise InvalidInputError(f"--color-by {color_by} needs the output maps, which this slice does not have: "
                                f"{result.why_no_maps()}; use --color-by code.")
    kind = "exact" if result.exact else "approximate"
    where = {"box": "a box", "through": "a plane through three points"}.get(result.plane.kind, "a plane")
    out.print(f"[bold]{result.num_regions}[/bold] regions ({kind}, {result.dtype}) on {where} of "
              f"area {result.plane.area:.4g}; {result.seconds:.2f} s")
    for note in result.notes:
        out.print(f"note: {note}")
    pictures = [(path, functools.partial(lambda tmp, fmt: result._save(tmp, fmt, color_by=color_by), fmt=fmt))
                for path, fmt in ((png, "png"), (svg, "svg")) if path is not None]
    _write_json(json_out, {"model": bundle.spec, **result.to_dict()}, *pictures)


@app.command("complexity")
@_user_errors
def complexity_cmd(
    model: Annotated[str, typer.Option(help="Model spec.")],
    data: Annotated[str, typer.Option(help="Data spec: the points where local complexity is measured.")],
    json_out: Annotated[Path, typer.Option("--json", help="Write per-point and per-site counts here.")],
    limit: Annotated[int, typer.Option(help="Number of points: the data's first N items (for digits and "
                                            "fashion-mnist a class-balanced seeded sample).")] = 64,
    radius: Annotated[float, typer.Option(help="Radius r of the cross-polytope (input units).")] = 0.005,
    n_dirs: Annotated[Optional[int], typer.Option(
        help="P: 2P vertices per point, in a random P-dim subspace; at most the input dimension (default: 20, or "
             "the input dimension when it is smaller, with a note).", show_default=False)] = None,
    layers: Annotated[Optional[str], typer.Option(help="Globs of the sites counted (default: all; not with "
                                                       "--exact).")] = None,
    exact: Annotated[bool, typer.Option(help="Also count the exact regions of the whole network in a square of side "
                                             "r in a random plane through each point.")] = False,
):
    """Local complexity (Humayun et al.): units whose piece changes near each point, per site."""
    import math

    from .data import load_data
    from .models import load_model
    from .slices import exact_local_complexity, local_complexity

    _check_json_target(json_out)
    if exact and layers is not None:
        raise InvalidInputError("--exact counts the regions of the whole network, so it does not take --layers; "
                                "drop one of them.")
    if n_dirs is not None and n_dirs < 1:
        raise InvalidInputError(f"--n-dirs must be at least 1. Got {n_dirs}.")
    if not (0 < radius < math.inf):
        raise InvalidInputError(f"--radius must be a finite number > 0. Got {radius}.")
    bundle = load_model(model)
    source = load_data(data, limit=limit)
    if bundle.modality == "text":
        raise InvalidInputError("Local complexity needs image or vector inputs; text models are not supported.")
    inputs = bundle.encode(source)
    if source.modality == "array":  # npy:/npz: points keep their float64 values, as the API's tensor would
        import numpy as np

        _keep_float64(inputs, bundle, np.asarray(source.items))
    x = next(iter(inputs.tensors.values())).double()
    dim = math.prod(x.shape[1:])
    if n_dirs is None:
        n_dirs = min(20, dim)
        if n_dirs < 20:
            out.print(f"note: --n-dirs is {n_dirs}, the input dimension of {bundle.spec} (the default 20 is more "
                      "than it has).")
    elif n_dirs > dim:
        raise InvalidInputError(f"--n-dirs must be at most the input dimension of {bundle.spec}, {dim}. Got {n_dirs}.")
    with err.status(f"local complexity of {bundle.spec} at {len(x)} points"):
        lc = local_complexity(bundle.module, x, radius=radius, n_dirs=n_dirs, layers=layers)
        payload = {"model": bundle.spec, "data": source.spec, "approximate": lc.to_dict()}
        if exact:
            payload["exact"] = exact_local_complexity(bundle.module, x, radius=radius).to_dict()
    table = Table(title=f"local complexity of {bundle.spec} on {source.spec} (approximate: {2 * n_dirs} vertices, "
                        f"r={radius}{'; smooth sites: threshold codes' if 'threshold codes' in lc.method else ''})",
                  title_justify="left")
    table.add_column("site", overflow="fold")
    table.add_column("mean units changing")
    for site, v in lc.per_site.items():
        table.add_row(site, f"{float(v.mean()):.2f}")
    out.print(table)
    for note in lc.notes:
        err.print(f"note: {note}")
    if exact:
        regions = payload["exact"]["total"]
        out.print(f"exact: {sum(regions) / len(regions):.2f} regions on average (min {min(regions)}, max "
                  f"{max(regions)}) in a square of side {radius} in a random plane through each point")
        for note in payload["exact"]["notes"]:
            err.print(f"note: {note}")
    _write_json(json_out, payload)


def _print_summary(summary: dict) -> None:
    kind = "exact polytope codes" if summary["exact"] else "threshold codes of smooth activations (approximate)"
    out.print(f"[bold]{summary['rows']}[/bold] rows of {kind} from [bold]{summary['model']}[/bold] on "
              f"[bold]{summary['data']}[/bold] ({summary['selection']['kind']} units) -> {summary['store']}")
    table = Table(title_justify="left")
    for col in ("site", "alias", "activation", "exact", "units", "bits/unit", "active"):
        table.add_column(col, overflow="fold")
    for lay in summary["layers"]:
        active = "–" if lay["fraction_active"] is None else f"{100 * lay['fraction_active']:.1f}%"
        table.add_row(lay["site"], lay["alias"] or "", lay["activation"], "yes" if lay["exact"] else "no",
                      str(lay["n_units"]), str(lay["bits_per_unit"]), active)
    out.print(table)


@app.command("cluster")
@_user_errors
def cluster_cmd(
    store: Annotated[Path, typer.Argument(help="A code store written by 'polytope-lens codes'.")],
    out_path: Annotated[Path, typer.Option("--out", help="Results folder (written atomically).")],
    metric: Annotated[str, typer.Option(help="hamming | jaccard.")] = "hamming",
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated globs over site names or aliases "
                                                       "(default: every site, concatenated).")] = None,
    min_cluster_size: Annotated[int, typer.Option(help="HDBSCAN's smallest cluster.")] = 20,
    min_samples: Annotated[Optional[int], typer.Option(help="HDBSCAN's core neighbourhood, the row included "
                                                            "(default: min-cluster-size).")] = None,
    n_neighbors: Annotated[Optional[int], typer.Option(help="kNN graph degree (default: max(2 * min-samples, "
                                                            "16)); larger is closer to exact HDBSCAN, except "
                                                            "where many distances tie (see docs/scale.md).")] = None,
    index: Annotated[str, typer.Option(help="auto | flat (exact kNN) | hnsw (approximate kNN).")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Cluster only the first N rows.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing results folder.")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Search the kNN graph on Ray workers: local | auto | "
                                                             "HOST:PORT | ray://HOST:PORT (needs "
                                                             "polytope-lens\\[scale]); the results are the same as "
                                                             "without it.")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="Ray workers (default: one per CPU).")] = None,
):
    """Cluster a store's codes (HDBSCAN through a faiss kNN graph): assignments, clusters.json and index.html."""
    from .cluster_report import cluster_store, codes_kind

    _check_ray(ray, ray_workers)
    stages = {"knn": "kNN graph", "bridge": "bridging components", "tree": "HDBSCAN tree"}
    with _bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        tasks: dict = {}

        def progress(stage: str, done: int, total: int):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stages.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = cluster_store(store, out_path, metric=metric, layers=layers, min_cluster_size=min_cluster_size,
                               min_samples=min_samples, n_neighbors=n_neighbors, index=index, limit=limit,
                               overwrite=overwrite, progress=progress, ray_address=ray, ray_workers=ray_workers)
    out.print(f"[bold]{result['n_clusters']}[/bold] clusters of [bold]{result['n_rows']}[/bold] rows of "
              f"{codes_kind(result['exact_codes'])} ({100 * result['noise_fraction']:.1f}% noise, "
              f"{result['metric']}, kNN {'exact' if result['knn_exact'] else 'approximate'}, "
              f"{result['seconds']:.1f} s) -> {result['out']}")
    sc = result.get("label_scores")
    if sc and sc["n_labels"] < 2:
        err.print("note: the rows have a single label (a --limit that takes the first items of one class or novel?): "
                  "the label scores say nothing about the clusters")


@app.command("reproduce")
@_user_errors
def reproduce_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for index.html and results.json.")],
    quick: Annotated[bool, typer.Option(help="Small sizes (under 5 minutes on 2 CPU cores).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier report at --out (never a file, a folder this "
                                                 "tool did not write, or the current folder).")] = False,
    models: Annotated[Optional[str], typer.Option(help="Comma-separated model jobs: digits-cnn, fashion-cnn, "
                                                       "efficientnet-lite0, minilm, minilm-austen (default: all; "
                                                       "digits-cnn,fashion-cnn with --quick). A job whose model or "
                                                       "data is not installed is skipped.")] = None,
):
    """Run predictions 1-3 and the representational flow on the embedded models; write the HTML report."""
    from .reproduce import (FULL, QUICK, check_models, check_out_dir, counts_kind, default_models, estimate_seconds,
                            reproduce)

    chosen = default_models(quick) if models is None else check_models([m.strip() for m in models.split(",")
                                                                         if m.strip()])
    check_out_dir(out_dir, overwrite=overwrite)
    est = estimate_seconds(QUICK if quick else FULL, chosen, quick=quick)
    err.print(f"{'quick' if quick else 'full'} run of {', '.join(chosen)}: estimated {est / 60:.1f} min")
    with _bar(TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
        task = bar.add_task("starting", total=None)
        result = reproduce(out_dir, quick=quick, models=chosen, overwrite=overwrite,
                           progress=lambda msg: bar.update(task, description=msg))
    for key, entries in result["results"].items():
        for e in entries:
            kind = counts_kind(e)  # predictions 2 and 3 rest on crossing counts: exact or sampled lower bounds
            out.print(f"{key} {e['model']} {e['statistic']}: {e['value']:.4g} vs {e['baseline']:.4g}"
                      f"{'' if kind is None else f' ({kind})'} -> {e['verdict']}", highlight=False, markup=False,
                      soft_wrap=True)  # one line per entry, whatever the width
    for m, why in result["skipped"].items():
        err.print(f"skipped {m}: {why}", highlight=False, markup=False)
    out.print(f"report in {result['seconds']:.0f} s -> {result['out_dir']}/index.html")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
