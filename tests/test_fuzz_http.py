"""Any question text through the real QA app over HTTP (hypothesis): alone in every mode and on /v1/ask, and mixed
into concurrent batches with ordinary questions, which answer exactly as they do alone. Never a 500; a request's own
fault is a 4xx naming its question; the app's replicas stay up throughout.

`pytest --hypothesis-profile=thorough tests/test_fuzz_http.py` draws ten times as many examples."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kit.corpora import synthetic_rows
from kit.jobs import free_port, run_chain, write_config
from kit.questions import TRICKY, questions
from kit.serveapp import tiny_qa_config
from pipeline.config import load_config
from pipeline.store.lexical import ANALYZERS

pytestmark = pytest.mark.ray
MODES = ("dense", "sparse", "hybrid")
MAX_CHARS = 300
EXAMPLES = max(10, settings.default.max_examples // 4)  # 25 in CI: each example is several HTTP requests
# Passages of the serve tests' vocabulary, and passages holding the texts the fuzzer draws from.
ROWS = synthetic_rows(300, words=30) + [
    (str(1000 + i), f"{word} appears here, beside castle and river", "Odd text") for i, word in enumerate(TRICKY)
]
ORDINARY = ["castle road", "river north", "garden music", "which king built the bridge", "island species"]
ORDINARY += ["poet and novel", "army ship", "museum theatre"]
TERMS = ANALYZERS["en_stem"]()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, ray_address):
    """The published index built by the jobs and the app serving it, with each ordinary question's answer alone in
    each mode, and the replicas it started with."""
    import ray
    from ray import serve

    from pipeline.serve.app import build_app

    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    limits = {"max_question_chars": MAX_CHARS, "max_body_bytes": 65536}
    config_path = write_config(tmp / "c.yaml", tiny_qa_config(tmp, tiny_models, ROWS, port, **limits))
    run_chain(config_path)
    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(load_config(config_path)), name="qa", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    alone = {(q, mode): _search(url, [q], mode).json()["results"][0] for q in ORDINARY for mode in MODES}
    yield {"url": url, "alone": alone, "replicas": _replicas()}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(autouse=True)
def stays_up(app):
    """After each test: the app answers, on the very replicas it started with (none crashed and was replaced)."""
    yield
    assert requests.get(f"{app['url']}/healthz", timeout=10).status_code == 200
    assert _replicas() == app["replicas"]


def _replicas() -> set[str]:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {actor.actor_id for actor in alive if actor.class_name.startswith("ServeReplica:qa:")}


def _search(url: str, asked: list[str], mode: str, k: int = 5) -> requests.Response:
    return requests.post(f"{url}/v1/search", json={"questions": asked, "k": k, "mode": mode}, timeout=120)


def _status(question: str) -> int:
    """What the app must answer a question of at most MAX_CHARS characters."""
    return 422 if not question.strip() else 200


def _assert_as_alone(got: list[dict], alone: list[dict], what) -> None:
    """The same passages in the same order; scores as alone up to float rounding (a batch's padding changes the
    question encoder's arithmetic, not its answer)."""
    assert [hit["id"] for hit in got] == [hit["id"] for hit in alone], what
    assert [hit["score"] for hit in got] == pytest.approx([hit["score"] for hit in alone], rel=1e-4, abs=1e-5), what


def _batches() -> dict[int, int]:
    """Batch size -> retrieval batches the ingress has run so far."""
    from ray import serve

    return serve.get_app_handle("qa").batch_sizes.remote().result(timeout_s=60)


def test_any_question_alone_in_every_mode_and_asked(app):
    url = app["url"]

    @settings(max_examples=EXAMPLES)
    @given(question=questions(MAX_CHARS, ordinary=ORDINARY))
    @example(question="what is a_b")
    @example(question="see https://personal.math.ubc.ca/~cbm/aands/page_79.htm")
    def alone(question: str) -> None:
        status, found = _status(question), {}
        for mode in MODES:
            response = _search(url, [question], mode)
            assert response.status_code == status, (mode, response.text)
            assert response.json()["request_id"] if status != 200 else response.json()["index_version"]
            if status == 200:
                [found[mode]] = response.json()["results"]
                scores = [hit["score"] for hit in found[mode]]
                assert len(scores) <= 5 and scores == sorted(scores, reverse=True), mode
        if status == 200 and not TERMS.analyze(question):  # nothing BM25 can match: none; hybrid is dense alone
            [deep] = _search(url, [question], "dense", k=100).json()["results"]  # as deep as hybrid searches
            assert found["sparse"] == [] and [h["id"] for h in found["hybrid"]] == [h["id"] for h in deep[:5]]
        asked = {"question": question, "k": 5, "top_answers": 2, "mode": "hybrid"}
        response = requests.post(f"{url}/v1/ask", json=asked, timeout=120)
        assert response.status_code == status, response.text
        if status == 200:
            assert 0 < len(response.json()["answers"]) <= 2 and len(response.json()["passages"]) == 5

    alone()


def test_odd_questions_in_concurrent_batches_leave_ordinary_ones_as_alone(app):
    """Every ordinary question in every mode, fired at once with the odd ones (so the ingress, the encoder, the
    shards and BM25 coalesce them into shared batches): the ordinary ones answer as alone, the odd ones as they
    would alone."""
    before = _batches()

    @settings(max_examples=max(5, EXAMPLES // 2))
    @given(odd=st.lists(questions(MAX_CHARS), min_size=1, max_size=4), seed=st.integers(0, 2**16))
    @example(odd=["what is a_b", "page_79.htm"], seed=0)
    def mixed(odd: list[str], seed: int) -> None:
        calls = [(q, mode, False) for q in ORDINARY for mode in MODES]
        calls += [(q, mode, True) for q in odd for mode in MODES]
        random.Random(seed).shuffle(calls)
        start = threading.Barrier(len(calls))

        def call(asked: tuple[str, str, bool]) -> requests.Response:
            start.wait()
            return _search(app["url"], [asked[0]], asked[1])

        with ThreadPoolExecutor(len(calls)) as pool:
            responses = list(pool.map(call, calls))
        for (question, mode, is_odd), response in zip(calls, responses):
            if is_odd:
                assert response.status_code == _status(question), (mode, response.text)
            else:
                assert response.status_code == 200, (question, mode, response.text)
                _assert_as_alone(response.json()["results"][0], app["alone"][(question, mode)], (question, mode))

    mixed()
    after = _batches()
    shared = {size: after.get(size, 0) - before.get(size, 0) for size in after if size > 1}
    assert sum(shared.values()) >= 10, shared  # the requests did meet in batches


def test_a_lone_surrogate_is_a_422_naming_its_question(app):
    @settings(max_examples=max(5, EXAMPLES // 5))
    @given(at=st.integers(0, len(ORDINARY[3])), surrogate=st.integers(0xD800, 0xDFFF), mode=st.sampled_from(MODES))
    def refused(at: int, surrogate: int, mode: str) -> None:
        question = ORDINARY[3][:at] + chr(surrogate) + ORDINARY[3][at:]  # JSON carries it escaped (\\udXXX)
        response = _search(app["url"], ["castle road", question], mode)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == (
            f"question 1 is not Unicode text: a lone surrogate (U+{surrogate:04X}) at character {at}"
        )
        assert response.json()["request_id"] == response.headers["x-request-id"]

    refused()
