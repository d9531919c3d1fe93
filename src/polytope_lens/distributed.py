"""Work sharded over Ray workers and collected in order by this process: the results of a single-process run.

Three commands shard their work here, each through the same machinery (``_actor_pool`` starts one Ray actor per
worker and stops them afterwards; ``_ordered`` hands tasks out round-robin with at most ``2 * workers`` in flight
and yields the results in task order, so memory stays bounded and the driver sees the single-process sequence):

* ``ray_code_chunks`` (``codes``): each worker loads the model from its spec with ``models.load_model`` (on a GPU when
  the cluster has GPUs), checks it is the model in memory (``extract.model_digest``: a module edited after loading is
  refused in one line) and codes chunks with ``extract.chunk_coder``, the single-process function; the driver writes
  the chunks in order through the same ``CodeStoreWriter`` (resume included). The store is identical to a
  single-process run's on the same kind of device (GPU codes may differ where a pre-activation is within rounding
  of a kink).
* ``ray_path_crossings`` (``path``): each worker loads the model from its spec and runs ``paths.path_crossings`` on a
  contiguous block of pairs with the same options; ``PathBatchResult.concat`` joins the blocks in order. Every count
  (crossings, per-site counts, ties, regions) is that of a single-process run; positions ``t`` agree to rounding
  (~1e-15): BLAS rounds a row of a matrix product differently depending on how many rows share the product, and
  a single process batches all pairs together.
* ``ray_knn_blocks`` (``cluster``): the faiss index is built once here and shipped through Ray's object store (HNSW
  serialized, a flat index rebuilt from the codes), each worker searches a block of query rows with
  ``cluster_scale._search_rows``, the single-process function; faiss answers every query independently of the
  others, so the kNN graph, and the clustering built from it here, is identical to a single-process run's.

Ray is imported lazily (``pip install 'polytope-lens[scale]'``). Addresses: ``"local"`` starts Ray here (and stops
it afterwards), ``"auto"`` joins the cluster Ray finds on this machine, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` a
given cluster; a TCP probe of the port (``connect_timeout`` seconds) turns an address that does not answer into one
clear error instead of Ray's long retry loop. A session that is already connected (``ray.is_initialized()``) is used
as it is and left running (an explicit address is still probed). A library error raised on a worker (bad input) is
re-raised here as it is; anything else a worker raises becomes one ``PolytopeLensError`` line.
"""

from __future__ import annotations

import math
import numbers
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress

from .codes import SplineCodes, UnitSelection
from .errors import InvalidInputError, MissingDependencyError, PolytopeLensError

__all__ = ["check_workers", "connect", "probe_address", "ray_code_chunks", "ray_knn_blocks", "ray_path_crossings"]


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("Distributed work (--ray) needs Ray; install it with "
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
    if not isinstance(address, str):
        raise InvalidInputError(f"The 'ray_address' parameter must be a str ('local', 'auto', 'HOST:PORT'). "
                                f"Got {address!r} instead.")
    ray = _ray()
    if address not in ("local", "auto"):
        probe_address(address, connect_timeout)
    if ray.is_initialized():
        return False
    try:
        if address == "local":  # a new instance even when another runs, or a stale one is recorded in /tmp/ray
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        raise PolytopeLensError(f"Could not connect to Ray at {address!r}: {str(e).splitlines()[0]}") from None
    return True


def check_workers(workers) -> None:
    """``ray_workers`` is None (one per GPU or CPU) or an int >= 1."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1):
        raise InvalidInputError(f"The 'ray_workers' parameter must be an int >= 1. Got {workers!r} instead.")


def check_ray_options(address, workers, computed: str, owner: str | None = None) -> None:
    """``ray_workers`` only with ``ray_address`` (without it the ``computed`` results are computed here, and the
    option would be ignored), and then ``check_workers``'s."""
    if address is None and workers is not None:
        of = "" if owner is None else f" of {owner}"
        raise InvalidInputError(f"The 'ray_workers' parameter{of} needs 'ray_address' (\"local\", \"auto\", "
                                f"\"HOST:PORT\"): without it the {computed} are computed here. Got {workers!r}.")
    if address is not None:
        check_workers(workers)


@contextmanager
def _actor_pool(address: str, make_class: Callable, args: tuple, *, workers: int | None, device: str,
                connect_timeout: float):
    """Connect to Ray and start ``workers`` actors ``make_class(ray)(device, *args)``; yields ``(ray, actors)``.

    ``args`` go to the object store once and are shared by every actor (arrays are read-only there).
    ``device``: ``"auto"`` puts each actor on one GPU when the cluster has GPUs (else one CPU) and passes it
    ``"cuda"`` or ``"cpu"``; ``"cuda"`` requires GPUs; ``"cpu"`` never reserves one. The default worker count is one
    per GPU used, else one per CPU; more workers than that share them (fractional Ray resources). The actors (and
    Ray, when this call started it) are stopped on exit.
    """
    check_workers(workers)
    ray = _ray()
    owned = connect(address, connect_timeout=connect_timeout)
    actors = []
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if device == "cuda" and not gpus:
            raise InvalidInputError(f"device='cuda' on Ray: the cluster at {address!r} has no GPUs.")
        use_gpu = bool(gpus) and device in ("auto", "cuda")
        cpus = max(1, int(resources.get("CPU", 1)))
        n = int(workers) if workers else (gpus if use_gpu else cpus)
        # an actor holds its share for its lifetime: more workers than devices share them rather than wait forever
        options = {"num_cpus": min(1.0, cpus / n)}
        if use_gpu:
            options["num_gpus"] = min(1.0, gpus / n)
        cls = make_class(ray)
        refs = [ray.put(a) for a in args]
        actors = [cls.options(**options).remote("cuda" if use_gpu else "cpu", *refs) for _ in range(n)]
        yield ray, actors
    finally:
        for a in actors:
            ray.kill(a)
        if owned:
            ray.shutdown()


def _ordered(ray, actors: list, tasks: Iterable[tuple], what: str) -> Iterator:
    """``actor.run(*task)`` for every task, round-robin over ``actors`` with at most two per actor in flight;
    yields the results in task order. ``what`` completes "A Ray worker failed while ..."."""
    n = len(actors)
    tasks = iter(tasks)
    pending: deque = deque()
    submitted = 0
    for task in tasks:
        pending.append(actors[submitted % n].run.remote(*task))
        submitted += 1
        if submitted == 2 * n:
            break
    while pending:
        try:
            result = ray.get(pending.popleft())
        except ray.exceptions.RayError as e:
            _abandon(ray, actors, pending)
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, PolytopeLensError):
                raise cause from None
            text = str(cause).strip()
            raise PolytopeLensError(f"A Ray worker failed while {what}: {type(cause).__name__}: "
                                    f"{text.splitlines()[-1] if text else ''}") from None
        task = next(tasks, None)
        if task is not None:
            pending.append(actors[submitted % n].run.remote(*task))
            submitted += 1
        yield result


def _abandon(ray, actors: list, pending: deque) -> None:
    """After a failure: stop the actors and collect what their unfinished tasks raise, so that Ray does not print
    them later as unhandled errors."""
    for a in actors:
        ray.kill(a)
    for ref in pending:
        with suppress(ray.exceptions.RayError):  # expected: the task failed too, or its actor was stopped
            ray.get(ref, timeout=10)
    pending.clear()


def _differs(module, model_spec: str, model_sha256: str | None) -> str | None:
    """On a worker: the error line when the model it loaded from ``model_spec`` is not the driver's (``model_sha256``,
    ``extract.model_digest`` of the model in memory: weights edited after loading, a file replaced), else None."""
    from .extract import model_digest

    if model_sha256 is None or model_digest(module) == model_sha256:
        return None
    return (f"The model in memory differs from what spec {model_spec!r} loads on the workers: Ray workers reload "
            "models from their spec; save it (file:PATH) or run without Ray.")


# ------------------------------------------------------------------------------------------------------- codes
def _code_worker(ray):
    @ray.remote
    class CodeWorker:
        """Loads the model once, then codes the chunks it is given."""

        def __init__(self, device, model_spec, source, kwargs, model_sha256):
            from .extract import chunk_coder
            from .models import load_model

            bundle = load_model(model_spec, device=device)
            self.differs = _differs(bundle.module, model_spec, model_sha256)
            self.code = chunk_coder(bundle, source, **kwargs)

        def run(self, first):
            if self.differs:
                raise InvalidInputError(self.differs)
            return first, self.code(first)

    return CodeWorker


def ray_code_chunks(address: str, bundle, source, *, layers, selection: UnitSelection, soft: bool, batch_size: int,
                    max_length: int, start: int = 0, workers: int | None = None,
                    progress: Callable[[int], None] | None = None, connect_timeout: float = 5.0,
                    model_sha256: str | None = None) -> Iterator[tuple[int, SplineCodes]]:
    """Yield ``(first example index, codes)`` for consecutive chunks from ``start``, coded on Ray workers.

    Parameters
    ----------
    address : str
        ``"local"``, ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` (see the module docstring).
    bundle : ModelBundle
        The model; workers reload it from ``bundle.spec`` and refuse to code (one line) when what they loaded is
        not the model in memory (an edited module), by its ``extract.model_digest``.
    source : DataSource
        The data, shipped to the workers once.
    workers : int, optional
        Actors to start (default: one per GPU when the cluster has GPUs, else one per CPU).
    progress : callable, optional
        Called with the number of examples of each chunk once it is received.
    model_sha256 : str, optional
        ``extract.model_digest(bundle.module)`` when the caller has it already (computed here otherwise).

    The actors live while the generator is suspended: a consumer stops them by closing it (``extract_to_store``
    does, on any error).
    """
    from .extract import model_digest

    kwargs = {"layers": layers, "selection": selection, "soft": soft, "batch_size": batch_size,
              "max_length": max_length}
    digest = model_digest(bundle.module) if model_sha256 is None else model_sha256
    with _actor_pool(address, _code_worker, (bundle.spec, source, kwargs, digest), workers=workers, device="auto",
                     connect_timeout=connect_timeout) as (ray, actors):
        what = f"coding {bundle.spec!r} on {getattr(source, 'spec', '?')!r}"
        for first, codes in _ordered(ray, actors, ((f,) for f in range(start, len(source), batch_size)), what):
            if progress is not None:
                progress(int(codes.meta.get("n_examples", min(batch_size, len(source) - first))))
            yield first, codes


# ------------------------------------------------------------------------------------------------------- paths
def _path_worker(ray):
    @ray.remote
    class PathWorker:
        """Loads the model once, then analyses the blocks of pairs it is given."""

        def __init__(self, device, model_spec, kwargs, model_sha256):
            from .models import load_model

            self.module = load_model(model_spec).module
            self.differs = _differs(self.module, model_spec, model_sha256)
            self.kwargs = {**kwargs, "device": device}

        def run(self, first, start, end, inputs):
            from .paths import path_crossings

            if self.differs:
                raise InvalidInputError(self.differs)

            extra = {} if inputs is None else {"inputs": inputs}
            return first, path_crossings(self.module, start, end, **self.kwargs, **extra)

    return PathWorker


def ray_path_crossings(address: str, model_spec, start, end, *, inputs=None, workers: int | None = None,
                       blocks_per_worker: int = 4, connect_timeout: float = 5.0, progress=None,
                       model_sha256: str | None = None, **kwargs):
    """``paths.path_crossings`` over blocks of pairs on Ray workers, joined in order into one ``PathBatchResult``.

    Parameters
    ----------
    address : str
        As in ``ray_code_chunks``.
    model_spec : str or ModelBundle
        Spec each worker loads the model from (``ModelBundle.spec``). Given the bundle (or ``model_sha256``, its
        ``extract.model_digest``), the workers refuse in one line when what they load is not the model in memory.
    start, end : Tensor (P, *shape)
        Validated endpoints; ``inputs`` (P, ...), for paths at a site, is split with them.
    workers : int, optional
        Actors to start (default: one per GPU when ``device`` is cuda, else one per CPU).
    blocks_per_worker : int
        The pairs are cut into about ``workers * blocks_per_worker`` contiguous blocks, for load balance.
    progress : callable, optional
        Called with the number of paths of each block as it comes back (in order).
    **kwargs
        The other options of ``path_crossings`` (``device``: ``"cuda"`` puts each worker on one GPU);
        ``memory_budget`` holds per worker.
    """
    import time

    import torch

    from .paths import PathBatchResult
    from .paths.runner import index_inputs

    t0 = time.perf_counter()
    if not isinstance(model_spec, str):  # a ModelBundle: check the workers' model against it
        from .extract import model_digest

        model_sha256 = model_digest(model_spec.module) if model_sha256 is None else model_sha256
        model_spec = model_spec.spec
    device = "cuda" if torch.device(kwargs.get("device", "cpu")).type == "cuda" else "cpu"
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    n_pairs = len(start)
    with _actor_pool(address, _path_worker, (model_spec, kwargs, model_sha256), workers=workers, device=device,
                     connect_timeout=connect_timeout) as (ray, actors):
        size = max(1, math.ceil(n_pairs / (len(actors) * blocks_per_worker)))

        def tasks():
            for a in range(0, n_pairs, size):
                rows = torch.arange(a, min(n_pairs, a + size))
                yield a, start[a:a + size], end[a:a + size], None if inputs is None else index_inputs(inputs, rows)

        parts = []
        for _, res in _ordered(ray, actors, tasks(), f"finding path crossings of {model_spec!r}"):
            parts.append(res)
            if progress is not None:
                progress(len(res.paths))
    return PathBatchResult.concat(parts, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------- cluster
def _knn_worker(ray):
    @ray.remote
    class KnnWorker:
        """Holds the codes and the faiss index (rebuilt when flat, deserialized when HNSW), searches row blocks."""

        def __init__(self, device, X, index_bytes, options):
            from .cluster_scale import _load_index, _popcount

            self.X, self.options = X, options
            self.index = _load_index(X, index_bytes, options["ef_search"])
            self.pop = _popcount(X) if options["metric"] == "jaccard" else None

        def run(self, s, e):
            from .cluster_scale import _search_rows

            o = self.options
            return s, *_search_rows(self.index, self.X, s, e, o["k"], o["kc"], o["metric"], self.pop)

    return KnnWorker


def ray_knn_blocks(address: str, X, index_bytes, *, k: int, kc: int, metric: str, ef_search: int,
                   workers: int | None = None, block_rows: int = 8192,
                   connect_timeout: float = 5.0) -> Iterator[tuple[int, object, object]]:
    """Yield ``(first row, distances, indices)`` for consecutive blocks of query rows, searched on Ray workers.

    ``X`` (the packed codes) goes to the object store once; ``index_bytes`` is a serialized faiss binary index, or
    None for an exact flat index, which each worker rebuilds from ``X``. Blocks hold at most ``block_rows`` rows and
    are small enough to give every worker about four. Workers run on CPUs (faiss-cpu).
    """
    n = len(X)
    options = {"k": k, "kc": kc, "metric": metric, "ef_search": ef_search}
    with _actor_pool(address, _knn_worker, (X, index_bytes, options), workers=workers, device="cpu",
                     connect_timeout=connect_timeout) as (ray, actors):
        size = max(1, min(block_rows, math.ceil(n / (4 * len(actors)))))
        tasks = ((s, min(n, s + size)) for s in range(0, n, size))
        yield from _ordered(ray, actors, tasks, f"searching the kNN graph of {n} rows")
