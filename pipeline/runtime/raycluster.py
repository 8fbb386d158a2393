"""Connecting to Ray the same way from every job: the cluster when there is one, else a local instance.

Which Ray a job uses, in order: RAY_ADDRESS (set by `ray job submit`, by the tests, or by hand; `local` starts a
private instance), else the cluster that `ray start` recorded on this machine, else a new local instance. A
recorded cluster that no longer answers (its processes were killed without `ray stop`) is an error at once: Ray
itself would retry for minutes and then fail with a bare ConnectionError.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

import ray

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


class RayUnavailable(PipelineError):
    """The Ray cluster a job was pointed at (or that `ray start` recorded) does not answer."""


def recorded_cluster_file() -> Path:
    """Where `ray start` records the current local cluster, as `ray.init()` looks for it."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def _target() -> tuple[str, str]:
    """(address for ray.init, where it came from)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    record = recorded_cluster_file()
    if record.is_file() and record.read_text().strip():
        return record.read_text().strip(), f"the cluster recorded by `ray start` in {record}"
    return "local", "a new local instance"


def connect() -> None:
    """Join the Ray that `_target` names, failing fast with what to do when it does not answer."""
    if ray.is_initialized():
        return
    address, source = _target()
    advice = (
        "run `ray stop` to clear a dead local cluster (or `ray start --head` for a new one), or set "
        "RAY_ADDRESS to the cluster to use (RAY_ADDRESS=local starts a private Ray for this job)"
    )
    host_port = address not in ("local", "auto") and "://" not in address
    if host_port and not _answers(address):
        raise RayUnavailable(f"no Ray answers at {address} ({source}): {advice}")
    options = {} if address != "local" else {"include_dashboard": False}
    if address == "local" and "RAY_AUTH_MODE" not in os.environ:
        log.info(
            "starting a local Ray for this job: Ray turns its token authentication on by default and warns that it "
            "did (the token is kept in ~/.ray/auth_token; RAY_AUTH_MODE=token or =disabled chooses, unwarned)"
        )
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **options)
    except ConnectionError as error:
        raise RayUnavailable(f"could not join Ray at {address} ({source}): {error}; {advice}") from error
    resources = ray.cluster_resources()
    log.info("ray: %s (%s CPUs, %s GPUs)", source, resources.get("CPU", 0), resources.get("GPU", 0))


def task_error(exc: ray.exceptions.RayTaskError) -> Exception:
    """The exception a Ray task or actor method raised (an InputError naming a file stays one), for re-raising in
    the driver; a cause Ray could not carry back becomes a PipelineError with Ray's message."""
    return exc.cause if isinstance(exc.cause, Exception) else PipelineError(str(exc))


def get(refs: list) -> list:
    """`ray.get` that raises what the task raised (see `task_error`)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        raise task_error(exc) from None


def use_assigned_cpus() -> int:
    """Give FAISS's OpenMP as many threads as CPUs Ray assigned to this task or actor, and return that number.

    Ray sets OMP_NUM_THREADS once in a worker, from the first task it runs, and OpenMP reads it once, so a worker
    that first ran a 1-CPU task would run a 16-CPU `train_sample`'s k-means on one thread (benchmarks/scale.py at
    5M passages: k-means on 1 of 2 cores). Outside a Ray worker (a job's driver, a test) FAISS keeps its threads."""
    import faiss

    if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return faiss.omp_get_max_threads()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    threads = max(1, math.floor(cpus)) if cpus else 1
    faiss.omp_set_num_threads(threads)
    return threads
