"""Let glibc keep freed memory for reuse, so the exact engines' arrays do not start on fresh pages every time.

The exact engines build and drop many (points x units) arrays per stage. With glibc's defaults, blocks over 128 KiB
(growing adaptively) come from ``mmap`` and go back to the OS when freed, and the heap is trimmed as soon as its top
holds more than a few free MiB, so every new array starts on fresh pages and pays a page fault per 4 KiB it touches.
On the 784->4x512 path benchmark that was a third of the run time, on a 2->3x256 slice a quarter.

``keep_freed_memory`` (called when a path or slice analysis starts) sets three glibc malloc parameters once per
process: blocks up to 32 MiB (glibc's maximum) come from the heap, the heap is trimmed only when more than 512 MiB at
its top is free, and it grows 64 MiB at a time. So a process keeps at most about 512 MiB of freed memory for reuse.
Set the environment variable ``POLYTOPE_LENS_KEEP_FREED_MEMORY=0`` to leave malloc alone; other C libraries (macOS,
musl) are never touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {"M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 32 << 20), "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 512 << 20),
            "M_TOP_PAD": (_M_TOP_PAD, 64 << 20)}

_applied: dict | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.gnu_get_libc_version  # only glibc has it (and mallopt with these parameters)
    except (OSError, AttributeError):
        return None
    return lib


def keep_freed_memory() -> dict:
    """Apply the malloc settings once per process; returns {parameter: accepted} ({} when not applied)."""
    global _applied
    if _applied is None:
        lib = _glibc() if os.environ.get("POLYTOPE_LENS_KEEP_FREED_MEMORY", "1") != "0" else None
        _applied = {} if lib is None else {name: bool(lib.mallopt(p, v)) for name, (p, v) in SETTINGS.items()}
    return _applied
