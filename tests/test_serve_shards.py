"""The QA app's index in shards, over real HTTP: three shards answer as one, refine re-scores exactly, versions
move across shards under load without a failed or mixed answer, a shard with no live replica is a 503 naming it,
and a killed shard replica costs at most 1% (one retrieval-only app per test on its own route)."""

import threading
import time

import numpy as np
import pytest
import requests

from kit.jobs import free_port, run_job
from kit.load import Load
from kit.poll import until
from pipeline.config import load_config
from pipeline.models.text_encoder import EncoderSettings, TextEncoder
from pipeline.ops.client import AppClient
from pipeline.store.manifests import IndexManifest
from pipeline.store.published import load_published
from pipeline.store.storage import Storage
from tests.conftest import RAY_DASHBOARD_PORT, qa_copy
from tests.serving import (
    BODY,
    PAUSE_S,
    QUESTIONS,
    answers_from,
    kill_one_replica_under_load,
    latest,
    replicas,
    route_app,
)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def qa(tmp_path_factory, tiny_models, ray_address, qa_store):
    """A copy of the session's published serve corpus (`qa_store`), and Serve's HTTP on the session's Ray: each test
    runs its own apps on their own routes."""
    import ray
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve-shards")
    port = free_port()
    config_path = qa_copy(qa_store, tmp, tiny_models, port)
    config = load_config(config_path)
    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {
        "config_path": config_path,
        "config": config,
        "url": f"http://127.0.0.1:{port}",
        "storage": Storage(config.storage.root),
        "tmp": tmp,
    }
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def segmented(qa):
    """Three versions of the same 400 passages in 4 segments each (distributed builds of 100-vector groups, other
    seeds: other quantizers, codes and scores, so no segment or quantizer file is shared); LATEST is put back."""
    before = latest(qa)
    versions = []
    for seed in (11, 12, 13):
        run = run_job(
            "build_index",
            qa["config_path"],
            "index.segment_vectors=100",
            f"index.seed={seed}",
            "index.reuse_trained=false",
            "index.compact=never",
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.summary["segments"] == 4
        versions.append(run.summary["version"])
    qa["storage"].write_bytes("indexes/LATEST", f"{before}\n".encode())
    return versions


def _sharded(qa, name: str, version: str, shards: int, **settings) -> str:
    """A retrieval-only app on its own route serving `version` from `shards` index shards."""
    small = {"encoder_cpus": 0.1, "retriever_cpus": 0.1}
    return route_app(qa, name, **{"index_version": version, "shards": shards, **small, **settings})


def _local_search(qa, version: str, model: str, k: int, refine_ks=(0,)) -> list[tuple[list[list[str]], np.ndarray]]:
    """What `version` answers QUESTIONS with when searched here, its segments stacked: (ids, scores) for each
    `refine_k` (0: none), the version loaded and the questions encoded once."""
    published = load_published(qa["storage"], version, str(qa["tmp"] / f"check-{version}"))
    vectors = TextEncoder(EncoderSettings(model, "dpr", max_length=64, question=True)).encode(None, QUESTIONS)
    found = []
    for refine_k in refine_ks:
        scores, rows = published.search(vectors, k, refine_k=refine_k)
        found.append(([published.passages(r).column("id").to_pylist() for r in rows], scores))
    return found


def test_three_shards_answer_as_one(qa, segmented, tiny_models):
    """Three shards (segments 1, 1 and 2 of the version's 4) answer what one search over all 4 answers."""
    from ray import serve

    version = segmented[0]
    try:
        three = _sharded(qa, "three", version, 3)
        split = requests.post(f"{three}/v1/search", json={"questions": QUESTIONS, "k": 20}, timeout=60)
        assert split.status_code == 200, split.text
        info = requests.get(f"{three}/v1/index", timeout=30).json()
    finally:
        serve.delete("three")
    [(ids, scores)] = _local_search(qa, version, tiny_models["question"], 20)
    assert split.json()["index_version"] == version
    assert [[h["id"] for h in hits] for hits in split.json()["results"]] == ids
    assert np.allclose([[h["score"] for h in hits] for hits in split.json()["results"]], scores, atol=1e-4)
    assert info["index_version"] == version and info["vectors"] == 400
    assert sorted(s["segments"] for s in info["shards"]) == [1, 1, 2]
    assert sorted(s["vectors"] for s in info["shards"]) == [100, 100, 200]


def test_serve_refine_k_re_scores_the_candidates_exactly(qa, segmented, tiny_models):
    """serve.refine_k: the app answers what a refined search of the same version returns (4 segments stacked),
    with the exact inner products of the stored vectors as scores."""
    from ray import serve

    version = segmented[0]
    try:
        url = _sharded(qa, "refined", version, 1, refine_k=120)
        response = requests.post(f"{url}/v1/search", json={"questions": QUESTIONS, "k": 20}, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        serve.delete("refined")
    (ids, scores), (plain, _) = _local_search(qa, version, tiny_models["question"], 20, refine_ks=(120, 0))
    assert ids != plain  # refine changed the order somewhere: the test can tell them apart
    assert [[h["id"] for h in hits] for hits in response.json()["results"]] == ids
    assert np.allclose([[h["score"] for h in hits] for hits in response.json()["results"]], scores, atol=1e-4)


@pytest.mark.reliability
def test_a_swap_across_three_shards_under_load_fails_nothing_and_mixes_nothing(qa, segmented):
    """Every response equals, hit for hit, the answer of the one version it names: no response mixes shards on
    different versions, and none fails while the shards move one after another."""
    from ray import serve

    old, new, _ = segmented
    body = {"questions": QUESTIONS[:2], "k": 10}
    try:
        # The timeout only tells a dead shard from a live one; here every shard lives, while the new version's
        # ingress and encoder replicas start beside three loading shards on CI's two cores.
        slow = {"shard_timeout_s": 60}
        url = _sharded(qa, "swap", old, 3, **slow)
        expected = {old: requests.post(f"{url}/v1/search", json=body, timeout=60).json()}
        answers, stop = [], threading.Event()

        def client():
            session = requests.Session()
            while not stop.is_set():
                response = session.post(f"{url}/v1/search", json=body, timeout=60)
                answers.append((response.status_code, response.json()))
                time.sleep(PAUSE_S)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1)
        _sharded(qa, "swap", new, 3, **slow)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not answers or answers[-1][1].get("index_version") != new):
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        expected[new] = requests.post(f"{url}/v1/search", json=body, timeout=60).json()  # the app, moved
    finally:
        serve.delete("swap")
    assert expected[new]["index_version"] == new and expected[old]["results"] != expected[new]["results"]
    assert [a for a in answers if a[0] != 200] == []
    assert {a[1]["index_version"] for a in answers} == {old, new}
    assert all(answer == expected[answer["index_version"]] for _, answer in answers)


MODES = ("dense", "sparse", "hybrid")


@pytest.mark.reliability
def test_three_shards_and_bm25_moved_ten_times_among_three_versions_under_load_fail_nothing(qa, segmented):
    """Three shards and the BM25 deployment on one node share its cache: deployed from a config through the Serve
    REST API and moved ten times among three versions that share no segment or quantizer as the nightly moves an app
    (the ingress's user_config set in place: `AppClient.set_version`), each part letting go of a version a second
    after the app moved on (serve.version_idle_s 1: its files go while other parts load theirs), with clients
    searching in every mode: no request fails (no part evicts a file another part holds or is loading) and every
    answer equals, hit for hit, its version's answer in its mode."""
    from ray import serve

    url = f"{qa['url']}/moves"
    client = AppClient(url, f"http://127.0.0.1:{RAY_DASHBOARD_PORT}", "moves")
    settings = {"shards": 3, "reader_model": "null", "encoder_cpus": 0.1, "retriever_cpus": 0.1}
    settings |= {"shard_timeout_s": 60, "version_idle_s": 1}
    app = {
        "name": "moves",
        "route_prefix": "/moves",
        "import_path": "pipeline.serve.app:app",
        "args": {"config": str(qa["config_path"]), "set": [f"serve.{key}={value}" for key, value in settings.items()]},
        "deployments": [{"name": "QAService", "user_config": {"index_version": segmented[0]}}],
    }
    running = client.serve_details()
    expected = {}
    try:
        client.deploy({"http_options": running["http_options"], "applications": [app]})
        for version in segmented:
            client.set_version(version)
            until(lambda v=version: answers_from(url, v), 90, 0.2, f"the app answering from {version}")
            for mode in MODES:
                answer = requests.post(f"{url}/v1/search", json={**BODY, "mode": mode}, timeout=60).json()
                expected[(version, mode)] = answer["results"]
        modes = lambda client, turn: {**BODY, "mode": MODES[(client + turn) % 3]}  # noqa: E731
        with Load(f"{url}/v1/search", 3, modes, pause_s=PAUSE_S) as load:
            for move in range(10):
                version = segmented[move % 3]
                client.set_version(version)
                moved = lambda v=version: load.answers and load.answers[-1].body.get("index_version") == v  # noqa: E731
                until(moved, 90, 0.2, f"move {move}")
    finally:
        serve.delete("moves")
    assert load.failed() == []
    assert {a.body["index_version"] for a in load.answers} == set(segmented)
    assert all(a.body["results"] == expected[(a.body["index_version"], a.request["mode"])] for a in load.answers)


@pytest.mark.reliability
def test_a_shard_without_live_replicas_gets_a_503_naming_it(qa, segmented):
    """Shard 2's only replica is SIGKILLed while its segment on storage is damaged and gone from its cache, so no
    replacement can load it: searches get a 503 naming the shard within serve.shard_timeout_s, never the other
    shards' hits presented as the whole answer."""
    import os
    import signal

    from ray import serve
    from ray.util.state import list_actors

    from pipeline.store.segments import assign_segments, segments_of

    version = segmented[0]
    cache = qa["tmp"] / "cache-down"
    manifest = qa["storage"].read_manifest(f"indexes/{version}", IndexManifest, name="manifest.json")
    owner = assign_segments(segments_of(manifest), 3)
    segment = next(s for s in segments_of(manifest) if owner[s.seq] == 2)
    stored = qa["storage"].path("indexes", segment.file("ivf.bin"))
    original = open(stored, "rb").read()
    try:
        url = _sharded(qa, "down", version, 3, cache_dir=str(cache), shard_timeout_s=3)
        body = {"questions": ["castle road"], "k": 5}
        assert requests.post(f"{url}/v1/search", json=body, timeout=60).status_code == 200
        with open(stored, "r+b") as handle:
            handle.seek(len(original) // 2)
            handle.write(bytes(16))
        (cache / segment.file("ivf.bin")).unlink()
        [replica] = list_actors(filters=[("class_name", "=", "ServeReplica:down:Retriever2"), ("state", "=", "ALIVE")])
        os.kill(replica.pid, signal.SIGKILL)
        time.sleep(1)
        started = time.monotonic()
        response = requests.post(f"{url}/v1/search", json=body, timeout=60)
        assert response.status_code == 503, response.text
        assert "index shard 2 (Retriever2)" in response.json()["error"]
        assert time.monotonic() - started < 3 + 5
    finally:
        with open(stored, "wb") as handle:
            handle.write(original)
        serve.delete("down")


@pytest.mark.reliability
def test_a_shard_replica_killed_under_load_costs_at_most_one_percent(qa, segmented):
    """Three shards of two replicas; one replica of shard 1 is SIGKILLed mid-load: the ingress retries the lost
    call on its sibling and Serve replaces it."""
    from ray import serve

    try:
        url = _sharded(qa, "kill3", segmented[0], 3, retriever_replicas=2)
        statuses = kill_one_replica_under_load(url, "kill3", "Retriever1")
        assert serve.status().applications["kill3"].deployments["Retriever1"].status == "HEALTHY"
        assert len(replicas("kill3", "Retriever1")) == 2
    finally:
        serve.delete("kill3")
    failed = [s for s in statuses if s != 200]
    assert len(statuses) >= 100 and len(failed) <= 0.01 * len(statuses), (len(statuses), failed)
