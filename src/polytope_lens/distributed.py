"""Code extraction on Ray workers, written in order by this process: a store identical to a single-process run.

``ray_code_chunks(address, bundle, source, ...)`` yields ``(first example, SplineCodes)`` in example order, like the
single-process loop of ``extract.extract_to_store``, which writes them through the same ``CodeStoreWriter``:

* the data source is put in Ray's object store once; each worker (a Ray actor, one CPU, or one GPU when the cluster
  has GPUs) loads the model from its spec with ``models.load_model`` and codes chunks with ``extract.chunk_coder``,
  the function the single-process path uses;
* chunks are handed out round-robin with at most ``2 * workers`` in flight, and collected in submission order, so
  memory stays bounded and the writer sees exactly the chunk sequence of a single-process run (resume included).

Identity holds when workers compute on the same kind of device as the single-process run; codes computed on a GPU
may differ from CPU codes where a pre-activation is within rounding of a kink.

Ray is imported lazily (``pip install 'polytope-lens[scale]'``). Addresses: ``"local"`` starts Ray here (and stops
it afterwards), ``"auto"`` joins the cluster Ray finds on this machine, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` a
given cluster; a TCP probe of the port (``connect_timeout`` seconds) turns an address that does not answer into one
clear error instead of Ray's long retry loop. A session that is already connected (``ray.is_initialized()``) is used
as it is and left running (an explicit address is still probed).
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Callable, Iterator

from .codes import SplineCodes, UnitSelection
from .errors import InvalidInputError, MissingDependencyError, PolytopeLensError

__all__ = ["ray_code_chunks", "connect", "probe_address"]


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("Distributed extraction (--ray) needs Ray; install it with "
                                     "pip install 'polytope-lens[scale]'.") from None
    return ray


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Raise ``PolytopeLensError`` unless something accepts TCP connections at ``HOST:PORT`` within ``timeout``."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInputError(f"The Ray address must be 'local', 'auto', 'HOST:PORT' or 'ray://HOST:PORT'. "
                                f"Got {address!r}.")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise PolytopeLensError(f"No Ray cluster answers at {address!r} ({why} after at most {timeout:g} s). "
                                "Start one with 'ray start --head' or pass --ray local.") from None


def connect(address: str, *, connect_timeout: float = 5.0) -> bool:
    """Connect this process to Ray; returns True when it started the connection (and should shut it down)."""
    ray = _ray()
    if address not in ("local", "auto"):
        probe_address(address, connect_timeout)
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        raise PolytopeLensError(f"Could not connect to Ray at {address!r}: {str(e).splitlines()[0]}") from None
    return True


def _worker_class(ray):
    @ray.remote
    class CodeWorker:
        """Loads the model once, then codes the chunks it is given."""

        def __init__(self, model_spec, source, device, kwargs):
            from .extract import chunk_coder
            from .models import load_model

            self.code = chunk_coder(load_model(model_spec, device=device), source, **kwargs)

        def run(self, first):
            return first, self.code(first)

    return CodeWorker


def ray_code_chunks(address: str, bundle, source, *, layers, selection: UnitSelection, soft: bool, batch_size: int,
                    max_length: int, start: int = 0, workers: int | None = None,
                    progress: Callable[[int], None] | None = None,
                    connect_timeout: float = 5.0) -> Iterator[tuple[int, SplineCodes]]:
    """Yield ``(first example index, codes)`` for consecutive chunks from ``start``, coded on Ray workers.

    Parameters
    ----------
    address : str
        ``"local"``, ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` (see the module docstring).
    bundle : ModelBundle
        The model; workers reload it from ``bundle.spec``.
    source : DataSource
        The data, shipped to the workers once.
    workers : int, optional
        Actors to start (default: one per GPU when the cluster has GPUs, else one per CPU).
    progress : callable, optional
        Called with the number of examples of each chunk once it is received.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidInputError(f"The 'ray_workers' parameter must be an int >= 1. Got {workers!r} instead.")
    ray = _ray()
    owned = connect(address, connect_timeout=connect_timeout)
    actors = []
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = workers or (gpus if gpus else max(1, int(resources.get("CPU", 1))))
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        Worker = _worker_class(ray)
        src_ref = ray.put(source)
        kwargs = dict(layers=layers, selection=selection, soft=soft, batch_size=batch_size, max_length=max_length)
        device = "cuda" if gpus else "cpu"
        actors = [Worker.options(**options).remote(bundle.spec, src_ref, device, kwargs) for _ in range(n)]
        firsts = iter(range(start, len(source), batch_size))
        pending: deque = deque()
        for i, first in zip(range(2 * n), firsts):
            pending.append(actors[i % n].run.remote(first))
        submitted = len(pending)
        while pending:
            try:
                first, codes = ray.get(pending.popleft())
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                raise PolytopeLensError(f"A Ray worker failed while coding {bundle.spec!r} on "
                                        f"{getattr(source, 'spec', '?')!r}: {type(cause).__name__}: "
                                        f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                                        ) from None
            nxt = next(firsts, None)
            if nxt is not None:
                pending.append(actors[submitted % n].run.remote(nxt))
                submitted += 1
            if progress is not None:
                progress(int(codes.meta.get("n_examples", min(batch_size, len(source) - first))))
            yield first, codes
    finally:
        for a in actors:
            ray.kill(a)
        if owned:
            ray.shutdown()
