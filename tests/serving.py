"""What the QA app's tests share: questions in the serve corpus's vocabulary, the published version, a search-only app
on its own route, the live replicas of a deployment, one of them killed under load, and whether an app answers from
a version."""

from __future__ import annotations

import os
import signal
import threading
import time

import requests

QUESTIONS = ["river mountain city", "castle garden poet", "north road bridge", "old stone market"]
BODY = {"questions": QUESTIONS[:2], "k": 10}


def latest(qa: dict) -> str:
    """The version the module's store publishes as LATEST."""
    return qa["storage"].read_bytes("indexes/LATEST").decode().strip()


def route_app(qa: dict, name: str, **settings) -> str:
    """A search-only app (no reader) named `name` on its own route beside the module's, `settings` over the module's
    serve settings: its URL."""
    from ray import serve

    from pipeline.serve.app import build_app

    serve_settings = qa["config"].serve.model_copy(update={"reader_model": None, **settings})
    serve.run(build_app(qa["config"].model_copy(update={"serve": serve_settings})), name=name, route_prefix=f"/{name}")
    return f"{qa['url']}/{name}"


def replicas(app: str, deployment: str) -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])


PAUSE_S = 0.05  # between a client's requests: concurrent clients, not a saturated CPU the other tests share


def kill_one_replica_under_load(url: str, app: str, deployment: str, at_least: int = 100) -> list[int]:
    """Three clients search `url` while one replica of `deployment` is SIGKILLed; returns every status once Serve
    has replaced it (or after 90 s) and `at_least` requests were made (or 60 s more went by)."""
    statuses, stop = [], threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.post(f"{url}/v1/search", json={"questions": ["castle road"], "k": 3}, timeout=30)
                statuses.append(r.status_code)
            except requests.RequestException:
                statuses.append(0)
            time.sleep(PAUSE_S)

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2)
        victim = replicas(app, deployment)[0]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            alive = replicas(app, deployment)
            if len(alive) == 2 and victim.actor_id not in {a.actor_id for a in alive}:
                break
            time.sleep(0.5)
        time.sleep(2)
        enough = time.monotonic() + 60
        while len(statuses) < at_least and time.monotonic() < enough:
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    return statuses


def answers_from(url: str, version: str) -> bool:
    response = requests.post(f"{url}/v1/search", json=BODY, timeout=60)
    return response.status_code == 200 and response.json()["index_version"] == version
