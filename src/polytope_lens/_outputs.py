"""What ``overwrite`` may replace: only an output this tool wrote, of the same kind, recognised by its metadata.

Never the current folder or one of its parents, never the command's own input, a plain file, a symbolic link or a
foreign folder; each refusal is one ``InvalidInputError`` line, raised before anything is deleted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

__all__ = ["canonical", "check_destination", "check_replaceable", "json_text", "plain_mode", "publish",
           "REPORT_FORMAT"]

REPORT_FORMAT = "polytope-lens/report/1"
_REPORT_KEYS = {"prediction_1", "prediction_2", "prediction_3", "details"}


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_code_store(path: Path) -> bool:
    from .store import FORMAT

    meta = _json(path / "zarr.json")
    return isinstance(meta, dict) and isinstance(meta.get("attributes"), dict) \
        and meta["attributes"].get("format") == FORMAT


def _is_clusters(path: Path) -> bool:
    meta = _json(path / "clusters.json")
    return isinstance(meta, dict) and meta.get("format") == "polytope-lens/clusters/1"


def _is_report(path: Path) -> bool:
    meta = _json(path / "results.json")
    return isinstance(meta, dict) and (path / "index.html").is_file() and (
        meta.get("format") == REPORT_FORMAT or _REPORT_KEYS <= set(meta))  # reports written before the format key


KINDS = {"codes": ("a polytope-lens code store", _is_code_store),
         "clusters": ("a polytope-lens cluster results folder", _is_clusters),
         "report": ("a polytope-lens reproduction report", _is_report)}


def check_replaceable(out, kind: str, inputs=()) -> None:
    """Raise unless ``out`` (when it exists) is an output of ``kind`` that overwrite may delete and replace.

    ``inputs`` are the paths the command reads: ``out`` may be none of them nor a folder holding one.
    """
    out = Path(out)
    what, recognise = KINDS[kind]
    head = f"--overwrite replaces only {what}; refusing to replace {str(out)!r}"
    if out.is_symlink():
        raise InvalidInputError(f"{head}: it is a symbolic link.")
    if not os.path.lexists(out):
        return
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise InvalidInputError(f"{head}: it is the current folder or one of its parents.")
    for inp in inputs:
        src = Path(inp).resolve()
        if src == target or target in src.parents:
            raise InvalidInputError(f"{head}: it is (or holds) this command's input {str(inp)!r}.")
    if not out.is_dir():
        raise InvalidInputError(f"{head}: it is a file, not a folder.")
    if not recognise(out):
        raise InvalidInputError(f"{head}: it is a folder without that kind's polytope-lens metadata.")


def check_destination(out, kind: str, *, overwrite: bool = False, inputs=()) -> None:
    """Raise the one-line error a new output of ``kind`` at ``out`` would meet: it exists (without ``overwrite``),
    it is not an output ``overwrite`` may replace (``check_replaceable``), or its folder is missing or not
    writable."""
    out = Path(out)
    if os.path.lexists(out):
        if not overwrite:
            raise InvalidInputError(f"The output {str(out)!r} already exists; pass overwrite (--overwrite) to replace "
                                    "it or choose another path.")
        check_replaceable(out, kind, inputs)
    parent = out.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InvalidInputError(f"The output folder {str(parent)!r} does not exist or is not writable.")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    longest = max(len(_aside(out).name.encode()), len(out.name.encode()) + 10)  # the aside, the temporary sibling
    if longest > name_max:
        raise InvalidInputError(f"The output name {out.name[:40]!r}... is too long: its temporary sibling would have "
                                f"{longest} bytes, above this file system's {name_max}; choose a shorter name.")


def canonical(out) -> Path:
    """``out`` with its folder resolved (``..`` and symbolic links of the folders above it), its own name kept (a
    link there is still refused). ``report/sub/..`` is ``report`` itself: its temporary sibling was made inside the
    folder being replaced, and the replacement deleted both."""
    p = Path(out)
    if p.name in ("", ".", ".."):
        return p.resolve()
    return p.parent.resolve() / p.name


def publish(tmp: Path, out: Path, kind: str, *, overwrite: bool, inputs=()) -> None:
    """Move the finished output ``tmp`` to ``out``, replacing an earlier output of ``kind`` only with ``overwrite``.

    The earlier output is renamed aside first and removed only once the new one is in place; an interrupt between
    the two renames puts it back, so Ctrl-C leaves either the old output or the new one, whole. An output that
    appeared at ``out`` during the run is not replaced without ``overwrite``. ``tmp`` gets the permissions a plain
    ``mkdir`` would give (``tempfile.mkdtemp`` makes it private)."""
    os.chmod(tmp, plain_mode(folder=True))
    aside = _aside(out)
    _discard(aside)  # left by a run stopped while it removed the output it had replaced
    if os.path.lexists(out):
        if not overwrite:
            raise InvalidInputError(f"The output {str(out)!r} appeared while this run was writing; pass overwrite "
                                    "(--overwrite) to replace it or choose another path.")
        check_replaceable(out, kind, inputs)  # again: it may have changed during the run
        os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        if os.path.lexists(tmp):  # the new output did not move: put the old one back
            if os.path.lexists(aside) and not os.path.lexists(out):
                os.replace(aside, out)
            raise
        # it moved (an interrupt as the rename returned): the run is done
    _discard(aside)


def plain_mode(folder: bool) -> int:
    """The permissions ``mkdir`` (``folder``) or ``open`` would give here: what an output made through
    ``tempfile`` (private, 0700 / 0600) is set to before it is moved into place."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def _aside(out: Path) -> Path:
    """Where ``publish`` keeps the output it replaces until the new one is in place."""
    return out.parent / f".{out.name}.replaced"


def _discard(path: Path) -> None:
    """Remove ``path`` to the end: an interrupt here would leave half an old output beside the new one."""
    while os.path.lexists(path):
        try:
            shutil.rmtree(path, ignore_errors=True)
        except KeyboardInterrupt:
            continue
        if os.path.lexists(path):  # what cannot be removed stays, as rmtree(ignore_errors) leaves it
            return


def _finite(v):
    """``v`` with NumPy values as Python ones and every NaN or infinity as None (JSON has no NaN: a strict reader,
    JavaScript's JSON.parse included, refuses the file)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, np.ndarray):
        return _finite(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def json_text(payload, default=str) -> str:
    """Strict JSON of ``payload`` (NaN and infinities as null), indented, other objects through ``default``."""
    return json.dumps(_finite(payload), indent=1, default=default, allow_nan=False)
