"""The HTTP API's errors by status: what the app says when a request cannot be answered (pure, no Ray Serve).

422 and 413 are the client's (`routes`, `guard`); 503 means a part the app depends on is down, overloaded, or
does not hold a version it may answer from, so the client may retry; 500 is left for real bugs. Every error body is
JSON with the request id (`guard.error`).
"""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from pipeline.errors import PipelineError
from pipeline.serve.fanout import ShardsDisagree, ShardUnavailable
from pipeline.serve.versions import VersionRefused


class Refused(PipelineError):
    """A request the app will not answer as asked (too large, empty, a mode the index lacks): its status, 413 or
    422, and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# A part that is down (a replica lost twice in a row), too slow (a shard past serve.shard_timeout_s), full, or
# without a version to answer from.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    RayActorError,  # ActorDiedError too
    ActorUnavailableError,
    BackPressureError,
    DeploymentUnavailableError,
    ShardUnavailable,
    ShardsDisagree,
    VersionRefused,
    asyncio.TimeoutError,
)


def status_of(exc: BaseException) -> int:
    """503 for an unavailable part (also when raised inside a deployment and re-raised by its handle), else 500."""
    return 503 if isinstance(exc, UNAVAILABLE) else 500
