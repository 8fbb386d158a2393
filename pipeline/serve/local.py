"""Run the QA app on this machine's Ray for a moment (the demo): start, ask over real HTTP, shut down."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.runtime.raycluster import connect

log = logging.getLogger(__name__)


def post_json(url: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def ask_once(config: PipelineConfig, question: str, k: int = 3) -> dict[str, Any]:
    """Deploy the app, POST /v1/ask, and tear it down again."""
    from ray import serve

    from pipeline.serve.app import build_app

    connect()
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    try:
        serve.run(build_app(config), name="qa", route_prefix="/")
        url = f"http://{config.serve.host}:{config.serve.port}/v1/ask"
        answer = post_json(url, {"question": question, "k": k})
        log.info("asked %s: %r", url, question)
        for rank, passage in enumerate(answer["passages"], 1):
            log.info("  %d. [%s] %.3f %s…", rank, passage["title"], passage["score"], passage["text"][:90])
        for item in answer["answers"]:
            log.info("  answer: %r (%.2f, %s)", item["text"], item["score"], item["title"])
        return {
            "question": question,
            "index_version": answer["index_version"],
            "passages": [p["title"] for p in answer["passages"]],
            "answers": [a["text"] for a in answer["answers"]],
            "url": url,
        }
    finally:
        serve.shutdown()
