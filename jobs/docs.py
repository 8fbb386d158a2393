"""Write the reference pages from the code: `docs/configuration.md` from the models of `pipeline/config/sections.py`,
`docs/api.md` and `docs/openapi.json` from the QA app's FastAPI schema (`make docs`).

    python -m jobs.docs [--check]

`--check` writes nothing and exits 1 naming each page that differs from what the code gives (the test suite runs
it). Needs no Ray, no storage and no model. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace

from pipeline.config import PipelineConfig, ServeConfig
from pipeline.config.reference import api_page, configuration_page
from pipeline.runtime.cli import exit_process
from pipeline.serve.examples import EXAMPLES
from pipeline.serve.metrics import Metrics
from pipeline.serve.routes import build_api

log = logging.getLogger("jobs.docs")
DOCS = Path(__file__).resolve().parent.parent / "docs"

CONFIGURATION = """
Every job, the QA app and the nightly read one deployment YAML (`configs/demo.yaml` and `configs/wiki21m.yaml`
are commented examples), a section per stage, with `--set dotted.key=value` overrides on the command line (the
value parsed as YAML). Unknown keys are errors, naming the key. Sizes in bytes take `2GiB`-style strings. The QA app
reads `storage`, `serve` and `index.lexical` (`docs/serving.md`, "Changing settings", says how an edit reaches it).
"""

API = """
The QA app's routes (`pipeline/serve/routes.py`); the app serves the same as OpenAPI at `/docs` and
`/openapi.json` (`docs/openapi.json` here). With `serve.api_key_env` set, every route but `/healthz` and
`/metrics` needs `Authorization: Bearer <key>`. Every error is JSON with the request's id (also its `x-request-id`
header and in Serve's logs), never a bare 500:

```json
{"error": "k=500 is over serve.max_k=100", "request_id": "3b9f0c0e-8c1d-4a47-9d55-0f6f6d1b2a7e"}
```

401 a bad or missing key; 413 a body, question or batch over its limit (`serve.max_body_bytes`,
`serve.max_question_chars`, `serve.max_batch_questions`); 422 malformed input, naming the field or the question;
503 when the app cannot answer now (its queue full, a part restarting or past `serve.shard_timeout_s`, no version
every part holds), to retry; 500 only for a bug, its traceback in the replica's log.
"""


def pages() -> dict[Path, str]:
    """Each reference page's path and the text the code gives it."""
    stand_in = SimpleNamespace(settings=ServeConfig(), metrics=Metrics())  # the schema needs no running app
    schema = build_api(stand_in, None).openapi()
    return {
        DOCS / "configuration.md": configuration_page(PipelineConfig, CONFIGURATION, "pipeline/config/sections.py"),
        DOCS / "api.md": api_page(schema, API, EXAMPLES, "pipeline/serve/routes.py, schemas.py, examples.py"),
        DOCS / "openapi.json": json.dumps(schema, indent=2, ensure_ascii=False) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = pages()
    stale = [str(p.relative_to(DOCS.parent)) for p, text in written.items() if not p.exists() or p.read_text() != text]
    if not args.check:
        for path, text in written.items():
            path.write_text(text, encoding="utf-8")
            log.info("wrote %s", path.relative_to(DOCS.parent))
    elif stale:
        log.error("out of date (run `python -m jobs.docs`): %s", ", ".join(stale))
    status = "stale" if args.check and stale else "ok"
    print(json.dumps({"status": status, "pages": [str(p.relative_to(DOCS.parent)) for p in written], "stale": stale}))
    return 1 if status == "stale" else 0


if __name__ == "__main__":
    exit_process(main())
