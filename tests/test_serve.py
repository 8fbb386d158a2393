"""The QA app on Ray Serve, over real HTTP: results, reader spans, every error status, metrics, hot swap."""

import json
import threading
import time

import numpy as np
import pytest
import requests
import yaml

from kit.jobs import REPO, free_port, run_job
from kit.poll import until
from kit.rss import maps_library
from pipeline.config import load_config
from pipeline.models.text_encoder import EncoderSettings, TextEncoder
from pipeline.serve.examples import EXAMPLES
from pipeline.store.lexical import fuse, load_lexical
from pipeline.store.published import load_published
from pipeline.store.storage import Storage
from tests.conftest import QA_ROWS as ROWS
from tests.conftest import TEST_API_KEY, qa_copy
from tests.serving import PAUSE_S, QUESTIONS, answers_from, kill_one_replica_under_load, latest, replicas, route_app

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def qa(tmp_path_factory, tiny_models, ray_address, qa_store):
    """A copy of the session's published serve corpus (`qa_store`), and the QA app serving it on the session's Ray."""
    import ray
    from ray import serve

    from pipeline.serve.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    limits = {"max_question_chars": 200, "max_k": 50, "max_batch_questions": 8, "max_body_bytes": 4096}
    config_path = qa_copy(qa_store, tmp, tiny_models, port, **limits)
    config = load_config(config_path)
    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="qa", route_prefix="/")
    state = {
        "config_path": config_path,
        "config": config,
        "url": f"http://127.0.0.1:{port}",
        "storage": Storage(config.storage.root),
        "tmp": tmp,
    }
    yield state
    serve.shutdown()
    ray.shutdown()


def _deploy(config):
    from ray import serve

    from pipeline.serve.app import build_app

    serve.run(build_app(config), name="qa", route_prefix="/")


def test_search_returns_the_published_index_best_first(qa, tiny_models):
    questions = ["river mountain city", "castle garden poet"]
    response = requests.post(f"{qa['url']}/v1/search", json={"questions": questions, "k": 5}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index_version"] == latest(qa) and len(body["results"]) == 2
    published = load_published(qa["storage"], None, str(qa["tmp"] / "check"))
    encoder = TextEncoder(EncoderSettings(tiny_models["question"], "dpr", max_length=64, question=True))
    _, expected = published.search(encoder.encode(None, questions), 5)
    by_id = {pid: (title, text) for pid, text, title in ROWS}
    for hits, rows in zip(body["results"], expected):
        assert [h["id"] for h in hits] == published.passages(rows).column("id").to_pylist()
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all((h["title"], h["text"]) == by_id[h["id"]] for h in hits)


def test_ask_spans_equal_decode_best_spans(qa, tiny_models):
    import torch
    from transformers import DPRReader, DPRReaderTokenizerFast

    question = "which river flows past the castle"
    response = requests.post(f"{qa['url']}/v1/ask", json={"question": question, "k": 4, "top_answers": 2}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    passages = body["passages"]
    assert len(passages) == 4 and body["index_version"] == latest(qa)
    tokenizer = DPRReaderTokenizerFast.from_pretrained(tiny_models["reader"])
    model = DPRReader.from_pretrained(tiny_models["reader"]).eval()
    inputs = tokenizer(
        questions=[question] * 4,
        titles=[p["title"] for p in passages],
        texts=[p["text"] for p in passages],
        padding="max_length",
        truncation=True,
        max_length=96,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    spans = tokenizer.decode_best_spans(inputs, output, num_spans=2, max_answer_length=10)
    assert [a["text"] for a in body["answers"]] == [s.text for s in spans]
    assert [a["passage_id"] for a in body["answers"]] == [passages[s.doc_id]["id"] for s in spans]
    assert np.allclose([a["score"] for a in body["answers"]], [float(s.span_score) for s in spans], atol=1e-4)


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/search", '{"questions": "not a list"}', 422, "invalid request"),
        ("/v1/search", "{malformed json", 422, "invalid request"),
        ("/v1/search", '{"questions": ["q"], "k": 0}', 422, "invalid request"),
        ("/v1/search", '{"questions": ["q"], "k": 1000000}', 422, "serve.max_k"),
        ("/v1/search", '{"questions": [], "k": 3}', 422, "invalid request"),
        ("/v1/search", '{"questions": ["   "]}', 422, "is empty"),
        ("/v1/search", '{"questions": [' + ",".join(['"q"'] * 9) + "]}", 413, "serve.max_batch_questions"),
        ("/v1/search", '{"questions": ["' + "x" * 300 + '"]}', 413, "serve.max_question_chars"),
        ("/v1/search", '{"questions": ["' + "a" * 5000 + '"]}', 413, "request body over 4096 bytes"),
        ("/v1/search", '{"questions": ["' + "a" * 10**6 + '"]}', 413, "request body over 4096 bytes"),
        ("/v1/ask", '{"question": "' + "why " * 250_000 + '"}', 413, "request body over 4096 bytes"),
        ("/v1/search", '{"questions": [' + ",".join(['"q"'] * 10**4) + "]}", 413, "request body over 4096 bytes"),
        ("/v1/search", '{"questions": ["q"], "k": "ten"}', 422, "invalid request"),
        ("/v1/ask", '{"question": 42}', 422, "invalid request"),
        ("/v1/ask", '{"question": "q", "top_answers": 0}', 422, "invalid request"),
        ("/v1/search", '{"questions": ["q"], "mode": "fuzzy"}', 422, "invalid request"),
    ],
)
@pytest.mark.reliability
def test_bad_input_gets_a_json_error_never_a_500(qa, path, body, status, message):
    started = time.perf_counter()
    response = requests.post(f"{qa['url']}{path}", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    assert message in str(response.json())
    assert response.json()["request_id"] == response.headers["x-request-id"]  # Serve's id, in its log lines too
    assert time.perf_counter() - started < 1.0  # refused before any model or index work
    healthy = requests.post(f"{qa['url']}/v1/search", json={"questions": ["river"], "k": 1}, timeout=30)
    assert healthy.status_code == 200  # and the app keeps answering others


def test_docs_openapi_health_index_and_metrics(qa):
    assert requests.get(f"{qa['url']}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{qa['url']}/docs", timeout=10).status_code == 200
    spec = requests.get(f"{qa['url']}/openapi.json", timeout=10).json()
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())  # docs/api.md's schema is the app's own
    assert spec["paths"] == committed["paths"] and spec["components"] == committed["components"]
    info = requests.get(f"{qa['url']}/v1/index", timeout=10).json()
    assert set(info) == set(EXAMPLES["GET /v1/index"]["answer"])  # docs/api.md's example has the keys it answers
    assert info["index_version"] == latest(qa) and info["vectors"] == 400
    assert info["lineage"]["snapshot"] == "s1" and info["lineage"]["factory"] == "IVF4,PQ32x8"
    footprint = info["bytes_per_passage"]  # what a replica stores, by kind: the reader's token ids among them
    assert footprint["token_ids"] > 0 and footprint["bm25"] < footprint["docstore"] and footprint["total"] > 0
    assert info["lineage"]["tokenizer"]["model"] == qa["config"].serve.reader_model
    requests.post(f"{qa['url']}/v1/search", json={"questions": ["army ship"]}, timeout=30)
    metrics = requests.get(f"{qa['url']}/metrics", timeout=10).text
    assert 'qa_requests_total{route="/v1/search",status="200"}' in metrics
    assert 'qa_stage_seconds_bucket{le="0.001",stage="encode"}' in metrics
    assert 'qa_stage_seconds_count{stage="search"}' in metrics
    assert f'qa_index_version_info{{version="{latest(qa)}"}} 1.0' in metrics


def test_hot_swap_under_load(qa):
    old = latest(qa)
    new_run = run_job("build_index", qa["config_path"], "index.nprobe=2")
    assert new_run.returncode == 0, new_run.stderr[-2000:]
    new = new_run.summary["version"]
    assert new != old

    seen, failures, stop = [], [], threading.Event()
    by_client: list[list[str]] = [[], [], []]

    def client(number: int):
        while not stop.is_set() and len(seen) + len(failures) < 5000:
            try:
                r = requests.post(
                    f"{qa['url']}/v1/search", json={"questions": ["north south road"], "k": 3}, timeout=30
                )
                (seen if r.status_code == 200 else failures).append(r.json().get("index_version", r.text))
                by_client[number].append(seen[-1] if r.status_code == 200 else "failed")
            except requests.RequestException as exc:
                failures.append(repr(exc))
            time.sleep(PAUSE_S)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    _deploy(qa["config"].model_copy(update={"serve": qa["config"].serve.model_copy(update={"index_version": new})}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not seen or seen[-1] != new):
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert set(seen) == {old, new} and seen[-1] == new and seen.count(old) >= 1
    # No client ever sees the version go back: once one of its answers came from the new version, all later ones
    # do. (Across clients, a request sent before the move may still finish after another's first new answer.)
    for versions in by_client:
        assert versions == sorted(versions, key=lambda v: v == new), versions


@pytest.mark.reliability
def test_a_corrupt_version_is_refused_and_the_current_one_keeps_serving(qa):
    from ray import serve

    current = requests.get(f"{qa['url']}/v1/index", timeout=10).json()["index_version"]
    # retrained: a quantizer and a segment of its own (segments are shared between versions by content)
    bad_run = run_job("build_index", qa["config_path"], "index.nprobe=3", "index.reuse_trained=false", "index.seed=3")
    bad = bad_run.summary["version"]
    quantizer = qa["storage"].read_json(f"indexes/{bad}/manifest.json")["quantizer"]
    index_file = qa["storage"].path("indexes", quantizer)
    with open(index_file, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00" * 64)
    # in place, as `serve deploy` applies a user_config change to the one place the version is set: the
    # Retrievers refuse it, the current version keeps answering in every mode
    ingress = serve.get_deployment_handle("QAService", app_name="qa")
    ingress.reconfigure.remote({"index_version": bad}).result(timeout_s=60)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = requests.get(f"{qa['url']}/v1/index", timeout=30).json()
            if info["last_error"]:
                break
            time.sleep(0.2)
        assert info["index_version"] == current and info["target"] == bad
        assert "checksum mismatch" in info["last_error"] and bad in info["last_error"]
        for mode in ("dense", "sparse", "hybrid"):
            body = {"questions": ["north"], "k": 2, "mode": mode}
            after = requests.post(f"{qa['url']}/v1/search", json=body, timeout=30)
            assert after.status_code == 200 and after.json()["index_version"] == current
    finally:
        ingress.reconfigure.remote({"index_version": current}).result(timeout_s=60)
        qa["storage"].write_bytes("indexes/LATEST", f"{current}\n".encode())  # build_index had moved it to `bad`


def test_a_version_of_the_release_before_block_files_serves_the_same_answers(qa):
    """The app moved (as `serve deploy` moves it) to a version whose docstores and token ids are the uncompressed
    Arrow files, and its kept vectors fp16, of the release before: /v1/search in every mode and /v1/ask answer as
    from the same version in block files; and the block files' passages are the Arrow files' row for row."""
    from ray import serve

    from kit.legacy import before_blocks

    current = latest(qa)
    old = before_blocks(qa["storage"], current, qa["tmp"] / "legacy")
    bodies = [("search", {"questions": QUESTIONS, "k": 5, "mode": m}) for m in ("dense", "sparse", "hybrid")]
    bodies.append(("ask", {"question": QUESTIONS[0], "k": 4, "top_answers": 2}))

    def answers() -> list[dict]:
        found = [requests.post(f"{qa['url']}/v1/{path}", json=body, timeout=60) for path, body in bodies]
        assert all(r.status_code == 200 for r in found), [r.text for r in found]
        return [{k: v for k, v in r.json().items() if k not in ("index_version", "request_id")} for r in found]

    ingress = serve.get_deployment_handle("QAService", app_name="qa")
    ingress.reconfigure.remote({"index_version": current}).result(timeout_s=60)
    until(lambda: answers_from(qa["url"], current), 60, what=f"answers from {current}")
    expected = answers()
    ingress.reconfigure.remote({"index_version": old}).result(timeout_s=60)
    try:
        until(lambda: answers_from(qa["url"], old), 60, what=f"answers from {old}")
        assert answers() == expected
    finally:
        ingress.reconfigure.remote({"index_version": current}).result(timeout_s=60)
    blocks = load_published(qa["storage"], current, str(qa["tmp"] / "c-blocks"))
    arrow = load_published(qa["storage"], old, str(qa["tmp"] / "c-arrow"))
    ids, _ = blocks.live_ids()
    assert blocks.passages(ids).equals(arrow.passages(ids))
    assert [(a.tolist(), b.tolist()) for a, b in blocks.store.token_ids(ids)] == [
        (a.tolist(), b.tolist()) for a, b in arrow.store.token_ids(ids)
    ]


def test_api_key_when_configured(qa):
    """An app whose settings name the key's variable (on its own route, beside the open one) answers 401 without
    the key or with a wrong one, 200 with it, and its health check needs none."""
    from ray import serve

    url = route_app(qa, "keyed", index_version=latest(qa), api_key_env="QA_TEST_API_KEY")
    try:
        body = {"questions": ["garden"], "k": 1}
        assert requests.post(f"{url}/v1/search", json=body, timeout=30).status_code == 401
        wrong = requests.post(f"{url}/v1/search", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error"] == "missing or wrong API key"
        assert wrong.json()["request_id"] == wrong.headers["x-request-id"]
        assert wrong.headers["www-authenticate"] == "Bearer"
        key = {"Authorization": f"Bearer {TEST_API_KEY}"}
        assert requests.post(f"{url}/v1/search", json=body, headers=key, timeout=30).status_code == 200
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        assert requests.post(f"{qa['url']}/v1/search", json=body, timeout=30).status_code == 200  # the open app
    finally:
        serve.delete("keyed")


@pytest.mark.reliability
def test_overload_is_answered_503_at_once_and_admitted_requests_succeed(qa):
    """Beyond max_ongoing_requests + max_queued_requests the proxy sheds load with a fast 503, never a 500."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from pipeline.serve.app import build_app

    tight = qa["config"].serve.model_copy(
        update={"max_ongoing_requests": 1, "max_queued_requests": 1, "index_version": latest(qa)}
    )
    serve.run(build_app(qa["config"].model_copy(update={"serve": tight})), name="overload", route_prefix="/overload")
    url = f"{qa['url']}/overload/v1/ask"
    assert requests.post(url, json={"question": "warm up", "k": 10}, timeout=60).status_code == 200
    alone = []
    for i in range(5):
        started = time.perf_counter()
        assert requests.post(url, json={"question": f"river {i}", "k": 10}, timeout=60).status_code == 200
        alone.append(time.perf_counter() - started)

    def ask(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = requests.post(url, json={"question": f"river castle {i}", "k": 10}, timeout=60)
        return response.status_code, time.perf_counter() - started

    try:
        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(ask, range(72)))
    finally:
        serve.delete("overload")
    statuses = [status for status, _ in outcomes]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 10, statuses
    shed = sorted(seconds for status, seconds in outcomes if status == 503)
    assert shed[len(shed) // 2] < 1.0, shed
    # admitted requests wait behind at most max_ongoing + max_queued others: their latency stays bounded (against
    # the slowest request alone, which met the same share of two cores as they did, the suite's other worker's too)
    admitted = sorted(seconds for status, seconds in outcomes if status == 200)
    assert admitted[len(admitted) // 2] < 4 * max(alone) + 0.25, (admitted, alone)


@pytest.mark.reliability
def test_a_replica_killed_under_load_costs_at_most_one_percent(qa):
    """Two retriever replicas; one is SIGKILLed mid-load. The ingress retries the lost call on a live replica and
    Serve replaces the dead one (health checks)."""
    from ray import serve

    url = route_app(qa, "kill2", index_version=latest(qa), retriever_replicas=2)
    try:
        statuses = kill_one_replica_under_load(url, "kill2", "Retriever")
        assert serve.status().applications["kill2"].deployments["Retriever"].status == "HEALTHY"
        assert len(replicas("kill2", "Retriever")) == 2
    finally:
        serve.delete("kill2")
    failed = [s for s in statuses if s != 200]
    assert len(statuses) >= 100 and len(failed) <= 0.01 * len(statuses), (len(statuses), failed)


def test_serve_config_file_names_the_app():
    spec = yaml.safe_load(open("configs/serve.yaml"))
    application = spec["applications"][0]
    assert application["import_path"] == "pipeline.serve.app:app"
    assert load_config(application["args"]["config"]).serve.reader_model is None
    assert application["deployments"] == [{"name": "QAService", "user_config": {"index_version": None}}]


def test_retriever_replicas_never_load_torch(qa):
    """The index half of the app holds no model: its replicas map no libtorch, unlike the question encoder's."""
    from ray.util.state import list_actors

    def mapped(deployment: str) -> list[tuple[int, bool]]:
        actors = list_actors(filters=[("class_name", "=", f"ServeReplica:qa:{deployment}"), ("state", "=", "ALIVE")])
        assert actors, deployment
        return [(a.pid, maps_library(a.pid, "libtorch")) for a in actors]

    assert all(not torch for _, torch in mapped("Retriever")), mapped("Retriever")
    assert all(not torch for _, torch in mapped("Lexical")), mapped("Lexical")  # BM25: tantivy only
    assert all(torch for _, torch in mapped("QuestionEncoder"))


def test_sparse_and_hybrid_find_what_only_bm25_finds(qa, tiny_models):
    """Each passage ends with its number ("passage 123"), a term in that passage only: BM25 finds it first (and
    alone), hybrid (reciprocal-rank fusion of both rankings) keeps it in its top 5 where the tiny random dense
    encoder does not, and the fused order is `fuse` of the two rankings of the published version."""
    questions = ["123", "77", "305"]
    wanted = ["123", "77", "305"]
    answers = {}
    for mode in ("dense", "sparse", "hybrid"):
        response = requests.post(
            f"{qa['url']}/v1/search", json={"questions": questions, "k": 5, "mode": mode}, timeout=60
        )
        assert response.status_code == 200, response.text
        answers[mode] = [[hit["id"] for hit in hits] for hits in response.json()["results"]]
    assert [ids[0] for ids in answers["sparse"]] == wanted
    assert all(pid in ids for pid, ids in zip(wanted, answers["hybrid"]))
    assert sum(pid in ids for pid, ids in zip(wanted, answers["dense"])) <= 1  # the test can tell them apart
    published = load_published(qa["storage"], None, str(qa["tmp"] / "check-hybrid"))
    lexical = load_lexical(qa["storage"], published.manifest, str(qa["tmp"] / "check-hybrid"))
    encoder = TextEncoder(EncoderSettings(tiny_models["question"], "dpr", max_length=64, question=True))
    scores, rows = published.search(encoder.encode(None, questions), 100)
    dense = [
        [{"id": pid, "score": float(score)} for pid, score in zip(published.passages(r).column("id").to_pylist(), sc)]
        for sc, r in zip(scores, rows)
    ]
    expected = [fuse(d, b, 5) for d, b in zip(dense, lexical.search(questions, 100))]
    assert answers["hybrid"] == [[hit["id"] for hit in hits] for hits in expected]


def test_metrics_expose_every_series_the_grafana_dashboard_queries(qa):
    """infra/grafana/qa-dashboard.json: each metric name its PromQL selects is a sample of the live app's /metrics once
    the app has answered a search, an ask and a refused request."""
    from kit.dashboard import dashboard_metric_names, load_dashboard, sample_names

    url = qa["url"]
    search = requests.post(f"{url}/v1/search", json={"questions": ["river castle"], "k": 3}, timeout=60)
    assert search.status_code == 200, search.text
    ask = requests.post(f"{url}/v1/ask", json={"question": "which river", "k": 3}, timeout=60)
    assert ask.status_code == 200, ask.text
    refused = requests.post(f"{url}/v1/search", json={"questions": "not a list"}, timeout=30)
    assert refused.status_code == 422, refused.text
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    used = dashboard_metric_names(load_dashboard())
    assert {"qa_requests_total", "qa_request_seconds_bucket", "qa_stage_seconds_bucket"} <= used
    assert used - sample_names(metrics) == set(), metrics
    assert 'qa_requests_total{route="/v1/search",status="422"}' in metrics  # what the error panels select
    for stage in ("encode", "search", "read"):
        assert f'qa_stage_seconds_count{{stage="{stage}"}}' in metrics
