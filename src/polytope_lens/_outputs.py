"""What ``overwrite`` may replace: only an output this tool wrote, of the same kind, recognised by its metadata.

Never the current folder or one of its parents, never the command's own input, a plain file, a symbolic link or a
foreign folder; each refusal is one ``InvalidInputError`` line, raised before anything is deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InvalidInputError

__all__ = ["check_destination", "check_replaceable", "REPORT_FORMAT"]

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
