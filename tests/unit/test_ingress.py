"""The ingress's logic in process (`pipeline.serve.app.Ingress`), with fakes of the deployments' handles behind it:
batch splitting, fusion, one version per response while a version moves in, a refused version, and the HTTP
contract (statuses and error bodies) through FastAPI's TestClient. Real Serve runs the same class in test_serve and
test_app_version."""

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorUnavailableError

import pipeline.serve.app as app_module
from pipeline.config import ServeConfig
from pipeline.serve.app import Ingress
from pipeline.serve.batching import Coalescer
from pipeline.serve.fanout import ShardUnavailable, merge_hits
from pipeline.serve.routes import build_api
from pipeline.store.lexical import fuse

DIMS = {"v1": 4, "v2": 6}  # the two versions' question encoders give vectors of other widths


class Handle:
    """A deployment handle's stand-in: `handle.method.remote(*args)` is `part.method(*args)`, awaitable."""

    def __init__(self, part):
        self._part = part

    def __getattr__(self, name):
        method = getattr(self._part, name)

        class Remote:
            @staticmethod
            def remote(*args):
                return method(*args)

        return Remote


class Part:
    """What a versioned deployment's replica holds and answers: the version asked for when held, else its last."""

    def __init__(self, held: list[str], refused: dict[str, str] | None = None, delay_s: float = 0.0):
        self.held, self.refused, self.delay_s, self.asked = list(held), dict(refused or {}), delay_s, []
        self.error: BaseException | None = None

    async def _pick(self, version: str) -> str:
        self.asked.append(version)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return version if version in self.held else self.held[-1]

    def _status(self) -> dict:
        return {"loaded": list(self.held), "refused": dict(self.refused)}


class Encoder(Part):
    async def encode(self, call):
        used = await self._pick(call.version)
        vectors = np.ones((len(call.questions), DIMS[used]), np.float32)
        return {"index_version": used, **self._status(), "vectors": vectors}

    async def info(self, version):
        used = await self._pick(version)
        return {"index_version": used, **self._status(), "question_model": f"question-model-{used}"}


class Shard(Part):
    def __init__(self, number: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.number = number

    async def search(self, request):
        used = await self._pick(request.version)
        if request.vectors.shape[1] != DIMS[used]:
            return {"index_version": used, **self._status(), "results": None}
        results = [
            [
                {
                    "id": f"{used}-s{self.number}-{i}",
                    "title": "t",
                    "text": "x",
                    "score": 1 - i / 10,
                    "key": i * 10,
                    "title_ids": np.array([i], np.uint16),
                    "text_ids": np.array([i, i], np.uint16),
                }
                for i in range(request.k)
            ]
            for _ in range(len(request.vectors))
        ]
        return {"index_version": used, **self._status(), "results": results}

    async def info(self, version):
        used = await self._pick(version)
        details = {"shard": [self.number, 2], "node": "n", "vectors": 50, "segments": 1, "lineage": {}}
        return {"index_version": used, **self._status(), **details}


class Bm25(Part):
    poison = "a_b"  # a question this BM25 index fails on (as tantivy's parser failed on it)

    async def search(self, request):
        used = await self._pick(request.version)
        if any(self.poison in question for question in request.questions):
            raise ValueError("The field 'body' does not have positions indexed")
        hits = [{"id": f"{used}-b{i}", "title": "t", "text": "x", "score": 9.0 - i} for i in range(request.k)]
        return {"index_version": used, **self._status(), "results": [hits for _ in request.questions]}

    async def info(self, version):
        used = await self._pick(version)
        return {"index_version": used, **self._status()}


def _ingress(parts: dict, serving: str = "v1", answered: str | None = None, **settings) -> Ingress:
    config = ServeConfig(max_batch_questions=4, max_question_chars=50, max_k=20, hybrid_depth=6, **settings)
    ingress = Ingress(
        Handle(parts["encoder"]),
        [Handle(shard) for shard in parts["shards"]],
        None,
        config,
        Handle(parts["bm25"]) if "bm25" in parts else None,
    )
    ingress.want = ingress.serving = serving
    ingress.answered = answered
    return ingress


def _parts(encoder=("v1",), shards=(("v1",), ("v1",)), bm25=("v1",)) -> dict:
    return {
        "encoder": Encoder(list(encoder)),
        "shards": [Shard(i, list(held)) for i, held in enumerate(shards)],
        "bm25": Bm25(list(bm25)),
    }


def test_a_batch_is_split_back_per_request_with_its_own_k_and_mode():
    parts = _parts()
    requests = [(["a"], 2, "dense"), (["b", "c"], 3, "hybrid"), (["d"], 1, "sparse")]
    dense_a, hybrid, sparse = asyncio.run(_ingress(parts)._retrieve_batch(requests))
    depth = 6  # hybrid_depth: the deepest any request of the batch needs
    shard_hits = [[{"id": f"v1-s{s}-{i}", "score": 1 - i / 10, "key": i * 10} for i in range(depth)] for s in (0, 1)]
    merged = merge_hits(shard_hits, depth)
    assert [h["id"] for h in dense_a["results"][0]] == [h["id"] for h in merged[:2]]
    bm25 = [{"id": f"v1-b{i}", "score": 9.0 - i} for i in range(depth)]
    expected = [h["id"] for h in fuse(merged, bm25, 3, 60, 0.5)]
    assert [[h["id"] for h in hits] for hits in hybrid["results"]] == [expected, expected]
    assert [h["id"] for h in sparse["results"][0]] == ["v1-b0"]
    assert {a["index_version"] for a in (dense_a, hybrid, sparse)} == {"v1"}
    assert parts["encoder"].asked == ["v1"]  # one encoder call for the batch
    # One search of each index per depth the batch asks (dense at 2 and 6, BM25 at 6 and 1): each request is searched
    # as deep as it would be alone.
    assert parts["bm25"].asked == ["v1", "v1"] and [s.asked for s in parts["shards"]] == [["v1", "v1"]] * 2


def test_hits_leave_the_app_without_their_faiss_ids_and_token_ids():
    client = TestClient(build_api(_ingress(_parts()), None))
    for mode in ("dense", "hybrid"):
        answer = client.post("/v1/search", json={"questions": ["q"], "k": 2, "mode": mode}).json()
        assert [set(hit) for hit in answer["results"][0]] == [{"id", "title", "text", "score"}] * 2, mode


def test_while_a_shard_lacks_the_new_version_answers_come_from_the_one_before():
    """The encoder and shard 0 hold v2, shard 1 still loads it: the answer comes from v1 whole (v1 vectors, v1
    hits), then from v2 whole once shard 1 holds it."""
    parts = _parts(encoder=("v1", "v2"), shards=(("v1", "v2"), ("v1",)), bm25=("v1", "v2"))
    ingress = _ingress(parts, serving="v2", answered="v1")
    [found] = asyncio.run(ingress._retrieve_batch([(["q"], 3, "hybrid")]))
    assert found["index_version"] == "v1"
    assert all(hit["id"].startswith("v1-") for hit in found["results"][0])
    parts["shards"][1].held.append("v2")
    [found] = asyncio.run(ingress._retrieve_batch([(["q"], 3, "hybrid")]))
    assert found["index_version"] == "v2" and all(hit["id"].startswith("v2-") for hit in found["results"][0])
    assert ingress.answered == "v2"


def test_a_starting_replica_takes_traffic_once_every_part_holds_its_version(monkeypatch):
    """A settings change replaces every replica: a new ingress's `reconfigure` (Serve sends it nothing before it
    returns) waits until the parts hold its version, so its first requests do not wait for a load; a version that
    never comes is waited for `START_WAIT_S` at most."""
    parts = _parts(encoder=("v1",), shards=(("v1",), ("v1", "v2")), bm25=("v1",))

    async def start(ingress: Ingress, version: str) -> float:
        started = asyncio.get_running_loop().time()
        await ingress.reconfigure({"index_version": version})
        return asyncio.get_running_loop().time() - started

    async def loaded_later():
        await asyncio.sleep(0.3)
        for part in (parts["encoder"], parts["shards"][0], parts["bm25"]):
            part.held.append("v2")

    async def both():
        ingress = _ingress(parts, serving=None)
        ingress.want = None
        waited, _ = await asyncio.gather(start(ingress, "v2"), loaded_later())
        return ingress, waited

    ingress, waited = asyncio.run(both())
    assert waited >= 0.3 and ingress.serving == "v2" and ingress._moving.done()
    monkeypatch.setattr(app_module, "START_WAIT_S", 0.2)
    never = _ingress(parts, serving=None)
    never.want = None
    assert 0.2 <= asyncio.run(start(never, "v3")) < 2 and never.serving == "v3"  # nothing else to answer from


def test_a_version_one_part_refuses_is_never_served_and_index_says_why(monkeypatch):
    """The question encoder refuses v2 (its model is missing); the BM25 index holds it. The ingress keeps asking
    requests for v1 in every mode, sparse included, and /v1/index names the reason."""
    monkeypatch.setattr(app_module, "REFUSED_RETRY_S", 0.01)
    parts = _parts(encoder=("v1",), shards=(("v1", "v2"), ("v1", "v2")), bm25=("v1", "v2"))
    parts["encoder"].refused = {"v2": "OSError: /nowhere/question-encoder is not a model"}
    ingress = _ingress(parts, serving="v1", answered="v1")

    async def move():
        ingress.want = "v2"
        task = asyncio.ensure_future(ingress._move_to("v2"))
        while ingress.last_error is None:
            await asyncio.sleep(0.01)
        ingress.want = "v1"  # the operator sets it back: the task ends
        await task

    asyncio.run(move())
    assert ingress.serving == "v1" and "/nowhere/question-encoder" in ingress.last_error
    ingress.want = "v2"
    client = TestClient(build_api(ingress, None))
    info = client.get("/v1/index").json()
    assert (info["index_version"], info["target"]) == ("v1", "v2") and "v2 refused" in info["last_error"]
    assert info["held"]["QuestionEncoder"] == ["v1"] and info["question_model"] == "question-model-v1"
    for mode in ("dense", "sparse", "hybrid"):
        answer = client.post("/v1/search", json={"questions": ["q"], "k": 2, "mode": mode}).json()
        assert answer["index_version"] == "v1", mode


@pytest.mark.parametrize(
    ("break_it", "status", "says"),
    [
        (lambda p: setattr(p["encoder"], "error", ValueError("cannot reshape array")), 500, "internal error"),
        (lambda p: setattr(p["encoder"], "error", ActorUnavailableError("gone", b"0" * 16)), 503, "restarting"),
        (lambda p: setattr(p["shards"][1], "delay_s", 1.0), 503, "index shard 1 (Retriever1) did not answer"),
    ],
)
def test_a_failing_part_gets_a_json_error_with_the_request_id(break_it, status, says):
    parts = _parts()
    break_it(parts)
    client = TestClient(build_api(_ingress(parts, shard_timeout_s=0.2), None), raise_server_exceptions=False)
    response = client.post("/v1/search", json={"questions": ["q"], "k": 2}, headers={"x-request-id": "req-7"})
    assert response.status_code == status, response.text
    assert response.json()["request_id"] == "req-7" and says in response.json()["error"]
    if status == 503 and "restarting" in says:
        assert parts["encoder"].asked == ["v1", "v1"]  # a lost replica's call is made once more
    assert client.post("/v1/search", json={"questions": ["q"], "k": 2}).status_code == status  # and stays JSON


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"questions": ["q"] * 5}, 413, "serve.max_batch_questions is 4"),
        ({"questions": ["x" * 51]}, 413, "serve.max_question_chars is 50"),
        ({"questions": ["  "]}, 422, "question 0 is empty"),
        ({"questions": ["q"], "k": 21}, 422, "k=21 is over serve.max_k=20"),
        ({"questions": ["q"], "mode": "sparse"}, 422, "needs the BM25 index"),
        ({"questions": "q"}, 422, "invalid request"),
    ],
)
def test_refusals_have_their_status_and_say_why(body, status, says):
    parts = _parts()
    del parts["bm25"]
    response = TestClient(build_api(_ingress(parts), None)).post("/v1/search", json=body)
    assert response.status_code == status and says in str(response.json())
    assert response.json()["request_id"]
    assert parts["encoder"].asked == []  # refused before any model or index work


def test_a_lone_surrogate_is_refused_naming_the_question():
    parts = _parts()
    body = b'{"questions": ["castle", "a \\ud800 b"], "k": 2}'  # valid JSON: the surrogate escaped
    response = TestClient(build_api(_ingress(parts), None)).post(
        "/v1/search", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "question 1 is not Unicode text: a lone surrogate (U+D800) at character 2"
    assert parts["encoder"].asked == []


def _answered(found: dict) -> tuple:
    return found["index_version"], [[(hit["id"], hit["score"]) for hit in hits] for hits in found["results"]]


def _coalesced(ingress: Ingress) -> Coalescer:
    """The ingress's batching as QAService wires it."""
    return Coalescer(ingress._retrieve_batch, 32, shared=app_module._unavailable)


def test_one_bad_request_in_a_batch_fails_alone_and_the_others_answer_as_alone():
    ordinary = [(["castle"], 2, "sparse"), (["road", "hill"], 3, "hybrid"), (["north"], 2, "dense")]

    async def main():
        ingress = _ingress(_parts())
        alone = [(await ingress._retrieve_batch([request]))[0] for request in ordinary]
        together = _coalesced(ingress)
        first = asyncio.ensure_future(together.submit((["first"], 1, "dense")))  # in flight: the rest queue
        calls = [asyncio.ensure_future(together.submit(r)) for r in [ordinary[0], (["what is a_b"], 2, "sparse")]]
        calls += [asyncio.ensure_future(together.submit(r)) for r in ordinary[1:]]
        got = await asyncio.gather(*calls, return_exceptions=True)
        await first
        assert together.sizes[4] == 1 and together.split == 1  # one batch of four, failed, then each alone
        assert isinstance(got[1], ValueError) and "positions" in str(got[1])
        assert [_answered(a) for a in [got[0], *got[2:]]] == [_answered(a) for a in alone]

    asyncio.run(main())


def test_a_part_unavailable_fails_its_batch_at_once_without_a_retry_per_request():
    async def main():
        parts = _parts()
        ingress = _ingress(parts, shard_timeout_s=0.05)
        together = _coalesced(ingress)
        first = asyncio.ensure_future(together.submit((["first"], 1, "dense")))
        parts["shards"][0].delay_s = 0.2  # past serve.shard_timeout_s
        calls = [asyncio.ensure_future(together.submit(([f"q{i}"], 1, "dense"))) for i in range(3)]
        got = await asyncio.gather(first, *calls, return_exceptions=True)
        assert all(isinstance(exc, ShardUnavailable) for exc in got[1:])
        assert together.split == 0 and sum(together.sizes.values()) == 2  # the lone first and the batch of 3

    asyncio.run(main())
