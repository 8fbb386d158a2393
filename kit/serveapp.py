"""The QA app as an operator deploys it: a Serve config naming the app and its one version setting, sent with
`serve deploy` (the CLI) or straight to the Serve REST API that the CLI and the nightly use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import requests
import yaml

from kit.jobs import REPO


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
    requests.put(f"{dashboard}/api/serve/applications/", json=spec, timeout=60).raise_for_status()


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
