"""Connecting to Ray the same way from every job: the cluster when there is one, else a local instance."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect() -> None:
    """Join RAY_ADDRESS (set by `ray job submit` and by the tests) or start a local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    log.info("ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
