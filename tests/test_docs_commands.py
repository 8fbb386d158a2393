"""Every shell block the README and docs/ mark as runnable on the demo store (```` ```sh demo ````) runs as
written: in a directory laid out as a clone after one demo night (`configs/` and `.demo/store`), with the
virtual environment's `python` first on PATH, each line exiting 0 and each job printing its JSON summary."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ingest.demo_corpus import write_demo_corpus

REPO = Path(__file__).resolve().parents[1]
RUNNABLE = re.compile(r"^```sh demo\n(.*?)^```", re.M | re.S)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def runnable_blocks() -> list[tuple[str, str]]:
    """(page, line) of every command in a block marked runnable, continuation lines joined."""
    found = []
    for page in PAGES:
        for block in RUNNABLE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split("  #", 1)[0].strip()
                if command:
                    found.append((str(page.relative_to(REPO)), command))
    return found


COMMANDS = runnable_blocks()


def test_the_docs_mark_commands_runnable_on_the_demo_store():
    pages = {page for page, _ in COMMANDS}
    assert "README.md" in pages and "docs/jobs.md" in pages and len(COMMANDS) >= 6, COMMANDS


@pytest.fixture(scope="module")
def demo_clone(tmp_path_factory, ray_address) -> dict:
    """A directory as a clone has it after one demo night: the configs, the corpus, and `.demo/store` with a
    published version (the nightly run as `make demo` runs it, MiniLM included)."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(REPO / "configs", root / "configs")
    write_demo_corpus(root / ".demo" / "corpus" / "psgs_demo.tsv.gz", max_passages=200)  # small: MiniLM, 25/s
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }
    night = subprocess.run(
        [sys.executable, "-m", "jobs.nightly", "--config", "configs/demo.yaml", "--set", "nightly.serve_address=null"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert night.returncode == 0, night.stderr[-3000:]
    return {"root": root, "env": env, "version": json.loads(night.stdout.splitlines()[-1])["version"]}


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c[:60]}" for p, c in COMMANDS])
def test_a_runnable_command_runs_as_written(demo_clone, page, command):
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=demo_clone["root"],
        env=demo_clone["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{page}: `{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
    if re.search(r"\bpython -m jobs\.(?!serve_config)", command):
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary.get("status", "ok") == "ok", summary
