"""The HTTP layer's error contract in process (FastAPI's TestClient, no Ray Serve): whatever a deployment raises,
the answer is JSON with the request id and the status that fits, and the log line carries the same id. The real
app over real Serve answers the same way (test_serve, test_app_version)."""

import logging

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from pipeline.config import ServeConfig
from pipeline.serve.fanout import ShardsDisagree, ShardUnavailable
from pipeline.serve.metrics import Metrics
from pipeline.serve.routes import build_api
from pipeline.serve.versions import VersionRefused


class RaisingService:
    """Stands in for the QAService replica behind the routes: every call raises `error`."""

    def __init__(self, error: BaseException):
        self.error, self.settings, self.metrics = error, ServeConfig(), Metrics()

    async def search(self, questions, k, mode):
        raise self.error

    async def ask(self, question, k, top_answers, mode):
        raise self.error

    async def index(self, request):
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        (ValueError("cannot reshape array of size 384 into shape (768)"), 500, "internal error (ValueError)"),
        (KeyError("results"), 500, "internal error (KeyError)"),
        (ActorUnavailableError("gone", b"0" * 16), 503, "a backend replica is restarting"),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), 503, "a backend replica is restarting"),
        (ShardUnavailable("index shard 2 (Retriever2) did not answer"), 503, "index shard 2 (Retriever2)"),
        (ShardsDisagree("none holds v2 everywhere yet"), 503, "none holds v2 everywhere yet"),
        (VersionRefused("question encoder of v2 refused: OSError"), 503, "question encoder of v2 refused"),
        # as a deployment's handle raises it: Ray's task error, an instance of the cause too
        (
            RayTaskError("encode", "Traceback: /x.py", VersionRefused("v2 refused")).as_instanceof_cause(),
            503,
            "v2 refused; retry shortly",
        ),
    ],
)
def test_an_error_inside_the_app_is_json_with_the_request_id(error, status, says, caplog):
    client = TestClient(build_api(RaisingService(error), None), raise_server_exceptions=False)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        for method, path, body in (
            ("POST", "/v1/search", {"questions": ["q"]}),
            ("POST", "/v1/ask", {"question": "q"}),
            ("GET", "/v1/index", None),
        ):
            response = client.request(method, path, json=body, headers={"x-request-id": f"req-{path}"})
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.json()["request_id"] == f"req-{path}" and says in response.json()["error"]
            assert any(f"req-{path}" in record.getMessage() for record in caplog.records)
    if status == 500:
        assert "384" not in response.json()["error"]  # the details go to the log, not to the client
    assert "Traceback" not in response.json()["error"]
    metrics = client.get("/metrics").text
    assert f'qa_requests_total{{route="/v1/search",status="{status}"}} 1.0' in metrics


def test_a_request_without_an_id_gets_one_and_refusals_carry_it():
    client = TestClient(build_api(RaisingService(ValueError()), "secret"), raise_server_exceptions=False)
    refused = client.post("/v1/search", json={"questions": ["q"]})
    assert refused.status_code == 401 and len(refused.json()["request_id"]) == 32
    invalid = client.post("/v1/search", json={"questions": "no"}, headers={"Authorization": "Bearer secret"})
    assert invalid.status_code == 422 and invalid.json()["request_id"] != refused.json()["request_id"]
