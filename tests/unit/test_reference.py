"""The reference pages written from the code (`python -m jobs.docs`): committed as the code gives them, every
setting described, and the API's examples in the shape the routes answer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from jobs.docs import pages
from pipeline.config import PipelineConfig
from pipeline.config.reference import nested_models
from pipeline.serve.examples import EXAMPLES
from pipeline.serve.schemas import AskRequest, AskResponse, SearchRequest, SearchResponse

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("page", ["docs/configuration.md", "docs/api.md", "docs/openapi.json"])
def test_each_committed_page_is_what_the_code_writes(page):
    written = {str(path.relative_to(REPO)): text for path, text in pages().items()}
    assert (REPO / page).read_text() == written[page], f"{page} is out of date: run `python -m jobs.docs`"


def test_the_check_names_a_stale_page_and_exits_1(tmp_path, monkeypatch):
    import jobs.docs

    (tmp_path / "api.md").write_text("an old page\n")
    monkeypatch.setattr(jobs.docs, "DOCS", tmp_path)
    assert jobs.docs.main(["--check"]) == 1
    assert (tmp_path / "api.md").read_text() == "an old page\n"  # --check writes nothing
    assert jobs.docs.main([]) == 0 and jobs.docs.main(["--check"]) == 0


def _models() -> list[type[BaseModel]]:
    sections = [field.annotation for field in PipelineConfig.model_fields.values()]
    return sections + [inner for section in sections for inner in nested_models(section)]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_section_and_setting_says_what_it_is_for(model):
    assert len((model.__doc__ or "").split()) >= 5, f"{model.__name__} has no docstring"
    for name, field in model.model_fields.items():
        words = (field.description or "").replace("_", " ").lower().split()
        assert len(words) >= 3, f"{model.__name__}.{name} has no description worth the name: {field.description!r}"


def test_the_examples_are_what_the_routes_take_and_answer():
    SearchRequest.model_validate(EXAMPLES["POST /v1/search"]["request"])
    AskRequest.model_validate(EXAMPLES["POST /v1/ask"]["request"])
    search = SearchResponse.model_validate(EXAMPLES["POST /v1/search"]["answer"])
    ask = AskResponse.model_validate(EXAMPLES["POST /v1/ask"]["answer"])
    assert search.model_dump() == EXAMPLES["POST /v1/search"]["answer"]  # nothing the model would drop
    assert ask.model_dump() == EXAMPLES["POST /v1/ask"]["answer"]
    routes = {f"{m.upper()} {p}" for p, ms in pages_schema()["paths"].items() for m in ms}
    assert routes == set(EXAMPLES)


def pages_schema() -> dict:
    return json.loads((REPO / "docs" / "openapi.json").read_text())


def test_the_command_line_check_passes_on_the_committed_pages():
    done = subprocess.run(
        [sys.executable, "-m", "jobs.docs", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"status": "ok"' in done.stdout.strip().splitlines()[-1]
