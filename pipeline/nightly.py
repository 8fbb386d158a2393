"""Nightly re-index: ingest the new snapshot as a delta on the previous one (only new and changed rows, tombstones
for the rest) → encode its rows → add one segment to the published index (on its trained quantizer while recall
holds; merged past the compaction limits) → publish → point the running Serve app at the new version, whose
replicas fetch only the segments they lack, and check it answers. Work and bytes follow the change, not the
corpus; a full snapshot is written on the first night, on request and every `nightly.max_chain` nights.

Every step is idempotent on its own (deterministic names, manifests written last, an index version that is a hash
of its inputs), so rerunning the same night after a crash resumes where it stopped. The previous snapshot is
fixed in `nightly/<snapshot>.json` by the first run, so a rerun diffs against the same one; and an index version's
manifest is created with a conditional write, so two runs of one night cannot both publish.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from pipeline.build_index import PhaseTimer, run_build_index
from pipeline.config import PipelineConfig
from pipeline.encode import run_encode
from pipeline.errors import PipelineError
from pipeline.ingest import run_ingest
from pipeline.layout import nightly_record, published_index, snapshot_dir
from pipeline.manifests import IndexManifest, PassageManifest
from pipeline.serve.fanout import retriever_names
from pipeline.storage import Storage

log = logging.getLogger(__name__)


def delta_base(
    storage: Storage, config: PipelineConfig, previous: str | None, published: IndexManifest | None
) -> str | None:
    """The snapshot tonight's is written as a delta on, or None for a full one: on request (`nightly.full`), on
    the first night, once `nightly.max_chain` deltas are stacked, and when the encoder settings changed (no vector
    of the previous snapshot can be reused then)."""
    if config.nightly.full or previous is None:
        return None
    base = storage.read_manifest(snapshot_dir(previous), PassageManifest)
    if base is None or base.depth + 1 > config.nightly.max_chain:
        return None
    encoder = published.encoder if published is not None else None
    wanted = {
        "model": config.encode.model,
        "pooling": config.encode.pooling,
        "max_length": config.encode.max_length,
        "normalize": config.encode.normalize,
    }
    if encoder is not None and {key: encoder.get(key) for key in wanted} != wanted:
        log.info("the encoder settings changed since the published index: writing a full snapshot")
        return None
    return previous


def night_record(storage: Storage, config: PipelineConfig) -> dict[str, Any]:
    """The first run of a night records what it diffs against and whether it writes a delta; reruns read it."""
    snapshot = config.ingest.snapshot
    rel = nightly_record(snapshot)
    published = published_index(storage)  # read once: what tonight diffs against and was encoded with
    previous = published.snapshot if published is not None and published.snapshot != snapshot else None
    record = {
        "snapshot": snapshot,
        "previous_snapshot": previous,
        "base": delta_base(storage, config, previous, published),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if not storage.create_exclusive(rel, json.dumps(record, indent=1).encode()):
        record = storage.read_json(rel)
        log.info("resuming the run of %s (diffing against %s)", snapshot, record["previous_snapshot"])
    return record


def run_nightly(config: PipelineConfig) -> dict[str, Any]:
    storage = Storage(config.storage.root, config.storage.options)
    snapshot = config.ingest.snapshot
    record = night_record(storage, config)
    timer = PhaseTimer()
    with timer("ingest"):
        ingested = run_ingest(
            config.model_copy(update={"ingest": config.ingest.model_copy(update={"base": record.get("base")})})
        )
    encode_config = config.model_copy(
        update={
            "encode": config.encode.model_copy(
                update={
                    "snapshot": snapshot,
                    "previous_snapshot": record["previous_snapshot"],
                    "carry_over": record["previous_snapshot"] is not None,
                }
            )
        }
    )
    with timer("encode"):
        encoded = run_encode(encode_config)
    index_config = config.model_copy(
        update={"index": config.index.model_copy(update={"snapshot": snapshot, "fingerprint": encoded["fingerprint"]})}
    )
    with timer("build_index"):
        built = run_build_index(index_config)
    served = None
    if config.nightly.serve_address:
        with timer("serve"):
            served = point_serve_at(config, built["version"])
    return {
        "snapshot": snapshot,
        "previous_snapshot": record["previous_snapshot"],
        "base": record.get("base"),
        "passages": ingested["rows"],
        "new": encoded.get("new", encoded["rows"]),
        "changed": encoded.get("changed", 0),
        "deleted": encoded.get("deleted", 0),
        "reused": encoded["reused"],
        "encoded": encoded["rows"],
        "retrained": built.get("retrained"),
        "version": built["version"],
        "index_build": built.get("mode"),
        "segments": built.get("segments"),
        "published": not built["reused"],
        "vectors": built["vectors"],
        "recall_at_100": built["recall_at_100"],
        "distortion": built.get("distortion"),
        "served": served,
        "phase_seconds": timer.seconds,
        "output": built["output"],
    }


# -- telling the Serve app -----------------------------------------------------------------------------------------
def _http_json(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def index_shards(app_details: dict[str, Any], shards: int) -> list[str]:
    """The app's deployments that serve an index version as Serve reports them running (`Retriever`, or
    `Retriever0..N-1`, and `Lexical`, the BM25 index), so the nightly updates the shards the app has, whatever this
    job's own `serve.shards` says; the config's when Serve lists none yet (pure)."""
    deployments = app_details.get("deployments") or {}
    running = sorted(
        (name for name in deployments if re.fullmatch(r"Retriever\d*", name)),
        key=lambda name: int(name.removeprefix("Retriever") or 0),
    )
    return (running or retriever_names(shards)) + (["Lexical"] if "Lexical" in deployments else [])


def with_index_version(
    deploy_config: dict[str, Any], app: str, version: str, retrievers: Sequence[str] = ("Retriever",)
) -> dict[str, Any]:
    """The Serve deploy config with only the app's Retriever `user_config.index_version` changed, on every index
    shard's deployment (pure)."""
    applications = [dict(a) for a in deploy_config["applications"]]
    target = next((a for a in applications if a.get("name") == app), None)
    if target is None:
        raise PipelineError(
            f"Serve has no application named {app!r} deployed from a config "
            f"(found {[a.get('name') for a in applications]}): check nightly.serve_app"
        )
    deployments = [dict(d) for d in target.get("deployments", [])]
    for name in retrievers:
        retriever = next((d for d in deployments if d.get("name") == name), None)
        if retriever is None:
            retriever = {"name": name}
            deployments.append(retriever)
        retriever["user_config"] = {**(retriever.get("user_config") or {}), "index_version": version}
    target["deployments"] = deployments
    return {**deploy_config, "applications": applications}


def point_serve_at(config: PipelineConfig, version: str) -> dict[str, Any]:
    """Set the Retriever's `user_config.index_version` through the Serve REST API (as `serve deploy` would: the
    replicas reload in place), then wait until the app itself reports the version over HTTP."""
    night = config.nightly
    base = night.serve_address.rstrip("/")
    details = _http_json("GET", f"{base}/api/serve/applications/")
    applications = details.get("applications", {})
    imperative = [name for name, app in applications.items() if not app.get("deployed_app_config")]
    if imperative:  # a declarative PUT would delete them
        raise PipelineError(
            f"Serve applications {imperative} were started with serve.run, not from a config: "
            f"deploy the QA app with `serve deploy` or a RayService so the nightly can update it"
        )
    deployed = [app["deployed_app_config"] for app in applications.values()]
    current = {
        key: details[key] for key in ("proxy_location", "http_options", "grpc_options") if details.get(key) is not None
    }
    _http_json(
        "PUT",
        f"{base}/api/serve/applications/",
        with_index_version(
            {**current, "applications": deployed},
            night.serve_app,
            version,
            index_shards(applications.get(night.serve_app, {}), config.serve.shards),
        ),
    )
    host = "127.0.0.1" if config.serve.host == "0.0.0.0" else config.serve.host
    url = (night.serve_url or f"http://{host}:{config.serve.port}").rstrip("/") + "/v1/index"
    key = os.environ.get(config.serve.api_key_env) if config.serve.api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline, seen = time.monotonic() + night.serve_timeout_s, None
    while time.monotonic() < deadline:
        try:
            info = _http_json("GET", url, headers=headers, timeout=10)
            seen = info.get("index_version")
            if seen == version:
                log.info("%s serves %s", url, version)
                return {"app": night.serve_app, "index_version": version, "url": url}
            if info.get("last_error"):
                log.warning("the app reports: %s", info["last_error"])
        except (urllib.error.URLError, OSError, ValueError) as exc:
            seen = f"unreachable ({exc})"
        time.sleep(1)
    raise PipelineError(
        f"index {version} was published, but {url} still answers from {seen} after {night.serve_timeout_s:.0f}s"
    )
