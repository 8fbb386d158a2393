"""The QA app as an operator deploys it: a Serve config naming the app and its one version setting, sent with
`serve deploy` (the CLI) or straight to the Serve REST API that the CLI and the nightly use; the tiny app the serve
tests build; and a private Ray with Serve for the benchmarks that serve the demo."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

from kit.corpora import write_tsv
from kit.jobs import REPO
from pipeline.ops.client import AppClient


def tiny_qa_config(
    tmp: Path, models: dict[str, str], rows: list[tuple[str, str, str]], port: int, **serve: Any
) -> dict[str, Any]:
    """A config for `rows` (psgs_w100 layout, written under `tmp`) with the tiny DPR `models` on every side, an
    IVF-PQ index with BM25, and an app on `port` whose parts take slices of a CPU; `serve` overrides its settings."""
    return {
        "storage": {"root": str(tmp / "store")},
        "ingest": {"input": str(write_tsv(tmp / "psgs.tsv", rows)), "snapshot": "s1", "shard_rows": 100},
        "encode": {"model": models["ctx"], "pooling": "dpr", "max_length": 64},
        "index": {"factory": "IVF4,PQ32x8", "nprobe": 4, "queries": 40, "min_recall": 0.5},
        "serve": {
            "question_model": models["question"],
            "reader_model": models["reader"],
            "cache_dir": str(tmp / "cache"),
            "port": port,
            "retriever_cpus": 0.25,
            "reader_cpus": 0.25,
            "encoder_cpus": 0.25,
            "lexical_cpus": 0.1,
            "reader_max_length": 96,
            **serve,
        },
    }


@contextlib.contextmanager
def private_serve(host: str, port: int, dashboard: bool = False) -> Iterator[str]:
    """A private local Ray with Serve's HTTP on host:port (its URL), shut down on leaving the block, and on SIGTERM
    and SIGINT."""
    import ray
    from ray import serve

    from kit.localray import exit_on_signals

    exit_on_signals()
    ray.init(address="local", logging_level=logging.WARNING, log_to_driver=False, include_dashboard=dashboard)
    serve.start(http_options={"host": host, "port": port})
    try:
        yield f"http://{host}:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_config(config: Path | str, port: int, index_version: str | None = None) -> dict[str, Any]:
    """`configs/serve.yaml`'s shape: the app `qa` built from deployment YAML `config`, HTTP on 127.0.0.1:`port`,
    the version set on the QAService (None: indexes/LATEST)."""
    application = {
        "name": "qa",
        "route_prefix": "/",
        "import_path": "pipeline.serve.app:app",
        "args": {"config": str(config)},
        "deployments": [{"name": "QAService", "user_config": {"index_version": index_version}}],
    }
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [application]}


def put_app(dashboard: str, spec: dict[str, Any]) -> None:
    """What `serve deploy` sends: the whole config, to the Serve REST API of the dashboard at `dashboard`."""
    AppClient(serve_address=dashboard).deploy(spec)


def serve_deploy(dashboard: str, spec: dict[str, Any], path: Path) -> None:
    """`serve deploy path -a dashboard`, the CLI itself, with `spec` written to `path`."""
    path.write_text(yaml.safe_dump(spec))
    command = [str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", dashboard]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"serve deploy failed: {done.stderr[-2000:]}")


def answers_by_mode(url: str, questions: list[str], modes: tuple[str, ...], k: int = 5) -> dict[str, dict[str, Any]]:
    """What the app at `url` answers now to `questions` in each mode (each answer names its version)."""
    out = {}
    for mode in modes:
        response = requests.post(f"{url}/v1/search", json={"questions": questions, "k": k, "mode": mode}, timeout=60)
        if response.status_code != 200:
            raise AssertionError(f"{mode}: {response.status_code} {response.text}")
        out[mode] = response.json()
    return out
