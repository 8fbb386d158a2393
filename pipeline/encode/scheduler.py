"""Feeding shards to the encoder actors, two in flight each, with a bounded number of tries per shard when an actor
dies (`docs/decisions/0002-encode-scheduler-not-ray-data.md` says why not Ray Data)."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import ray

from pipeline.config import EncodeConfig
from pipeline.encode.actors import ActorPool
from pipeline.encode.plan import Carry
from pipeline.errors import InputError, PipelineError
from pipeline.runtime.raycluster import task_error
from pipeline.store.manifests import FileEntry

log = logging.getLogger(__name__)


class ShardScheduler:
    """Feeds shards to encoder actors, two in flight each (tokenized round-robin by the tokenizer actors).

    When an actor dies, its in-flight shards go back to the queue (one attempt each) for any healthy actor, and
    the dead one gets no work until a probe finds it restarted by Ray: shards are not burnt on an actor that is
    still starting up.
    """

    IN_FLIGHT = 2
    PROBE_INTERVAL_S = 0.5
    RECOVERY_TIMEOUT_S = 600.0

    def __init__(self, pool: ActorPool, config: EncodeConfig, output: str, passages: str, carries: dict[str, Carry]):
        self.actors, self.tokenizers = pool.encoders, pool.tokenizers
        self.max_attempts, self.max_bad_shards = config.max_attempts, config.max_bad_shards
        self.output, self.passages, self.carries = output, passages, carries
        self.quarantine: list[dict[str, str]] = []  # bad passage shards skipped under encode.max_bad_shards
        self.inflight: dict[Any, tuple[int, FileEntry]] = {}
        self.load = [0] * len(self.actors)
        self.probes: dict[Any, int] = {}
        self.recovering: dict[int, float] = {}  # actor → when it died
        self.attempts: dict[str, int] = {}
        self.submitted = 0
        self.retried = 0

    def _fill(self, queue: deque) -> None:
        for actor in range(len(self.actors)):
            while queue and actor not in self.recovering and self.load[actor] < self.IN_FLIGHT:
                entry = queue.popleft()
                carry, shard = self.carries.get(entry.name), None
                if self.tokenizers and carry is None:  # a carried shard tokenizes only its few changed rows
                    shard = self.tokenizers[self.submitted % len(self.tokenizers)].tokenize_shard.remote(
                        self.passages, entry
                    )
                self.submitted += 1
                ref = self.actors[actor].encode_shard.remote(self.output, self.passages, entry, shard, carry)
                self.inflight[ref] = (actor, entry)
                self.load[actor] += 1

    def _probe(self, actor: int) -> None:
        if time.monotonic() - self.recovering[actor] > self.RECOVERY_TIMEOUT_S:
            self._cancel()
            raise PipelineError(f"encoder actor {actor} did not come back within {self.RECOVERY_TIMEOUT_S:.0f}s")
        self.probes[self.actors[actor].describe.remote()] = actor

    def run(self, todo: list[FileEntry], on_done) -> list[FileEntry]:
        queue, finished = deque(todo), []
        self._fill(queue)
        while self.inflight or (queue and self.probes):
            [ref], _ = ray.wait(list(self.inflight) + list(self.probes), num_returns=1)
            if ref in self.probes:
                actor = self.probes.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    time.sleep(self.PROBE_INTERVAL_S)  # still restarting
                    self._probe(actor)
                    continue
                log.info("encoder actor %d is back", actor)
                del self.recovering[actor]
                self._fill(queue)
                continue
            actor, entry = self.inflight.pop(ref)
            self.load[actor] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self.attempts[entry.name] = self.attempts.get(entry.name, 0) + 1
                if self.attempts[entry.name] >= self.max_attempts:
                    self._cancel()
                    raise PipelineError(
                        f"shard {entry.name}: encoder actor died {self.attempts[entry.name]} times "
                        f"({exc.__class__.__name__})"
                    ) from None
                log.warning("encoder actor %d died with shard %s in flight; requeued", actor, entry.name)
                self.retried += 1
                queue.appendleft(entry)
                if actor not in self.recovering:
                    self.recovering[actor] = time.monotonic()
                    self._probe(actor)
            except ray.exceptions.RayTaskError as exc:
                cause = task_error(exc)
                if isinstance(cause, InputError) and len(self.quarantine) < self.max_bad_shards:
                    log.warning("quarantined: %s", cause)
                    self.quarantine.append({"shard": entry.name, "problem": str(cause)})
                else:
                    self._cancel()
                    raise cause from None
            else:
                finished.append(result)
                on_done(result)
            self._fill(queue)
        return finished

    def _cancel(self) -> None:
        for ref in self.inflight:
            ray.cancel(ref, force=False)
        self.inflight.clear()
        self.probes.clear()
