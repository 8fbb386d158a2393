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
import functools
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

from pipeline import history
from pipeline.config import PipelineConfig
from pipeline.encode.job import run_encode
from pipeline.errors import PipelineError
from pipeline.history import NightRun
from pipeline.index.job import run_build_index
from pipeline.ingest import run_ingest
from pipeline.layout import nightly_record, published_index, snapshot_dir
from pipeline.manifests import IndexManifest, PassageManifest
from pipeline.storage import Storage
from pipeline.telemetry import PhaseTimer

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
    """One night, recorded in the history (`pipeline.history`) whether it ends well or fails."""
    storage = Storage(config.storage.root, config.storage.options)
    night = NightRun(PhaseTimer(log))
    try:
        summary = _run_night(storage, config, night)
    except Exception as exc:
        history.record_quietly(storage, functools.partial(history.night_entry, storage, config, night, exc))
        raise
    summary["history"] = history.record_quietly(storage, functools.partial(history.night_entry, storage, config, night))
    return summary


def _run_night(storage: Storage, config: PipelineConfig, night: NightRun) -> dict[str, Any]:
    snapshot = config.ingest.snapshot
    record = night.plan = night_record(storage, config)
    with night.stage("ingest"):
        ingested = night.ingested = run_ingest(
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
    with night.stage("encode"):
        encoded = night.encoded = run_encode(encode_config)
    index_config = config.model_copy(
        update={"index": config.index.model_copy(update={"snapshot": snapshot, "fingerprint": encoded.fingerprint})}
    )
    with night.stage("build_index"):
        built = night.built = run_build_index(index_config)
    served = None
    if config.nightly.serve_address:
        with night.stage("serve"):
            served = night.served = point_serve_at(config, built.version)
    if config.retain.after_night:  # once the app holds tonight's version: what no retained version needs goes
        from pipeline.retention import retain_after_night

        with night.stage("retain"):
            night.retention = retain_after_night(config)
    return {
        "snapshot": snapshot,
        "previous_snapshot": record["previous_snapshot"],
        "base": record.get("base"),
        "passages": ingested.rows,
        "new": encoded.rows if encoded.new is None else encoded.new,  # a first night: every passage is new
        "changed": encoded.changed or 0,
        "deleted": encoded.deleted or 0,
        "reused": encoded.reused,
        "encoded": encoded.rows,
        "retrained": built.retrained,
        "version": built.version,
        "index_build": built.mode,
        "segments": built.segments,
        "published": not built.reused,
        "vectors": built.vectors,
        "recall_at_100": built.recall_at_100,
        "distortion": built.distortion,
        "served": served,
        "retention": night.retention.model_dump() if night.retention is not None else None,
        "phase_seconds": night.timer.seconds,
        "output": built.output,
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


INGRESS = "QAService"  # the deployment whose user_config sets the version of the whole app


def with_index_version(deploy_config: dict[str, Any], app: str, version: str) -> dict[str, Any]:
    """The Serve deploy config with the app's version set where it is set, the ingress's `user_config`, and any
    `index_version` another deployment's user_config still carries (configs written for older releases) dropped,
    so that one setting moves the question encoder, every index shard and BM25 together (pure)."""
    applications = [dict(a) for a in deploy_config["applications"]]
    target = next((a for a in applications if a.get("name") == app), None)
    if target is None:
        raise PipelineError(
            f"Serve has no application named {app!r} deployed from a config "
            f"(found {[a.get('name') for a in applications]}): check nightly.serve_app"
        )
    deployments = []
    for deployment in target.get("deployments", []):
        deployment = dict(deployment)
        user_config = {k: v for k, v in (deployment.get("user_config") or {}).items() if k != "index_version"}
        if deployment.get("name") == INGRESS or user_config:
            deployment["user_config"] = user_config
        else:
            deployment.pop("user_config", None)
        deployments.append(deployment)
    ingress = next((d for d in deployments if d.get("name") == INGRESS), None)
    if ingress is None:
        ingress = {"name": INGRESS}
        deployments.append(ingress)
    ingress["user_config"] = {**(ingress.get("user_config") or {}), "index_version": version}
    target["deployments"] = deployments
    return {**deploy_config, "applications": applications}


def app_url(config: PipelineConfig) -> str:
    """Where the app answers HTTP: `nightly.serve_url`, else serve.host:serve.port."""
    host = "127.0.0.1" if config.serve.host == "0.0.0.0" else config.serve.host
    return (config.nightly.serve_url or f"http://{host}:{config.serve.port}").rstrip("/")


def auth_headers(config: PipelineConfig) -> dict[str, str]:
    """The app's Bearer key, from the variable `serve.api_key_env` names, when it has one."""
    key = os.environ.get(config.serve.api_key_env) if config.serve.api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def point_serve_at(config: PipelineConfig, version: str) -> dict[str, Any]:
    """Set the app's version (the ingress's `user_config.index_version`) through the Serve REST API, as `serve
    deploy` would: every part loads it beside the version it serves. Then check it by searching, in every mode the
    app has, until the answers come from it; a version the app refuses, or an app that fails its searches, fails
    the night (the app keeps answering from the version before)."""
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
    url, headers = app_url(config), auth_headers(config)

    def set_version(name: str) -> None:
        updated = with_index_version({**current, "applications": deployed}, night.serve_app, name)
        _http_json("PUT", f"{base}/api/serve/applications/", updated)

    try:
        before = _http_json("GET", f"{url}/v1/index", headers=headers, timeout=30).get("index_version")
    except (urllib.error.URLError, OSError, ValueError):
        before = None  # the app does not answer now: nothing to set back
    set_version(version)
    try:
        return verify_serving(url, version, headers, night.serve_timeout_s)
    except PipelineError as exc:
        if before is None or before == version:
            raise
        set_version(before)  # the one setting names what is answered, also for replicas started later
        raise PipelineError(f"{exc}; the app is set back to {before}") from None


def verify_serving(url: str, version: str, headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Search the app at `url` in every mode it has until each answers 200 from `version` (`/v1/index` first, for
    the modes and a refusal); PipelineError naming what the app said when it refuses the version, or when
    `timeout_s` passes without it."""
    deadline, seen = time.monotonic() + timeout_s, "no answer yet"
    while time.monotonic() < deadline:
        try:
            info = _http_json("GET", f"{url}/v1/index", headers=headers, timeout=30)
            if info.get("target") == version and info.get("last_error"):
                raise PipelineError(f"the app at {url} refused index {version}: {info['last_error']}")
            modes = ["dense", "sparse", "hybrid"] if info.get("bm25") else ["dense"]
            probe = "which passage answers this question?"
            answers = {
                mode: _http_json("POST", f"{url}/v1/search", {"questions": [probe], "k": 1, "mode": mode}, headers, 30)[
                    "index_version"
                ]
                for mode in modes
            }
            if set(answers.values()) == {version}:
                log.info("%s serves %s in modes %s", url, version, modes)
                return {"index_version": version, "url": url, "modes": modes}
            seen = f"answers from {answers}"
        except urllib.error.HTTPError as exc:
            body = exc.read()[:4000].decode(errors="replace")
            seen = f"HTTP {exc.code}: {body}"
            refused = _json_or_empty(body)
            if refused.get("target") == version and refused.get("last_error"):
                raise PipelineError(f"the app at {url} refused index {version}: {refused['last_error']}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            seen = f"unreachable ({exc})"
        time.sleep(1)
    raise PipelineError(f"index {version} was published, but {url} does not serve it after {timeout_s:.0f}s: {seen}")


def _json_or_empty(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
