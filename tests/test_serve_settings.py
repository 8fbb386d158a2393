"""Changing the QA app's settings as docs/serving.md says: edit the deployment YAML, write the Serve config with
`python -m jobs.serve_config`, `serve deploy` it. The new setting takes effect (Serve rebuilds the app: its args
changed), no request fails while it does, and the nightly's version change afterwards keeps the settings and
restarts nothing. Real Ray Serve through the `serve deploy` CLI, real HTTP."""

import subprocess
import sys
import time

import pytest
import requests
import yaml

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import REPO, free_port, run_job, write_config
from kit.load import Load
from kit.poll import until
from kit.serveapp import serve_config, serve_deploy
from pipeline.config import load_config
from pipeline.ops.client import AppClient
from tests.conftest import RAY_DASHBOARD_PORT

pytestmark = pytest.mark.ray
ROWS = synthetic_rows(200, words=30)
QUESTIONS = ["river mountain city"]


def _settings(tmp, port: int, max_k: int) -> dict:
    return {
        "storage": {"root": str(tmp / "store")},
        "ingest": {"shard_rows": 100},
        "encode": {"model": "", "max_length": 48},  # filled in by the fixture
        "index": {"factory": "IVF4,Flat", "nprobe": 4, "queries": 30, "min_recall": 0.5, "lexical": False},
        "serve": {
            "reader_model": None,
            "port": port,
            "cache_dir": str(tmp / "cache"),
            "retriever_cpus": 0.2,
            "encoder_cpus": 0.2,
            "max_k": max_k,
        },
    }


def _status(url: str, k: int) -> int:
    return requests.post(f"{url}/v1/search", json={"questions": QUESTIONS, "k": k}, timeout=60).status_code


def _write_and_deploy(state, name: str) -> dict:
    """What the operator runs: `python -m jobs.serve_config --config c.yaml --serve-config serve.yaml > NAME`,
    then `serve deploy NAME`. Returns the written config."""
    command = [sys.executable, "-m", "jobs.serve_config", "--config", str(state["config"])]
    command += ["--serve-config", str(state["template"])]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    written = yaml.safe_load(done.stdout)
    serve_deploy(state["dashboard"], written, state["tmp"] / name)
    return written


def _deployed(dashboard: str) -> dict:
    return AppClient(serve_address=dashboard).serve_details()["applications"]["qa"]


def _replica_ids(dashboard: str) -> set[str]:
    deployments = _deployed(dashboard)["deployments"]
    return {r["replica_id"] for d in deployments.values() for r in d["replicas"] if r["state"] == "RUNNING"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, ray_address):
    """One version published; the app deployed from a written Serve config with serve.max_k 5."""
    import ray
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve-settings")
    port, dashboard = free_port(), f"http://127.0.0.1:{RAY_DASHBOARD_PORT}"
    settings = _settings(tmp, port, max_k=5)
    settings["encode"].update(model=tiny_models["ctx"], question_model=tiny_models["question"])
    config = write_config(tmp / "c.yaml", settings)
    write_tsv(tmp / "psgs.tsv", ROWS)
    night = run_job("nightly", config, f"ingest.input={tmp / 'psgs.tsv'}", "ingest.snapshot=s1")
    assert night.returncode == 0, night.stderr[-3000:]
    template = tmp / "serve.yaml"  # configs/serve.yaml's shape, on this test's port
    template.write_text(yaml.safe_dump(serve_config(config, port)))
    state = {
        "tmp": tmp,
        "config": config,
        "settings": settings,
        "template": template,
        "dashboard": dashboard,
        "url": f"http://127.0.0.1:{port}",
        "version": night.summary["version"],
    }
    started = time.monotonic()
    state["written"] = _write_and_deploy(state, "deploy-1.yaml")
    until(lambda: _status(state["url"], 5) == 200, 180, 0.5, "the app answering")
    state["first_deploy_s"] = time.monotonic() - started
    yield state
    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def edited(app):
    """serve.max_k 5 -> 8 in the deployment YAML, written and deployed again while two clients search."""
    url, dashboard = app["url"], app["dashboard"]
    before = {"k5": _status(url, 5), "k6": _status(url, 6), "replicas": _replica_ids(dashboard)}
    app["settings"]["serve"]["max_k"] = 8
    write_config(app["config"], app["settings"])

    def body(client: int, turn: int) -> dict:
        return {"questions": QUESTIONS, "k": 5}

    running: list[dict[str, int]] = []  # each deployment's RUNNING replicas, polled while the edit moves in
    with Load(f"{url}/v1/search", 2, body, pause_s=0.05) as clients:
        time.sleep(1)
        started = time.monotonic()
        written = _write_and_deploy(app, "deploy-2.yaml")
        while _status(url, 8) != 200 or _replica_ids(dashboard) & before["replicas"]:  # until every part is new
            assert time.monotonic() - started < 180, "k=8 not answered by all-new replicas within 180 s"
            deployments = _deployed(dashboard)["deployments"]  # none listed while Serve builds the new app
            if deployments:
                running.append({n: sum(r["state"] == "RUNNING" for r in d["replicas"]) for n, d in deployments.items()})
            time.sleep(0.2)
        took = time.monotonic() - started
        time.sleep(1)
    print(f"first deploy {app['first_deploy_s']:.1f}s; every replica new {took:.1f}s after `serve deploy`")
    return {"before": before, "written": written, "clients": clients, "took_s": took, "running": running}


def test_an_edited_setting_reaches_the_app_without_a_failed_request(app, edited):
    url, dashboard = app["url"], app["dashboard"]
    assert edited["before"]["k5"] == 200 and edited["before"]["k6"] == 422  # serve.max_k 5 as first written
    assert (_status(url, 8), _status(url, 9)) == (200, 422)  # serve.max_k 8 after the edit
    old, new = app["written"]["applications"][0]["args"], edited["written"]["applications"][0]["args"]
    assert (old["settings"]["serve"]["max_k"], new["settings"]["serve"]["max_k"]) == (5, 8)
    assert _deployed(dashboard)["deployed_app_config"]["args"] == new
    # Serve rebuilt the app: every replica is a new one, and no request failed while they were replaced; each old
    # replica answered until its replacement was ready (serve.max_surge_percent 100): no part was ever without one
    assert not _replica_ids(dashboard) & edited["before"]["replicas"]
    assert len(edited["running"]) > 5 and all(min(polled.values()) >= 1 for polled in edited["running"])
    clients = edited["clients"]
    assert clients.failed() == [] and len(clients.answers) > 20, clients.failed()[:3]


def test_the_nightly_setting_the_version_keeps_the_settings_and_restarts_nothing(app, edited):
    """What the nightly does after publishing (GET the deployed config, PUT it back with the QAService's
    index_version): the args it finds are kept, so Serve applies the user_config in place."""
    url, dashboard = app["url"], app["dashboard"]
    replicas = _replica_ids(dashboard)
    config = load_config(app["config"], [f"nightly.serve_address={dashboard}", "nightly.serve_timeout_s=120"])
    assert AppClient.of(config).move_to(app["version"], 120)["index_version"] == app["version"]
    deployed = _deployed(dashboard)["deployed_app_config"]
    assert deployed["args"] == edited["written"]["applications"][0]["args"]
    assert [d["user_config"] for d in deployed["deployments"] if d["name"] == "QAService"] == [
        {"index_version": app["version"]}
    ]
    assert _replica_ids(dashboard) == replicas
    assert (_status(url, 8), _status(url, 9)) == (200, 422)


def test_replicas_replaced_by_a_settings_change_start_on_the_pinned_version_not_latest(app, edited):
    """The app pinned to its first version while `LATEST` names a newer one, and a setting changed in the same
    `serve deploy` (so Serve replaces every replica): each new replica loads the pinned version before it takes
    traffic, and none loads `LATEST` (each part holds the pinned version alone); no request fails meanwhile."""
    url, dashboard, pinned = app["url"], app["dashboard"], app["version"]
    config = load_config(app["config"], [f"nightly.serve_address={dashboard}", "nightly.serve_timeout_s=120"])
    assert AppClient.of(config).move_to(pinned, 120)["index_version"] == pinned  # pinned in place, as the nightly pins
    newer = run_job("build_index", app["config"], "index.nprobe=3")
    assert newer.returncode == 0 and newer.summary["version"] != pinned, newer.stderr[-2000:]
    state = {**app, "template": app["tmp"] / "serve-pinned.yaml"}
    state["template"].write_text(yaml.safe_dump(serve_config(app["config"], _port(url), index_version=pinned)))
    app["settings"]["serve"]["version_idle_s"] = 90
    write_config(app["config"], app["settings"])
    before = _replica_ids(dashboard)

    def body(client: int, turn: int) -> dict:
        return {"questions": QUESTIONS, "k": 5}

    try:
        with Load(f"{url}/v1/search", 2, body, pause_s=0.05) as clients:
            time.sleep(1)
            _write_and_deploy(state, "deploy-pinned.yaml")
            until(lambda: _replaced(dashboard, before), 180, 0.5, "every replica replaced")
            time.sleep(1)
        info = requests.get(f"{url}/v1/index", timeout=30).json()
        assert info["index_version"] == pinned and info["pinned"], info
        assert info["held"] == {"QuestionEncoder": [pinned], "Retriever": [pinned]}, info["held"]
        assert clients.failed() == [] and len(clients.answers) > 20, clients.failed()[:3]
        assert {a.body["index_version"] for a in clients.answers} == {pinned}
    finally:  # the app as the other tests of this module find it: `edited`'s config, following LATEST
        del app["settings"]["serve"]["version_idle_s"]
        write_config(app["config"], app["settings"])
        serve_deploy(dashboard, edited["written"], app["tmp"] / "deploy-restored.yaml")
        until(lambda: _deployed(dashboard)["status"] == "RUNNING", 180, 0.5, "the app restored")


def _replaced(dashboard: str, before: set[str]) -> bool:
    """The app running on replicas that are all new (none of `before` left, in any state)."""
    deployed = _deployed(dashboard)
    replicas = {r["replica_id"] for d in deployed["deployments"].values() for r in d["replicas"]}
    return deployed["status"] == "RUNNING" and bool(replicas) and not replicas & before


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
