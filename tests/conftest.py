"""Session-wide real services: an S3 API server (moto) on 127.0.0.1 and, when asked for, one local Ray."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from hypothesis import settings

from kit.corpora import synthetic_rows
from kit.jobs import free_port, run_chain, write_config
from kit.localray import LocalRay
from kit.models import tiny_dpr
from kit.serveapp import tiny_qa_config

# Fake credentials for the local S3 server; tests check they never leak into logs or outputs.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIATESTKEY7Q3XZ",
    "AWS_SECRET_ACCESS_KEY": "test-secret-Zq8Jw2vN5mK1pL0r",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(FAKE_CREDENTIALS)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The session's Ray listens on 127.0.0.1 only; a token left in ~/.ray by another local Ray must not be demanded.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub: models are built or packaged
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TEST_API_KEY = "qa-test-key-5e1f"
os.environ["QA_TEST_API_KEY"] = TEST_API_KEY  # seen by Serve replicas started on the session's Ray
# Jobs run by tests never join whatever cluster `ray start` recorded on this machine: a private local Ray unless a
# test asks for the session's (ray_address sets RAY_ADDRESS to it).
os.environ["RAY_ADDRESS"] = "local"


logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log

# Property tests (hypothesis): the same examples on every run and no example database written into the repository;
# `pytest --hypothesis-profile=thorough` runs ten times as many, freshly drawn.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=100)
settings.register_profile("thorough", database=None, deadline=None, max_examples=1000)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on a freshly reset server."""
    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_endpoint: str):
    return boto3.client("s3", endpoint_url=s3_endpoint)


RAY_DASHBOARD_PORT = free_port()
RAY_TEMP_DIRS: list[Path] = []  # the session Ray's logs live here (the secrets test scans them)


@pytest.fixture(scope="session")
def ray_address() -> str:
    """One local Ray for the whole session; jobs started by tests join it through RAY_ADDRESS. Its dashboard
    (on RAY_DASHBOARD_PORT) serves the Serve REST API that the nightly job uses."""
    # Short: Ray's socket paths under it must fit in 107 bytes, which pytest's temp dirs of xdist workers do not.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    RAY_TEMP_DIRS.append(temp_dir)
    cluster = LocalRay(temp_dir, num_cpus=2, dashboard_port=RAY_DASHBOARD_PORT)
    os.environ["RAY_ADDRESS"] = cluster.start()
    yield cluster.address
    os.environ["RAY_ADDRESS"] = "local"
    cluster.stop()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Tiny DPR context/question encoders and reader (`kit.models`), loaded through the real `from_pretrained` path
    by the code under test."""
    return tiny_dpr(tmp_path_factory.mktemp("models"), ("ctx", "question", "reader"))


QA_ROWS = synthetic_rows(400, words=40)  # the serve tests' corpus


@pytest.fixture(scope="session")
def qa_store(tmp_path_factory, tiny_models, ray_address) -> Path:
    """The serve tests' corpus (`QA_ROWS`) published once a session by the jobs (ingest, encode, build_index) with
    the tiny DPR models on every side, an IVF-PQ index and BM25; each module serves a copy of its own (`qa_copy`)."""
    tmp = tmp_path_factory.mktemp("qa-store")
    run_chain(write_config(tmp / "c.yaml", tiny_qa_config(tmp, tiny_models, QA_ROWS, free_port())))
    return tmp / "store"


def qa_copy(store: Path, tmp: Path, models: dict[str, str], port: int, **serve) -> Path:
    """A copy of the published `store` under `tmp`, and the path of its config (`kit.serveapp.tiny_qa_config`, the
    app on `port`, `serve` its settings): a module changes its copy as it likes."""
    shutil.copytree(store, tmp / "store")
    return write_config(tmp / "c.yaml", tiny_qa_config(tmp, models, QA_ROWS, port, **serve))


# The modules that take minutes, longest first (a full run's --durations): they start first, so that the workers
# of `pytest -n 2` (make test) end together rather than one waiting on a long module started last.
LONGEST_FIRST = [
    "test_serve_shards.py",
    "test_retention.py",
    "test_serve.py",
    "test_nightly.py",
    "test_app_version.py",
    "test_index.py",
    "test_fuzz_http.py",
    "test_serve_settings.py",
    "test_encode_job.py",
    "test_cluster_jobs.py",
    "test_reliability.py",
    "test_autoscaling.py",
    "test_docs_commands.py",
    "test_evaluate.py",
    "test_ingest.py",
    "test_gpu_benchmark.py",
]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Modules in LONGEST_FIRST order, then the rest as collected; the order within each module is left alone
    (pytest-randomly's, with its seed)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_terminal_summary(terminalreporter, config) -> None:
    """The order is random (pytest-randomly): say how to replay it, so an order dependency can be reproduced."""
    seed = config.getoption("randomly_seed", None)
    if seed is not None and config.getoption("randomly_reorganize", True):
        terminalreporter.write_line(f"tests ran in random order: replay it with -p randomly --randomly-seed={seed}")


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """End the test process without interpreter finalization, once pytest has reported and decided the status.

    After a fully passing run the interpreter has died with SIGSEGV at exit, now and then: this
    process holds Ray's core worker, torch, FAISS and their thread pools, whose teardown order at exit is not
    ours to fix. The jobs themselves run in their own processes and exit normally; only this one skips it.
    """
    status = config.stash.get(_EXIT_STATUS, None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)


_EXIT_STATUS = pytest.StashKey[int]()
