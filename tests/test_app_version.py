"""The QA app moves as one version (question encoder, index, BM25): encoder-upgrade nights under load, a pin to an
older version and back through `serve deploy`, and a version whose question model is missing, refused while the
app keeps answering. Real Ray Serve deployed from a config over its REST API, real HTTP, the real nightly job."""

import time

import pytest
import requests

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import free_port, run_job, write_config
from kit.load import Load
from kit.models import tiny_dpr
from kit.poll import until
from kit.serveapp import answers_by_mode, serve_config, serve_deploy
from pipeline.models.text_encoder import EncoderSettings, TextEncoder
from pipeline.ops.client import AppClient
from pipeline.store.published import load_published
from pipeline.store.storage import Storage
from tests.conftest import RAY_DASHBOARD_PORT

pytestmark = pytest.mark.ray
ROWS = synthetic_rows(240, words=30)
QUESTIONS = ["river mountain city", "castle garden poet"]
MODES = ("dense", "sparse", "hybrid")


def _clients(url: str) -> Load:
    """Four clients searching `url` in turn in every mode (a `with` block bounds them)."""

    def body(client: int, turn: int) -> dict:
        return {"questions": QUESTIONS, "k": 5, "mode": MODES[(client + turn) % len(MODES)]}

    return Load(f"{url}/v1/search", 4, body, pause_s=0.02)


def _expected(url: str) -> dict[str, dict]:
    """What the app answers now in each mode (the version each names)."""
    return answers_by_mode(url, QUESTIONS, MODES)


def _wait_for(url: str, version: str, timeout: float = 120) -> None:
    until(
        lambda: all(a["index_version"] == version for a in _expected(url).values()),
        timeout,
        0.5,
        f"{url} answering from {version} in every mode",
    )


def _deploy(state, index_version) -> None:
    """`serve deploy` of the app's config with the QAService's index_version set, as an operator pins it."""
    spec = serve_config(state["config"], state["port"], index_version)
    serve_deploy(state["dashboard"], spec, state["tmp"] / f"serve-{index_version}.yaml")


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, ray_address):
    """Night 1 published with the tiny 32-d DPR pair (recorded in its manifest as the question encoder), and the
    QA app deployed from a config through the Serve REST API, following indexes/LATEST."""
    import ray
    from ray import serve

    tmp = tmp_path_factory.mktemp("app-version")
    port = free_port()
    dashboard = f"http://127.0.0.1:{RAY_DASHBOARD_PORT}"
    models = tmp / "models"
    pairs = {
        "a": {"ctx": tiny_models["ctx"], "question": tiny_models["question"]},
        "wide": tiny_dpr(models, hidden=48, layers=1, seed=7, name="wide"),  # another dimension
        "same": tiny_dpr(models, hidden=32, layers=1, seed=9, name="same"),  # the first one's, other weights
    }
    config = write_config(
        tmp / "c.yaml",
        {
            "storage": {"root": str(tmp / "store")},
            "ingest": {"shard_rows": 80},
            "encode": {"model": pairs["a"]["ctx"], "question_model": pairs["a"]["question"], "max_length": 48},
            "index": {"factory": "IVF4,Flat", "nprobe": 4, "queries": 30, "min_recall": 0.5},
            "serve": {
                "question_model": "/nowhere/a-fallback-no-version-uses",
                "reader_model": None,
                "port": port,
                "cache_dir": str(tmp / "cache"),
                "retriever_cpus": 0.2,
                "encoder_cpus": 0.2,
                "lexical_cpus": 0.1,
            },
            "nightly": {"serve_address": dashboard, "serve_timeout_s": 120},
        },
    )
    night = run_job("nightly", config, *_night(tmp, ROWS, "n1"), "nightly.serve_address=null")
    assert night.returncode == 0, night.stderr[-3000:]
    state = {
        "tmp": tmp,
        "port": port,
        "dashboard": dashboard,
        "config": config,
        "pairs": pairs,
        "url": f"http://127.0.0.1:{port}",
        "storage": Storage(str(tmp / "store")),
        "versions": [night.summary["version"]],
    }
    _deploy(state, None)
    _wait_for(state["url"], state["versions"][0], 180)
    yield state
    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    serve.shutdown()
    ray.shutdown()


def _night(tmp, rows, snapshot):
    path = tmp / f"psgs-{snapshot}.tsv"
    if not path.exists():
        write_tsv(path, rows)
    return [f"ingest.input={path}", f"ingest.snapshot={snapshot}"]


def _upgrade_night(app, pair: str, snapshot: str):
    """A night with the encoder pair `pair` while clients search: (the run, the clients, the answers before)."""
    before = _expected(app["url"])
    models = app["pairs"][pair]
    with _clients(app["url"]) as clients:
        time.sleep(1)
        run = run_job(
            "nightly",
            app["config"],
            *_night(app["tmp"], ROWS, snapshot),
            f"encode.model={models['ctx']}",
            f"encode.question_model={models['question']}",
        )
        time.sleep(1)
    assert run.returncode == 0, run.stderr[-3000:]
    app["versions"].append(run.summary["version"])
    return run, clients, before


def _answers_are_their_versions(clients: Load, expected: dict[str, dict[str, dict]]) -> None:
    """Every answer equals, hit for hit, what the version it names answers in its mode: no answer pairs one
    version's question vectors (or BM25 hits) with another version's index."""
    assert clients.failed() == []
    assert {a.body["index_version"] for a in clients.answers} == set(expected)
    for a in clients.answers:
        assert a.body == expected[a.body["index_version"]][a.request["mode"]]


SELF = ROWS[:40:5]  # passages whose own text is searched for


@pytest.fixture(scope="module")
def wide_night(app):
    """Night 2 moves the app to the 48-d encoder pair under load. What tests read of the live app is taken here,
    before a later night moves it on (tests run in any order)."""
    run, clients, before = _upgrade_night(app, "wide", "n2")
    texts = [text for _, text, _ in SELF]
    found = requests.post(f"{app['url']}/v1/search", json={"questions": texts, "k": 5}, timeout=60)
    return {
        "run": run,
        "clients": clients,
        "before": before,
        "after": _expected(app["url"]),
        "info": requests.get(f"{app['url']}/v1/index", timeout=30).json(),
        "self_search": (found.status_code, found.json()),
    }


def test_an_encoder_upgrade_night_under_load_fails_nothing_and_serves_the_new_pair(app, wide_night):
    old, new = app["versions"][:2]
    manifest = app["storage"].read_json(f"indexes/{new}/manifest.json")
    assert manifest["dim"] == 48 and manifest["encoder"]["question_model"] == app["pairs"]["wide"]["question"]
    assert wide_night["run"].summary["served"]["index_version"] == new
    assert wide_night["run"].summary["served"]["modes"] == list(MODES)
    assert all(a["index_version"] == old for a in wide_night["before"].values())
    assert all(a["index_version"] == new for a in wide_night["after"].values())
    _answers_are_their_versions(wide_night["clients"], {old: wide_night["before"], new: wide_night["after"]})
    info = wide_night["info"]
    assert (info["index_version"], info["question_model"], info["last_error"]) == (
        new,
        app["pairs"]["wide"]["question"],
        None,
    )


def test_a_passage_finds_itself_as_in_a_scratch_deployment_of_the_new_version(app, wide_night):
    """The app after the night answers a passage's own text as the new version with its own question encoder,
    loaded from scratch, does."""
    new = app["versions"][1]
    texts = [text for _, text, _ in SELF]
    status, answer = wide_night["self_search"]
    assert status == 200 and answer["index_version"] == new
    published = load_published(app["storage"], new, str(app["tmp"] / "scratch"))
    encoder = TextEncoder(EncoderSettings(app["pairs"]["wide"]["question"], "dpr", max_length=48, question=True))
    _, rows = published.search(encoder.encode(None, texts), 5)
    scratch = [published.passages(r[r >= 0]).column("id").to_pylist() for r in rows]
    assert [[hit["id"] for hit in hits] for hits in answer["results"]] == scratch
    wanted = [pid for pid, _, _ in SELF]
    found_self = sum(pid in ids for pid, ids in zip(wanted, scratch))
    assert found_self == sum(pid in [h["id"] for h in hits] for pid, hits in zip(wanted, answer["results"]))


@pytest.fixture(scope="module")
def same_dim_night(app, wide_night):
    """Night 3 moves to another 32-d pair: vectors of either would fit either index, so a mix would go unseen."""
    run, clients, before = _upgrade_night(app, "same", "n3")
    info = requests.get(f"{app['url']}/v1/index", timeout=30).json()
    return {"run": run, "clients": clients, "before": before, "after": _expected(app["url"]), "info": info}


def test_a_same_dimension_encoder_change_never_pairs_one_versions_vectors_with_anothers_index(app, same_dim_night):
    old, new = app["versions"][1:3]
    assert same_dim_night["before"]["dense"]["results"] != same_dim_night["after"]["dense"]["results"]
    _answers_are_their_versions(
        same_dim_night["clients"], {old: same_dim_night["before"], new: same_dim_night["after"]}
    )
    info = same_dim_night["info"]
    assert info["index_version"] == new and info["question_model"] == app["pairs"]["same"]["question"]


def test_a_pinned_older_version_is_served_in_every_mode_and_rolls_forward(app, same_dim_night):
    """`serve deploy` with the QAService's index_version set to night 1's version while LATEST names night 3's:
    dense, sparse and hybrid answers all come from it (with its own 32-d question encoder), nothing fails; then
    index_version null rolls the app forward to LATEST the same way."""
    first, latest = app["versions"][0], app["versions"][2]
    assert app["storage"].read_bytes("indexes/LATEST").decode().strip() == latest
    expected = {latest: _expected(app["url"])}
    with _clients(app["url"]) as pinning:
        time.sleep(1)
        _deploy(app, first)
        _wait_for(app["url"], first)
        expected[first] = _expected(app["url"])
        time.sleep(1)
    info = requests.get(f"{app['url']}/v1/index", timeout=30).json()
    assert (info["index_version"], info["target"], info["pinned"]) == (first, first, True)
    assert info["question_model"] == app["pairs"]["a"]["question"]
    assert {a["index_version"] for a in expected[first].values()} == {first}
    _answers_are_their_versions(pinning, expected)
    with _clients(app["url"]) as forward:
        time.sleep(1)
        _deploy(app, None)
        _wait_for(app["url"], latest)
        time.sleep(1)
    assert requests.get(f"{app['url']}/v1/index", timeout=30).json()["pinned"] is False
    _answers_are_their_versions(forward, expected)


def test_a_version_whose_question_model_is_missing_is_refused_and_the_night_fails(app, same_dim_night):
    """Night 4 records a question model that does not exist: the app refuses the version (the current one keeps
    answering in every mode, nothing fails), the nightly exits 1 naming the reason and sets the app back."""
    _wait_for(app["url"], app["versions"][2])
    current = app["versions"][2]
    before = _expected(app["url"])
    rows = [(pid, text + " four" if pid == "7" else text, title) for pid, text, title in ROWS]
    with _clients(app["url"]) as clients:
        run = run_job(
            "nightly",
            app["config"],
            *_night(app["tmp"], rows, "n4"),
            f"encode.model={app['pairs']['same']['ctx']}",
            "encode.question_model=/nowhere/question-encoder",
        )
        time.sleep(1)
    bad = app["storage"].read_bytes("indexes/LATEST").decode().strip()
    app["storage"].write_bytes("indexes/LATEST", f"{current}\n".encode())  # the build had moved it to `bad`
    assert run.returncode == 1 and bad != current
    assert "/nowhere/question-encoder" in run.summary["error"] and f"set back to {current}" in run.summary["error"]
    assert clients.failed() == []
    assert {a.body["index_version"] for a in clients.answers} == {current}
    info = requests.get(f"{app['url']}/v1/index", timeout=30).json()
    assert (info["index_version"], info["target"], info["last_error"]) == (current, current, None)
    assert _expected(app["url"]) == before
    deployed = AppClient(serve_address=app["dashboard"]).serve_details()
    ingress = deployed["applications"]["qa"]["deployed_app_config"]["deployments"]
    assert [d["user_config"] for d in ingress if d["name"] == "QAService"] == [{"index_version": current}]
